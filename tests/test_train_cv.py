"""samunet_train_cv: folds in sequence in one process, and the fold-to-device partition."""
from __future__ import annotations

import sys

import pytest
import SimpleITK as sitk

from samunet.cli import train_cv
from samunet.cli.ensemble import main as ensemble_main
from samunet.cli.predict import main as predict_main
from samunet.errors import ConfigurationError

DATASET = "Dataset991_PhantomTiny"
TINY = ["--num-epochs", "1", "--iters-per-epoch", "3", "--val-iters", "1", "--batch-size", "2", "-device", "cpu"]


def test_folds_are_shared_round_robin():
    assert train_cv.partition_folds([0, 1, 2, 3, 4], ["cuda:0", "cuda:1"]) == {"cuda:0": [0, 2, 4], "cuda:1": [1, 3]}
    assert train_cv.partition_folds([0, 1, 2, 3, 4], ["cuda:0"]) == {"cuda:0": [0, 1, 2, 3, 4]}
    assert train_cv.partition_folds([3, 4], ["cuda:0", "cuda:1", "cuda:2"]) == {"cuda:0": [3], "cuda:1": [4]}
    with pytest.raises(ConfigurationError, match="more than once"):
        train_cv.partition_folds([0, 0], ["cuda:0"])
    with pytest.raises(ConfigurationError, match="more than once"):
        train_cv.partition_folds([0, 1], ["cuda:0", "cuda:0"])


def test_devices_become_cuda_visible_devices():
    assert train_cv.device_environment("cuda:3") == ("cuda", {"CUDA_VISIBLE_DEVICES": "3"})
    assert train_cv.device_environment("cpu") == ("cpu", {})
    for bad in ("gpu0", "cpu:1", "cuda:x"):
        with pytest.raises(ConfigurationError):
            train_cv.device_environment(bad)


def test_worker_commands_pass_the_overrides_on():
    args = train_cv.build_parser().parse_args(["218", "2d", "-tr", "HSAMTrainer", "--num-epochs", "5", "--npz",
                                               "--devices", "cuda:0", "cuda:1"])
    command = train_cv.fold_command(args, 3, "cuda")
    assert command[:2] == [sys.executable, "-c"]
    assert command[3:] == ["218", "2d", "3", "-tr", "HSAMTrainer", "-device", "cuda", "--npz", "--num-epochs", "5"]
    assert args.folds == [0, 1, 2, 3, 4]


def test_a_worker_gets_every_training_option_it_was_given():
    """The worker's samunet_train parses back to the same value of every option samunet_train has (read from
    its parser, so an option added later is passed on too: --precision once was not)."""
    from samunet.cli.train import build_parser as train_parser
    given = ["-p", "otherPlans", "-pretrained_weights", "m.pth", "-num_gpus", "2", "--c", "--val_best", "--npz",
             "--disable_checkpointing", "--num-epochs", "5", "--iters-per-epoch", "7", "--val-iters", "2", "--lr",
             "0.003", "--batch-size", "3", "--backbone", "vit_b", "--weights", "none", "--depth", "4",
             "--precision", "bf16", "--max-minutes", "30", "--labelled-fraction", "0.25", "--labelled-unit", "cases",
             "--labelled-seed", "3", "--val_cases", "2", "--overlays", "-v"]
    args = train_cv.build_parser().parse_args(["218", "2d", "-tr", "HSAMTrainer", *given, "--devices", "cpu", "cpu"])
    worker = train_parser().parse_args(train_cv.fold_command(args, 3, "cpu")[3:])
    options = {action.dest for action in train_parser()._actions if action.option_strings} - {"help"}
    differing = {name: (getattr(args, name), getattr(worker, name)) for name in options
                 if name != "device" and getattr(args, name) != getattr(worker, name)}
    assert differing == {}
    defaults = train_parser().parse_args(["218", "2d", "0"])
    unexercised = {name for name in options - {"device", "trainer"} if getattr(args, name) == getattr(defaults, name)}
    assert unexercised <= {"only_validate", "skip_final_validation"}  # refused together with --c / --val_best / --npz


def test_a_failing_worker_fails_the_command(monkeypatch, capsys):
    calls = []

    class Result:
        def __init__(self, code):
            self.returncode = code

    def fake_run(command, env):
        calls.append((command[5], env.get("CUDA_VISIBLE_DEVICES")))
        return Result(1 if command[5] == "1" else 0)

    monkeypatch.setattr(train_cv.subprocess, "run", fake_run)
    assert train_cv.main(["991", "2d", "--folds", "0", "1", "2", "--devices", "cuda:0", "cuda:1"]) == 2
    assert sorted(calls) == [("0", "0"), ("1", "1"), ("2", "0")]
    assert "1 of 3 fold(s) failed: fold 1 (exit code 1)" in capsys.readouterr().err


@pytest.mark.slow
def test_two_folds_in_sequence_then_ensemble_their_predictions(planned_tiny_dataset, tmp_path):
    model = planned_tiny_dataset["nnUNet_results"] / DATASET / "SAMedTrainer__samunetPlans__2d"

    def fold_2_files():  # the shared results folder may hold other tests' runs: fold 2 must stay as it was
        return {(p, p.stat().st_mtime_ns) for p in (model / "fold_2").rglob("*")}
    fold_2_before = fold_2_files()
    assert train_cv.main(["991", "2d", "-tr", "SAMedTrainer", "--folds", "0", "1", "--npz", *TINY]) == 0
    for fold in (0, 1):
        assert (model / f"fold_{fold}" / "checkpoint_final.pth").is_file()
        assert list((model / f"fold_{fold}" / "validation").glob("*.npz"))
    assert fold_2_files() == fold_2_before
    images = planned_tiny_dataset["nnUNet_raw"] / DATASET / "imagesTs"
    for fold in (0, 1):
        assert predict_main(["-i", str(images), "-o", str(tmp_path / f"p{fold}"), "-d", "991", "-f", str(fold),
                             "--disable-tta", "-device", "cpu", "--save-probabilities"]) == 0
        assert sorted(p.name for p in (tmp_path / f"p{fold}").glob("*.npz")) == ["case_0005.npz", "case_0006.npz"]
    assert ensemble_main(["-i", str(tmp_path / "p0"), str(tmp_path / "p1"), "-o", str(tmp_path / "ens")]) == 0
    reference = sitk.ReadImage(str(images.parent / "labelsTs" / "case_0005.nii.gz"))
    assert sitk.ReadImage(str(tmp_path / "ens" / "case_0005.nii.gz")).GetSize() == reference.GetSize()


@pytest.mark.parametrize("devices", [["cpu", "cpu"], ["cpu:0", "cpu:1"]])
def test_several_cpu_workers_are_refused_with_the_way_to_train_on_a_cpu(devices, capsys):
    """--devices cpu cpu / cpu:0 cpu:1: one line, exit 2, saying how the folds train on a CPU."""
    assert train_cv.main(["991", "2d", "--folds", "2", "3", "--devices", *devices]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error, error
    assert "on a CPU, train the folds one after another: leave --devices out and give -device cpu" in error
