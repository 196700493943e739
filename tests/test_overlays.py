"""Overlays for any data set (samunet/reporting/overlays.py, samunet_overlays, samunet_predict --overlays,
samunet_train --overlays): the pixels of the written PNGs are read back and checked, not only the files."""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from samunet.reporting.overlays import ALPHA, choose_slices, label_colours, write_overlay

BACKGROUND, TISSUE = 20.0, 300.0  # an MRI-like image: dark background, a bright body (no HU)


def _rgb(png: Path) -> np.ndarray:
    return np.asarray(Image.open(png).convert("RGB")).astype(int)


def _blended(label: int, largest: int, grey: float = 1.0) -> np.ndarray:
    """The PNG colour of ``label`` drawn over a pixel of grey level ``grey``."""
    return np.round(255 * ((1 - ALPHA) * grey + ALPHA * label_colours(largest)[label])).astype(int)


def _where(rgb: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """(row, column) of the pixels within 2 of ``colour`` in every channel."""
    return np.argwhere(np.abs(rgb - colour).max(axis=-1) <= 2)


def _write(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


def _mri_case(folder: Path, num_classes: int = 4, depth: int = 10, spacing=(0.8, 0.8, 3.0)):
    """(image, reference, labels) of a 3D MRI-like case: class k is a block on slices 2..7; the reference
    holds every class, ``labels`` is its array."""
    image = np.full((depth, 40, 48), BACKGROUND, np.float32)
    image[:, 4:36, 4:44] = TISSUE
    labels = np.zeros(image.shape, np.uint8)
    for k in range(1, num_classes + 1):
        row, column = divmod(k - 1, 4)
        labels[2:8, 6 + 7 * row:11 + 7 * row, 6 + 9 * column:14 + 9 * column] = k
    return (_write(folder / "case_0000.nii.gz", image, spacing), _write(folder / "reference.nii.gz", labels, spacing),
            labels)


def test_a_3d_mri_case_with_four_classes_shows_reference_and_prediction_side_by_side(tmp_path):
    """Percentile window (background black, body white), each class in its colour, the class missing
    from the prediction only in the middle (reference) column, every class also in the right one."""
    image, reference, labels = _mri_case(tmp_path)
    prediction = labels.copy()
    prediction[prediction == 4] = 0
    _write(tmp_path / "prediction.nii.gz", prediction, (0.8, 0.8, 3.0))
    names = {"background": 0, "ventricles": 1, "pallidum": 2, "amygdala": 3, "brain stem": 4}
    png = write_overlay(image, reference, tmp_path / "prediction.nii.gz", tmp_path / "case.png", names)
    rgb = _rgb(png)
    width = rgb.shape[1]
    assert len(_where(rgb, np.array([0, 0, 0]))) > 500  # the background, black: the image's own percentiles
    for label in range(1, 5):
        columns = _where(rgb, _blended(label, 4))[:, 1]
        assert len(columns) > 100, label
        in_reference = ((columns > width / 3) & (columns < 2 * width / 3)).sum()
        in_prediction = (columns >= 2 * width / 3).sum()
        assert in_reference > 50 and (in_prediction > 50) == (label != 4), (label, in_reference, in_prediction)
        assert (columns < width / 3).sum() == 0  # the first column is the image alone


def test_pixels_keep_the_aspect_ratio_of_the_spacing(tmp_path):
    """A block of 10 x 10 voxels of 2 mm rows and 1 mm columns is drawn twice as high as wide."""
    image = np.full((1, 30, 30), TISSUE, np.float32)
    image[0, :, :5] = BACKGROUND
    labels = np.zeros(image.shape, np.uint8)
    labels[0, 10:20, 10:20] = 1
    _write(tmp_path / "image.nii.gz", image, (1.0, 2.0, 1.0))
    _write(tmp_path / "prediction.nii.gz", labels, (1.0, 2.0, 1.0))
    png = write_overlay(tmp_path / "image.nii.gz", None, tmp_path / "prediction.nii.gz", tmp_path / "o.png",
                        {"background": 0, "organ": 1})
    rgb = _rgb(png)
    found = _where(rgb[: int(rgb.shape[0] * 0.85)], _blended(1, 1))  # above the legend
    height, width = np.ptp(found, axis=0) + 1
    assert abs(height / width - 2.0) < 0.15, (height, width)


def test_sixteen_classes_get_sixteen_distinct_colours_without_a_reference(tmp_path):
    """label_colours stays distinct for 16 classes (and far beyond, no wrap-around), and a prediction alone
    (two columns: image, prediction) shows each of the 16 classes in its own colour."""
    colours = label_colours(60)[1:]
    distance = np.sqrt(((colours[:, None] - colours[None]) ** 2).sum(-1)) + np.eye(60) * 9
    assert distance[:16, :16].min() > 0.2 and distance.min() > 0.05
    image, _, labels = _mri_case(tmp_path, num_classes=16, depth=9)
    image_array = sitk.GetArrayFromImage(sitk.ReadImage(str(image)))
    image_array[:, 4:36, 4:44] = TISSUE
    png = write_overlay(image, None, _write(tmp_path / "prediction.nii.gz", labels, (0.8, 0.8, 3.0)),
                        tmp_path / "o.png", {"background": 0, **{f"structure {k}": k for k in range(1, 17)}})
    rgb = _rgb(png)
    for label in range(1, 17):
        columns = _where(rgb, _blended(label, 16))[:, 1]
        assert (columns > rgb.shape[1] / 2).sum() > 50 and (columns < rgb.shape[1] / 2).sum() == 0, label


def test_slices_with_the_most_foreground_are_chosen_apart_and_evenly_spaced_ones_added():
    prediction = np.zeros((40, 4, 4), np.uint8)
    for index, count in {5: 3, 6: 16, 7: 15, 20: 10, 30: 12, 31: 11}.items():
        prediction[index].flat[:count] = 1
    reference = np.zeros_like(prediction)
    reference[20] = 1  # 16 with the prediction's 10
    assert [i for i, _ in choose_slices([prediction, reference], 3)] == [6, 20, 30]
    assert [i for i, _ in choose_slices([prediction], 2, even_slices=3)] == [6, 10, 20, 29, 30]
    assert choose_slices([np.zeros((9, 4, 4))], 3) == [(4, "middle, no foreground")]


def _png_dataset(root: Path) -> dict:
    """A 2D data set of .png files (nnunetv2's NaturalImage2DIO): 2 cases, images, predictions, references."""
    dataset_json = {"channel_names": {"0": "microscopy"}, "labels": {"background": 0, "cell": 1, "nucleus": 2},
                    "numTraining": 2, "file_ending": ".png"}
    folders = {name: root / name for name in ("images", "predictions", "references")}
    for folder in folders.values():
        folder.mkdir()
    for case in ("cell_a", "cell_b"):
        image = np.full((32, 40), 200, np.uint8)
        image[:2] = 10
        labels = np.zeros((32, 40), np.uint8)
        labels[4:20, 4:20], labels[8:14, 24:36] = 1, 2
        Image.fromarray(image).save(folders["images"] / f"{case}_0000.png")
        Image.fromarray(labels).save(folders["predictions"] / f"{case}.png")
        Image.fromarray(labels).save(folders["references"] / f"{case}.png")
    (folders["predictions"] / "dataset.json").write_text(json.dumps(dataset_json))
    return folders


def test_samunet_overlays_draws_a_2d_png_data_set(tmp_path):
    from samunet.cli.overlays import main
    folders = _png_dataset(tmp_path)
    assert main(["-i", str(folders["images"]), "-p", str(folders["predictions"]), "-r", str(folders["references"]),
                 "-o", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cell_a.png", "cell_b.png"]
    rgb = _rgb(tmp_path / "out" / "cell_a.png")
    for label in (1, 2):
        columns = _where(rgb, _blended(label, 2))[:, 1]
        assert ((columns > rgb.shape[1] / 3) & (columns < 2 * rgb.shape[1] / 3)).sum() > 50, label
        assert (columns > 2 * rgb.shape[1] / 3).sum() > 50, label


BAD_INPUT = {
    "image missing": (lambda f: (f["images"] / "cell_b_0000.png").unlink(), "no image cell_b_0000.png"),
    "reference missing": (lambda f: (f["references"] / "cell_a.png").unlink(), "no reference cell_a.png"),
    "shape mismatch": (lambda f: Image.fromarray(np.zeros((8, 8), np.uint8)).save(f["predictions"] / "cell_a.png"),
                       "has shape (1, 8, 8) but its image"),
    "no dataset.json": (lambda f: (f["predictions"] / "dataset.json").unlink(), "no dataset.json found"),
    "unreadable image": (lambda f: (f["images"] / "cell_a_0000.png").write_bytes(b"not a png"), "cannot be read"),
}


@pytest.mark.parametrize("damage", sorted(BAD_INPUT))
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, damage, capsys):
    from samunet.cli.overlays import main
    folders = _png_dataset(tmp_path)
    make, expected = BAD_INPUT[damage]
    make(folders)
    assert main(["-i", str(folders["images"]), "-p", str(folders["predictions"]), "-r", str(folders["references"]),
                 "-o", str(tmp_path / "out"), "--cases", "cell_a", "cell_b"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error and expected in error, error
    assert not any(p.name.startswith(".") for p in (tmp_path / "out").glob("*")) if (tmp_path / "out").exists() \
        else True


def test_a_failing_write_leaves_no_partial_png(tmp_path, monkeypatch):
    """A full disk while the PNG is saved: no PNG (not even a cut-off one) and no temporary file."""
    import matplotlib.figure
    image, reference, _ = _mri_case(tmp_path)
    real_savefig = matplotlib.figure.Figure.savefig

    def savefig_on_a_full_disk(self, target, **kwargs):
        real_savefig(self, target, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig_on_a_full_disk)
    out = tmp_path / "out"
    with pytest.raises(OSError) as failed:
        write_overlay(image, None, reference, out / "case.png", {"background": 0, "a": 1})
    assert failed.value.errno == errno.ENOSPC and failed.value.filename == str(out / "case.png")
    assert list(out.iterdir()) == []


def test_samunet_predict_overlays_draws_every_prediction(model):  # noqa: F811
    """--overlays writes OUTPUT/overlays/CASE.png, the prediction alone on its image, for every case."""
    from samunet.cli.predict import main as predict_main
    from trainer_harness import PREDICTION_CASES
    arguments = ["-i", str(model["images"]), "-o", str(model["out"]), "-d", "999", "-f", "0", "-device", "cpu",
                 "--disable_tta", "-npp", "0", "-nps", "0", "--disable_progress_bar", "--overlays"]
    assert predict_main(arguments) == 0
    overlays = model["out"] / "overlays"
    assert sorted(p.name for p in overlays.iterdir()) == [f"{case}.png" for case in PREDICTION_CASES]
    (overlays / f"{PREDICTION_CASES[1]}.png").unlink()
    assert predict_main(arguments + ["--continue_prediction"]) == 0  # the overlays folder is no case output
    assert sorted(p.name for p in overlays.iterdir()) == [f"{case}.png" for case in PREDICTION_CASES]
    dataset_json = json.loads((model["out"] / "dataset.json").read_text())
    case = PREDICTION_CASES[0]
    again = write_overlay(model["images"] / f"{case}_0000.nii.gz", None, model["out"] / f"{case}.nii.gz",
                          model["out"] / "again" / f"{case}.png", dataset_json["labels"], dataset_json=dataset_json)
    assert np.array_equal(_rgb(overlays / f"{case}.png"), _rgb(again))  # the prediction alone, drawn as above


def test_validation_overlays_draw_the_raw_image_reference_and_prediction(planned_tiny_dataset, tmp_path,
                                                                         monkeypatch):
    """samunet_train --overlays: <fold>/validation/overlays/CASE.png from the raw image, gt_segmentations and
    the validation prediction; without the raw images, train() refuses before anything is written."""
    import nnunetv2.paths

    from samunet.cli.train import train
    from samunet.errors import DatasetError
    from samunet.reporting.overlays import write_validation_overlays
    dataset = "Dataset991_PhantomTiny"
    preprocessed = planned_tiny_dataset["nnUNet_preprocessed"] / dataset
    dataset_json = json.loads((preprocessed / "dataset.json").read_text())
    fold = tmp_path / "fold_0"
    (fold / "validation").mkdir(parents=True)
    case = sorted((preprocessed / "gt_segmentations").iterdir())[0]
    prediction = sitk.ReadImage(str(case))
    sitk.WriteImage(prediction, str(fold / "validation" / case.name))
    written = write_validation_overlays(fold, dataset, dataset_json, preprocessed / "gt_segmentations")
    assert [p.relative_to(fold).as_posix() for p in written] == \
        [f"validation/overlays/{case.name.removesuffix('.nii.gz')}.png"]
    rgb = _rgb(written[0])
    coloured = np.ptp(rgb, axis=-1) > 20  # the image is grey (R = G = B), labels add a colour
    third = rgb.shape[1] // 3
    assert sitk.GetArrayFromImage(prediction).any()
    assert not coloured[:, :third].any() and coloured[:, 2 * third:].sum() > 100  # image | reference | prediction
    raw_image = planned_tiny_dataset["nnUNet_raw"] / dataset / "imagesTr" / case.name.replace(".nii.gz", "_0000.nii.gz")
    again = write_overlay(raw_image, case, fold / "validation" / case.name, tmp_path / "again" / written[0].name,
                          dataset_json["labels"], dataset_json=dataset_json)
    assert np.array_equal(rgb, _rgb(again))  # the raw image, the reference and the prediction
    empty = tmp_path / "no_raw"
    empty.mkdir()
    monkeypatch.setattr(nnunetv2.paths, "nnUNet_raw", str(empty))
    results = planned_tiny_dataset["nnUNet_results"] / dataset
    before = sorted(results.rglob("*")) if results.exists() else []
    def never_train(*args, **kwargs):
        raise AssertionError("the training started although its overlays cannot be drawn")

    monkeypatch.setattr("samunet.cli.train._set_up_trainer", never_train)
    with pytest.raises(DatasetError, match="imagesTr does not exist"):
        train(991, "2d", "all", "SAMedTrainer", overlays=True)
    assert (sorted(results.rglob("*")) if results.exists() else []) == before
    shutil.rmtree(fold)


def test_the_demo_report_draws_each_test_case_in_the_ct_window(tmp_path):
    """samunet_demo's report: overlay_<case>.png per test case, soft tissue (40 HU) mid-grey in the CT window."""
    from samunet.cli import demo
    raw, predictions, training = tmp_path / "raw", tmp_path / "pred", tmp_path / "fold_0"
    for folder in (raw / "imagesTs", raw / "labelsTs", predictions, training):
        folder.mkdir(parents=True)
    image = np.full((4, 24, 24), -1000.0, np.float32)
    image[:, 2:22, 2:22] = 40.0
    labels = np.zeros(image.shape, np.uint8)
    labels[1:3, 6:16, 6:16] = 1
    _write(raw / "imagesTs" / "phantom_000_0000.nii.gz", image)
    _write(raw / "labelsTs" / "phantom_000.nii.gz", labels)
    _write(predictions / "phantom_000.nii.gz", labels)
    summary = {"tolerance_mm": 2.0, "mean_per_class": {"liver": {"Dice": 1.0, "NSD": 1.0, "HD95": 0.0}},
               "foreground_mean": {"Dice": 1.0, "NSD": 1.0, "HD95": 0.0}}
    settings = {"trainer": "SAMedTrainer", "backbone": "vit_test", "weights": "none", "image_size": 64,
                "device": "cpu"}
    dataset_json = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1}, "numTraining": 1,
                    "file_ending": ".nii.gz"}
    demo.write_report(tmp_path / "report", raw, predictions, training, summary, dataset_json, {"predict": 1.0},
                      settings)
    rgb = _rgb(tmp_path / "report" / "overlay_phantom_000.png")
    assert len(_where(rgb, _blended(1, 1, grey=0.5))) > 200 and len(_where(rgb, np.array([128, 128, 128]))) > 200


@pytest.mark.parametrize("spelling", ["references", "predictions", "images", "symlink to references",
                                      "relative path of predictions"])
def test_an_output_folder_holding_input_files_is_refused_before_anything_is_written(tmp_path, spelling, capsys,
                                                                                   monkeypatch):
    """-o onto the label maps of a .png data set would replace CASE.png by its picture: refused, any spelling
    of the folder (symbolic link, relative path), exit 2, every input file byte for byte as it was."""
    from samunet.cli.overlays import main
    folders = _png_dataset(tmp_path)
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    output = {"references": folders["references"], "predictions": folders["predictions"],
              "images": folders["images"]}.get(spelling)
    if spelling == "symlink to references":
        output = tmp_path / "link"
        output.symlink_to(folders["references"], target_is_directory=True)
    elif spelling == "relative path of predictions":
        monkeypatch.chdir(folders["images"])
        output = Path("..") / "images" / ".." / "predictions"
    assert main(["-i", str(folders["images"]), "-p", str(folders["predictions"]), "-r", str(folders["references"]),
                 "-o", str(output)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error and "choose another output folder" in error, error
    assert str(output) in error
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == before


def test_prediction_overlays_refuse_an_overlays_file_in_the_output_folder(tmp_path):
    """samunet_predict --overlays writes into OUTPUT/overlays/: a file of that name is refused, not replaced."""
    from samunet.errors import DatasetError
    from samunet.reporting.overlays import write_prediction_overlays
    folders = _png_dataset(tmp_path)
    (folders["predictions"] / "overlays").write_bytes(b"a user's file")
    dataset_json = json.loads((folders["predictions"] / "dataset.json").read_text())
    with pytest.raises(DatasetError, match="is a file; choose another output folder"):
        write_prediction_overlays(folders["images"], folders["predictions"], dataset_json)
    assert (folders["predictions"] / "overlays").read_bytes() == b"a user's file"


def test_an_unreadable_case_leaves_no_overlay_written(tmp_path, capsys):
    """A truncated prediction of the last case: exit 2, the error says nothing was written, and no PNG of the
    cases before it (nor a staging file) is in the output folder."""
    from samunet.cli.overlays import main
    folders = _png_dataset(tmp_path)
    truncated = folders["predictions"] / "cell_b.png"
    truncated.write_bytes(truncated.read_bytes()[:50])
    out = tmp_path / "out"
    assert main(["-i", str(folders["images"]), "-p", str(folders["predictions"]), "-o", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert "cell_b.png cannot be read" in error and "no overlay was written" in error and "\n" not in error, error
    assert not out.exists()  # the folder the command made is not left behind either


@pytest.mark.parametrize("overlays", [False, True])
def test_a_new_validation_removes_the_overlays_of_the_earlier_one(planned_tiny_dataset, tmp_path, monkeypatch,
                                                                  overlays):
    """--val after a --val --overlays: validation/overlays/*.png of the earlier predictions are removed before
    the new validation (and drawn again with --overlays); a file the user put there stays."""
    from types import SimpleNamespace

    from samunet.cli import train as train_module
    fold = tmp_path / "fold_all"
    stale = fold / "validation" / "overlays"
    stale.mkdir(parents=True)
    for name in ("case_0000.png", "case_0002.png"):
        (stale / name).write_bytes(b"an earlier validation's picture")
    (stale / "notes.txt").write_text("the user's")
    seen = {}
    trainer = SimpleNamespace(output_folder=str(fold), local_rank=0, print_to_log_file=lambda *a, **k: None,
                              dataset_json={}, preprocessed_dataset_folder_base=str(tmp_path),
                              perform_actual_validation=lambda *a: seen.update(pngs=sorted(stale.glob("*.png"))))
    monkeypatch.setattr(train_module, "_set_up_trainer", lambda *a, **k: trainer)
    drawn = []
    monkeypatch.setattr("samunet.reporting.overlays.write_validation_overlays", lambda *a: drawn.append(a))
    train_module.train(991, "2d", "all", "SAMedTrainer", only_validate=True, overlays=overlays)
    assert seen["pngs"] == [] and sorted(p.name for p in stale.iterdir()) == ["notes.txt"]
    assert len(drawn) == int(overlays)
