"""The contract every registered trainer fulfils, checked for every name in ``TRAINERS``.

A method (or ablation) gets every check here just by registering its trainer. Each case is one
trainer x tiny backbone x class count (2, 5) x slice-stack depth (1, 3; only for trainers with
``uses_slice_stacks``), built once by ``tests/trainer_harness.py`` (nnunetv2's own constructor and
``initialize()``, synthetic plans, no data on disk) and then:

- trained through the trainer's own ``train_step``, two steps in every training phase
  (``trainer.training_phase_starts()``, entered through ``on_train_epoch_start``), with the network
  wrapped in ``DistributedDataParallel(find_unused_parameters=False)`` over a one-process gloo group
  as nnU-Net's multi-GPU training wraps it; what happens during those steps is recorded;
- checked in eval mode afterwards: shapes, determinism, deep supervision, deepcopy, state_dict
  and pickle round trips.

Each test asserts one part of the contract on the case's recorded or live state, so a failure
names the trainer, the case and the part broken.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import io
import itertools
import math
import pickle
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from samunet.registry import TRAINERS
from trainer_harness import build_fresh_network, build_trainer, make_batch, trainer_workdir

TINY_BACKBONES = ("vit_test", "tinyvit_test")
CLASS_COUNTS = (2, 5)
STACK_DEPTHS = (1, 3)
# 16 px is accepted too, but gives the ViT a single token: attention over one key has zero gradient
# for q (LoRA's q-projections then fail the gradient checks falsely). 32 px: a 2 x 2 token grid.
IMG_SIZE = 32
BATCH_SIZE = 2
STEPS_PER_PHASE = 2
DEPLOYED_ATOL = 1e-6
LISTED_NAMES = 60  # names shown in a failure message before "... and N more"


@dataclass(frozen=True)
class Case:
    trainer: str
    backbone: str
    num_classes: int
    depth: int
    stacks: bool

    def __str__(self) -> str:
        return f"{self.trainer}-{self.backbone}-K{self.num_classes}" + (f"-D{self.depth}" if self.stacks else "")


def contract_cases() -> list[Case]:
    cases = []
    for name in TRAINERS.names():
        stacks = bool(getattr(TRAINERS.get(name), "uses_slice_stacks", False))
        for backbone, classes, depth in itertools.product(TINY_BACKBONES, CLASS_COUNTS,
                                                          STACK_DEPTHS if stacks else (1,)):
            cases.append(Case(name, backbone, classes, depth, stacks))
    return cases


CASES = contract_cases()


# ---- recording one case ----------------------------------------------------------------------
def describe(error: BaseException) -> str:
    """``Type: message`` and the innermost frames, for a failure message."""
    frames = traceback.extract_tb(error.__traceback__)[-3:]
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
    return f"{type(error).__name__}: {error} (at {where})"


def listed(names) -> str:
    names = list(names)
    shown = ", ".join(names[:LISTED_NAMES])
    return shown + (f", ... and {len(names) - LISTED_NAMES} more" if len(names) > LISTED_NAMES else "")


def as_list(output) -> list[torch.Tensor]:
    return list(output) if isinstance(output, (list, tuple)) else [output]


def difference(actual, expected) -> str | None:
    """None when ``actual`` is a tensor bitwise equal to ``expected``, else what differs."""
    if not isinstance(actual, torch.Tensor):
        return f"got a {type(actual).__name__}, expected a tensor"
    if actual.shape != expected.shape:
        return f"shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    if torch.equal(actual, expected):
        return None
    return f"max |difference| {(actual.double() - expected.double()).abs().max().item():.3g}"


@dataclass
class PhaseRecord:
    """What happened in one training phase (its start epoch, then ``STEPS_PER_PHASE`` train steps)."""

    start_epoch: int
    start_error: str | None = None
    trainable: set[str] = field(default_factory=set)
    step_errors: list[str] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    missing_grads: list[list[str]] = field(default_factory=list)  # per completed step: trainable, no gradient
    nonzero_grads: set[str] = field(default_factory=set)
    changed_frozen: list[str] = field(default_factory=list)
    ddp_problems: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"phase starting at epoch {self.start_epoch}"


class DDPWatch:
    """Hooks on the DDP wrapper in use (:meth:`attach`; the trainer may wrap anew when a phase starts):
    counts its forwards and keeps the output of the first one when asked to (if it is a tensor or a
    list of them, not a method-specific structure)."""

    def __init__(self) -> None:
        self.wrapper: nn.Module | None = None
        self.forwards = 0
        self.capture_next = False
        self.captured = None
        self._handles: list = []

    def attach(self, wrapper: nn.Module) -> None:
        self.remove()
        self.wrapper = wrapper
        self._handles = [wrapper.register_forward_pre_hook(self._enter), wrapper.register_forward_hook(self._leave)]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self.wrapper = [], None

    def _enter(self, module, args) -> None:
        self.forwards += 1

    def _leave(self, module, args, output) -> None:
        if self.capture_next:
            self.capture_next = False
            if isinstance(output, torch.Tensor):
                self.captured = output.detach()
            elif type(output) in (list, tuple) and all(isinstance(o, torch.Tensor) for o in output):
                self.captured = [o.detach() for o in output]


def registered_with_ddp(wrapper: DistributedDataParallel) -> set[str] | None:
    """Names of the parameters ``wrapper`` all-reduces (the ones that required grad when it was built),
    read from its reducer's buckets; None if this torch does not expose them."""
    try:
        ids = {id(p) for bucket in wrapper.reducer._get_zeros_like_grad_buckets() for p in bucket.parameters()}
    except Exception:
        return None
    return {name for name, p in wrapper.module.named_parameters(remove_duplicate=False) if id(p) in ids}


class ContractRun:
    """One case: the initialised trainer trained through all its phases (records in ``phases``), the
    output of its first training forward, and an eval batch; ``trainer.network`` is the unwrapped,
    trained network afterwards."""

    def __init__(self, case: Case, workdir: Path) -> None:
        self.case = case
        self.workdir = workdir
        self.training_output_error: str | None = None
        self.training_output: list[torch.Tensor] | torch.Tensor | None = None
        self.training_loss: float | None = None
        self.ddp_wrap_error: str | None = None
        self.phases: list[PhaseRecord] = []
        self._deployed: torch.Tensor | None = None
        quiet = io.StringIO()  # nnU-Net's console prints and progress bars
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            self.trainer = build_trainer(case.trainer, backbone=case.backbone, num_classes=case.num_classes,
                                         img_size=IMG_SIZE, depth=case.depth)
            self.batch = make_batch(self.trainer, batch_size=BATCH_SIZE, seed=0)  # the eval input
            self.first_training_batch = make_batch(self.trainer, batch_size=BATCH_SIZE, seed=1)
            torch.manual_seed(1)
            self.train_all_phases()
            self.record_training_output()

    @property
    def network(self) -> nn.Module:
        return self.trainer.network_module

    @property
    def patch(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.trainer.configuration_manager.patch_size)

    def trainable_names(self) -> set[str]:
        return {name for name, p in self.network.named_parameters(remove_duplicate=False) if p.requires_grad}

    def train_all_phases(self) -> None:
        trainer = self.trainer
        trainer.set_deep_supervision_enabled(trainer.enable_deep_supervision)  # as nnU-Net's on_train_start
        phase_starts = tuple(trainer.training_phase_starts())
        self.watch = DDPWatch()
        self.watch.capture_next = True  # the first training forward's output
        store = dist.FileStore(str(self.workdir / f"store_{self.case}"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            try:  # before the first epoch, as nnUNetTrainer.initialize() wraps it
                trainer.network = DistributedDataParallel(trainer.network, find_unused_parameters=False)
                self.watch.attach(trainer.network)
            except Exception as error:
                self.ddp_wrap_error = describe(error)
            for index, epoch in enumerate(phase_starts):
                self.phases.append(self.train_phase(index, int(epoch)))
        finally:
            self.watch.remove()
            trainer.network = trainer.network_module
            dist.destroy_process_group()

    def record_training_output(self) -> None:
        """The output of the first training forward (through the DDP wrapper, with whatever else the trainer
        passes, e.g. H-SAM's label map), or, when train_step did not call the wrapper or its network returns
        a method-specific structure in training (AutoMedSAM's class prediction), of ``network(data)`` in
        train mode with the trainer's deep-supervision setting on the same batch; and the trainer's loss
        on it."""
        trainer, batch = self.trainer, self.first_training_batch
        try:
            with torch.no_grad():
                if self.watch.captured is not None:
                    self.training_output = self.watch.captured
                else:
                    trainer.set_deep_supervision_enabled(trainer.enable_deep_supervision)
                    trainer.network.train()
                    self.training_output = trainer.network(batch["data"])
                self.training_loss = float(trainer.loss(self.training_output, batch["target"]))
        except Exception as error:  # recorded; the tests that need it fail with it
            self.training_output_error = describe(error)

    def train_phase(self, index: int, epoch: int) -> PhaseRecord:
        trainer = self.trainer
        record = PhaseRecord(epoch)
        trainer.current_epoch = epoch
        try:
            trainer.on_train_epoch_start()
        except Exception as error:
            record.start_error = describe(error)
            return record
        record.trainable = self.trainable_names()
        if isinstance(trainer.network, DistributedDataParallel):
            if trainer.network is not self.watch.wrapper:  # the trainer wrapped anew for this phase
                self.watch.attach(trainer.network)
            registered = registered_with_ddp(trainer.network)
            if registered is not None:
                if unsynced := sorted(record.trainable - registered):
                    record.ddp_problems.append(f"trainable in this phase but not among the parameters the DDP "
                                               f"wrapper all-reduces: {listed(unsynced)}")
                if stale := sorted(registered - record.trainable):
                    record.ddp_problems.append(f"frozen in this phase but registered with the DDP wrapper, which "
                                               f"then waits for their gradients: {listed(stale)}")
        elif self.ddp_wrap_error is None and not record.ddp_problems and not any(p.ddp_problems for p in self.phases):
            record.ddp_problems.append("on_train_epoch_start replaced the DDP-wrapped network by an unwrapped one")
        before = {k: v.detach().clone() for k, v in self.network.state_dict().items()}
        handles = [p.register_post_accumulate_grad_hook(self.gradient_recorder(name, record))
                   for name, p in self.network.named_parameters(remove_duplicate=False) if name in record.trainable]
        try:
            for step in range(STEPS_PER_PHASE):
                batch = (self.first_training_batch if index == step == 0 else
                         make_batch(trainer, batch_size=BATCH_SIZE, seed=1 + STEPS_PER_PHASE * index + step))
                result = self.train_step(batch, step, record)
                if result is None:
                    break
                record.losses.append(float(result["loss"]))
                record.missing_grads.append(sorted(record.trainable - self.step_gradients))
        finally:
            for handle in handles:
                handle.remove()
        after = self.network.state_dict()
        if set(after) != set(before):
            record.changed_frozen.append(f"state_dict keys changed: added {listed(sorted(set(after) - set(before)))}; "
                                         f"removed {listed(sorted(set(before) - set(after)))}")
        for key, old in before.items():
            if key in record.trainable or key not in after or torch.equal(old, after[key]):
                continue
            new = after[key]
            if old.shape != new.shape:
                record.changed_frozen.append(f"{key} (shape {tuple(old.shape)} -> {tuple(new.shape)})")
            else:
                diff = (new.double() - old.double()).abs().max().item() if old.numel() else 0.0
                record.changed_frozen.append(f"{key} (max |change| {diff:.3g})")
        return record

    def gradient_recorder(self, name: str, record: PhaseRecord):
        """Post-accumulate-grad hook of parameter ``name``: it got a gradient in this step (non-zero?)."""
        def hook(p: torch.Tensor) -> None:
            self.step_gradients.add(name)
            if bool((p.grad != 0).any()):
                record.nonzero_grads.add(name)
        return hook

    def train_step(self, batch: dict, step: int, record: PhaseRecord) -> dict | None:
        """``trainer.train_step(batch)``; under DDP the step must call the wrapper (DDP all-reduces the
        gradients of one backward only after its forward ran). A step that fails under DDP is recorded and
        retried on the unwrapped network (which then stays unwrapped), so the other checks still see
        training."""
        trainer = self.trainer
        self.step_gradients: set[str] = set()
        if isinstance(trainer.network, DistributedDataParallel):
            self.watch.forwards = 0
            try:
                result = trainer.train_step(batch)
            except Exception as error:
                record.ddp_problems.append(f"step {step}: train_step under DDP raised {describe(error)}")
                trainer.network = trainer.network.module
                self.watch.remove()
            else:
                if self.watch.forwards == 0:  # then DDP's reducer is not armed: no gradient is all-reduced
                    record.ddp_problems.append(f"step {step}: train_step never called the DDP-wrapped network "
                                               f"(trainer.network); it ran the unwrapped module")
                return result
            gc.collect()  # the failed wrapper's reducer leaves the parameters' gradient hooks when it is freed
            self.step_gradients = set()
        try:
            return trainer.train_step(batch)
        except Exception as error:
            record.step_errors.append(f"step {step}: {describe(error)}")
            return None

    # ---- eval mode ----------------------------------------------------------------------------------
    def forward_deployed(self, network: nn.Module | None = None) -> torch.Tensor:
        """One forward in eval mode, deep supervision off, no autograd (what nnU-Net's predictor runs); of
        the trained network unless another is given (whose deep-supervision switch is left as it is)."""
        if network is None:
            self.trainer.set_deep_supervision_enabled(False)
            network = self.network
        network.eval()
        with torch.no_grad():
            return network(self.batch["data"])

    def deployed_output(self) -> torch.Tensor:
        """The trained network's deployed output on the eval batch, computed once."""
        if self._deployed is None:
            self._deployed = self.forward_deployed()
        return self._deployed


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """nnU-Net folders for the module's trainers, one intra-op thread while it lasts."""
    root = tmp_path_factory.mktemp("trainer_contract")
    with trainer_workdir(root):
        yield root


@pytest.fixture(scope="module", params=CASES, ids=str)
def run(request, workdir) -> ContractRun:
    """The case built and trained once; every test of the case reads it (module scope: pytest runs a
    case's tests together, then drops it)."""
    try:
        return ContractRun(request.param, workdir)
    except Exception as error:
        raise pytest.fail.Exception(f"building or training {request.param} raised {describe(error)}",
                                    pytrace=False) from None


# Failures report their message only: it names what broke, and with a few hundred failing cases
# pytest's traceback rendering would cost more time than the checks themselves.
def check(ok: bool, message: str) -> None:
    if not ok:
        pytest.fail(message, pytrace=False)


@contextlib.contextmanager
def reported(what: str):
    """An exception inside fails the test with ``what raised ...`` (type, message, innermost frames)."""
    try:
        yield
    except Exception as error:
        raise pytest.fail.Exception(f"{what} raised {describe(error)}", pytrace=False) from None


def require_training_output(run: ContractRun):
    check(run.training_output_error is None, f"the training forward or loss raised {run.training_output_error}")
    return run.training_output


def require_completed_phases(run: ContractRun) -> list[PhaseRecord]:
    """The phase records, failing when a phase did not start or a train step raised (the check that
    called this cannot be made then)."""
    problems = []
    for phase in run.phases:
        if phase.start_error:
            problems.append(f"{phase.name}: on_train_epoch_start raised {phase.start_error}")
        problems += [f"{phase.name}: train_step raised at {error}" for error in phase.step_errors]
    check(not problems, "training did not complete:\n" + "\n".join(problems))
    return run.phases


def deployed(run: ContractRun) -> torch.Tensor:
    """The trained network's deployed output, failing the test when the forward raises or gives a list."""
    with reported("the eval forward"):
        output = run.deployed_output()
    check(isinstance(output, torch.Tensor),
          f"with deep supervision off, the eval forward gives a {type(output).__name__}, not one tensor")
    return output


# ---- 1. shapes ---------------------------------------------------------------------------------
def test_deployed_output_has_one_channel_per_class_over_the_whole_patch(run):
    """In eval mode without deep supervision the network maps (B, 1, *patch) to (B, K, *patch): what
    nnU-Net's sliding-window predictor adds up."""
    output = deployed(run)
    expected = (BATCH_SIZE, run.case.num_classes, *run.patch)
    check(tuple(output.shape) == expected, f"output {tuple(output.shape)}, expected {expected}")


def test_training_output_matches_the_trainers_deep_supervision_scales(run):
    """The first training forward (through the DDP wrapper in train_step; train mode with the trainer's
    deep-supervision setting) gives one output per scale of ``_get_deep_supervision_scales()``, each
    (B, K, *round(patch * scale)) as nnU-Net's target downsampling shapes the labels; one (B, K, *patch)
    tensor when the scales are None."""
    output = require_training_output(run)
    scales = run.trainer._get_deep_supervision_scales()
    K = run.case.num_classes
    if scales is None:
        check(isinstance(output, torch.Tensor), f"no deep-supervision scales, but the output is a {type(output)}")
        expected = (BATCH_SIZE, K, *run.patch)
        check(tuple(output.shape) == expected, f"output {tuple(output.shape)}, expected {expected}")
        return
    check(isinstance(output, (list, tuple)), f"deep-supervision scales {scales}, but the output is one tensor")
    expected = [(BATCH_SIZE, K, *(round(n * s) for n, s in zip(run.patch, scale))) for scale in scales]
    actual = [tuple(o.shape) for o in output]
    check(actual == expected, f"outputs {actual}, expected {expected} (scales {scales})")


# ---- 2. finite values ---------------------------------------------------------------------------
def test_outputs_and_losses_are_finite(run):
    """No NaN or inf in the first training output, the trainer's loss on it, the deployed output, or the
    losses the train steps return."""
    problems = []
    if run.training_output_error is None:
        for i, output in enumerate(as_list(run.training_output)):
            if not torch.isfinite(output).all():
                problems.append(f"training output {i} has {int((~torch.isfinite(output)).sum())} non-finite values")
        if not math.isfinite(run.training_loss):
            problems.append(f"trainer.loss on the training output is {run.training_loss}")
    else:
        problems.append(f"the training forward or loss raised {run.training_output_error}")
    output = deployed(run)
    if not torch.isfinite(output).all():
        problems.append(f"deployed output has {int((~torch.isfinite(output)).sum())} non-finite values")
    for phase in run.phases:
        if not all(math.isfinite(loss) for loss in phase.losses):
            problems.append(f"{phase.name}: train_step losses {phase.losses}")
    check(not problems, "\n".join(problems))


# ---- 3./4. training through train_step in every phase --------------------------------------------
def test_train_step_runs_in_every_training_phase(run):
    """For every phase start e (``training_phase_starts()``): ``current_epoch = e``,
    ``on_train_epoch_start()``, then two steps of the trainer's own ``train_step`` (each one optimiser
    step) complete and return a loss."""
    phases = require_completed_phases(run)
    check(bool(phases), "no training phase")
    for phase in phases:
        check(len(phase.losses) == STEPS_PER_PHASE, f"{phase.name}: {len(phase.losses)} steps returned a loss")


# ---- 5. frozen state ----------------------------------------------------------------------------
def test_frozen_weights_and_buffers_stay_bitwise_unchanged(run):
    """Every state_dict entry that is not a parameter trainable in the phase (frozen weights, and buffers
    such as BatchNorm statistics of a frozen encoder) is bitwise the same after the phase's train steps:
    frozen means the released weights are what the checkpoint holds."""
    changed = [f"{phase.name}: {listed(phase.changed_frozen)}" for phase in require_completed_phases(run)
               if phase.changed_frozen]
    check(not changed, "frozen state_dict entries changed in training:\n" + "\n".join(changed))


# ---- 6. gradients -------------------------------------------------------------------------------
def test_every_trainable_parameter_gets_a_gradient_in_every_step(run):
    """Every parameter with requires_grad in the phase has a gradient (not None) after every train step:
    DDP with find_unused_parameters=False (nnU-Net's setting) fails on a trainable parameter the loss does
    not reach, and it would be trained by weight decay alone."""
    missing = []
    for phase in require_completed_phases(run):
        for step, names in enumerate(phase.missing_grads):
            if names:
                missing.append(f"{phase.name}, step {step}: {len(names)} of {len(phase.trainable)} trainable "
                               f"parameters got no gradient: {listed(names)}")
    check(not missing, "\n".join(missing))


def test_every_trainable_parameter_gets_a_nonzero_gradient_within_two_steps(run):
    """Every parameter trainable in the phase gets a non-zero gradient in at least one of the phase's two
    steps (two, because a zero-initialised up-projection such as LoRA's B zeroes the first step's
    gradient of its down-projection)."""
    zero = []
    for phase in require_completed_phases(run):
        names = sorted(phase.trainable - phase.nonzero_grads)
        if names:
            zero.append(f"{phase.name}: {len(names)} of {len(phase.trainable)} trainable parameters had only "
                        f"zero or no gradients: {listed(names)}")
    check(not zero, "\n".join(zero))


# ---- 7. DDP -------------------------------------------------------------------------------------
def test_training_runs_through_the_ddp_wrapper(run):
    """With ``trainer.network`` wrapped in DistributedDataParallel(find_unused_parameters=False) before
    the first epoch (as nnU-Net's multi-GPU training does), every train step completes under DDP and
    calls the wrapper (a step that runs only the unwrapped network skips gradient synchronisation), and
    the parameters trainable in each phase are exactly the ones the wrapper in use then all-reduces (DDP
    registers them when it wraps, so a phase that changes what trains needs a new wrapper)."""
    check(run.ddp_wrap_error is None, f"wrapping the network in DDP raised {run.ddp_wrap_error}")
    problems = [f"{phase.name}: {problem}" for phase in run.phases for problem in phase.ddp_problems]
    check(not problems, "\n".join(problems))
    require_completed_phases(run)


# ---- 8./9. deployed output ------------------------------------------------------------------------
def test_deployed_output_is_deterministic(run):
    """Two eval forwards of the same input are bitwise equal (no sampling or noise at inference)."""
    first = deployed(run)
    with reported("the second eval forward"):
        second = run.forward_deployed()
    problem = difference(second, first)
    check(problem is None, f"second eval forward: {problem}")


def test_first_deep_supervision_output_is_the_deployed_output(run):
    """In eval mode, output[0] with deep supervision on equals the output with it off: nnU-Net computes
    its online pseudo-Dice and ranks checkpoints on output[0] of the deep-supervised network, so it must
    be what inference deploys."""
    expected = deployed(run)
    with reported("the eval forward with deep supervision on"):
        run.trainer.set_deep_supervision_enabled(True)
        try:
            supervised = run.forward_deployed(run.network)
        finally:
            run.trainer.set_deep_supervision_enabled(False)
    first = as_list(supervised)[0]
    check(first.shape == expected.shape, f"output[0] {tuple(first.shape)}, deployed {tuple(expected.shape)}")
    check(torch.allclose(first, expected, rtol=DEPLOYED_ATOL, atol=DEPLOYED_ATOL),
          f"output[0] with deep supervision differs from the deployed output by up to "
          f"{(first - expected).abs().max().item():.3g}")


# ---- 10.-12. copies -------------------------------------------------------------------------------
def perturb_(network: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(0.5 + torch.rand(p.shape, generator=generator, dtype=p.dtype))


def test_deepcopy_reproduces_the_output_and_shares_nothing_with_the_original(run):
    """``copy.deepcopy(network)`` gives the same deployed output, and the two are independent: perturbing
    every parameter of one leaves the other's output unchanged (a copy still reaching the original's
    modules through hooks or closures fails this; nnU-Net's ensembling and EMA-style code copy networks)."""
    original = run.network
    expected = deployed(run)
    with reported("copy.deepcopy(network)"):
        duplicate = copy.deepcopy(original)
    saved = [p.detach().clone() for p in original.parameters()]
    perturb_(original, seed=0)
    try:
        with reported("the deepcopy's eval forward (original perturbed)"):
            copy_output = run.forward_deployed(duplicate)
    finally:  # bitwise restore: the case's other tests use the trained network
        with torch.no_grad():
            for p, value in zip(original.parameters(), saved):
                p.copy_(value)
    if difference(copy_output, expected) is not None:  # not reproduced, or reaching into the original? tell apart
        with reported("the deepcopy's eval forward"):
            problem = difference(run.forward_deployed(duplicate), expected)
        check(problem is None, f"the deepcopy's output: {problem}")
        check(False, f"perturbing the original's parameters changed the deepcopy's output "
                     f"({difference(copy_output, expected)}): the copy still uses modules of the original "
                     f"(forward hooks or closures holding them)")
    perturb_(duplicate, seed=1)
    with reported("the original's eval forward after perturbing the deepcopy"):
        problem = difference(run.forward_deployed(), expected)
    check(problem is None, f"perturbing the deepcopy's parameters changed the original's output ({problem}): the "
                           f"original uses modules of the copy")


def test_state_dict_round_trip_reproduces_the_output(run):
    """A network freshly built by the trainer's builder from the same plans, after
    ``load_state_dict(trained.state_dict(), strict=True)``, gives exactly the trained network's deployed
    output: what nnU-Net's predictor does with a checkpoint."""
    expected = deployed(run)
    with reported("building a fresh network and loading the trained state_dict (strict)"):
        fresh = build_fresh_network(run.trainer, enable_deep_supervision=False)
        fresh.load_state_dict(run.network.state_dict(), strict=True)
    with reported("the reloaded network's eval forward"):
        problem = difference(run.forward_deployed(fresh), expected)
    check(problem is None, f"the reloaded network's output: {problem}")


def test_pickled_network_reproduces_the_output(run):
    """``pickle.loads(pickle.dumps(network))`` works (multiprocessing and some export paths pickle the
    network) and gives the same deployed output."""
    expected = deployed(run)
    with reported("pickling and unpickling the network"):
        restored = pickle.loads(pickle.dumps(run.network, protocol=pickle.HIGHEST_PROTOCOL))
    with reported("the unpickled network's eval forward"):
        problem = difference(run.forward_deployed(restored), expected)
    check(problem is None, f"the unpickled network's output: {problem}")


# ---- 13. tracing, once per network class ----------------------------------------------------------
def network_classes() -> list[tuple[str, str]]:
    """(network class, the first registered trainer that builds it) for every network class in use."""
    first: dict[str, str] = {}
    for name in TRAINERS.names():
        first.setdefault(TRAINERS.get(name).network_class, name)
    return sorted(first.items())


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
@pytest.mark.parametrize("network_class, trainer_name", network_classes(), ids=[c for c, _ in network_classes()])
def test_every_network_class_traces(workdir, network_class, trainer_name, backbone):
    """``torch.jit.trace`` runs through the deployed forward (no Python hooks or closures in the way) and
    the traced module gives the eager output on the traced input."""
    trainer = build_trainer(trainer_name, backbone=backbone, num_classes=3, img_size=IMG_SIZE,
                            depth=3 if getattr(TRAINERS.get(trainer_name), "uses_slice_stacks", False) else 1)
    network = trainer.network_module.eval()
    trainer.set_deep_supervision_enabled(False)
    data = make_batch(trainer, batch_size=BATCH_SIZE)["data"]
    with torch.no_grad(), reported("torch.jit.trace of the deployed forward"), warnings.catch_warnings():
        # a trace fixes Python-side shape checks as constants (the output check below is what counts here);
        # torch 2.13 marks jit.trace deprecated in favour of torch.export
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(network, data, check_trace=False)
    with torch.no_grad():
        traced_output, eager_output = traced(data), network(data)
    # not bitwise: eager TinyViT fuses convolutions in oneDNN where a trace records the plain operators
    problem = difference(traced_output, eager_output)
    check(problem is None or torch.allclose(traced_output, eager_output, rtol=1e-5, atol=1e-5),
          f"the traced {network_class}'s output: {problem}")
