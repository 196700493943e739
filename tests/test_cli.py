"""Command-line parsing and the clear one-line errors of samunet's commands."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import SimpleITK as sitk

from samunet.cli.common import parse_fold, run_cli
from samunet.cli.plan_and_preprocess import main as plan_main
from samunet.cli.predict import build_parser as predict_parser
from samunet.cli.train import build_parser as train_parser, hyperparameters_from_args, main as train_main
from samunet.errors import DatasetError
from samunet.preprocessing.dataset_checks import validate_raw_dataset


@pytest.mark.parametrize("text, fold", [("0", 0), ("4", 4), ("fold0", 0), ("fold3", 3), ("fold_2", 2),
                                        ("all", "all"), ("FOLD1", 1)])
def test_folds_accept_numbers_fold_names_and_all(text, fold):
    assert parse_fold(text) == fold


@pytest.mark.parametrize("text", ["5", "fold5", "-1", "everything"])
def test_bad_folds_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_fold(text)


def test_train_cli_parses_the_nnunet_style_arguments_and_overrides():
    args = train_parser().parse_args(["218", "2d", "fold0", "-tr", "SAMedTrainer", "--c", "-device", "cpu",
                                      "--num-epochs", "3", "--iters-per-epoch", "7", "--lr", "0.02",
                                      "--backbone", "vit_b", "--weights", "/w/sam.pth", "--batch-size", "6"])
    assert (args.dataset, args.configuration, args.fold, args.trainer) == ("218", "2d", 0, "SAMedTrainer")
    assert args.continue_training and args.device == "cpu" and args.backbone == "vit_b"
    assert hyperparameters_from_args(args) == {"num_epochs": 3, "num_iterations_per_epoch": 7,
                                               "initial_lr": 0.02, "batch_size": 6, "weights": "/w/sam.pth"}


def test_predict_cli_takes_several_folds_and_tta_switch():
    args = predict_parser().parse_args(["-i", "in", "-o", "out", "-d", "Dataset218_AMOS2022_postChallenge_task1",
                                        "-c", "2d", "-tr", "SAMedTrainer", "-f", "0", "fold1", "2",
                                        "--disable-tta"])
    assert args.folds == [0, 1, 2] and args.disable_tta and args.dataset.startswith("Dataset218")


def test_unknown_trainer_lists_the_available_ones(planned_tiny_dataset, capsys):
    assert train_main(["991", "2d", "all", "-tr", "NoSuchTrainer"]) == 2
    error = capsys.readouterr().err
    assert "unknown trainer 'NoSuchTrainer'" in error and "SAMedTrainer" in error and error.count("\n") == 1


def test_unknown_dataset_id_is_a_clear_error(nnunet_folders, capsys):
    assert plan_main(["-d", "123"]) == 2
    error = capsys.readouterr().err
    assert "no dataset 123 found" in error and "nnUNet_raw=" in error and "Traceback" not in error


def test_training_an_unplanned_dataset_says_to_plan_first(nnunet_folders, capsys):
    (nnunet_folders["nnUNet_raw"] / "Dataset993_X").mkdir()
    assert train_main(["993", "2d", "0"]) == 2
    assert "run `samunet_plan_and_preprocess -d Dataset993_X` first" in capsys.readouterr().err


def _write(array, path, spacing=(1.0, 1.0, 2.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


def _raw_dataset(root, dataset_json):
    folder = root / "Dataset994_Bad"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    (folder / "dataset.json").write_text(json.dumps(dataset_json))
    return folder


def test_dataset_json_missing_required_fields_is_named(nnunet_folders):
    folder = _raw_dataset(nnunet_folders["nnUNet_raw"], {"labels": {"background": 0, "a": 1}})
    with pytest.raises(DatasetError, match=r"lacks the required field\(s\) \['numTraining', 'file_ending', "
                                           r"'channel_names'\]"):
        validate_raw_dataset(folder)


def test_image_and_label_of_different_geometry_are_reported_before_planning(nnunet_folders, capsys):
    folder = _raw_dataset(nnunet_folders["nnUNet_raw"], {
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, "numTraining": 1,
        "file_ending": ".nii.gz"})
    _write(np.zeros((4, 8, 8), np.int16), folder / "imagesTr" / "c_0000_0000.nii.gz")
    _write(np.zeros((4, 8, 8), np.uint8), folder / "labelsTr" / "c_0000.nii.gz", spacing=(1.0, 1.0, 3.0))
    assert run_cli(plan_main, ["-d", "994"]) == 2
    error = capsys.readouterr().err
    assert "case c_0000" in error and "does not match its label" in error and "[1.0, 1.0, 3.0]" in error
    assert list(nnunet_folders["nnUNet_preprocessed"].iterdir()) == []


def test_class_selection_is_refused_for_trainers_that_predict_all_classes(tmp_path, capsys, monkeypatch):
    from samunet.cli import predict

    class AllClasses:
        network = object()
        dataset_json = {"labels": {"background": 0, "liver": 1}}

    monkeypatch.setattr(predict, "build_predictor", lambda *args, **kwargs: AllClasses())
    monkeypatch.setattr(predict, "prepare_environment", lambda: None)
    monkeypatch.setattr("samunet.preprocessing.dataset_checks.resolve_dataset_name", lambda dataset: "Dataset991_X")
    assert predict.main(["-i", str(tmp_path), "-o", str(tmp_path / "out"), "-d", "991", "-tr", "SAMedTrainer",
                         "--classes", "liver"]) == 2
    assert "--classes needs a class-prompted trainer" in capsys.readouterr().err


def test_plan_options_reach_nnunetv2_with_nnunet_meanings(monkeypatch, nnunet_folders):
    """-npfp: fingerprint processes; -np: preprocessing processes; --clean: re-extract the fingerprint (else
    kept, as nnU-Net does); --no_pp: plan only; -overwrite_plans_name: the plans written and preprocessed;
    -gpu_memory_target / -preprocessor_name / -fpe: what the planner and the fingerprint get; --no_pbar."""
    import nnunetv2.experiment_planning.plan_and_preprocess_api as api

    import samunet.planners.sam_planner as sam_planner
    calls = {}

    class Planner:
        def __init__(self, dataset_id, **kwargs):
            calls["planner"] = (dataset_id, kwargs)

        def plan_experiment(self):
            calls["planned"] = True

    monkeypatch.setattr(api, "extract_fingerprint_dataset", lambda *a, **k: calls.setdefault("fingerprint", (a, k)))
    monkeypatch.setattr(api, "preprocess_dataset", lambda *a, **k: calls.setdefault("preprocess", (a, k)))
    monkeypatch.setattr(sam_planner, "SAMPlanner", Planner)
    monkeypatch.setattr("samunet.preprocessing.dataset_checks.resolve_dataset_name", lambda d: "Dataset218_X")
    monkeypatch.setattr("samunet.preprocessing.dataset_checks.validate_raw_dataset", lambda folder, **options: None)
    monkeypatch.setattr("samunet.cli.plan_and_preprocess.prepare_environment", lambda n: None)
    monkeypatch.setattr("samunet.preprocessing.completeness.start_preprocessing", lambda *a: None)
    monkeypatch.setattr("samunet.preprocessing.completeness.finish_preprocessing", lambda *a: None)
    argv = ["-d", "218", "-npfp", "3", "-np", "2", "-gpu_memory_target", "24", "-overwrite_plans_name", "P24",
            "-preprocessor_name", "DefaultPreprocessor", "-fpe", "DatasetFingerprintExtractor", "--no_pbar"]
    assert plan_main(argv) == 0
    (dataset_id, extractor), fingerprint = calls["fingerprint"]
    assert dataset_id == 218 and extractor.__name__ == "DatasetFingerprintExtractor"
    assert fingerprint["num_processes"] == 3 and fingerprint["clean"] is False
    assert fingerprint["show_progress_bar"] is False
    assert calls["planner"] == (218, {"gpu_memory_target_in_gb": 24.0, "preprocessor_name": "DefaultPreprocessor",
                                      "plans_name": "P24", "backbone": "litemedsam", "image_size": None,
                                      "depth": None})
    (preprocessed_id, plans_name), preprocess = calls["preprocess"]
    assert (preprocessed_id, plans_name, preprocess["num_processes"]) == (218, "P24", (2,))
    calls.clear()
    assert plan_main(["-d", "218", "--clean", "--no_pp"]) == 0
    assert calls["fingerprint"][1]["clean"] is True and "preprocess" not in calls and calls["planned"]


def test_unknown_nnunet_classes_are_refused_by_name(capsys, nnunet_folders):
    assert plan_main(["-d", "218", "-preprocessor_name", "NoSuchPreprocessor"]) == 2
    assert "no preprocessor class named 'NoSuchPreprocessor'" in capsys.readouterr().err


def test_train_options_reach_the_trainer(monkeypatch):
    """--disable_checkpointing and --val_best as nnU-Net means them; their conflict is refused."""
    from samunet.cli import train as train_module
    seen = {}
    monkeypatch.setattr(train_module, "prepare_environment", lambda: None)
    monkeypatch.setattr(train_module, "train", lambda *a, **k: seen.update(k))
    assert train_main(["218", "2d", "0", "--disable_checkpointing", "--val_best", "--val"]) == 0
    assert seen["disable_checkpointing"] and seen["val_best"] and seen["only_validate"]
    monkeypatch.undo()
    assert train_main(["218", "2d", "0", "--disable_checkpointing", "--val_best"]) == 2
