"""samunet_evaluate on bad input (issue 13): one line naming the file and the fix, exit code 2, and
no summary written, or the previous one left as it was."""
import errno
import json

import numpy as np
import pytest
import SimpleITK as sitk

from samunet.cli.evaluate import main

DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "kidney": 2},
                "numTraining": 2, "file_ending": ".nii.gz"}
SPACING = (1.5, 1.5, 3.0)


def _label_map():
    array = np.zeros((4, 10, 12), dtype=np.uint8)
    array[1:3, 2:7, 2:7] = 1
    array[1:3, 7:9, 8:11] = 2
    return array


def _write(array, path, spacing=SPACING, origin=(0.0, 0.0, 0.0), direction=None):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    sitk.WriteImage(image, str(path))


@pytest.fixture
def case_folders(tmp_path):
    """ref/ and pred/ with two identical cases, and dataset.json."""
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    for case in ("case_0000", "case_0001"):
        _write(_label_map(), ref / f"{case}.nii.gz")
        _write(_label_map(), pred / f"{case}.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps(DATASET_JSON))
    return tmp_path, ref, pred


def _evaluate(tmp_path, ref, pred, *extra):
    return main([str(ref), str(pred), "-djfile", str(tmp_path / "dataset.json"), *extra])


def _one_line_error(capsys) -> str:
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and "Traceback" not in error, error
    return error


def _written(folder):
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".nii.gz"))


@pytest.mark.parametrize("field,change,shown", [
    ("size", {"array": np.zeros((4, 10, 13), dtype=np.uint8)}, "size ((13, 10, 4) vs (12, 10, 4))"),
    ("spacing", {"spacing": (1.5, 1.5, 2.0)}, "spacing ((1.5, 1.5, 2.0) vs (1.5, 1.5, 3.0))"),
    ("origin", {"origin": (0.0, 0.0, 7.5)}, "origin ((0.0, 0.0, 7.5) vs (0.0, 0.0, 0.0))"),
    ("direction", {"direction": (1, 0, 0, 0, -1, 0, 0, 0, -1)},
     "direction ((1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, -1.0) vs (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))"),
])
def test_prediction_on_another_grid_names_the_field(case_folders, capsys, field, change, shown):
    tmp_path, ref, pred = case_folders
    _write(change.pop("array", _label_map()), pred / "case_0001.nii.gz", **change)
    assert _evaluate(tmp_path, ref, pred) == 2
    error = _one_line_error(capsys)
    assert "case case_0001" in error and f"in {shown}" in error and "case_0000" not in error
    assert "resample the prediction onto the reference grid" in error
    assert _written(pred) == []


def test_undeclared_prediction_values_are_named_for_every_case(case_folders, capsys):
    tmp_path, ref, pred = case_folders
    for case, value in (("case_0000", 5), ("case_0001", 7)):
        array = _label_map()
        array[0, 0, 0] = value
        _write(array, pred / f"{case}.nii.gz")
    assert _evaluate(tmp_path, ref, pred) == 2
    error = _one_line_error(capsys)
    assert "2 problem(s)" in error and "Label values that dataset.json does not declare" in error
    assert "case_0000.nii.gz has [5] (declared: [0, 1, 2])" in error and "case_0001.nii.gz has [7]" in error
    assert _written(pred) == []


def test_predictions_in_another_format_than_file_ending(case_folders, capsys):
    tmp_path, ref, pred = case_folders
    (pred / "case_0001.nii.gz").unlink()
    _write(_label_map(), pred / "case_0001.nii")
    assert _evaluate(tmp_path, ref, pred) == 2
    assert "case_0001 (case_0001.nii is there, not in .nii.gz)" in _one_line_error(capsys)
    for path in list(pred.iterdir()):
        path.unlink()
        _write(_label_map(), pred / path.name.replace(".nii.gz", ".nrrd"))
    assert _evaluate(tmp_path, ref, pred) == 2
    error = _one_line_error(capsys)
    assert "no '*.nii.gz' predictions" in error and "case_0000.nrrd" in error and "file_ending is '.nii.gz'" in error


@pytest.mark.parametrize("kind,array,expected", [
    ("nan", np.where(_label_map() == 2, np.nan, _label_map()).astype(np.float32),
     "Non-finite values (NaN or inf) in label files: {path} has 12 of 480"),
    ("fraction", np.where(_label_map() == 2, 1.5, _label_map()).astype(np.float32),
     "Label values that are not whole numbers: {path} has 1.5"),
])
def test_non_finite_and_non_integer_label_values(case_folders, capsys, kind, array, expected):
    """In .mha (SimpleITK's NIfTI reader turns NaN into 0)."""
    tmp_path, ref, pred = case_folders
    for path in [*ref.iterdir(), *pred.iterdir()]:
        path.unlink()
        _write(_label_map(), path.parent / path.name.replace(".nii.gz", ".mha"))
    (tmp_path / "dataset.json").write_text(json.dumps(dict(DATASET_JSON, file_ending=".mha")))
    _write(array, ref / "case_0000.mha")
    assert _evaluate(tmp_path, ref, pred) == 2
    error = _one_line_error(capsys)
    assert expected.format(path=ref / "case_0000.mha") in error
    assert "save them again with an integer type" in error


def test_prediction_holding_the_ignore_label(case_folders, capsys):
    tmp_path, ref, pred = case_folders
    (tmp_path / "dataset.json").write_text(json.dumps(dict(DATASET_JSON, labels={**DATASET_JSON["labels"],
                                                                                 "ignore": 3})))
    array = _label_map()
    array[3] = 3
    _write(array, pred / "case_0000.nii.gz")
    assert _evaluate(tmp_path, ref, pred) == 2
    assert "Predictions holding the 'ignore' label" in _one_line_error(capsys)


@pytest.mark.parametrize("empty", ["ref", "pred"])
def test_empty_folders(case_folders, capsys, empty):
    tmp_path, ref, pred = case_folders
    folder = {"ref": ref, "pred": pred}[empty]
    for path in folder.iterdir():
        path.unlink()
    assert _evaluate(tmp_path, ref, pred) == 2
    role = {"ref": "references", "pred": "predictions"}[empty]
    assert f"the {role} folder {folder} is empty" in _one_line_error(capsys)


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_truncated_or_empty_file_is_named(case_folders, capsys, damage):
    tmp_path, ref, pred = case_folders
    path = pred / "case_0001.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    assert _evaluate(tmp_path, ref, pred) == 2
    error = _one_line_error(capsys)
    assert f"Files that cannot be read: {path}" in error and "complete copy" in error
    assert ("is empty (0 bytes)" in error) == (damage == "empty")
    assert _written(pred) == []


def test_an_entry_named_like_a_label_map_that_is_no_file_is_named_not_skipped(case_folders, capsys):
    """A broken symbolic link among the predictions (or a folder named like a label map) is refused, naming it;
    skipping it would score the other cases as if it had never been predicted."""
    tmp_path, ref, pred = case_folders
    (pred / "case_0001.nii.gz").unlink()
    (pred / "case_0001.nii.gz").symlink_to(tmp_path / "gone.nii.gz")
    assert _evaluate(tmp_path, ref, pred) == 2
    error = _one_line_error(capsys)
    assert f"{pred / 'case_0001.nii.gz'} is a broken symbolic link" in error
    assert _written(pred) == []


def test_rgb_png_label_is_refused(tmp_path, capsys):
    from skimage import io
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    grey = np.zeros((6, 8), dtype=np.uint8)
    grey[1:4, 2:6] = 1
    io.imsave(ref / "a.png", grey, check_contrast=False)
    io.imsave(pred / "a.png", np.stack([grey] * 3, axis=-1), check_contrast=False)
    (tmp_path / "dataset.json").write_text(json.dumps(dict(DATASET_JSON, file_ending=".png")))
    assert _evaluate(tmp_path, ref, pred) == 2
    assert f"several channels or values per pixel: {pred / 'a.png'} holds 3 channels" in _one_line_error(capsys)


def test_a_failed_write_leaves_the_previous_summary(case_folders, capsys, monkeypatch):
    """A full disk while the summary is written: one line naming the file, the old summary intact,
    no temporary file left."""
    import samunet.atomic_files as atomic_files
    tmp_path, ref, pred = case_folders
    assert _evaluate(tmp_path, ref, pred) == 0
    before = {name: (pred / name).read_bytes() for name in _written(pred)}
    _write(np.roll(_label_map(), 1, axis=2), pred / "case_0001.nii.gz")
    real_open = open

    def full_disk(file, *args, **kwargs):
        stream = real_open(file, *args, **kwargs)

        def write(data):
            stream.__class__.write(stream, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        stream.write = write
        return stream
    monkeypatch.setattr(atomic_files, "open", full_disk, raising=False)  # the temporary file's stream
    assert _evaluate(tmp_path, ref, pred) == 2
    error = _one_line_error(capsys)
    assert "no space left" in error and "summary_samunet.json" in error
    assert {name: (pred / name).read_bytes() for name in _written(pred)} == before
    assert not [p for p in pred.iterdir() if p.name.startswith(".")]


def test_output_that_is_not_json_is_refused(case_folders, capsys):
    tmp_path, ref, pred = case_folders
    assert _evaluate(tmp_path, ref, pred, "-o", str(tmp_path / "summary.md")) == 2
    assert "must end with .json" in _one_line_error(capsys)
    assert not (tmp_path / "summary.md").exists()


def test_label_values_that_are_not_integers_in_dataset_json(case_folders, capsys):
    tmp_path, ref, pred = case_folders
    (tmp_path / "dataset.json").write_text(json.dumps(dict(DATASET_JSON, labels={"background": 0, "liver": "1"})))
    assert _evaluate(tmp_path, ref, pred) == 2
    assert "dataset.json's label 'liver' has the value '1'" in _one_line_error(capsys)
