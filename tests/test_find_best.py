"""samunet_find_best on two miniature five-fold results folders (with validation probabilities)."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import SimpleITK as sitk

from samunet.cli.find_best import main

DATASET = "Dataset124_Tiny"
LABELS = {"background": 0, "liver": 1, "kidney": 2}
DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": 6, "file_ending": ".nii.gz"}
PLANS = {"image_reader_writer": "SimpleITKIO", "label_manager": "LabelManager", "configurations": {}}
CASES = [f"case_{i}" for i in range(6)]
SPLITS = [{"train": [c for c in CASES if c not in val], "val": val}
          for val in (CASES[0:2], CASES[2:3], CASES[3:4], CASES[4:5], CASES[5:6])]
PROPERTIES = {"sitk_stuff": {"spacing": (1.5, 1.5, 3.0), "origin": (0.0, 0.0, 0.0),
                             "direction": (1, 0, 0, 0, 1, 0, 0, 0, 1)}}


def _label_map(shift=0):
    array = np.zeros((4, 16, 16), dtype=np.uint8)
    array[1:3, 2:8, 2 + shift:8 + shift] = 1
    array[1:3, 10:14, 10:14] = 2
    return array


def _write(array, path):
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing((1.5, 1.5, 3.0))
    sitk.WriteImage(image, str(path))


def _probabilities(labels, weight):
    probabilities = np.full((3, *labels.shape), (1 - weight) / 2, dtype=np.float32)
    for value in range(3):
        probabilities[value][labels == value] = weight
    return probabilities


def _model(results, trainer, wrong_case, weight, npz=True):
    """Five folds whose validation is perfect except ``wrong_case`` (liver shifted, confidence ``weight``)."""
    model = results / DATASET / f"{trainer}__samunetPlans__2d"
    model.mkdir(parents=True)
    (model / "dataset.json").write_text(json.dumps(DATASET_JSON))
    (model / "plans.json").write_text(json.dumps(PLANS))
    for fold, split in enumerate(SPLITS):
        validation = model / f"fold_{fold}" / "validation"
        validation.mkdir(parents=True)
        (model / f"fold_{fold}" / "checkpoint_final.pth").write_bytes(b"")
        for case in split["val"]:
            labels = _label_map(2 if case == wrong_case else 0)
            _write(labels, validation / f"{case}.nii.gz")
            if npz:
                np.savez_compressed(validation / f"{case}.npz",
                                    probabilities=_probabilities(labels, weight if case == wrong_case else 0.9))
                (validation / f"{case}.pkl").write_bytes(pickle.dumps(PROPERTIES))
    return model


@pytest.fixture
def results(nnunet_folders):
    (nnunet_folders["nnUNet_raw"] / DATASET).mkdir()
    preprocessed = nnunet_folders["nnUNet_preprocessed"] / DATASET
    (preprocessed / "gt_segmentations").mkdir(parents=True)
    (preprocessed / "dataset.json").write_text(json.dumps(DATASET_JSON))
    (preprocessed / "splits_final.json").write_text(json.dumps(SPLITS))
    for case in CASES:
        _write(_label_map(), preprocessed / "gt_segmentations" / f"{case}.nii.gz")
    return nnunet_folders["nnUNet_results"]


def test_best_single_model_from_computed_and_stored_summaries(results, capsys):
    _model(results, "SAMedTrainer", "case_0", 0.6)
    stored = _model(results, "HSAMTrainer", "case_1", 0.6)
    (stored / "cv_summary_samunet.json").write_text(json.dumps({"overall": {"Dice": {"mean": 0.5}}}))
    assert main(["-d", "124", "-tr", "SAMedTrainer", "HSAMTrainer"]) == 0
    ranking = json.loads((results / DATASET / "find_best_samunet.json").read_text())
    names = [entry["name"] for entry in ranking["ranking"]]
    assert names == ["SAMedTrainer__samunetPlans__2d", "HSAMTrainer__samunetPlans__2d"]
    liver = (4 / 6 + 5) / 6
    assert ranking["best"]["foreground_dice"] == pytest.approx((liver + 1) / 2)
    assert (results / DATASET / "SAMedTrainer__samunetPlans__2d" / "cv_summary_samunet.json").is_file()
    out = capsys.readouterr().out
    assert "samunet_predict -i INPUT_FOLDER -o OUTPUT_FOLDER -d 124 -c 2d -tr SAMedTrainer -p samunetPlans " \
           "-f 0 1 2 3 4" in out
    assert "samunet_ensemble" not in out


def test_an_ensemble_that_fixes_both_models_wins(results, capsys):
    _model(results, "SAMedTrainer", "case_0", 0.6)
    _model(results, "HSAMTrainer", "case_1", 0.6)
    _model(results, "HSPSAMTrainer", "case_2", 0.6, npz=False)
    assert main(["-d", "124", "-tr", "SAMedTrainer", "HSAMTrainer", "HSPSAMTrainer", "--ensembles"]) == 0
    ranking = json.loads((results / DATASET / "find_best_samunet.json").read_text())
    best = ranking["best"]
    assert best["members"] == ["SAMedTrainer", "HSAMTrainer"] and best["foreground_dice"] == pytest.approx(1.0)
    assert len(ranking["ranking"]) == 4 and "HSPSAMTrainer" in ranking["left_out_of_ensembles"]
    assert (results / DATASET / "ensembles" / best["name"] / "case_0.nii.gz").is_file()
    out = capsys.readouterr().out
    assert "-tr SAMedTrainer -p samunetPlans -f 0 1 2 3 4 --save-probabilities" in out
    assert "samunet_ensemble -i OUTPUT_FOLDER_SAMedTrainer OUTPUT_FOLDER_HSAMTrainer -o OUTPUT_FOLDER" in out
    assert "not ensembled: HSPSAMTrainer" in out and "--npz" in out


def test_missing_model_is_a_one_line_error(results, capsys):
    _model(results, "SAMedTrainer", "case_0", 0.6)
    assert main(["-d", "124", "-tr", "SAMedTrainer", "HSAMTrainer"]) == 2
    message = capsys.readouterr().err
    assert "HSAMTrainer__samunetPlans__2d" in message and "samunet_train_cv" in message
