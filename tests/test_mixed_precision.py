"""Mixed precision on every trainer (issue 14, deliverable 5).

- Each main trainer on each tiny backbone (``tests/trainer_harness.py``: nnU-Net's constructor and
  ``initialize()``, CPU), with the ``precision`` hyper-parameter ``bf16``: two real ``train_step`` calls
  and one ``validation_step``. Every ``nn.Linear`` of the network must output bfloat16 during both (so the
  forward ran under autocast, in the encoder and the decoder alike), the loss must compute with float32
  network outputs and be finite, and the parameters must stay float32 with finite float32 gradients, and
  change.
- The same steps under float16 with a GradScaler: the branch of ``train_step`` that CUDA's default takes.
  CUDA kernels cannot run here, so torch's CPU float16 autocast and ``GradScaler("cpu")`` stand in (samunet
  refuses fp16 on a CPU for real training); the dtypes the networks meet and the code path are CUDA's.
- Which autocast dtype and GradScaler each device and ``--precision`` choice gets, CUDA included, without
  running CUDA kernels; fp16 on a CPU is refused in one line by ``samunet_train`` and ``samunet_demo``.
- ``--precision`` reaches the trainer and ``--c`` restores it from the fold folder.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from torch import nn

from samunet import precision as precision_module
from samunet.errors import ConfigurationError
from samunet.registry import TRAINERS
from samunet.precision import PRECISIONS, Precision, choose_precision
from trainer_harness import (DATASET_NAME, PLANS_NAME, build_trainer, in_memory_dataset_class, make_batch,
                             synthetic_dataset_json, synthetic_plans, trainer_workdir)

MAIN_TRAINERS = ("SAMedTrainer", "HSPSAMTrainer", "HSAMTrainer", "SelfPromptSAMTrainer", "AutoMedSAMTrainer")
TINY_BACKBONES = ("vit_test", "tinyvit_test")
# 64 px: at 32 px the ViT's 2 x 2 embedding leaves AutoMedSAM's diffusion prompt encoder a stride-2 convolution of
# a 1 x 1 map, whose bfloat16 weight gradient torch 2.13's CPU kernel (oneDNN) fills with NaN now and then (a torch
# bug; at the sizes samunet plans the map is at least 4 x 4)
IMG_SIZE = 64
FP16_IMG_SIZE = 32  # CPU float16 convolutions are slow (no float16 kernels)
NUM_CLASSES = 3
STACK_DEPTH = 2


@pytest.fixture
def workdir(tmp_path):
    with trainer_workdir(tmp_path) as folders:
        yield folders


def build_with_precision(name: str, backbone: str, precision: str, monkeypatch, img_size: int = IMG_SIZE):
    """The harness's trainer with ``precision`` among its class's default hyper-parameters, so nnU-Net's
    constructor applies it through ``set_hyperparameters`` as it applies every hyper-parameter."""
    trainer_class = TRAINERS.get(name)
    monkeypatch.setattr(trainer_class, "default_hyperparameters",
                        {**trainer_class.default_hyperparameters, "precision": precision})
    depth = STACK_DEPTH if getattr(trainer_class, "uses_slice_stacks", False) else 1
    return build_trainer(name, backbone=backbone, num_classes=NUM_CLASSES, img_size=img_size, depth=depth)


@contextlib.contextmanager
def linear_output_dtypes(network: nn.Module):
    """Record ``(module name, output dtype)`` of every ``nn.Linear`` of ``network`` while the context lasts."""
    seen: list[tuple[str, torch.dtype]] = []
    handles = [module.register_forward_hook(lambda m, args, out, name=name: seen.append((name, out.dtype)))
               for name, module in network.named_modules() if isinstance(module, nn.Linear)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def loss_input_dtypes(loss: nn.Module):
    """Record the dtypes of the floating tensors (also in lists) that ``loss`` computes with, i.e. after its
    forward pre-hooks, while the context lasts."""
    seen: list[torch.dtype] = []

    def record(module, args, result):
        for value in args:
            for tensor in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                    seen.append(tensor.dtype)

    handle = loss.register_forward_hook(record)
    try:
        yield seen
    finally:
        handle.remove()


def assert_forward_ran_in(seen: list[tuple[str, torch.dtype]], dtype: torch.dtype, step: str) -> None:
    assert any(name.startswith("image_encoder.") for name, _ in seen), f"{step}: no encoder Linear ran"
    assert any(not name.startswith("image_encoder.") for name, _ in seen), f"{step}: no decoder Linear ran"
    other = sorted({f"{name}: {d}" for name, d in seen if d != dtype})
    assert not other, f"{step}: these Linear layers did not run in {dtype}: {other[:10]}"


def run_steps(trainer, dtype: torch.dtype, *, steps: int, finite_gradients: bool) -> None:
    """``steps`` train_steps and one validation_step: every Linear in ``dtype``, finite float32 losses, float32
    parameters and gradients, and with ``finite_gradients`` finite gradients that changed every trainable
    parameter (a GradScaler may instead skip a step with non-finite gradients, which is its job)."""
    network = trainer.network_module
    trainer.on_train_epoch_start()  # enters the first training phase, which decides what trains
    trainable = {name: p.detach().clone() for name, p in network.named_parameters() if p.requires_grad}
    outputs = []
    for step in range(steps):
        with linear_output_dtypes(network) as seen, loss_input_dtypes(trainer.loss) as loss_inputs:
            outputs.append(trainer.train_step(make_batch(trainer, seed=step)))
        assert_forward_ran_in(seen, dtype, f"train_step {step}")
        # AutoMedSAM trains with its joint loss (which takes float32 itself), the others with trainer.loss
        assert set(loss_inputs) <= {torch.float32}, f"train_step {step}: the loss computed with {set(loss_inputs)}"
        loss = outputs[-1]["loss"]
        assert loss.dtype == np.float32 and np.isfinite(loss), f"train_step {step}: loss {loss}"
        for name, parameter in network.named_parameters():
            assert parameter.dtype == torch.float32, f"{name} became {parameter.dtype}"
            if parameter.grad is not None:
                assert parameter.grad.dtype == torch.float32, f"{name}.grad is {parameter.grad.dtype}"
                assert not finite_gradients or torch.isfinite(parameter.grad).all(), \
                    f"{name}.grad is not finite at step {step}"
    if finite_gradients:
        unchanged = [name for name, before in trainable.items()
                     if torch.equal(before, network.get_parameter(name).detach())]
        assert not unchanged, f"trainable parameters that {steps} steps left unchanged: {unchanged[:10]}"
    trainer.on_train_epoch_end(outputs)
    trainer.on_validation_epoch_start()
    with linear_output_dtypes(network) as seen, loss_input_dtypes(trainer.loss) as loss_inputs:
        validation = trainer.validation_step(make_batch(trainer, seed=steps))
    assert_forward_ran_in(seen, dtype, "validation_step")
    assert loss_inputs and set(loss_inputs) == {torch.float32}, f"the loss computed with {set(loss_inputs)}"
    assert validation["loss"].dtype == np.float32 and np.isfinite(validation["loss"]), validation["loss"]


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
@pytest.mark.parametrize("name", MAIN_TRAINERS)
def test_bf16_steps_of_every_main_trainer_run_in_bfloat16_with_float32_parameters(name, backbone, workdir,
                                                                                monkeypatch):
    trainer = build_with_precision(name, backbone, "bf16", monkeypatch)
    assert trainer.precision == Precision("bf16", "cpu", torch.bfloat16, uses_grad_scaler=False)
    assert trainer.grad_scaler is None
    run_steps(trainer, torch.bfloat16, steps=2, finite_gradients=True)


@pytest.mark.parametrize("name", MAIN_TRAINERS)
def test_the_fp16_grad_scaler_step_runs_every_main_trainer_in_float16(name, workdir, monkeypatch):
    """CUDA's default path (float16 autocast, GradScaler) with CPU stand-ins, which samunet refuses for real
    training on a CPU and this test therefore sets directly. One step: CPU float16 convolutions are slow."""
    trainer = build_with_precision(name, "tinyvit_test", "bf16", monkeypatch, img_size=FP16_IMG_SIZE)
    trainer.precision = Precision("fp16", "cpu", torch.float16, uses_grad_scaler=True)
    trainer.grad_scaler = torch.amp.GradScaler("cpu")
    scaler_steps = []
    real_step = trainer.grad_scaler.step
    monkeypatch.setattr(trainer.grad_scaler, "step", lambda *a, **k: scaler_steps.append(1) or real_step(*a, **k))
    run_steps(trainer, torch.float16, steps=1, finite_gradients=False)
    assert scaler_steps == [1], "train_step did not step the optimiser through the GradScaler"


@pytest.mark.parametrize(("device", "requested", "expected"), [
    ("cuda", None, ("fp16", torch.float16, True)),  # nnU-Net's default on CUDA
    ("cuda", "fp16", ("fp16", torch.float16, True)),
    ("cuda", "bf16", ("bf16", torch.bfloat16, False)),
    ("cuda", "fp32", ("fp32", None, False)),
    ("cpu", None, ("fp32", None, False)),  # nnU-Net runs CPUs in float32
    ("cpu", "bf16", ("bf16", torch.bfloat16, False)),
    ("mps", None, ("fp32", None, False)),
])
def test_each_device_gets_nnunets_default_or_the_chosen_precision(device, requested, expected):
    precision = choose_precision(device, requested)
    assert (precision.name, precision.autocast_dtype, precision.uses_grad_scaler) == expected


@pytest.mark.parametrize(("device", "requested", "words"), [
    ("cpu", "fp16", ("fp16", "CUDA", "bf16")),
    ("mps", "bf16", ("bf16", "mps", "fp32")),
    ("cpu", "fp8", ("fp8", "fp32, fp16, bf16")),
])
def test_a_precision_the_device_cannot_run_is_refused_in_one_line(device, requested, words):
    with pytest.raises(ConfigurationError) as error:
        choose_precision(device, requested)
    message = str(error.value)
    assert "\n" not in message and all(word in message for word in words), message


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_native_bfloat16_trains_with_a_warning(native, workdir, monkeypatch, caplog):
    """Emulated bfloat16 is slower than float32 (samunet.precision.choose_precision): a CPU trainer set to bf16
    still trains in bf16, and warns only where the CPU has no native bfloat16."""
    monkeypatch.setattr(precision_module, "cpu_has_native_bfloat16", lambda: native)
    trainer = TRAINERS.get("SAMedTrainer")(synthetic_plans(backbone="vit_test", img_size=IMG_SIZE), "2d", 0,
                                           synthetic_dataset_json(NUM_CLASSES), torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger=precision_module.__name__):
        trainer.set_hyperparameters({"precision": "bf16"})
    assert trainer.precision.name == "bf16"
    assert ("no native bfloat16" in caplog.text) is not native


def test_a_cuda_trainer_gets_the_grad_scaler_for_fp16_only_and_autocasts_to_the_chosen_dtype(workdir):
    """nnU-Net's constructor on a CUDA device (no kernel runs): fp16 (the default) keeps a GradScaler, bf16 and
    fp32 drop it, and the trainer's autocast context targets CUDA with the chosen dtype."""
    trainer_class = TRAINERS.get("SAMedTrainer")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that CUDA is unavailable for the GradScaler and autocast
        trainer = trainer_class(synthetic_plans(backbone="vit_test", img_size=IMG_SIZE), "2d", 0,
                                synthetic_dataset_json(NUM_CLASSES), torch.device("cuda"))
        assert trainer.precision.name == "fp16" and isinstance(trainer.grad_scaler, torch.amp.GradScaler)
        context = trainer.autocast()
        assert (context.device, context.fast_dtype) == ("cuda", torch.float16)
        trainer.set_hyperparameters({"precision": "bf16"})
        assert trainer.grad_scaler is None
        context = trainer.autocast()
        assert (context.device, context.fast_dtype) == ("cuda", torch.bfloat16)
        trainer.set_hyperparameters({"precision": "fp32"})
        assert trainer.grad_scaler is None and isinstance(trainer.autocast(), contextlib.nullcontext)
        trainer.set_hyperparameters({"precision": "fp16"})
        assert isinstance(trainer.grad_scaler, torch.amp.GradScaler)


def test_every_training_command_takes_the_precisions():
    from samunet.cli import demo, train, train_cv
    assert train.PRECISION_CHOICES == PRECISIONS
    cv_args = train_cv.build_parser().parse_args(["999", "2d", "--precision", "bf16"])
    assert train.hyperparameters_from_args(cv_args) == {"precision": "bf16"}
    assert demo.build_parser().parse_args(["--precision", "bf16"]).precision == "bf16"


@contextlib.contextmanager
def in_memory_data(trainer_class: type):
    """nnU-Net's data set class replaced by the harness's in-memory one (as ``build_trainer`` does), so
    ``initialize()`` reads no preprocessed data."""
    dataset_class = in_memory_dataset_class(num_classes=NUM_CLASSES, img_size=IMG_SIZE)
    with contextlib.ExitStack() as patches:
        for module in {sys.modules[klass.__module__] for klass in trainer_class.__mro__}:
            if hasattr(module, "infer_dataset_class"):
                patches.enter_context(mock.patch.object(module, "infer_dataset_class", return_value=dataset_class))
        yield


def test_precision_flag_reaches_the_trainer_and_continuing_restores_it(workdir):
    """``samunet_train ... --precision bf16`` -> the trainer's precision and checkpoint; ``--c`` without the
    flag continues in bf16."""
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    from samunet.cli.train import _set_up_trainer, build_parser, hyperparameters_from_args
    args = build_parser().parse_args(["999", "2d", "0", "--precision", "bf16", "-device", "cpu"])
    trainer_class = TRAINERS.get("SAMedTrainer")
    fold_folder = Path(get_output_folder(DATASET_NAME, trainer_class.__name__, PLANS_NAME, "2d", 0))

    def set_up(continue_training: bool, hyperparameters: dict):
        with in_memory_data(trainer_class):
            return _set_up_trainer(trainer_class, synthetic_plans(backbone="vit_test", img_size=IMG_SIZE),
                                   synthetic_dataset_json(NUM_CLASSES), "2d", 0, fold_folder,
                                   continue_training=continue_training, only_validate=False, device="cpu",
                                   hyperparameters=hyperparameters, backbone=None, depth=None)

    trainer = set_up(False, hyperparameters_from_args(args))
    assert trainer.precision.name == "bf16"
    with in_memory_data(trainer_class):
        trainer.initialize()
    trainer.save_checkpoint(str(fold_folder / "checkpoint_latest.pth"))
    checkpoint = torch.load(fold_folder / "checkpoint_latest.pth", weights_only=True)
    assert checkpoint["samunet"]["hyperparameters"]["precision"] == "bf16"

    continued = set_up(True, hyperparameters_from_args(build_parser().parse_args(["999", "2d", "0", "--c"])))
    assert continued.was_initialized and continued.precision.name == "bf16"
    assert continued.hyperparameters["precision"] == "bf16"


def refuse_to_run(*args, **kwargs):
    raise AssertionError("the command went on to run although its --precision was refused")


def test_samunet_train_refuses_fp16_on_a_cpu_in_one_line(planned_tiny_dataset, capsys, monkeypatch):
    from samunet.cli.train import main as train_main
    from samunet.trainers.base import SAMTrainerBase
    monkeypatch.setattr(SAMTrainerBase, "run_training", refuse_to_run)
    results = planned_tiny_dataset["nnUNet_results"]  # shared: other tests' trainings may be there
    before = sorted(path for path in results.rglob("*") if path.is_file())
    assert train_main(["991", "2d", "0", "-device", "cpu", "--precision", "fp16"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and "\n" not in error and "fp16" in error and "bf16" in error, error
    assert sorted(path for path in results.rglob("*") if path.is_file()) == before


def test_samunet_demo_refuses_fp16_on_a_cpu_before_writing_anything(tmp_path, capsys, monkeypatch):
    from samunet.cli import demo
    from samunet.cli.demo import main as demo_main
    monkeypatch.setattr(demo, "run_demo", refuse_to_run)
    assert demo_main(["--output", str(tmp_path / "demo"), "-device", "cpu", "--precision", "fp16"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and "\n" not in error and "fp16" in error, error
    assert not (tmp_path / "demo").exists()
