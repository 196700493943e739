"""``--max-minutes M`` (issue 15, deliverable 1): the epochs that fit a wall-clock budget, the poly schedule
stretched over them, the budget and the time spent in the checkpoint, ``--c`` within the remaining minutes,
the flags of samunet_train / samunet_train_cv / samunet_demo, and nnU-Net's own trainer run the same way.

The clock is fake: ``samunet.trainers.time_budget.time`` is replaced by an object whose ``monotonic()`` only
moves when a training step runs (``STEP_S`` seconds each), so epochs cost the same on every machine.
"""
from __future__ import annotations

import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

from samunet.cli import demo as demo_cli
from samunet.cli import train_cv as train_cv_cli
from samunet.cli.train import build_parser, hyperparameters_from_args, main as train_main
from samunet.trainers import time_budget
from samunet.trainers.base import SAMTrainerBase
from samunet.trainers.checkpoints import read_checkpoint
from samunet.trainers.time_budget import TimeBudget, sliding_window_tiles, stretch_schedule
from trainer_harness import build_trainer, trainer_workdir

TINY = ["-device", "cpu", "--iters-per-epoch", "1", "--val-iters", "1", "--batch-size", "2",
        "--disable_validation_inference"]
SAMED_LR = 1e-3


class FakeClock:
    """Seconds that move only when told to."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    """The budget's clock, moved by ``clock.step_s`` at every training step."""
    fake = FakeClock()
    fake.step_s = 0.0
    monkeypatch.setattr(time_budget, "time", types.SimpleNamespace(monotonic=fake))
    real_step = SAMTrainerBase.train_step

    def timed_step(self, batch):
        result = real_step(self, batch)
        fake.now += fake.step_s
        return result

    monkeypatch.setattr(SAMTrainerBase, "train_step", timed_step)
    return fake


def _fold(results: Path, trainer: str, fold: str) -> Path:
    return results / "Dataset991_PhantomTiny" / f"{trainer}__samunetPlans__2d" / f"fold_{fold}"


# ---- the plan ---------------------------------------------------------------------------------------
def test_epochs_that_fit_keep_the_final_validation_and_the_cap():
    clock = FakeClock()
    budget = TimeBudget(10, clock=clock)  # 600 s
    assert budget.epochs_that_fit(0, 1000) == 1000  # nothing measured yet: the cap
    budget.epoch_started()
    clock.now = 100.0
    budget.epoch_ended()
    budget.final_validation_s = 150.0
    assert budget.epochs_that_fit(1, 1000) == 1 + 3  # 500 s left, 150 s kept for the validation: 3 more
    assert budget.epochs_that_fit(1, 2) == 2  # --num-epochs smaller than what fits: the smaller wins
    clock.now = 590.0
    assert budget.epochs_that_fit(1, 1000) == 1  # nothing more fits: what is done
    assert TimeBudget(None, clock=clock).epochs_that_fit(3, 50) == 50  # no budget: nnU-Net's epoch count


def test_first_epoch_counts_only_until_a_second_is_measured():
    clock = FakeClock()
    budget = TimeBudget(60, clock=clock)
    budget.epoch_started()
    for end in (50.0, 60.0, 70.0):  # a slow first epoch (warm-up), then 10 s each
        clock.now = end
        budget.epoch_ended()
    assert budget.epoch_s == pytest.approx(10.0)
    budget.exclude_from_epoch(5.0)  # one-time work after the last epoch end: 75 s is the next end, 10 s an epoch
    clock.now = 85.0
    budget.epoch_ended()
    assert budget.epoch_s == pytest.approx(10.0)
    assert budget.spent_s() == pytest.approx(85.0)


def test_a_continued_run_counts_the_time_spent_before():
    clock = FakeClock()
    first = TimeBudget(30, clock=clock)
    clock.now = 1200.0
    state = first.state()
    second = TimeBudget(30, clock=clock)
    second.restore(state)
    clock.now = 1260.0
    assert second.spent_s() == pytest.approx(1260.0)
    assert second.remaining_s() == pytest.approx(1800.0 - 1260.0)


def test_the_schedule_is_stretched_over_the_planned_epochs():
    from samunet.trainers.automedsam import ValidationPlateauScheduler
    from samunet.trainers.h_sam import WarmupPolyLRScheduler
    parameter = torch.nn.Parameter(torch.zeros(1))
    poly = PolyLRScheduler(torch.optim.SGD([parameter], lr=0.01), 0.01, 1000)
    stretch_schedule(poly, 8, 250)
    poly.step(7)
    assert poly.get_last_lr()[0] == pytest.approx(0.01 * (1 / 8) ** 0.9)  # the poly schedule's last value
    warmup = WarmupPolyLRScheduler(torch.optim.SGD([parameter], lr=0.01), initial_lr=0.01, warmup_iterations=250,
                                   max_iterations=1000 * 50, iterations_per_epoch=50, max_warmup_fraction=0.1)
    assert warmup.warmup_iterations == 250
    stretch_schedule(warmup, 8, 50)
    # the shortened run warms up over its first 10% and reaches the full lr: not stuck in the published
    # 250-iteration warm-up for all of its 400 iterations
    assert (warmup.max_iterations, warmup.warmup_iterations) == (400, 40)
    warmup.step(1)
    assert warmup.get_last_lr()[0] == pytest.approx(0.01 * (1 - 10 / 360) ** 0.9)
    plateau = ValidationPlateauScheduler(torch.optim.SGD([parameter], lr=0.01), factor=0.9, patience=5, cooldown=0)
    stretch_schedule(plateau, 8, 50)  # a plateau schedule does not depend on the run's length


def test_sliding_window_tiles_are_nnunets(monkeypatch):
    predictor = nnUNetPredictor(tile_step_size=0.5, device=torch.device("cpu"))
    predictor.configuration_manager = types.SimpleNamespace(patch_size=[64, 64])
    for shape in ((1, 3, 40, 40), (1, 5, 10, 97), (1, 2, 150, 97)):  # smaller than the patch: padded
        padded = [max(n, 64) for n in shape[2:]]
        expected = len(predictor._internal_get_sliding_window_slicers((shape[1], *padded)))
        assert sliding_window_tiles(shape, (64, 64)) == expected


def test_final_validation_estimate_counts_tiles_mirrors_and_thinning(tmp_path):
    with trainer_workdir(tmp_path):
        trainer = build_trainer("SAMedTrainer", backbone="vit_test", num_classes=3, img_size=32)
        trainer.inference_allowed_mirroring_axes = (0, 1)
        trainer.fold = "all"  # every case validates
        _, keys = trainer.do_split()
        # the harness's cases are 4 slices of 32 x 32: one tile a slice, four mirrorings
        assert time_budget.validation_tiles(trainer) == len(keys) * 4 * 4
        trainer.final_validation_cases = 1
        assert time_budget.validation_tiles(trainer) == 4 * 4
        trainer.skip_final_validation = True
        assert time_budget.validation_tiles(trainer) == 0


def test_a_tile_is_timed_as_the_validation_runs_it_and_the_network_keeps_its_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMUNET_TILES_PER_BATCH", "4")  # the predictor's tiles per call (the batch size is 2)
    with trainer_workdir(tmp_path):
        trainer = build_trainer("SAMedTrainer", backbone="vit_test", num_classes=3, img_size=32)
        trainer.network.train()
        readings = iter([10.0, 13.0])  # after the warm-up, one pass of 3 s (over TILE_SECONDS) for 4 tiles
        assert time_budget.measure_tile_seconds(trainer, lambda: next(readings)) == pytest.approx(0.75)
        readings = iter([10.0, 10.3, 10.6, 10.9, 11.2])  # short passes: timed until TILE_SECONDS add up
        assert time_budget.measure_tile_seconds(trainer, lambda: next(readings)) == pytest.approx(1.2 / 16)
        monkeypatch.setenv("SAMUNET_TILES_PER_BATCH", "56")  # a CPU times at most CPU_TIMED_TILES tiles a pass
        readings = iter([10.0, 14.0])
        assert time_budget.measure_tile_seconds(trainer, lambda: next(readings)) == pytest.approx(
            4.0 / time_budget.CPU_TIMED_TILES)
        assert trainer.network.training
    assert time_budget.estimate_final_validation_seconds(100, 0.2) == pytest.approx(
        time_budget.VALIDATION_SAFETY * 20.0 + time_budget.VALIDATION_FIXED_S)
    assert time_budget.estimate_final_validation_seconds(0, 0.2) == 0.0  # --disable_validation_inference


# ---- the command line --------------------------------------------------------------------------------
def test_max_minutes_is_a_hyperparameter_of_train_train_cv_and_demo(monkeypatch):
    args = build_parser().parse_args(["991", "2d", "0", "--max-minutes", "2.5"])
    assert hyperparameters_from_args(args)["max_minutes"] == 2.5

    runs = []
    monkeypatch.setattr(train_cv_cli, "train_on_processes", lambda run, **_: runs.append(run.keywords))
    monkeypatch.setattr(train_cv_cli, "prepare_environment", lambda: None)
    assert train_cv_cli.main(["991", "2d", "--folds", "0", "1", "--max-minutes", "30"]) == 0
    assert [run["hyperparameters"]["max_minutes"] for run in runs] == [30.0, 30.0]  # each fold gets M
    cv_args = train_cv_cli.build_parser().parse_args(["991", "2d", "--max-minutes", "30"])
    command = train_cv_cli.fold_command(cv_args, 0, "cuda")
    assert command[command.index("--max-minutes") + 1] == "30.0"  # and the per-device workers too

    demos = []
    monkeypatch.setattr(demo_cli, "run_demo", lambda root, **kwargs: demos.append(kwargs) or {})
    monkeypatch.setattr("samunet.evaluation.evaluate_folder.format_table", lambda summary: "")
    assert demo_cli.main(["--max-minutes", "5", "-device", "cpu"]) == 0
    assert demos[0]["hyperparameters"]["max_minutes"] == 5.0


@pytest.mark.parametrize("value", ["0", "-3", "soon", "inf"])
def test_a_bad_budget_is_refused_in_one_line(value, capsys):
    with pytest.raises(SystemExit) as stopped:
        build_parser().parse_args(["991", "2d", "0", "--max-minutes", value])
    assert stopped.value.code == 2
    assert "--max-minutes" in capsys.readouterr().err


# ---- training under a budget ---------------------------------------------------------------------------
def test_training_stops_at_the_epochs_that_fit_and_continues_within_the_rest(planned_tiny_dataset, clock):
    """30 min at 500 s an epoch: 3 epochs (not the 5 of --num-epochs), the last at the poly schedule's end;
    --c with 40 min in all has 2400 - 1500 s left: one more epoch, its lr again the schedule's last."""
    fold = _fold(planned_tiny_dataset["nnUNet_results"], "SAMedTrainer", "2")
    shutil.rmtree(fold, ignore_errors=True)
    clock.step_s = 500.0
    common = ["991", "2d", "2", "-tr", "SAMedTrainer", *TINY, "--weights", "none", "--num-epochs", "5"]
    assert train_main([*common, "--max-minutes", "30"]) == 0
    checkpoint = read_checkpoint(fold / "checkpoint_final.pth")
    assert checkpoint["current_epoch"] == 3
    lrs = checkpoint["logging"]["lrs"]
    assert lrs[-1] == pytest.approx(SAMED_LR * (1 / 3) ** 0.9)
    record = checkpoint["samunet"]["time_budget"]
    assert record["max_minutes"] == 30 and record["planned_epochs"] == 3
    assert record["spent_s"] == pytest.approx(1500.0)
    assert checkpoint["samunet"]["hyperparameters"]["max_minutes"] == 30

    assert train_main([*common, "--max-minutes", "40", "--c"]) == 0
    checkpoint = read_checkpoint(fold / "checkpoint_final.pth")
    assert checkpoint["current_epoch"] == 4
    assert checkpoint["logging"]["lrs"][-1] == pytest.approx(SAMED_LR * (1 / 4) ** 0.9)
    assert checkpoint["samunet"]["time_budget"]["spent_s"] == pytest.approx(2000.0)


def test_the_first_plans_tile_timing_is_spent_time_but_not_part_of_an_epochs_cost(planned_tiny_dataset, clock,
                                                                                   monkeypatch):
    """The first plan times a validation tile once (14 s here, after epoch 0's end): the budget spends them, but
    the next epoch's cost is still its 100 s. Counted in, epoch 1 would cost 114 s and the plan would shrink."""
    fold = _fold(planned_tiny_dataset["nnUNet_results"], "SAMedTrainer", "3")
    shutil.rmtree(fold, ignore_errors=True)
    clock.step_s = 100.0

    def timed_tiles(trainer, clock_function):
        clock.now += 14.0
        return 0.5

    monkeypatch.setattr(time_budget, "validation_tiles", lambda trainer: 10)
    monkeypatch.setattr(time_budget, "measure_tile_seconds", timed_tiles)
    assert train_main(["991", "2d", "3", "-tr", "SAMedTrainer", *TINY, "--weights", "none", "--num-epochs", "3",
                       "--max-minutes", "30"]) == 0
    record = read_checkpoint(fold / "checkpoint_final.pth")["samunet"]["time_budget"]
    assert record["epoch_s"] == pytest.approx(100.0)
    assert record["spent_s"] == pytest.approx(314.0)
    assert record["final_validation_s"] == pytest.approx(time_budget.VALIDATION_SAFETY * 5.0
                                                         + time_budget.VALIDATION_FIXED_S)


def test_nnunet_trainer_runs_under_a_budget_that_holds_less_than_an_epoch(planned_tiny_dataset, clock):
    """nnU-Net's own trainer and U-Net through samunet_train: an epoch of 60 min in a 30-min budget trains the
    one epoch every run gets, says by how much the budget is exceeded, and the model predicts."""
    from samunet.cli.predict import build_predictor
    from samunet.networks.nnunet_unet import PlainConvUNetForSamunet
    fold = _fold(planned_tiny_dataset["nnUNet_results"], "nnUNetTrainerSamunetPlans", "all")
    shutil.rmtree(fold, ignore_errors=True)
    clock.step_s = 3600.0
    assert train_main(["991", "2d", "all", "-tr", "nnUNetTrainerSamunetPlans", *TINY, "--num-epochs", "3",
                       "--max-minutes", "30"]) == 0
    checkpoint = read_checkpoint(fold / "checkpoint_final.pth")
    assert checkpoint["current_epoch"] == 1
    assert checkpoint["samunet"]["time_budget"]["planned_epochs"] == 1
    assert any(key.startswith("encoder.stages.") for key in checkpoint["network_weights"])  # nnU-Net's U-Net
    log = "".join(path.read_text() for path in fold.glob("training_log_*.txt"))
    assert "does not hold another epoch" in log and "about 30.0 min over the budget" in log
    predictor = build_predictor("Dataset991_PhantomTiny", "2d", "nnUNetTrainerSamunetPlans", ["all"], device="cpu")
    assert isinstance(predictor.network, PlainConvUNetForSamunet)
    assert predictor.configuration_manager.network_arch_init_kwargs["features_per_stage"][0] == 32


def test_unet_configuration_is_nnunets_2d_topology():
    from samunet.networks.nnunet_unet import unet_configuration
    configuration = ConfigurationManager({"patch_size": [256, 256], "spacing": [0.8, 0.8], "batch_size": 2,
                                          "architecture": {"network_class_name": "x", "arch_kwargs": {},
                                                           "_kw_requires_import": []}})
    unet = unet_configuration(configuration)
    kwargs = unet.network_arch_init_kwargs
    assert unet.patch_size == [256, 256]
    assert kwargs["n_stages"] == 7 and kwargs["features_per_stage"] == [32, 64, 128, 256, 512, 512, 512]
    assert np.array_equal(np.cumprod(np.array(kwargs["strides"])[:, 0])[-1], 64)  # down to 4-pixel maps
    assert unet_configuration(unet) is unet


def test_continuing_a_spent_budget_says_so_in_one_line_and_times_nothing(planned_tiny_dataset, clock, monkeypatch):
    """--c on a run whose earlier run already spent more than the budget: no further epoch, one line naming the
    spent minutes and how to train on, no tile timing and no over-budget warning written as a plan."""
    fold = _fold(planned_tiny_dataset["nnUNet_results"], "SAMedTrainer", "3")
    shutil.rmtree(fold, ignore_errors=True)
    clock.step_s = 3600.0
    common = ["991", "2d", "3", "-tr", "SAMedTrainer", *TINY, "--weights", "none", "--num-epochs", "3",
              "--max-minutes", "30"]
    assert train_main(common) == 0
    measured = []
    monkeypatch.setattr(time_budget, "validation_tiles", lambda trainer: measured.append(trainer) or 0)
    assert train_main([*common, "--c"]) == 0
    assert measured == [] and read_checkpoint(fold / "checkpoint_final.pth")["current_epoch"] == 1
    logs = sorted(fold.glob("training_log_*.txt"), key=lambda path: path.stat().st_mtime)
    resumed = logs[-1].read_text().split("loaded ")[-1]
    assert "time budget: the 30 min were spent by the earlier run(s) (60.0 min); no further epoch after the 1 " \
           "done, the final validation follows (--c --max-minutes with more than 60.0 min trains on)" in resumed
    assert "does not hold another epoch" not in resumed


def test_a_continued_run_keeps_the_recorded_epoch_cost_until_its_second_epoch_ends():
    """After --c the first epoch is timed without its end (checkpoint, progress.png): 3.2 s against the
    recorded 6.8 s all included. The plan keeps 6.8 s until a second epoch measured from epoch end to epoch end
    (4.7 s) replaces it, instead of swinging 2 -> 4 -> 3 epochs."""
    clock = FakeClock()
    budget = TimeBudget(1.2, clock=clock)
    budget.restore({"spent_s": 30.0, "epoch_s": 6.8, "tile_s": 0.01, "final_validation_s": 20.0})
    budget.epoch_started()
    clock.now = 3.2
    budget.epoch_ended()
    assert budget.epoch_s == pytest.approx(6.8)
    clock.now = 7.9
    budget.epoch_ended()
    assert budget.epoch_s == pytest.approx(4.7)
