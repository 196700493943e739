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
    assert command[3:] == ["218", "2d", "3", "-tr", "HSAMTrainer", "-device", "cuda", "-p", "samunetPlans",
                           "--num-epochs", "5", "--npz"]
    assert args.folds == [0, 1, 2, 3, 4]


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
    assert train_cv.main(["991", "2d", "-tr", "SAMedTrainer", "--folds", "0", "1", "--npz", *TINY]) == 0
    model = planned_tiny_dataset["nnUNet_results"] / DATASET / "SAMedTrainer__samunetPlans__2d"
    for fold in (0, 1):
        assert (model / f"fold_{fold}" / "checkpoint_final.pth").is_file()
        assert list((model / f"fold_{fold}" / "validation").glob("*.npz"))
    assert not (model / "fold_2").exists()
    images = planned_tiny_dataset["nnUNet_raw"] / DATASET / "imagesTs"
    for fold in (0, 1):
        assert predict_main(["-i", str(images), "-o", str(tmp_path / f"p{fold}"), "-d", "991", "-f", str(fold),
                             "--disable-tta", "-device", "cpu", "--save-probabilities"]) == 0
        assert sorted(p.name for p in (tmp_path / f"p{fold}").glob("*.npz")) == ["case_0005.npz", "case_0006.npz"]
    assert ensemble_main(["-i", str(tmp_path / "p0"), str(tmp_path / "p1"), "-o", str(tmp_path / "ens")]) == 0
    reference = sitk.ReadImage(str(images.parent / "labelsTs" / "case_0005.nii.gz"))
    assert sitk.ReadImage(str(tmp_path / "ens" / "case_0005.nii.gz")).GetSize() == reference.GetSize()
