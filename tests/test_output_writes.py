"""Every write of the commands that write through nnunetv2's functions (issue 13, deliverable 3): a full disk,
during a write that Python reports or one that SimpleITK leaves cut off without an error, ends the command
with one line naming the file and exit code 2, leaves the previous outputs as they were and no cut-off
file under a final name, and no scratch folder."""
from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from samunet.cli.common import run_cli
from samunet.cli.ensemble import main as ensemble_main
from samunet.cli.find_best import main as find_best_main
from samunet.cli.postprocessing import main_apply, main_determine

LABELS = {"background": 0, "liver": 1, "kidney": 2}
DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": 6, "file_ending": ".nii.gz"}
PLANS = {"image_reader_writer": "SimpleITKIO", "label_manager": "LabelManager", "configurations": {"2d": {}}}
GEOMETRY = {"sitk_stuff": {"spacing": (1.5, 1.5, 3.0), "origin": (0.0, 0.0, 0.0),
                           "direction": (1, 0, 0, 0, 1, 0, 0, 0, 1)}}
CASES = [f"case_{i}" for i in range(6)]
SPLITS = [{"train": [c for c in CASES if c not in val], "val": val}
          for val in (CASES[0:2], CASES[2:3], CASES[3:4], CASES[4:5], CASES[5:6])]
DATASET = "Dataset125_Writes"
CROSSVAL = "crossval_results_folds_0_1_2_3_4"


def _labels(stray: bool = False) -> np.ndarray:
    array = np.zeros((4, 16, 16), dtype=np.uint8)
    array[1:3, 2:8, 2:8] = 1
    array[1:3, 10:14, 10:14] = 2
    if stray:  # a small liver component far from the liver
        array[3, 14:16, 0:2] = 1
    return array


def _write_labels(array: np.ndarray, path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.5, 1.5, 3.0))
    sitk.WriteImage(image, str(path))


def _write_probabilities(folder: Path, case: str, labels: np.ndarray, weight: float) -> None:
    probabilities = np.full((3, *labels.shape), (1 - weight) / 2, dtype=np.float32)
    for value in range(3):
        probabilities[value][labels == value] = weight
    np.savez_compressed(folder / f"{case}.npz", probabilities=probabilities)
    (folder / f"{case}.pkl").write_bytes(pickle.dumps(GEOMETRY))


def _metadata(folder: Path) -> None:
    (folder / "dataset.json").write_text(json.dumps(DATASET_JSON))
    (folder / "plans.json").write_text(json.dumps(PLANS))


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative name -> content), hidden ones included."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _hidden(folder: Path) -> list[str]:
    return [str(p.relative_to(folder)) for p in folder.rglob(".*")]


def _unchanged(folder: Path, previous: dict[str, bytes]) -> None:
    """``folder`` holds exactly its ``previous`` files and no scratch folder."""
    assert _snapshot(folder) == previous and not _hidden(folder)


@pytest.fixture
def disk_full_in_simpleitk(monkeypatch):
    """SimpleITK on a full disk: the label map of a case named ``failing`` is cut in half without an error
    (no free space is left); returns the setter of that case name."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    real_write, failing = SimpleITKIO.write_seg, []

    def write_seg(self, segmentation, output, properties):
        real_write(self, segmentation, output, properties)
        if failing and Path(output).name == failing[0]:
            Path(output).write_bytes(Path(output).read_bytes()[: os.path.getsize(output) // 2])

    monkeypatch.setattr(SimpleITKIO, "write_seg", write_seg)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 ** 9, 10 ** 9 - 4096, 4096))
    return failing.append


def _one_line(capsys, names: Path) -> str:
    error = capsys.readouterr().err
    assert error.startswith("error: no space left on the device holding ") and error.count("\n") == 1, error
    assert f"holding {names} " in error, error
    return error


# ---------------------------------------------------------------------------------------------- samunet_ensemble
def test_ensemble_on_a_full_disk_keeps_the_previous_output_and_writes_no_cut_off_label_map(
        tmp_path, disk_full_in_simpleitk, capsys):
    first, second, out = tmp_path / "m1", tmp_path / "m2", tmp_path / "out"
    for folder, weight in ((first, 0.9), (second, 0.6)):
        folder.mkdir()
        _metadata(folder)
        for case in CASES[:3]:
            _write_probabilities(folder, case, _labels(), weight)
    assert ensemble_main(["-i", str(first), str(second), "-o", str(out)]) == 0
    previous = _snapshot(out)
    disk_full_in_simpleitk("case_1.nii.gz")
    assert ensemble_main(["-i", str(first), str(second), "-o", str(out), "--save_npz"]) == 2
    _one_line(capsys, out / "case_1.nii.gz")
    _unchanged(out, previous)  # no file of the failed run: all or nothing


# ---------------------------------------------------------------------------------- samunet_apply_postprocessing
@pytest.fixture
def predictions(tmp_path) -> Path:
    folder = tmp_path / "pred"
    folder.mkdir()
    _metadata(folder)
    for case in CASES[:3]:
        _write_labels(_labels(stray=True), folder / f"{case}.nii.gz")
    return folder


def _keep_largest_liver(tmp_path) -> Path:
    from nnunetv2.postprocessing.remove_connected_components import \
        remove_all_but_largest_component_from_segmentation as keep_largest
    path = tmp_path / "postprocessing.pkl"
    path.write_bytes(pickle.dumps(([keep_largest], [{"labels_or_regions": 1}])))
    return path


def test_apply_postprocessing_on_a_full_disk_keeps_the_previous_output(predictions, tmp_path, disk_full_in_simpleitk,
                                                                       capsys):
    out = tmp_path / "pp"
    arguments = ["-i", str(predictions), "-o", str(out), "-pp_pkl_file", str(_keep_largest_liver(tmp_path))]
    assert main_apply(arguments) == 0
    previous = _snapshot(out)
    (predictions / "case_2.nii.gz").unlink()
    _write_labels(_labels(), predictions / "case_2.nii.gz")  # new input: the new output would differ
    disk_full_in_simpleitk("case_2.nii.gz")
    assert main_apply(arguments) == 2
    _one_line(capsys, out / "case_2.nii.gz")
    _unchanged(out, previous)


# ------------------------------------------------------------------------------ samunet_determine_postprocessing
def test_determine_postprocessing_on_a_full_disk_keeps_the_previous_decision(predictions, tmp_path, monkeypatch,
                                                                             capsys):
    """The disk fills while postprocessing.pkl is written (Python reports it, naming no file): the previous
    postprocessing.pkl, .json, summary.json and postprocessed/ stay as they were."""
    references = tmp_path / "ref"
    references.mkdir()
    for case in CASES[:3]:
        _write_labels(_labels(), references / f"{case}.nii.gz")
    arguments = ["-i", str(predictions), "-ref", str(references)]
    assert main_determine(arguments) == 0
    previous = _snapshot(predictions)
    assert {"postprocessing.pkl", "postprocessing.json", "summary.json", "postprocessed/case_0.nii.gz"} <= set(previous)
    real_dump = pickle.dump

    def dump_onto_a_full_disk(content, stream, *args, **kwargs):
        if getattr(stream, "name", "").endswith("postprocessing.pkl"):
            stream.write(pickle.dumps(content)[:10])
            stream.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_dump(content, stream, *args, **kwargs)

    monkeypatch.setattr(pickle, "dump", dump_onto_a_full_disk)
    assert main_determine(arguments) == 2
    _one_line(capsys, predictions / "postprocessing.pkl")
    _unchanged(predictions, previous)


def test_determine_postprocessing_decides_on_no_cut_off_label_map(predictions, tmp_path, disk_full_in_simpleitk,
                                                                  capsys):
    """SimpleITK cuts off a postprocessed candidate: the decision stops there (its metrics would have been
    computed from half a file) with one line, and nothing is written into the predictions folder."""
    references = tmp_path / "ref"
    references.mkdir()
    for case in CASES[:3]:
        _write_labels(_labels(), references / f"{case}.nii.gz")
    previous = _snapshot(predictions)
    disk_full_in_simpleitk("case_1.nii.gz")
    assert main_determine(["-i", str(predictions), "-ref", str(references)]) == 2
    _one_line(capsys, predictions / "postprocessed" / "temp" / "keep_largest_fg" / "case_1.nii.gz")
    _unchanged(predictions, previous)


# ---------------------------------------------------------------------------------------------- samunet_find_best
@pytest.fixture
def trained(nnunet_folders) -> Path:
    """Two five-fold models with validation predictions and probabilities, and the data set's references."""
    preprocessed = nnunet_folders["nnUNet_preprocessed"] / DATASET
    (nnunet_folders["nnUNet_raw"] / DATASET).mkdir()
    (preprocessed / "gt_segmentations").mkdir(parents=True)
    _metadata(preprocessed)
    (preprocessed / "samunetPlans.json").write_text(json.dumps(PLANS))
    (preprocessed / "splits_final.json").write_text(json.dumps(SPLITS))
    for case in CASES:
        _write_labels(_labels(), preprocessed / "gt_segmentations" / f"{case}.nii.gz")
    results = nnunet_folders["nnUNet_results"] / DATASET
    for trainer, weight in (("SAMedTrainer", 0.9), ("HSAMTrainer", 0.6)):
        model = results / f"{trainer}__samunetPlans__2d"
        model.mkdir(parents=True)
        _metadata(model)
        for fold, split in enumerate(SPLITS):
            validation = model / f"fold_{fold}" / "validation"
            validation.mkdir(parents=True)
            (model / f"fold_{fold}" / "checkpoint_final.pth").write_bytes(b"")
            for case in split["val"]:
                _write_labels(_labels(stray=case == "case_0"), validation / f"{case}.nii.gz")
                _write_probabilities(validation, case, _labels(), weight)
    return results


def test_find_best_on_a_full_disk_keeps_the_previous_folders(trained, monkeypatch, disk_full_in_simpleitk, capsys):
    """Two faults in turn: a copy into the cross-validation folder fills the disk (shutil names the
    source first, as its sendfile path does), then SimpleITK cuts off an ensembled label map."""
    arguments = [DATASET, "-tr", "SAMedTrainer", "HSAMTrainer"]
    assert find_best_main(arguments) == 0
    previous = _snapshot(trained)
    real_copy = shutil.copy

    def copy_onto_a_full_disk(source, target, **kwargs):
        if Path(source).name == "case_3.nii.gz":
            target = Path(target)
            target.write_bytes(Path(source).read_bytes()[:100])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(source), None, str(target))
        return real_copy(source, target, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(shutil, "copy", copy_onto_a_full_disk)
        assert find_best_main(arguments) == 2
    _one_line(capsys, trained / "SAMedTrainer__samunetPlans__2d" / CROSSVAL / "case_3.nii.gz")
    _unchanged(trained, previous)

    disk_full_in_simpleitk("case_4.nii.gz")
    assert find_best_main(arguments) == 2
    ensemble = "ensemble___SAMedTrainer__samunetPlans__2d___HSAMTrainer__samunetPlans__2d___0_1_2_3_4"
    _one_line(capsys, trained / "ensembles" / ensemble / "case_4.nii.gz")
    _unchanged(trained, previous)


# ---------------------------------------------------------------------------------------------- samunet_demo
def test_the_demo_report_on_a_full_disk_keeps_the_previous_report(tmp_path, monkeypatch, capsys):
    """progress.png is copied and metrics.json / .md written through temporary files."""
    from samunet.atomic_files import write_atomically
    from samunet.cli import demo
    training, report = tmp_path / "fold_0", tmp_path / "report"
    training.mkdir()
    (training / "progress.png").write_bytes(b"\x89PNG new" * 1000)
    summary = {"tolerance_mm": 2.0, "mean_per_class": {"liver": {"Dice": 0.9, "NSD": 0.8, "HD95": 1.0}},
               "foreground_mean": {"Dice": 0.9, "NSD": 0.8, "HD95": 1.0}}
    settings = {"trainer": "SAMedTrainer", "backbone": "vit_test", "weights": "none", "image_size": 64,
                "device": "cpu"}

    def write() -> None:
        demo.write_report(report, tmp_path / "raw", tmp_path / "pred", training, summary, DATASET_JSON,
                          {"predict": 1.0}, settings)

    write()
    previous = _snapshot(report)
    for full in ("progress.png", "metrics.json", "metrics.md"):
        def write_half(path, content, **kwargs):
            if Path(path).name != full:
                return write_atomically(path, content, **kwargs)

            def half(stream):
                stream.write(b"half")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return write_atomically(path, half, **kwargs)

        (training / "progress.png").write_bytes(b"\x89PNG newer" * 1000)
        summary["foreground_mean"]["Dice"] += 0.01
        with monkeypatch.context() as patched:
            patched.setattr(demo, "write_atomically", write_half, raising=False)
            patched.setattr("samunet.atomic_files.write_atomically", write_half)
            assert run_cli(lambda argv: write(), []) == 2
        _one_line(capsys, report / full)
        current = _snapshot(report)
        assert current[full] == previous[full] and not _hidden(report)
        previous = current
