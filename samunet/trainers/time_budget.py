"""Wall-clock training budgets: ``--max-minutes M`` of samunet_train, samunet_train_cv and samunet_demo.

A fold's training plus its final validation ends within M minutes of wall clock, counted from the moment
the trainer is constructed (network building, weight loading and data-loader start-up count too). nnU-Net
trains a fixed number of epochs with a poly learning rate over them; under a budget the number of epochs is
the number that fits, and the schedule is stretched over exactly those epochs:

- after every epoch the cost of one epoch is measured (the time between epoch ends, so checkpoint writes and
  progress.png count, the one-time tile timing of the first plan does not; the first epoch, which pays for
  warm-up and compilation, only until a second one is measured, and after ``--c`` not at all: the checkpoint's
  recorded cost holds until then) and the final validation is estimated
  (:func:`estimate_final_validation_seconds`: sliding-window tiles of the fold's validation cases, times the
  mirrorings, times the measured cost of one tile's forward pass (:func:`measure_tile_seconds`), times
  :data:`VALIDATION_SAFETY`, plus :data:`VALIDATION_FIXED_S`);
- the trainer's ``num_epochs`` becomes ``min(cap, epochs done + whole epochs that fit before the validation)``,
  ``cap`` being the ``num_epochs`` hyper-parameter (``--num-epochs`` or the trainer's default: the smaller
  wins), and the learning-rate schedule's length follows (:func:`stretch_schedule`), so the last epoch runs at
  the poly schedule's last value;
- at least one epoch is trained in all (a budget that does not hold one epoch and the validation still
  gives a model, with a warning saying by how much the budget will be exceeded); a run continued with ``--c``
  whose budget is spent trains no further epoch and goes on to the final validation (one line says so, and
  the validation tile is not timed again when the earlier runs already spent the whole budget);
- the budget, the time spent and the estimates are recorded in every checkpoint (``samunet.time_budget``), so
  ``--c`` continues within the remaining minutes, and a larger ``--max-minutes`` given with ``--c`` trains on.

:class:`TimeBudget` holds the clock and the estimates; :class:`TimeBudgetMixin` puts it into nnU-Net's epoch
loop (``SAMTrainerBase`` and the nnU-Net U-Net wrapper inherit it). A distributed run follows rank 0's plan.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Callable

import numpy as np
import torch
from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from torch import distributed as dist

from samunet.errors import ConfigurationError

logger = logging.getLogger(__name__)

# the final validation's estimate: its forward passes times this (resampling and export of every case), plus a
# fixed part (the export workers' start-up, the metrics)
VALIDATION_SAFETY = 1.5
VALIDATION_FIXED_S = 20.0
TILE_STEP_SIZE = 0.5  # the final validation's sliding-window step (samunet.trainers.validation)
RECENT_EPOCHS = 5  # the epoch cost is the mean of the last few epochs (the first one only while it is alone)
# a tile is timed over passes that add up to this many seconds (at most TILE_PASSES passes): one short pass on a
# busy machine measures the scheduler, not the network
TILE_SECONDS = 1.0
TILE_PASSES = 20
# on a CPU a tile costs the same in any batch, so a timing pass holds at most this many (the CPU predictor puts
# 8 slices of 256 px together: 56 tiles of 96 px took 14 s to time with their warm-up pass)
CPU_TIMED_TILES = 8


def check_max_minutes(value) -> float | None:
    """``value`` as a positive number of minutes (None: no budget). Raises ConfigurationError otherwise."""
    if value is None:
        return None
    try:
        minutes = float(value)
    except (TypeError, ValueError):
        minutes = float("nan")
    if not math.isfinite(minutes) or minutes <= 0:
        raise ConfigurationError(f"--max-minutes must be a positive number of minutes, got {value!r}")
    return minutes


class TimeBudget:
    """The wall clock of one fold's training: time spent (this run and the runs before it, from the
    checkpoint), the measured cost of an epoch and of one validation tile, and the epochs that fit ``minutes``
    (None: no budget; the time spent is recorded all the same). ``clock``: seconds, monotonic."""

    def __init__(self, minutes: float | None = None, clock: Callable[[], float] | None = None) -> None:
        self.clock = clock if clock is not None else time.monotonic
        self.minutes = check_max_minutes(minutes)
        self.started = self.clock()
        self.spent_before_s = 0.0  # by the runs before this one (--c)
        self.epoch_s: float | None = None  # cost of one epoch, all included
        self.tile_s: float | None = None  # cost of one sliding-window tile's forward pass
        self.final_validation_s: float | None = None
        self.planned_epochs: int | None = None
        self._last_mark: float | None = None  # this run: start of its first epoch, then the latest epoch end
        self._epoch_durations: list[float] = []  # this run's epochs, end to end

    # ---- the clock ----------------------------------------------------------------------------------
    def spent_s(self) -> float:
        return self.spent_before_s + self.clock() - self.started

    def remaining_s(self) -> float:
        return math.inf if self.minutes is None else self.minutes * 60.0 - self.spent_s()

    # ---- measurements -------------------------------------------------------------------------------
    def epoch_started(self) -> None:
        if self._last_mark is None:
            self._last_mark = self.clock()

    def epoch_ended(self) -> None:
        """Record an epoch end and update the cost of one epoch: the mean of the last few, without the
        first epoch of this run once there are others (it pays for warm-up). The first epoch's duration also
        lacks the checkpoint and progress.png writes of an epoch end (the marks are taken before them), so a
        run continued with ``--c`` keeps the cost its checkpoint recorded until its second epoch has ended."""
        now = self.clock()
        if self._last_mark is None:  # no epoch start seen: nothing to measure yet
            self._last_mark = now
            return
        self._epoch_durations.append(now - self._last_mark)
        self._last_mark = now
        durations = self._epoch_durations
        if len(durations) == 1 and self.epoch_s is not None:  # --c: the recorded cost, all included
            return
        if len(durations) > 1:
            durations = durations[1:]
        self.epoch_s = float(np.mean(durations[-RECENT_EPOCHS:]))

    def exclude_from_epoch(self, seconds: float) -> None:
        """Leave ``seconds`` of one-time work done after the latest epoch end (the tile timing of the first plan)
        out of the next epoch's cost; they still count as time spent."""
        if self._last_mark is not None:
            self._last_mark += seconds

    # ---- the plan -----------------------------------------------------------------------------------
    def epochs_that_fit(self, epochs_done: int, cap: int) -> int:
        """Epochs in all (done and to do) that fit the remaining time before the final validation: at least
        ``epochs_done``, at most ``cap``; ``cap`` without a budget or before an epoch was measured (so the first
        epoch always runs)."""
        if self.minutes is None or self.epoch_s is None:
            return cap
        available = self.remaining_s() - (self.final_validation_s or 0.0)
        more = math.floor(available / max(self.epoch_s, 1e-9)) if available > 0 else 0
        return int(min(cap, epochs_done + more))

    def state(self) -> dict:
        """What a checkpoint records (plain data)."""
        return {"max_minutes": self.minutes, "spent_s": round(self.spent_s(), 3), "epoch_s": self.epoch_s,
                "tile_s": self.tile_s, "final_validation_s": self.final_validation_s,
                "planned_epochs": self.planned_epochs}

    def restore(self, state: dict | None) -> None:
        """Continue from a checkpoint's record: its time spent and estimates (the budget itself is the
        ``max_minutes`` hyper-parameter, restored with the others)."""
        if not state:
            return
        self.spent_before_s = float(state.get("spent_s") or 0.0)
        self.epoch_s = state.get("epoch_s")
        self.tile_s = state.get("tile_s")
        self.final_validation_s = state.get("final_validation_s")


def sliding_window_tiles(shape: tuple[int, ...], patch_size: tuple[int, ...],
                         step: float = TILE_STEP_SIZE) -> int:
    """Tiles nnU-Net's sliding window predicts for a preprocessed case of ``shape`` (channels first) with
    ``patch_size`` (a 2d patch slides over every slice; a case smaller than the patch is padded to it)."""
    spatial = [int(n) for n in shape[1:]]
    leading, window = spatial[:len(spatial) - len(patch_size)], spatial[len(spatial) - len(patch_size):]
    padded = [max(n, int(p)) for n, p in zip(window, patch_size)]
    steps = compute_steps_for_sliding_window(tuple(padded), tuple(int(p) for p in patch_size), step)
    return int(np.prod(leading, dtype=np.int64)) * int(np.prod([len(s) for s in steps], dtype=np.int64))


def validation_tiles(trainer) -> int:
    """Forward passes of the final validation of ``trainer``'s fold (this rank's share): sliding-window tiles
    of every validation case times nnU-Net's mirrorings (2 ** mirrored axes); only the cases ``--val_cases``
    keeps (``trainer.final_validation_cases``), none with ``--disable_validation_inference``
    (``trainer.skip_final_validation``)."""
    from samunet.trainers.validation import thinned_cases
    if getattr(trainer, "skip_final_validation", False):
        return 0
    _, keys = trainer.do_split()
    keys = thinned_cases(list(keys), getattr(trainer, "final_validation_cases", None))
    if trainer.is_ddp:
        keys = keys[trainer.local_rank::dist.get_world_size()]
    dataset = trainer.dataset_class(trainer.preprocessed_dataset_folder, keys)
    patch = tuple(trainer.configuration_manager.patch_size)
    tiles = sum(sliding_window_tiles(dataset.load_case(key)[0].shape, patch) for key in dataset.identifiers)
    return tiles * 2 ** len(trainer.inference_allowed_mirroring_axes or ())


def estimate_final_validation_seconds(tiles: int, tile_s: float) -> float:
    """The final validation's cost: ``tiles`` forward passes at ``tile_s`` each, times :data:`VALIDATION_SAFETY`,
    plus :data:`VALIDATION_FIXED_S`; nothing without tiles (no validation)."""
    return VALIDATION_SAFETY * tiles * tile_s + VALIDATION_FIXED_S if tiles else 0.0


def tiles_per_call(trainer) -> int:
    """Tiles per network call of the final validation: samunet's batched predictor's choice
    (``$SAMUNET_TILES_PER_BATCH``, else by device: :mod:`samunet.inference.batched_predictor`)."""
    from samunet.inference.batched_predictor import default_tiles_per_batch, requested_tiles_per_batch
    return requested_tiles_per_batch(None) or default_tiles_per_batch(trainer.configuration_manager, trainer.device)


def measure_tile_seconds(trainer, clock: Callable[[], float]) -> float:
    """Seconds of one tile's forward pass as the final validation runs it: random tiles of the patch, as many per
    network call as the final validation's predictor puts together (:func:`tiles_per_call`; on a CPU at most
    :data:`CPU_TIMED_TILES`), through the (uncompiled, unwrapped) network in eval mode, without gradients, under
    the trainer's autocast; after a warm-up pass, the mean over passes adding up to :data:`TILE_SECONDS` (at most
    :data:`TILE_PASSES`). The network's mode is restored."""
    network = getattr(trainer, "network_module", trainer.network)
    was_training = network.training
    batch = tiles_per_call(trainer)
    if trainer.device.type == "cpu":
        batch = min(batch, CPU_TIMED_TILES)
    tiles = torch.randn((batch, trainer.num_input_channels, *trainer.configuration_manager.patch_size),
                        device=trainer.device)
    autocast = getattr(trainer, "autocast", contextlib.nullcontext)
    network.eval()
    try:
        with torch.no_grad(), autocast():
            network(tiles)
            if trainer.device.type == "cuda":
                torch.cuda.synchronize(trainer.device)
            started, passes = clock(), 0
            while True:
                network(tiles)
                if trainer.device.type == "cuda":
                    torch.cuda.synchronize(trainer.device)
                passes += 1
                elapsed = clock() - started
                if elapsed >= TILE_SECONDS or passes >= TILE_PASSES:
                    return elapsed / (passes * batch)
    finally:
        network.train(was_training)


def stretch_schedule(scheduler, num_epochs: int, iterations_per_epoch: int) -> None:
    """Make ``scheduler`` end after ``num_epochs``: nnU-Net's ``PolyLRScheduler`` counts epochs (``max_steps``);
    a per-iteration schedule with ``set_max_iterations`` (H-SAM's warm-up poly, whose warm-up shrinks with the
    run) counts iterations. Other schedulers (a plateau schedule) do not depend on the run's length and are left
    alone."""
    if isinstance(scheduler, PolyLRScheduler):
        scheduler.max_steps = num_epochs
    elif hasattr(scheduler, "set_max_iterations"):
        scheduler.set_max_iterations(num_epochs * iterations_per_epoch)


class _BudgetSpent(Exception):
    """Ends nnU-Net's epoch loop before ``range``'s end when the plan has fewer epochs."""


class TimeBudgetMixin:
    """nnUNetTrainer hooks that keep a training within ``self.time_budget`` (put it before nnUNetTrainer in the
    bases). nnU-Net's ``run_training`` loops to the ``num_epochs`` it saw when the loop began (the cap). At every
    epoch end this mixin measures and plans (``num_epochs`` and the lr schedule's length); at every epoch start
    it stops the loop when the plan is reached. A continued run makes its first plan at its first epoch start,
    from the estimates its checkpoint recorded."""

    time_budget: TimeBudget

    def run_training(self):
        try:
            super().run_training()
        except _BudgetSpent:
            self.on_train_end()

    def on_train_start(self):
        super().on_train_start()
        self._epoch_cap = self.num_epochs
        self._validation_tiles = None
        if self.time_budget.minutes is not None:
            self.print_to_log_file(
                f"time budget: {self.time_budget.minutes:g} min for training and final validation, "
                f"{self.time_budget.spent_s() / 60:.1f} min spent; at most {self._epoch_cap} epochs")

    def on_epoch_start(self):
        if self.time_budget.planned_epochs is None:  # a continued run plans from the checkpoint's estimates
            self._plan_epochs(done=self.current_epoch)
        if self.current_epoch >= self.num_epochs:
            self.print_to_log_file(f"time budget: training ends after {self.current_epoch} epoch(s), "
                                   f"{self.time_budget.spent_s() / 60:.1f} of {self.time_budget.minutes:g} min spent")
            raise _BudgetSpent()
        self.time_budget.epoch_started()
        super().on_epoch_start()

    def on_epoch_end(self):
        self.time_budget.epoch_ended()
        self._plan_epochs(done=self.current_epoch + 1)
        super().on_epoch_end()

    def _plan_epochs(self, done: int) -> None:
        """Set ``num_epochs`` and the schedule's length to the epochs that fit with ``done`` epochs done (rank
        0's plan in a distributed run), logging every change."""
        budget = self.time_budget
        if budget.minutes is None or budget.epoch_s is None:
            return
        if budget.planned_epochs is None and done > 0 and budget.spent_before_s >= budget.minutes * 60.0:
            self._end_spent_budget(done)  # the earlier runs used it up: nothing to plan, nothing to measure
            return
        if self._validation_tiles is None:  # once per run: the cases and the network do not change
            started = budget.clock()
            self._validation_tiles = validation_tiles(self)
            budget.tile_s = measure_tile_seconds(self, budget.clock) if self._validation_tiles else 0.0
            budget.exclude_from_epoch(budget.clock() - started)
        budget.final_validation_s = estimate_final_validation_seconds(self._validation_tiles, budget.tile_s)
        planned = budget.epochs_that_fit(done, self._epoch_cap)
        if self.is_ddp:
            shared = [planned]
            dist.broadcast_object_list(shared, src=0)
            planned = shared[0]
        if planned != budget.planned_epochs:
            self._log_plan(planned, done)
        budget.planned_epochs = planned
        self.num_epochs = planned
        stretch_schedule(self.lr_scheduler, planned, self.num_iterations_per_epoch)

    def _end_spent_budget(self, done: int) -> None:
        """``--c`` on a run whose recorded time already exceeds the budget (the same on every rank: it comes from
        the checkpoint): no further epoch and no tile timing, said in one line."""
        budget = self.time_budget
        line = (f"time budget: the {budget.minutes:g} min were spent by the earlier run(s) "
                f"({budget.spent_before_s / 60:.1f} min); no further epoch after the {done} done, the final "
                f"validation follows (--c --max-minutes with more than {budget.spent_before_s / 60:.1f} min trains on)")
        logger.info(line)
        self.print_to_log_file(line)
        budget.planned_epochs = done
        self.num_epochs = done

    def _log_plan(self, planned: int, done: int) -> None:
        budget = self.time_budget
        line = (f"time budget: {budget.spent_s() / 60:.1f} of {budget.minutes:g} min spent, an epoch takes "
                f"{budget.epoch_s:.1f} s, the final validation about {budget.final_validation_s / 60:.1f} min: "
                f"{planned} epoch(s) in all, the lr schedule stretched over them")
        self.print_to_log_file(line)
        over = budget.epoch_s * max(planned - done, 0) + budget.final_validation_s - budget.remaining_s()
        if planned == done and over > 0:
            warning = (f"the time budget of {budget.minutes:g} min does not hold another epoch and the final "
                       f"validation; training ends after {planned} epoch(s), about {over / 60:.1f} min over the "
                       f"budget (fewer --iters-per-epoch or a larger --max-minutes fit it)")
            logger.warning(warning)
            self.print_to_log_file(f"WARNING: {warning}")
