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


@pytest.mark.parametrize("command", ["train", "train_cv", "demo"])
def test_new_options_take_nnunets_underscore_spellings(command):
    """--max_minutes, --labelled_fraction, --labelled_unit, --labelled_seed, --num_epochs, --iters_per_epoch,
    --batch_size as nnU-Net users type them (nnU-Net's --val_best, --disable_checkpointing)."""
    from samunet.cli import demo, train, train_cv
    parser = {"train": train.build_parser, "train_cv": train_cv.build_parser, "demo": demo.build_parser}[command]()
    positionals = {"train": ["991", "2d", "0"], "train_cv": ["991", "2d"], "demo": []}[command]
    underscores = parser.parse_args([*positionals, "--max_minutes", "3", "--labelled_fraction", "0.5",
                                     "--labelled_unit", "cases", "--labelled_seed", "4", "--num_epochs", "2",
                                     "--iters_per_epoch", "5", "--batch_size", "3"])
    dashes = parser.parse_args([*positionals, "--max-minutes", "3", "--labelled-fraction", "0.5",
                                "--labelled-unit", "cases", "--labelled-seed", "4", "--num-epochs", "2",
                                "--iters-per-epoch", "5", "--batch-size", "3"])
    assert vars(underscores) == vars(dashes)
    assert (dashes.max_minutes, dashes.labelled_fraction, dashes.labelled_unit, dashes.labelled_seed) == \
        (3.0, 0.5, "cases", 4)


def test_demo_and_train_read_the_same_overrides():
    """samunet_demo reads its trainer overrides with samunet_train's hyperparameters_from_args: the options
    both have give the same dict; the ones the demo lacks (--val-iters, --weights) are simply unset."""
    from samunet.cli import demo, train
    options = ["--max-minutes", "3", "--labelled-fraction", "0.5", "--labelled-unit", "cases", "--labelled-seed",
               "4", "--num-epochs", "2", "--iters-per-epoch", "5", "--batch-size", "3", "--lr", "0.01",
               "--precision", "bf16"]
    from_demo = train.hyperparameters_from_args(demo.build_parser().parse_args(options))
    assert from_demo == train.hyperparameters_from_args(train.build_parser().parse_args(["991", "2d", "0",
                                                                                         *options]))
    assert from_demo == {"max_minutes": 3.0, "labelled_fraction": 0.5, "labelled_unit": "cases",
                         "labelled_seed": 4, "num_epochs": 2, "num_iterations_per_epoch": 5, "batch_size": 3,
                         "initial_lr": 0.01, "precision": "bf16"}
    assert train.hyperparameters_from_args(demo.build_parser().parse_args([])) == {}


def test_demo_help_does_not_mention_continue(capsys):
    """samunet_demo has no --c, so its --max-minutes help does not promise one; samunet_train's does."""
    from samunet.cli import demo
    with pytest.raises(SystemExit):
        demo.build_parser().parse_args(["--help"])
    assert "--max_minutes" in capsys.readouterr().out
    assert "--c" not in demo.build_parser().format_help()
    assert "--c continues within the remaining minutes" in " ".join(train_parser().format_help().split())


@pytest.mark.parametrize("option, expected", [
    (["--backbone", "vit_test"], "--backbone vit_test select(s) a SAM encoder; nnUNetTrainerSamunetPlans trains "
                                 "nnU-Net's 2d U-Net from scratch: leave --backbone out"),
    (["--weights", "medsam"], "leave --weights out"),
])
def test_sam_options_are_refused_for_the_nnunet_unet_trainer(option, expected, nnunet_folders, capsys):
    """-tr nnUNetTrainerSamunetPlans with --backbone or --weights: one line, exit 2, as --depth is refused."""
    assert train_main(["991", "2d", "0", "-tr", "nnUNetTrainerSamunetPlans", *option]) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"error: {expected}" or (error.startswith("error: ") and expected in error and "\n" not in error)
    assert not any(nnunet_folders["nnUNet_results"].iterdir())
    assert train_main(["991", "2d", "0", "-tr", "nnUNetTrainerSamunetPlans", "--weights", "none"]) == 2
    assert "SAM encoder" not in capsys.readouterr().err  # --weights none is accepted (then: not planned)


def test_loading_a_checkpoint_does_not_announce_random_backbone_weights(tmp_path, caplog):
    """--val / --c: the network's weights come from the checkpoint, so no "starts from RANDOM weights" line
    (which a fresh training of a backbone without released weights does print)."""
    import contextlib
    import sys
    from unittest import mock

    import torch

    from samunet.registry import TRAINERS
    from trainer_harness import (build_trainer, in_memory_dataset_class, synthetic_dataset_json, synthetic_plans,
                                 trainer_workdir)
    with trainer_workdir(tmp_path), caplog.at_level("WARNING"):
        trained = build_trainer("SAMedTrainer", backbone="vit_test", num_classes=2, img_size=64)
        assert "starts from RANDOM weights" in caplog.text
        checkpoint = tmp_path / "checkpoint_final.pth"
        trained.save_checkpoint(str(checkpoint))
        caplog.clear()
        trainer_class = TRAINERS.get("SAMedTrainer")
        again = trainer_class(synthetic_plans(backbone="vit_test", img_size=64), "2d", 0, synthetic_dataset_json(2),
                              torch.device("cpu"))
        dataset_class = in_memory_dataset_class(num_classes=2, img_size=64)
        with contextlib.ExitStack() as patches:
            for module in {sys.modules[klass.__module__] for klass in trainer_class.__mro__}:
                if hasattr(module, "infer_dataset_class"):
                    patches.enter_context(mock.patch.object(module, "infer_dataset_class", return_value=dataset_class))
            again.load_checkpoint(str(checkpoint))
        assert "RANDOM" not in caplog.text
        log = open(again.log_file).read()  # the same log file as the first trainer's (same second)
        assert f"network weights from {checkpoint}" in log
        assert "starts from random weights" not in log.split(f"network weights from {checkpoint}")[0].split(
            "SAMedTrainer: backbone vit_test")[-1]
        for name, value in trained.network_module.state_dict().items():
            assert torch.equal(again.network_module.state_dict()[name], value), name
