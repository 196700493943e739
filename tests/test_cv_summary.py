"""Tests of samunet_cv_summary on a miniature five-fold results folder."""
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from samunet.cli.cv_summary import main

DATASET = "Dataset123_Tiny"
MODEL = "SAMedTrainer__samunetPlans__2d"
LABELS = {"background": 0, "liver": 1, "kidney": 2}
CASES = [f"case_{i}" for i in range(6)]
SPLITS = [{"train": [c for c in CASES if c not in val], "val": val}
          for val in (CASES[0:2], CASES[2:3], CASES[3:4], CASES[4:5], CASES[5:6])]


def _write(array, path):
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing((1.5, 1.5, 3.0))
    sitk.WriteImage(image, str(path))


def _label_map(shift=0):
    array = np.zeros((4, 16, 16), dtype=np.uint8)
    array[1:3, 2:8, 2 + shift:8 + shift] = 1
    array[1:3, 10:14, 10:14] = 2
    return array


@pytest.fixture
def results(nnunet_folders):
    dataset_json = {"channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": 6, "file_ending": ".nii.gz"}
    (nnunet_folders["nnUNet_raw"] / DATASET).mkdir()
    preprocessed = nnunet_folders["nnUNet_preprocessed"] / DATASET
    (preprocessed / "gt_segmentations").mkdir(parents=True)
    (preprocessed / "dataset.json").write_text(json.dumps(dataset_json))
    (preprocessed / "splits_final.json").write_text(json.dumps(SPLITS))
    for case in CASES:
        _write(_label_map(), preprocessed / "gt_segmentations" / f"{case}.nii.gz")
    model = nnunet_folders["nnUNet_results"] / DATASET / MODEL
    for fold, split in enumerate(SPLITS):
        (model / f"fold_{fold}" / "validation").mkdir(parents=True)
        (model / f"fold_{fold}" / "checkpoint_final.pth").write_bytes(b"")
        for case in split["val"]:
            shift = 2 if case == "case_0" else 0
            _write(_label_map(shift), model / f"fold_{fold}" / "validation" / f"{case}.nii.gz")
    return model


def test_summary_pools_all_folds_with_mean_and_std(results, capsys):
    assert main(["-d", "123", "-tr", "SAMedTrainer"]) == 0
    summary = json.loads((results / "cv_summary_samunet.json").read_text())
    assert summary["num_cases"] == 6 and set(summary["per_case"]) == set(CASES)
    liver = summary["per_class"]["liver"]["Dice"]
    assert liver["mean"] == pytest.approx((4 / 6 + 5) / 6)
    assert liver["std"] == pytest.approx(np.std([4 / 6] + [1.0] * 5))
    assert summary["per_class"]["kidney"]["Dice"] == {"mean": 1.0, "std": 0.0}
    assert summary["overall"]["Dice"]["mean"] == pytest.approx((liver["mean"] + 1.0) / 2)
    assert summary["per_fold"]["fold_0"]["num_cases"] == 2
    assert summary["per_fold"]["fold_1"]["foreground_dice"] == 1.0
    markdown = (results / "cv_summary_samunet.md").read_text()
    assert "| kidney | 1.0000 ± 0.0000 |" in markdown and "| fold_4 | 1 | 1.0000 |" in markdown
    assert "| liver |" in capsys.readouterr().out


def test_missing_or_incomplete_folds_are_refused(results, capsys):
    import shutil
    shutil.rmtree(results / "fold_3")
    (results / "fold_1" / "validation" / "case_2.nii.gz").unlink()
    (results / "fold_4" / "checkpoint_final.pth").unlink()
    assert main(["-d", "123", "-tr", "SAMedTrainer"]) == 2
    message = capsys.readouterr().err
    assert "3 problem(s)" in message
    assert "fold 3:" in message and "does not exist" in message
    assert "fold 1: 1 of 1 validation case(s) have no prediction" in message and "case_2" in message
    assert "fold 4: no checkpoint_final.pth" in message
    assert message.count("\n") == 1  # one line, with the real names in the commands
    assert f"samunet_train {DATASET} 2d 3 -tr SAMedTrainer)" in message
    assert f"samunet_train {DATASET} 2d 1 -tr SAMedTrainer --val)" in message
    assert not (results / "cv_summary_samunet.json").exists()


def test_unknown_trainer_folder_is_a_clear_error(results, capsys):
    assert main(["-d", "123", "-tr", "HSAMTrainer", "-o", str(results / "x.json")]) == 2
    message = capsys.readouterr().err
    assert "HSAMTrainer__samunetPlans__2d" in message


def test_empty_classes_stay_nan(results):
    from samunet.evaluation.cv_summary import summarise_cross_validation
    dataset_json = {"labels": dict(LABELS, spleen=3), "file_ending": ".nii.gz"}
    summary = summarise_cross_validation(results, results.parents[2] / "nnUNet_preprocessed" / DATASET,
                                         dataset_json, output_json=results / "s.json")
    assert math.isnan(summary["per_class"]["spleen"]["Dice"]["mean"])
    assert "| spleen | n/a |" in (results / "s.md").read_text()


def test_metric_conventions_are_chosen_and_recorded_as_in_samunet_evaluate(results):
    assert main(["-d", "123", "-tr", "SAMedTrainer"]) == 0
    default = json.loads((results / "cv_summary_samunet.json").read_text())["metric_conventions"]
    assert (default["nsd"], default["hd95"]) == ("surface_area", "max_directed")
    assert main(["-d", "123", "-tr", "SAMedTrainer", "--nsd", "voxel", "--hd95", "pooled"]) == 0
    chosen = json.loads((results / "cv_summary_samunet.json").read_text())["metric_conventions"]
    assert (chosen["nsd"], chosen["hd95"]) == ("voxel", "pooled")
