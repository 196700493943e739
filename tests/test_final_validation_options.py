"""Skipping or thinning the final validation (samunet/trainers/validation.py, samunet_train's options).

``--disable_validation_inference`` skips it and says so in the log; ``--val_cases N`` validates N of the fold's
cases and marks the result as thinned in validation/summary.json and the log; ``--val`` alone still validates
every case; ``--npz`` keeps its meaning. The real pipeline runs on a private copy of the tiny planned phantom
(fold ``all``: its 5 training cases are the validation cases).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from samunet.cli.train import build_parser, main as train_main, train
from samunet.cli.train_cv import build_parser as cv_parser, fold_command
from samunet.errors import ConfigurationError
from samunet.trainers.validation import SUBSET_KEY, check_val_cases, thinned_cases
from trainer_harness import nnunet_environment

TINY_RUN = {"num_epochs": 1, "num_iterations_per_epoch": 1, "num_val_iterations_per_epoch": 1, "batch_size": 2}


@pytest.fixture(scope="module")
def private_tiny_dataset(tiny_dataset_root, tmp_path_factory) -> Path:
    """The tiny planned phantom's raw and preprocessed folders copied, with an empty results folder: the
    trainings here share no fold folder with other tests."""
    root = tmp_path_factory.mktemp("validation_options")
    for name in ("nnUNet_raw", "nnUNet_preprocessed"):
        shutil.copytree(tiny_dataset_root / name, root / name)
    return root


def validated_cases(fold: Path) -> list[str]:
    return sorted(p.name for p in (fold / "validation").glob("*.nii.gz"))


def test_thinned_cases_are_spread_evenly_and_reproducible():
    keys = [f"case_{i}" for i in (3, 0, 4, 1, 2)]
    assert thinned_cases(keys, None) == keys
    assert thinned_cases(keys, 2) == ["case_0", "case_2"] == thinned_cases(list(reversed(keys)), 2)
    assert thinned_cases(keys, 9) == sorted(keys)
    with pytest.raises(ConfigurationError, match="--val_cases"):
        check_val_cases(0)


def test_options_parse_in_both_spellings_and_samunet_train_cv_passes_them():
    args = build_parser().parse_args(["1", "2d", "0", "--disable_validation_inference", "--val_cases", "3"])
    assert args.skip_final_validation and args.val_cases == 3
    args = build_parser().parse_args(["1", "2d", "0", "--skip-final-validation", "--val-cases", "2"])
    assert args.skip_final_validation and args.val_cases == 2
    assert not build_parser().parse_args(["1", "2d", "0"]).skip_final_validation
    cv_args = cv_parser().parse_args(["1", "2d", "--val_cases", "2", "--disable_validation_inference"])
    command = fold_command(cv_args, 0, "cpu")
    assert "--disable_validation_inference" in command and command[command.index("--val_cases") + 1] == "2"


@pytest.mark.parametrize("extra", [["--val"], ["--val_best"], ["--npz"], ["--val_cases", "2"]])
def test_skipping_with_an_option_that_needs_the_validation_is_refused(nnunet_folders, capsys, extra):
    assert train_main(["991", "2d", "all", "--disable_validation_inference", *extra]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "--disable_validation_inference" in error[0] and extra[0] in error[0]
    assert train_main(["991", "2d", "all", "--val_cases", "0"]) == 2
    assert "--val_cases" in capsys.readouterr().err


def test_a_bad_tiles_per_batch_variable_is_refused_before_training(nnunet_folders, capsys, monkeypatch):
    monkeypatch.setenv("SAMUNET_TILES_PER_BATCH", "0")
    assert train_main(["991", "2d", "all"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "SAMUNET_TILES_PER_BATCH='0'" in error[0]


def test_thinned_full_and_skipped_final_validations(private_tiny_dataset):
    with nnunet_environment(private_tiny_dataset):
        trainer = train(991, "2d", "all", "SAMedTrainer", device="cpu", hyperparameters=dict(TINY_RUN), val_cases=2)
        fold = Path(trainer.output_folder)
        log = next(fold.glob("training_log_*.txt"))
        summary = json.loads((fold / "validation" / "summary.json").read_text())
        subset = summary[SUBSET_KEY]
        assert subset["validated_cases"] == 2 and subset["fold_validation_cases"] == 5
        assert "not a full validation" in subset["note"] and len(summary["metric_per_case"]) == 2
        assert validated_cases(fold) == sorted(f"{case}.nii.gz" for case in subset["cases"])
        assert "THINNED final validation (--val_cases 2): 2 of the fold's 5" in log.read_text()

        train(991, "2d", "all", "SAMedTrainer", device="cpu", only_validate=True)  # --val: every case
        summary = json.loads((fold / "validation" / "summary.json").read_text())
        assert SUBSET_KEY not in summary and len(summary["metric_per_case"]) == 5 and len(validated_cases(fold)) == 5

        train(991, "2d", "all", "SAMedTrainer", device="cpu", only_validate=True, val_cases=2)
        assert len(validated_cases(fold)) == 2  # the full run's other 3 cases are gone: summary and folder agree
        assert len(json.loads((fold / "validation" / "summary.json").read_text())["metric_per_case"]) == 2

        before = (fold / "validation" / "summary.json").stat().st_mtime_ns
        trainer = train(991, "2d", "all", "SAMedTrainer", device="cpu", continue_training=True,
                        skip_final_validation=True)
        assert (fold / "validation" / "summary.json").stat().st_mtime_ns == before
        text = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
        assert "Final validation skipped (--disable_validation_inference)" in text
        assert "is from an earlier validation, not of these weights" in text
