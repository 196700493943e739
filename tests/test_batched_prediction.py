"""Batched sliding-window prediction (samunet/inference/batched_predictor.py).

The batched predictor must give nnunetv2's one-tile-at-a-time result (the same Gaussian weighting, float16
accumulation and mirroring) while calling the network on several tiles at once, and every network must encode
each slice once per call. Equality is shown in two parts, because a network run on a batch is not bitwise the
network run on each row (float32 summation order differs by ~1e-7, which the float16 accumulator can round to
one float16 step):
- the predictor: with a network that runs its rows one at a time, batched and nnunetv2's own path agree to
  1e-5 (in fact bitwise), for a slice-stack and a single-slice trainer, with and without mirroring, on a
  volume whose tile count is not a multiple of the batch;
- each network: a batch's outputs equal the rows' outputs to 1e-5.
"""
from __future__ import annotations

import pytest
import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import nn

from samunet.errors import ConfigurationError
from samunet.inference.batched_predictor import (CPU_PIXELS_PER_BATCH, TILES_PER_BATCH_VARIABLE, BatchedPredictor,
                                                 default_tiles_per_batch)
from samunet.registry import TRAINERS
from trainer_harness import synthetic_dataset_json, synthetic_plans

MAIN_TRAINERS = {"SAMedTrainer": 1, "SelfPromptSAMTrainer": 3, "HSAMTrainer": 1, "HSPSAMTrainer": 1,
                 "AutoMedSAMTrainer": 1}  # name: slices per stack
NUM_CLASSES = 3
VOLUME = (1, 5, 64, 80)  # (C, Z, Y, X): 5 slices, two overlapping 64-px windows per slice

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build(trainer_name: str, batch_size: int = 4):
    """(trainer class, plans manager, inference configuration, network with perturbed random weights)."""
    trainer_class = TRAINERS.get(trainer_name)
    plans_manager = PlansManager(synthetic_plans(backbone="vit_test", img_size=64, depth=MAIN_TRAINERS[trainer_name],
                                                 batch_size=batch_size))
    configuration = trainer_class.inference_configuration(plans_manager.get_configuration("2d"))
    torch.manual_seed(0)
    network = trainer_class.build_network_architecture(plans_manager, configuration, 1, NUM_CLASSES, False).eval()
    with torch.no_grad():  # zero-initialised parts (LoRA, residual prompts) would hide mistakes
        for parameter in network.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return trainer_class, plans_manager, configuration, network


def predictor_for(trainer_name: str, network: nn.Module, *, mirroring: bool, tiles_per_batch: int | None,
                  precision: str | None = None):
    trainer_class, plans_manager, configuration, _ = build(trainer_name)
    predictor = trainer_class.predictor_class()(
        tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring, perform_everything_on_device=False,
        device=torch.device("cpu"), allow_tqdm=False, tiles_per_batch=tiles_per_batch, precision=precision)
    axes = (0, 1) if MAIN_TRAINERS[trainer_name] == 1 else (1, 2)
    predictor.manual_initialization(network, plans_manager, configuration, None,
                                    synthetic_dataset_json(NUM_CLASSES), trainer_name, axes)
    return predictor


class RowByRow(nn.Module):
    """``network`` run on each row of the batch separately: rows come out bitwise as without batching."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        return torch.cat([self.network(row[None]) for row in x])


def volume() -> torch.Tensor:
    return torch.randn(VOLUME, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("mirroring", [False, True], ids=["no_tta", "tta"])
@pytest.mark.parametrize("trainer_name", ["SAMedTrainer", "SelfPromptSAMTrainer"])
def test_batched_sliding_window_equals_nnunets_one_tile_at_a_time(trainer_name, mirroring):
    *_, network = build(trainer_name)
    image = volume()
    reference_predictor = predictor_for(trainer_name, RowByRow(network), mirroring=mirroring, tiles_per_batch=1)
    reference = torch.as_tensor(reference_predictor.predict_sliding_window_return_logits(image)).float()
    batched_predictor = predictor_for(trainer_name, RowByRow(network), mirroring=mirroring, tiles_per_batch=3)
    batched = torch.as_tensor(batched_predictor.predict_sliding_window_return_logits(image)).float()
    passes = 4 if mirroring else 1  # the batch, then its three in-plane flips
    calls = reference_predictor.network.calls
    assert set(calls) == {1} and len(calls) % passes == 0
    tiles = len(calls) // passes
    assert tiles % 3 != 0  # the last batch is a partial one
    sizes = [min(3, tiles - start) for start in range(0, tiles, 3)]
    assert batched_predictor.network.calls == [size for size in sizes for _ in range(passes)]
    assert batched.shape == reference.shape == (NUM_CLASSES, *VOLUME[1:])
    torch.testing.assert_close(batched, reference, atol=1e-5, rtol=0)
    # the real network on whole batches: the float32 noise stays below one float16 step of the output
    plain = predictor_for(trainer_name, network, mirroring=mirroring, tiles_per_batch=3)
    direct = torch.as_tensor(plain.predict_sliding_window_return_logits(image)).float()
    assert (direct - reference).abs().max() <= 2 ** -10 * max(1.0, reference.abs().max().item())


@pytest.mark.parametrize("trainer_name", list(MAIN_TRAINERS))
def test_a_batch_through_each_network_equals_its_rows_and_encodes_each_slice_once(trainer_name):
    """One image encoding per forward (AutoMedSAM decodes every class from it, H-SAM's two stages share it),
    and rows of a batch do not mix."""
    _, _, configuration, network = build(trainer_name)
    encoded_rows = []
    network.image_encoder.register_forward_pre_hook(lambda module, args: encoded_rows.append(args[0].shape[0]))
    x = torch.randn(3, 1, *configuration.patch_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        batched = network(x)
        assert encoded_rows == [3 * MAIN_TRAINERS[trainer_name]]
        rows = torch.cat([network(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, rows, atol=1e-5, rtol=1e-4)


def test_default_tiles_per_batch_follows_the_device_and_can_be_overridden(monkeypatch):
    *_, configuration, _ = build("SAMedTrainer", batch_size=12)
    assert default_tiles_per_batch(configuration, torch.device("cuda")) == 12  # the planned batch
    assert default_tiles_per_batch(configuration, torch.device("cpu")) == CPU_PIXELS_PER_BATCH // 64 ** 2
    *_, stacks, _ = build("SelfPromptSAMTrainer", batch_size=12)  # 4 stacks of 3 planned
    assert default_tiles_per_batch(stacks, torch.device("cuda")) == 4
    assert default_tiles_per_batch(stacks, torch.device("cpu")) == 1  # stacks: one per call on a CPU (measured)
    configuration.configuration["patch_size"] = [1024, 1024]  # a ViT at 1024 px: one slice per call on a CPU
    assert default_tiles_per_batch(configuration, torch.device("cpu")) == 1
    for name in MAIN_TRAINERS:
        assert issubclass(TRAINERS.get(name).predictor_class(), BatchedPredictor)
    monkeypatch.setenv(TILES_PER_BATCH_VARIABLE, "5")
    assert BatchedPredictor(device=torch.device("cpu")).tiles_per_batch == 5
    assert BatchedPredictor(device=torch.device("cpu"), tiles_per_batch=2).tiles_per_batch == 2
    monkeypatch.setenv(TILES_PER_BATCH_VARIABLE, "many")
    with pytest.raises(ConfigurationError, match=TILES_PER_BATCH_VARIABLE):
        BatchedPredictor(device=torch.device("cpu"))
    with pytest.raises(ConfigurationError, match="tiles_per_batch"):
        BatchedPredictor(device=torch.device("cpu"), tiles_per_batch=0)
