"""samunet_ensemble: averaging .npz probabilities of prediction folders (nnunetv2's merge_files)."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import SimpleITK as sitk

from samunet.cli.ensemble import main
from samunet.errors import DatasetError
from samunet.evaluation.model_selection import ensemble_prediction_folders

LABELS = {"background": 0, "a": 1, "b": 2}
DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": 2, "file_ending": ".nii.gz"}
PLANS = {"image_reader_writer": "SimpleITKIO", "label_manager": "LabelManager", "configurations": {}}
SHAPE = (2, 4, 5)
PROPERTIES = {"sitk_stuff": {"spacing": (1.5, 1.5, 3.0), "origin": (1.0, 2.0, 3.0),
                             "direction": (1, 0, 0, 0, 1, 0, 0, 0, 1)}, "spacing": [3.0, 1.5, 1.5]}


def one_hot(labels: np.ndarray, weight: float) -> np.ndarray:
    """Probabilities that favour ``labels`` with ``weight`` and share the rest."""
    probabilities = np.full((3, *labels.shape), (1 - weight) / 2, dtype=np.float32)
    for value in range(3):
        probabilities[value][labels == value] = weight
    return probabilities


def write_folder(folder, cases: dict[str, np.ndarray], metadata: bool = True):
    folder.mkdir(parents=True)
    for case, probabilities in cases.items():
        np.savez_compressed(folder / f"{case}.npz", probabilities=probabilities)
        (folder / f"{case}.pkl").write_bytes(pickle.dumps(PROPERTIES))
    if metadata:
        (folder / "dataset.json").write_text(json.dumps(DATASET_JSON))
        (folder / "plans.json").write_text(json.dumps(PLANS))
    return folder


@pytest.fixture
def two_folders(tmp_path):
    ones, twos = np.ones(SHAPE, dtype=int), np.full(SHAPE, 2)
    first = write_folder(tmp_path / "m1", {"case_0": one_hot(ones, 0.6), "case_1": one_hot(twos, 0.4)})
    second = write_folder(tmp_path / "m2", {"case_0": one_hot(twos, 0.5), "case_1": one_hot(ones, 0.9)},
                          metadata=False)
    return first, second


def test_probabilities_are_averaged_and_written_with_the_geometry(two_folders, tmp_path):
    assert main(["-i", *map(str, two_folders), "-o", str(tmp_path / "out")]) == 0
    # case_0: class 1 gets (0.6 + 0.25) / 2, class 2 (0.2 + 0.5) / 2 -> 1; case_1: class 1 wins with 0.9
    for case, expected in (("case_0", 1), ("case_1", 1)):
        image = sitk.ReadImage(str(tmp_path / "out" / f"{case}.nii.gz"))
        assert np.all(sitk.GetArrayFromImage(image) == expected)
        assert image.GetSpacing() == pytest.approx((1.5, 1.5, 3.0)) and image.GetOrigin() == pytest.approx((1, 2, 3))
    assert json.loads((tmp_path / "out" / "dataset.json").read_text())["labels"] == LABELS


def test_a_folder_without_probabilities_is_a_one_line_error(two_folders, tmp_path, capsys):
    (tmp_path / "labels_only").mkdir()
    assert main(["-i", str(two_folders[0]), str(tmp_path / "labels_only"), "-o", str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err
    assert "labels_only holds no softmax probabilities" in message and "--save-probabilities" in message
    assert message.count("\n") == 1 and not (tmp_path / "out").exists()


def test_folders_that_disagree_on_cases_are_refused(two_folders, tmp_path, capsys):
    """Only the .npz of a case is missing (its .pkl and label map are there): the message names that file."""
    (two_folders[1] / "case_1.npz").unlink()
    assert main(["-i", *map(str, two_folders), "-o", str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err
    assert "Probability files missing: " + str(two_folders[1] / "case_1.npz") in message
    assert "--save_probabilities" in message and message.count("\n") == 1


@pytest.mark.parametrize("damage, kind", [
    ("truncated", "Probability files that cannot be read"),
    ("classes", "another number of classes than dataset.json's labels"),
    ("shape", "differ in shape between the folders"),
    ("pkl", "Probability files that cannot be read")])
def test_every_probability_file_is_checked_before_anything_is_written(two_folders, tmp_path, capsys, damage, kind):
    """A cut-off .npz or .pkl, 2 classes where dataset.json has 3, another shape: one line naming the file
    (not a BadZipFile / broadcast traceback), and no output folder."""
    damaged = two_folders[1] / "case_1.npz"
    if damage == "truncated":
        damaged.write_bytes(damaged.read_bytes()[:100])
    elif damage == "pkl":
        damaged = damaged.with_suffix(".pkl")
        damaged.write_bytes(damaged.read_bytes()[:10])
    else:
        probabilities = np.load(damaged)["probabilities"]
        np.savez_compressed(damaged, probabilities=probabilities[:2] if damage == "classes" else
                            probabilities[:, :, :3])
    assert main(["-i", *map(str, two_folders), "-o", str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err
    assert kind in message and str(damaged) in message and message.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_other_input_errors(two_folders, tmp_path):
    (two_folders[1] / "case_0.pkl").unlink()
    with pytest.raises(DatasetError, match="missing: .*m2/case_0.pkl"):
        ensemble_prediction_folders(two_folders, tmp_path / "out")
    with pytest.raises(DatasetError, match="at least two"):
        ensemble_prediction_folders(two_folders[:1], tmp_path / "out")
    with pytest.raises(DatasetError, match="is one of the inputs"):
        ensemble_prediction_folders(two_folders, two_folders[0])


def test_save_npz_writes_the_averaged_probabilities(two_folders, tmp_path):
    """nnUNetv2_ensemble's --save_npz: the averaged probabilities and the geometry beside each label map."""
    assert main(["-i", *map(str, two_folders), "-o", str(tmp_path / "out"), "--save_npz"]) == 0
    averaged = np.load(tmp_path / "out" / "case_1.npz")["probabilities"]
    first, second = (np.load(folder / "case_1.npz")["probabilities"] for folder in two_folders)
    assert np.allclose(averaged, (first + second) / 2)
    assert (tmp_path / "out" / "case_1.pkl").is_file()
