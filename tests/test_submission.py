"""Tests of samunet_export_submission on miniature converted datasets and prediction folders."""
import json
import zipfile

import numpy as np
import pytest
import SimpleITK as sitk

from samunet.cli.export_submission import main
from samunet.preprocessing.converters.acdc import LABELS as ACDC_LABELS
from samunet.preprocessing.converters.synapse import LABELS as SYNAPSE_LABELS

SHAPE = (4, 16, 16)
SPACING = (1.5, 1.5, 5.0)
AMOS_LABELS = {"background": 0, **{f"organ{i}": i for i in range(1, 16)}}


def _write(array, path, spacing=SPACING, dtype=np.uint8):
    image = sitk.GetImageFromArray(np.asarray(array, dtype=dtype))
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


def _dataset(raw, name, labels, cases, **extra):
    folder = raw / name
    (folder / "imagesTs").mkdir(parents=True)
    for case in cases:
        _write(np.zeros(SHAPE), folder / "imagesTs" / f"{case}_0000.nii.gz", dtype=np.int16)
    dataset_json = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 0, "file_ending": ".nii.gz",
                    **extra}
    (folder / "dataset.json").write_text(json.dumps(dataset_json))
    return folder


def _predictions(folder, cases, value=1):
    folder.mkdir()
    for case in cases:
        array = np.zeros(SHAPE)
        array[1:3, 4:8, 4:8] = value
        _write(array, folder / f"{case}.nii.gz")
    return folder


ACDC_CASES = ["patient101_frame01", "patient101_frame14", "patient102_frame01", "patient102_frame09"]
ACDC_PHASES = {"patient101_frame01": "ED", "patient101_frame14": "ES", "patient102_frame01": "ED",
               "patient102_frame09": "ES"}


@pytest.fixture
def acdc(nnunet_folders, tmp_path):
    _dataset(nnunet_folders["nnUNet_raw"], "Dataset027_ACDC", ACDC_LABELS, ACDC_CASES, acdc_phases=ACDC_PHASES)
    return _predictions(tmp_path / "pred", ACDC_CASES, value=3)


def test_amos_zip_holds_results_folder(nnunet_folders, tmp_path):
    cases = ["amos_0500", "amos_0501"]
    _dataset(nnunet_folders["nnUNet_raw"], "Dataset218_AMOS2022_postChallenge_task1", AMOS_LABELS, cases)
    pred = _predictions(tmp_path / "pred", cases, value=15)
    (pred / "plans.json").write_text("{}")  # samunet_predict's side files are ignored
    assert main(["--challenge", "amos", "-i", str(pred), "-o", str(tmp_path / "out" / "amos.zip")]) == 0
    with zipfile.ZipFile(tmp_path / "out" / "amos.zip") as archive:
        assert sorted(archive.namelist()) == ["results/amos_0500.nii.gz", "results/amos_0501.nii.gz"]
        assert archive.read("results/amos_0500.nii.gz") == (pred / "amos_0500.nii.gz").read_bytes()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["amos.zip"]


def test_amos_needs_a_zip_path(nnunet_folders, tmp_path, capsys):
    _dataset(nnunet_folders["nnUNet_raw"], "Dataset218_AMOS2022_postChallenge_task1", AMOS_LABELS, ["amos_0500"])
    pred = _predictions(tmp_path / "pred", ["amos_0500"])
    assert main(["--challenge", "amos", "-i", str(pred), "-o", str(tmp_path / "out")]) == 2
    assert "ending in .zip" in capsys.readouterr().err


def test_acdc_files_are_named_by_phase(acdc, tmp_path):
    assert main(["--challenge", "acdc", "-i", str(acdc), "-o", str(tmp_path / "sub")]) == 0
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == [
        "patient101_ED.nii.gz", "patient101_ES.nii.gz", "patient102_ED.nii.gz", "patient102_ES.nii.gz"]
    assert (tmp_path / "sub" / "patient101_ES.nii.gz").read_bytes() == (acdc / "patient101_frame14.nii.gz").read_bytes()


def test_every_problem_is_listed_and_nothing_written(acdc, nnunet_folders, tmp_path, capsys):
    (acdc / "patient101_frame01.nii.gz").unlink()
    _write(np.zeros(SHAPE), acdc / "patient103_frame01.nii.gz")
    _write(np.zeros(SHAPE), acdc / "patient101_frame14.nii.gz", spacing=(1.0, 1.5, 5.0))
    _write(np.full(SHAPE, 4), acdc / "patient102_frame01.nii.gz")
    assert main(["--challenge", "acdc", "-i", str(acdc), "-o", str(tmp_path / "sub")]) == 2
    message = capsys.readouterr().err
    assert "4 problem(s)" in message and "nothing was written" in message and message.count("\n") == 1
    assert "Test images without a prediction: patient101_frame01. Fix:" in message
    assert "Predictions without a test image: patient103_frame01 (no such image" in message
    assert "patient101_frame14.nii.gz: spacing [1.0, 1.5, 5.0] differs" in message
    assert "patient102_frame01.nii.gz: label values [4]" in message
    assert not (tmp_path / "sub").exists()


def test_label_values_that_are_not_whole_numbers_are_refused(acdc, tmp_path, capsys):
    """A float prediction holding 2.5 (a linearly resampled label map) is not exported (it used to be)."""
    array = np.zeros(SHAPE)
    array[1, 4:6, 4:6] = 2.5
    _write(array, acdc / "patient101_frame14.nii.gz", dtype=np.float32)
    assert main(["--challenge", "acdc", "-i", str(acdc), "-o", str(tmp_path / "sub")]) == 2
    message = capsys.readouterr().err
    assert "patient101_frame14.nii.gz: label values 2.5 are not whole numbers" in message
    assert message.count("\n") == 1 and not (tmp_path / "sub").exists()


def test_a_cut_off_prediction_is_named(acdc, tmp_path, capsys):
    """A prediction cut off mid-copy: named as unreadable, not exported (SimpleITK reads it as zeros)."""
    damaged = acdc / "patient102_frame09.nii.gz"
    damaged.write_bytes(damaged.read_bytes()[:-40])
    assert main(["--challenge", "acdc", "-i", str(acdc), "-o", str(tmp_path / "sub")]) == 2
    message = capsys.readouterr().err
    assert f"Predictions that cannot be read: {damaged}" in message and message.count("\n") == 1


def test_acdc_label_convention_and_phases_are_checked(nnunet_folders, tmp_path, capsys):
    labels = {"background": 0, "LV": 1, "MYO": 2, "RV": 3}
    _dataset(nnunet_folders["nnUNet_raw"], "Dataset027_ACDC", labels, ["patient101_frame01", "patient001_frame01"],
             acdc_phases={"patient001_frame01": "ED"})
    pred = _predictions(tmp_path / "pred", ["patient101_frame01", "patient001_frame01"])
    assert main(["--challenge", "acdc", "-i", str(pred), "-o", str(tmp_path / "sub")]) == 2
    message = capsys.readouterr().err
    assert "1 RV, 2 MYO, 3 LV" in message
    assert "patient001_frame01: cannot be named for acdc: ACDC test patients are 101-150" in message
    assert "patient101_frame01: cannot be named for acdc: dataset.json's acdc_phases names no ED/ES" in message


def test_synapse_only_transunet_test_cases_and_zip_option(nnunet_folders, tmp_path, capsys):
    _dataset(nnunet_folders["nnUNet_raw"], "Dataset120_Synapse8", SYNAPSE_LABELS, ["img0001", "img0038"])
    pred = _predictions(tmp_path / "pred", ["img0001", "img0038"], value=8)
    assert main(["--challenge", "synapse", "-i", str(pred), "-o", str(tmp_path / "syn.zip")]) == 0
    with zipfile.ZipFile(tmp_path / "syn.zip") as archive:
        assert sorted(archive.namelist()) == ["img0001.nii.gz", "img0038.nii.gz"]
    assert main(["--challenge", "synapse", "-i", str(pred), "-o", str(tmp_path / "syn.zip")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    _dataset(nnunet_folders["nnUNet_raw"], "Dataset112_Synapse8", SYNAPSE_LABELS, ["img0005"])
    _predictions(tmp_path / "pred5", ["img0005"])
    assert main(["--challenge", "synapse", "-d", "112", "-i", str(tmp_path / "pred5"), "-o",
                 str(tmp_path / "s5")]) == 2
    assert "img0005: cannot be named for synapse: not one of the 12 TransUNet test cases" in capsys.readouterr().err


def test_missing_dataset_is_a_one_line_error(nnunet_folders, tmp_path, capsys):
    assert main(["--challenge", "synapse", "-i", str(tmp_path), "-o", str(tmp_path / "x")]) == 2
    message = capsys.readouterr().err
    assert "no dataset 120 found" in message and message.count("\n") == 1


def test_acdc_conversion_and_export_agree_on_phases(nnunet_folders, tmp_path):
    from samunet.cli.convert import main as convert
    source = tmp_path / "acdc"
    for part, number, ed, es in (("training", 1, 1, 5), ("testing", 101, 12, 3)):
        folder = source / part / f"patient{number:03d}"
        folder.mkdir(parents=True)
        (folder / "Info.cfg").write_text(f"ED: {ed}\nES: {es}\n")
        for frame in (ed, es):
            _write(np.zeros(SHAPE), folder / f"patient{number:03d}_frame{frame:02d}.nii.gz", dtype=np.int16)
            _write(np.full(SHAPE, 2), folder / f"patient{number:03d}_frame{frame:02d}_gt.nii.gz")
    assert convert(["acdc", str(source)]) == 0
    labels_ts = nnunet_folders["nnUNet_raw"] / "Dataset027_ACDC" / "labelsTs"
    assert main(["--challenge", "acdc", "-i", str(labels_ts), "-o", str(tmp_path / "sub.zip")]) == 0
    with zipfile.ZipFile(tmp_path / "sub.zip") as archive:
        assert sorted(archive.namelist()) == ["patient101_ED.nii.gz", "patient101_ES.nii.gz"]
        assert archive.read("patient101_ED.nii.gz") == (labels_ts / "patient101_frame12.nii.gz").read_bytes()


@pytest.mark.parametrize("output", ["sub", "sub.zip"])
def test_a_full_disk_names_the_output_and_leaves_nothing(acdc, tmp_path, monkeypatch, capsys, output):
    """ENOSPC while the submission is written: one line naming the output file, no temporary file left."""
    import errno
    import os

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr("shutil.copyfile", full)
    monkeypatch.setattr("zipfile.ZipFile.write", full)
    assert main(["--challenge", "acdc", "-i", str(acdc), "-o", str(tmp_path / "out" / output)]) == 2
    message = capsys.readouterr().err
    assert f"no space left on the device holding {tmp_path / 'out' / output}" in message
    assert message.count("\n") == 1 and list((tmp_path / "out").iterdir()) == []
