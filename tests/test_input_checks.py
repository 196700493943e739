"""Bad image and label files meet one set of checks (samunet.input_checks) at planning and at
prediction: each problem names the file, what is wrong and how to fix it, in one line, before
anything is written. Each test builds a miniature dataset or input folder in tmp_path."""
from __future__ import annotations

import gzip
import json
import os
import re
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

from samunet.cli.plan_and_preprocess import main as plan_main
from samunet.errors import DatasetError, InputFilesError
from samunet.input_checks import ModelGrid, prediction_cases
from samunet.preprocessing.dataset_checks import validate_raw_dataset

LABELS = {"background": 0, "organ": 1}
SHAPE = (4, 16, 16)  # numpy (z, y, x)


def _write(array, path: Path, *, spacing=None, origin=None, direction=None, vector=False) -> Path:
    image = sitk.GetImageFromArray(array, isVector=vector)
    if spacing is not None:
        image.SetSpacing(spacing)
    if origin is not None:
        image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def _label(shape=SHAPE, value=1) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    label[tuple(slice(s // 4, s // 2 + 1) for s in shape)] = value
    return label


def _dataset(root: Path, cases: dict, *, channel_names=("CT",), labels=LABELS, ending=".nii.gz",
             num_training=None, dataset_id=994, **extra) -> Path:
    """nnUNet_raw/Dataset994_Bad with ``cases``: {case: (list of image arrays, label array or None)}."""
    folder = root / f"Dataset{dataset_id:03d}_Bad"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for case, (images, label) in cases.items():
        for channel, image in enumerate(images):
            _write(image, folder / "imagesTr" / f"{case}_{channel:04d}{ending}")
        if label is not None:
            _write(label, folder / "labelsTr" / f"{case}{ending}")
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {str(i): name for i, name in enumerate(channel_names)}, "labels": labels,
        "numTraining": len(cases) if num_training is None else num_training, "file_ending": ending, **extra}))
    return folder


def _good_cases(n=2, channels=1) -> dict:
    rng = np.random.default_rng(0)
    return {f"case_{i:04d}": ([rng.normal(size=SHAPE).astype(np.float32) for _ in range(channels)], _label())
            for i in range(n)}


def _problems(folder, **kwargs) -> InputFilesError:
    with pytest.raises(InputFilesError) as raised:
        validate_raw_dataset(folder, **kwargs)
    return raised.value


def _kinds(error: InputFilesError) -> list[str]:
    return [problem.kind for problem in error.problems]


def _nothing_written(folders) -> bool:
    return not any(folders["nnUNet_preprocessed"].iterdir()) and not any(folders["nnUNet_results"].iterdir())


def _one_line_error(capsys) -> str:
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and "Traceback" not in error
    return error


# ---- row 1: an RGB png dataset (one CASE_0000.png holding R, G and B) -------------------------------

def _rgb_png(path: Path, rng, label=None, channels=3) -> Path:
    pixels = (rng.random((32, 32, channels)) * 60).astype(np.uint8)
    if label is not None:
        pixels[label > 0] += 150
    return _write(pixels, path, vector=True)


@pytest.fixture
def few_intensity_samples(monkeypatch):
    """nnunetv2's fingerprint samples 1e8 foreground voxels per channel whatever the dataset's size
    (minutes for 3 channels on a busy CPU); a 3-case miniature needs far fewer."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    original = DatasetFingerprintExtractor.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.num_foreground_voxels_for_intensitystats = 10_000
    monkeypatch.setattr(DatasetFingerprintExtractor, "__init__", init)


def test_an_rgb_png_dataset_counts_three_channels_and_is_planned(nnunet_folders, few_intensity_samples):
    rng = np.random.default_rng(1)
    folder = nnunet_folders["nnUNet_raw"] / "Dataset995_Rgb"
    for i in range(3):
        label = _label((32, 32))
        _rgb_png(folder / "imagesTr" / f"road_{i:03d}_0000.png", rng, label)
        _write(label, folder / "labelsTr" / f"road_{i:03d}.png")
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "R", "1": "G", "2": "B"}, "labels": {"background": 0, "road": 1},
        "numTraining": 3, "file_ending": ".png"}))
    assert validate_raw_dataset(folder)["file_ending"] == ".png"
    assert plan_main(["-d", "995", "--backbone", "vit_test", "--image-size", "64", "-np", "1", "--no_pp",
                      "--no_pbar"]) == 0
    plans = json.loads((nnunet_folders["nnUNet_preprocessed"] / "Dataset995_Rgb" / "samunetPlans.json").read_text())
    assert plans["image_reader_writer"] == "NaturalImage2DIO"
    assert len(plans["configurations"]["2d"]["normalization_schemes"]) == 3


def test_rgb_pngs_are_accepted_for_prediction_and_other_channel_counts_refused(tmp_path):
    rng = np.random.default_rng(2)
    model = {"channel_names": {"0": "R", "1": "G", "2": "B"}, "labels": LABELS, "file_ending": ".png"}
    for case in ("a", "b"):
        _rgb_png(tmp_path / "rgb" / f"{case}_0000.png", rng)
    assert [len(files) for files in prediction_cases(tmp_path / "rgb", model)] == [1, 1]

    _rgb_png(tmp_path / "rgba" / "a_0000.png", rng, channels=4)
    _write(np.zeros((32, 32), np.uint8), tmp_path / "rgba" / "b_0000.png")
    with pytest.raises(InputFilesError) as raised:
        prediction_cases(tmp_path / "rgba", model)
    message = str(raised.value)
    assert "a has 4 channel(s) (0000 holds 4) but dataset.json names 3 (0000 R, 0001 G, 0002 B)" in message
    assert "b has channel 0000 but dataset.json names 3" in message and "b_0001.png, b_0002.png missing" in message


# ---- row 2: a 2D image saved as a 3D volume whose singleton axis is in-plane ----------------------

def test_a_2d_image_with_an_in_plane_singleton_axis_is_refused_at_planning(nnunet_folders, capsys):
    strip = np.zeros((48, 48, 1), np.float32)  # sitk size (1, 48, 48): 48 slices of 48 x 1
    cases = {"img": ([strip], _label((48, 48, 1))), "ok": ([np.zeros((1, 48, 48), np.float32)], _label((1, 48, 48)))}
    _dataset(nnunet_folders["nnUNet_raw"], cases)
    assert plan_main(["-d", "994"]) == 2
    error = _one_line_error(capsys)
    assert "imagesTr/img_0000.nii.gz has size [1, 48, 48] (x, y, z): 48 slices of 48x1 pixels" in error
    assert "labelsTr/img.nii.gz has size [1, 48, 48]" in error and "ok_0000" not in error
    assert "sitk.GetImageFromArray(array.squeeze())" in error and _nothing_written(nnunet_folders)


def test_a_2d_image_with_an_in_plane_singleton_axis_is_refused_at_prediction(tmp_path):
    _write(np.zeros((48, 1, 48), np.float32), tmp_path / "in" / "img_0000.nii.gz")
    with pytest.raises(InputFilesError, match=r"img_0000.nii.gz has size \[48, 1, 48\] \(x, y, z\): 48 slices "
                                              r"of 1x48 pixels"):
        prediction_cases(tmp_path / "in", {"channel_names": {"0": "CT"}, "file_ending": ".nii.gz"})


# ---- row 3: label values not declared, not integers, negative; labels and regions misdeclared ------

def test_undeclared_label_values_are_refused_at_planning_naming_cases_and_values(nnunet_folders, capsys):
    labels = {"background": 0, **{f"organ{i}": i for i in range(1, 5)}}
    cases = _good_cases(3)
    cases["case_0001"] = (cases["case_0001"][0], _label(value=5))
    cases["case_0002"] = (cases["case_0002"][0], _label(value=4))
    _dataset(nnunet_folders["nnUNet_raw"], cases, labels=labels)
    assert plan_main(["-d", "994"]) == 2
    error = _one_line_error(capsys)
    assert "1 problem(s)" in error and "label values not declared in dataset.json" in error.lower()
    assert "labelsTr/case_0001.nii.gz has 5 (dataset.json declares 0..4)" in error and _nothing_written(nnunet_folders)


def test_label_files_are_read_in_a_process_pool_with_the_same_findings(tmp_path):
    cases = _good_cases(3)
    cases["case_0000"] = (cases["case_0000"][0], _label().astype(np.float32) * 1.5)
    cases["case_0002"] = (cases["case_0002"][0], _label().astype(np.int16) * -1)
    folder = _dataset(tmp_path, cases)
    in_this_process = _problems(folder, num_processes=1)
    start = time.perf_counter()
    in_pool = _problems(folder, num_processes=2)
    pool_seconds = time.perf_counter() - start
    assert in_pool.problems == in_this_process.problems
    assert set(_kinds(in_pool)) == {"label_not_integer", "label_negative"}
    message = str(in_pool)
    assert "labelsTr/case_0000.nii.gz has 1.5" in message and "labelsTr/case_0002.nii.gz has -1" in message
    assert pool_seconds < 30


@pytest.mark.parametrize("labels, extra, expected", [
    ({"background": 0, "a": 1, "b": 3}, {}, "labels are [0, 1, 3], not the consecutive 0..2"),
    ({"background": 0, "a": "1"}, {}, "label 'a' is '1', not an integer"),
    ({"background": 0, "a": -1}, {}, "label 'a' is -1; labels are never negative"),
    ({"background": 0, "a": 1, "ignore": 5}, {}, "the ignore label is 5; it must be the highest, 2"),
    ({"background": 0, "whole": [1, 2], "core": 2}, {}, "labels ['whole'] are regions (lists) but there is no "
                                                         "regions_class_order"),
    ({"background": 0, "whole": [1, 2], "core": 2}, {"regions_class_order": [1]},
     "regions_class_order is [1]; it needs one integer label per region (2: ['whole', 'core'])"),
    ({"background": 0, "whole": [1, 2], "core": 2}, {"regions_class_order": [1, 7]},
     "regions_class_order [1, 7] holds values that are not declared labels 1..2"),
    ({"background": 0, "whole": [], "core": 2}, {"regions_class_order": [1, 2]},
     "region 'whole' is [], not a non-empty list of integer labels"),
])
def test_misdeclared_labels_and_regions_are_named(tmp_path, labels, extra, expected):
    error = _problems(_dataset(tmp_path, _good_cases(1), labels=labels, **extra))
    assert _kinds(error) == ["dataset_json"] and expected in str(error)


def test_well_declared_regions_are_accepted(tmp_path):
    regions = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing": 3}
    label = np.zeros(SHAPE, np.uint8)
    label[:, :4], label[:, 4:8], label[:, 8:12] = 1, 2, 3
    cases = {"brats": ([np.ones(SHAPE, np.float32)], label)}
    validate_raw_dataset(_dataset(tmp_path, cases, labels=regions, regions_class_order=[1, 2, 3]))


# ---- row 5: non-finite voxels in images of every reader, at planning and prediction ---------------

@pytest.mark.parametrize("ending, reader", [(".mha", None), (".nrrd", None), (".nii", None),
                                            (".nii.gz", "NibabelIO")])
def test_non_finite_training_voxels_are_counted_per_file_and_nothing_is_written(nnunet_folders, capsys, ending,
                                                                               reader):
    """Voxels as nnunetv2's reader returns them: SimpleITKIO (ITK 5.4) already reads NaN/inf in NIfTI as 0,
    NibabelIO (.nii, or chosen with overwrite_image_reader_writer) keeps them, as SimpleITKIO does in .mha/.nrrd."""
    cases = _good_cases(3)
    cases["case_0001"][0][0][0, :2, :3] = np.nan  # 6 NaN
    cases["case_0002"][0][0][1, 0, 0] = np.inf
    _dataset(nnunet_folders["nnUNet_raw"], cases, ending=ending,
             **({"overwrite_image_reader_writer": reader} if reader else {}))
    assert plan_main(["-d", "994"]) == 2
    error = _one_line_error(capsys)
    assert f"Non-finite voxels (NaN or inf): imagesTr/case_0001_0000{ending} has 6 of 1024; " \
           f"imagesTr/case_0002_0000{ending} has 1 of 1024" in error
    assert "numpy.nan_to_num" in error and _nothing_written(nnunet_folders)


def test_non_finite_voxels_in_a_test_image_are_refused_at_prediction(tmp_path):
    image = np.zeros(SHAPE, np.float32)
    image[0, 0, :4] = np.nan
    _write(image, tmp_path / "in" / "scan_0000.mha")
    with pytest.raises(InputFilesError, match=r"Non-finite voxels \(NaN or inf\): scan_0000.mha has 4 of 1024"):
        prediction_cases(tmp_path / "in", {"channel_names": {"0": "CT"}, "file_ending": ".mha"})


# ---- row 6: geometry differences name the field, with both values ---------------------------------

@pytest.mark.parametrize("change, expected", [
    ({"direction": (-1, 0, 0, 0, 1, 0, 0, 0, 1)},
     "in direction ([1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0] vs [-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])"),
    ({"origin": (0.0, 0.0, 5.0)}, "in origin ([0.0, 0.0, 0.0] vs [0.0, 0.0, 5.0])"),
    ({"spacing": (1.0, 1.0, 3.0)}, "in spacing ([1.0, 1.0, 1.0] vs [1.0, 1.0, 3.0])"),
])
def test_a_label_on_another_grid_names_the_differing_field(tmp_path, change, expected):
    folder = _dataset(tmp_path, _good_cases(1))
    _write(_label(), folder / "labelsTr" / "case_0000.nii.gz", **change)
    error = str(_problems(folder))
    assert "case case_0000: image imagesTr/case_0000_0000.nii.gz does not match its label " \
           f"labelsTr/case_0000.nii.gz {expected}" in error
    assert error.count(" vs ") == 1


def test_channels_of_one_case_on_different_grids_are_named(tmp_path):
    folder = _dataset(tmp_path, _good_cases(1, channels=2), channel_names=("T1", "T2"))
    _write(np.zeros((4, 16, 12), np.float32), folder / "imagesTr" / "case_0000_0001.nii.gz")
    error = str(_problems(folder))
    assert "channel imagesTr/case_0000_0000.nii.gz does not match channel imagesTr/case_0000_0001.nii.gz in " \
           "size ([16, 16, 4] vs [12, 16, 4])" in error


def test_channels_of_one_case_on_different_grids_are_named_at_prediction(tmp_path):
    _write(np.zeros(SHAPE, np.float32), tmp_path / "in" / "p_0000.nii.gz")
    _write(np.zeros(SHAPE, np.float32), tmp_path / "in" / "p_0001.nii.gz", spacing=(0.5, 0.5, 1.0))
    with pytest.raises(InputFilesError, match=r"channel p_0000.nii.gz does not match channel p_0001.nii.gz in "
                                              r"spacing \(\[1.0, 1.0, 1.0\] vs \[0.5, 0.5, 1.0\]\)"):
        prediction_cases(tmp_path / "in", {"channel_names": {"0": "T1", "1": "T2"}, "file_ending": ".nii.gz"})


# ---- row 8: samunet_predict's input folder -------------------------------------------------------

MODEL = {"channel_names": {"0": "T1", "1": "T2"}, "labels": LABELS, "file_ending": ".nii.gz"}


def _input_folder(tmp_path, names) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in names:
        _write(np.zeros(SHAPE, np.float32), folder / name)
    return folder


def _predict_error(tmp_path, monkeypatch, capsys, folder, model=MODEL) -> str:
    """samunet_predict -i FOLDER with a stand-in model (the input is checked before any prediction)."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from samunet.cli import predict
    stand_in = SimpleNamespace(
        dataset_json=model, tile_step_size=0.5,
        plans_manager=SimpleNamespace(image_reader_writer_class=SimpleITKIO, transpose_forward=[0, 1, 2]),
        configuration_manager=SimpleNamespace(spacing=[1.0, 1.0], median_image_size_in_voxels=[16.0, 16.0],
                                              patch_size=[16, 16]))
    monkeypatch.setattr(predict, "build_predictor", lambda *args, **kwargs: stand_in)
    monkeypatch.setattr(predict, "prepare_environment", lambda: None)
    monkeypatch.setattr("samunet.preprocessing.dataset_checks.resolve_dataset_name", lambda dataset: "Dataset991_X")
    out = tmp_path / "out"
    assert predict.main(["-i", str(folder), "-o", str(out), "-d", "991", "-f", "0"]) == 2
    assert not out.exists()
    return _one_line_error(capsys)


@pytest.mark.parametrize("names, expected", [
    (["patient001.nii.gz", "patient002.nii.gz"],
     "patient001.nii.gz (expected patient001_0000.nii.gz); patient002.nii.gz (expected patient002_0000.nii.gz)"),
    (["a_0000.nii.gz", "a_0001.nii.gz", "notes_scan.nii.gz"], "notes_scan.nii.gz (expected notes_scan_0000.nii.gz)"),
    (["case_0001.nii.gz", "case_0002.nii.gz"], "case_0001.nii.gz (expected case_0001_0000.nii.gz; or channel 0001 "
                                               "of case 'case', whose channel 0000 is missing)"),
])
def test_prediction_files_without_channel_suffix_are_named_with_their_expected_names(tmp_path, monkeypatch, capsys,
                                                                                    names, expected):
    error = _predict_error(tmp_path, monkeypatch, capsys, _input_folder(tmp_path, names))
    assert "without nnU-Net's 4-digit channel suffix" in error and expected in error


def test_an_empty_prediction_folder_is_a_clear_error(tmp_path, monkeypatch, capsys):
    error = _predict_error(tmp_path, monkeypatch, capsys, _input_folder(tmp_path, []))
    assert "No images: " in error and "holds no images named CASE_0000.nii.gz" in error


def test_prediction_files_of_another_ending_are_named(tmp_path, monkeypatch, capsys):
    error = _predict_error(tmp_path, monkeypatch, capsys,
                           _input_folder(tmp_path, ["a_0000.nii", "a_0001.nii", "b_0000.nrrd"]))
    assert "a_0000.nii ends with .nii, dataset.json's file_ending is .nii.gz" in error
    assert "b_0000.nrrd ends with .nrrd" in error and "3 problem(s)" in error


@pytest.mark.parametrize("names, expected", [
    (["case_0001_0000.nii.gz"], "case_0001 has channel 0000 but dataset.json names 2 (0000 T1, 0001 T2): "
                                "case_0001_0001.nii.gz missing"),
    (["case_0001_0000.nii.gz", "case_0001_0001.nii.gz", "case_0001_0002.nii.gz"],
     "case_0001 has channels 0000,0001,0002 but dataset.json names 2 (0000 T1, 0001 T2): case_0001_0002.nii.gz "
     "extra"),
    (["case_0001_0000.nii.gz", "case_0001_0002.nii.gz"], "case_0001 has channels 0000,0002 but dataset.json names "
                                                         "2 (0000 T1, 0001 T2): case_0001_0001.nii.gz missing and "
                                                         "case_0001_0002.nii.gz extra"),
])
def test_missing_and_extra_channels_are_named_at_prediction(tmp_path, monkeypatch, capsys, names, expected):
    error = _predict_error(tmp_path, monkeypatch, capsys, _input_folder(tmp_path, names))
    assert expected in error


def test_a_missing_input_folder_is_named(tmp_path):
    with pytest.raises(DatasetError, match="input folder .*nowhere does not exist"):
        prediction_cases(tmp_path / "nowhere", MODEL)


# ---- further kinds of bad training data ----------------------------------------------------------

def test_mixed_endings_and_duplicate_cases_in_imagestr_are_named(tmp_path):
    folder = _dataset(tmp_path, _good_cases(2))
    _write(np.zeros(SHAPE, np.float32), folder / "imagesTr" / "case_0000_0000.nii")  # the same case again
    _write(np.zeros(SHAPE, np.float32), folder / "imagesTr" / "case_0009_0000.mha")
    error = _problems(folder)
    assert sorted(_kinds(error)) == ["duplicate", "ending"]
    assert "imagesTr/case_0000_0000.nii and case_0000_0000.nii.gz are the same case" in str(error)
    assert "imagesTr/case_0009_0000.mha ends with .mha, dataset.json's file_ending is .nii.gz" in str(error)


def test_unpaired_images_and_labels_and_a_wrong_numtraining_are_all_listed(tmp_path):
    folder = _dataset(tmp_path, _good_cases(3), num_training=5)
    (folder / "labelsTr" / "case_0001.nii.gz").unlink()
    _write(_label(), folder / "labelsTr" / "lonely.nii.gz")
    _write(_label(), folder / "labelsTr" / "case_0002_0000.nii.gz")
    error = _problems(folder)
    message = str(error)
    assert len(error.problems) == 4 and message.count("\n") == 0
    assert "case case_0001: no label labelsTr/case_0001.nii.gz" in message
    assert "labelsTr/lonely.nii.gz has no image imagesTr/lonely_0000.nii.gz" in message
    assert "labelsTr/case_0002_0000.nii.gz has no image imagesTr/case_0002_0000_0000.nii.gz (labels carry no " \
           "channel suffix: name it case_0002.nii.gz)" in message
    assert "dataset.json says numTraining=5 but imagesTr holds 3 cases" in message


def test_files_listed_in_dataset_json_are_checked_for_duplicates_and_absence(tmp_path):
    folder = _dataset(tmp_path, _good_cases(2))
    listed = {case: {"images": [f"imagesTr/{case}_0000.nii.gz"], "label": f"labelsTr/{case}.nii.gz"}
              for case in ("case_0000", "case_0001")}
    listed["case_0001"]["images"] = ["imagesTr/case_0000_0000.nii.gz"]
    listed["gone"] = {"images": ["imagesTr/gone_0000.nii.gz"], "label": "labelsTr/gone.nii.gz"}
    dataset_json = json.loads((folder / "dataset.json").read_text())
    (folder / "dataset.json").write_text(json.dumps({**dataset_json, "numTraining": 3, "dataset": listed}))
    message = str(_problems(folder))
    assert "imagesTr/case_0000_0000.nii.gz is listed 2 times in dataset.json's 'dataset'" in message
    assert "case gone: no image imagesTr/gone_0000.nii.gz" in message and "case gone: no label" in message


def test_missing_training_folders_are_named(tmp_path):
    folder = tmp_path / "Dataset994_Bad"
    folder.mkdir()
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": LABELS,
                                                     "numTraining": 0, "file_ending": ".nii.gz"}))
    assert "has no imagesTr and no labelsTr" in str(_problems(folder))


def test_4d_and_multi_component_images_are_refused(tmp_path):
    folder = _dataset(tmp_path, _good_cases(2))
    image_4d = sitk.JoinSeries([sitk.GetImageFromArray(np.zeros(SHAPE, np.float32))] * 2)
    sitk.WriteImage(image_4d, str(folder / "imagesTr" / "case_0000_0000.nii.gz"))
    _write(np.zeros((*SHAPE, 3), np.float32), folder / "imagesTr" / "case_0001_0000.nii.gz", vector=True)
    message = str(_problems(folder))
    assert "imagesTr/case_0000_0000.nii.gz is 4D (size [16, 16, 4, 2])" in message
    assert "imagesTr/case_0001_0000.nii.gz has 3 values per pixel (SimpleITKIO needs 1)" in message


def test_empty_truncated_and_unreadable_files_are_each_named(tmp_path):
    folder = _dataset(tmp_path, _good_cases(4))
    (folder / "imagesTr" / "case_0000_0000.nii.gz").write_bytes(b"")
    whole = (folder / "imagesTr" / "case_0001_0000.nii.gz").read_bytes()
    (folder / "imagesTr" / "case_0001_0000.nii.gz").write_bytes(whole[:len(whole) // 2])
    (folder / "labelsTr" / "case_0002.nii.gz").write_bytes(b"not an image at all" * 10)
    with gzip.open(folder / "imagesTr" / "case_0003_0000.nii.gz", "wb") as broken:
        broken.write(b"\0" * 400)
    error = _problems(folder)
    assert _kinds(error) == ["unreadable"] * 4
    message = str(error)
    assert "imagesTr/case_0000_0000.nii.gz is empty (0 bytes)" in message
    assert re.search(r"imagesTr/case_0001_0000.nii.gz is truncated: \d+ of 4448 bytes missing", message)
    for name in ("labelsTr/case_0002.nii.gz", "imagesTr/case_0003_0000.nii.gz"):
        assert f"{name} (SimpleITKIO: RuntimeError: Unable to determine ImageIO reader for \"{name}\")" in message
    assert "an empty or truncated file is usually an interrupted copy" in message


def test_every_problem_is_listed_up_to_a_limit_per_kind(tmp_path):
    cases = _good_cases(11)
    for images, _ in cases.values():
        images[0][0, 0, 0] = np.nan
    error = _problems(_dataset(tmp_path, cases, ending=".mha"))
    message = str(error)
    assert len(error.problems) == 11 and message.startswith(f"dataset {tmp_path / 'Dataset994_Bad'} has 11 problem(s)")
    assert "imagesTr/case_0007_0000.mha has 1 of 1024; and 3 more" in message and "case_0008" not in message


def test_a_good_dataset_passes(tmp_path):
    assert validate_raw_dataset(_dataset(tmp_path, _good_cases(2, channels=2), channel_names=("T1", "T2")))


# ---- entries named like images that are no readable file; -i given a file ---------------------------

def _not_files(folder: Path, prefix: str = "") -> None:
    """A broken symbolic link, a folder and a fifo, each named like an image, in ``folder``."""
    (folder / f"{prefix}link_0000.nii.gz").symlink_to(folder / "nowhere" / "x.nii.gz")
    (folder / f"{prefix}folder_0000.nii.gz").mkdir()
    os.mkfifo(folder / f"{prefix}pipe_0000.nii.gz")


def test_entries_that_are_not_readable_files_are_named_at_prediction(tmp_path):
    folder = _input_folder(tmp_path, ["case_0000_0000.nii.gz"])
    _not_files(folder)
    with pytest.raises(InputFilesError) as raised:
        prediction_cases(folder, {**MODEL, "channel_names": {"0": "CT"}})
    message = str(raised.value)
    assert _kinds(raised.value) == ["not_a_file"] * 3 and message.count("\n") == 0
    assert f"link_0000.nii.gz is a broken symbolic link (to {folder / 'nowhere' / 'x.nii.gz'}, which does not " \
           "exist)" in message
    assert "folder_0000.nii.gz is a folder, not a file" in message
    assert "pipe_0000.nii.gz is not a regular file (a fifo, socket or device)" in message


def test_entries_that_are_not_readable_files_are_named_at_planning(tmp_path):
    folder = _dataset(tmp_path, _good_cases(2))
    _not_files(folder / "imagesTr")
    (folder / "labelsTr" / "gone.nii.gz").symlink_to(tmp_path / "gone.nii.gz")
    error = _problems(folder)
    assert _kinds(error).count("not_a_file") == 4
    assert "imagesTr/folder_0000.nii.gz is a folder, not a file" in str(error)
    assert "labelsTr/gone.nii.gz is a broken symbolic link" in str(error)


def test_an_input_file_given_as_the_folder_is_named_as_a_file(tmp_path):
    image = _write(np.zeros(SHAPE, np.float32), tmp_path / "case_0000_0000.nii.gz")
    with pytest.raises(DatasetError, match=f"input {image} is a file, not a folder: -i takes the folder holding the "
                                           f"images .* give its folder {tmp_path}$"):
        prediction_cases(image, MODEL)


# ---- test images whose spacing does not fit the model's --------------------------------------------

GRID = ModelGrid(spacing=(1.0, 1.0), transpose_forward=(0, 1, 2), median_size=(16.0, 16.0), patch_size=(16, 16),
                 tile_step_size=0.5)


def test_a_test_image_that_would_resample_below_one_pixel_is_refused(tmp_path):
    folder = tmp_path / "in"
    _write(np.zeros(SHAPE, np.float32), folder / "case_0000_0000.nii.gz", spacing=(0.0015, 0.0015, 0.003))
    _write(np.zeros(SHAPE, np.float32), folder / "case_0001_0000.nii.gz")
    with pytest.raises(InputFilesError) as raised:
        prediction_cases(folder, {**MODEL, "channel_names": {"0": "CT"}}, model_grid=GRID)
    assert _kinds(raised.value) == ["spacing_too_fine"]
    assert "case_0000_0000.nii.gz (spacing [0.003, 0.0015, 0.0015] mm, the model's [1.0, 1.0] mm) would be " \
           "[4.0, 0.024, 0.024] pixels" in str(raised.value) and "check the header's units" in str(raised.value)


def test_a_test_image_far_larger_than_the_models_cases_is_a_warning_with_its_work(tmp_path, caplog):
    folder = tmp_path / "in"
    _write(np.zeros(SHAPE, np.float32), folder / "case_0000_0000.nii.gz", spacing=(20.0, 20.0, 1.0))
    _write(np.zeros(SHAPE, np.float32), folder / "case_0001_0000.nii.gz", spacing=(10.0, 10.0, 1.0))  # 10x: fine
    with caplog.at_level("WARNING", logger="samunet.input_checks"):
        cases = prediction_cases(folder, {**MODEL, "channel_names": {"0": "CT"}}, model_grid=GRID)
    assert len(cases) == 2 and len(caplog.records) == 1
    # 320 px at step 8 with a 16-px patch: 39 windows per axis, 39 * 39 * 4 slices
    assert "case_0000_0000.nii.gz (spacing [1.0, 20.0, 20.0] mm, the model's [1.0, 1.0] mm) resamples to " \
           "[4, 320, 320] voxels, more than 10x the model's median image size [16, 16]: 6084 sliding-window " \
           "steps" in caplog.text
