"""Prediction precision (``BatchedPredictor(precision=...)``, samunet_predict's ``--precision``).

Default (None) is nnunetv2's: no autocast on a CPU. ``bf16`` runs every main network under CPU autocast
bfloat16 in both sliding-window paths (batched and nnunetv2's one tile at a time), hands float32 to the
Gaussian accumulation and segments as float32 does; a precision the device cannot run is refused.
"""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import samunet.inference.batched_predictor as batched_predictor
from samunet import precision as precision_module
from samunet.cli.predict import build_parser
from samunet.errors import ConfigurationError
from test_batched_prediction import MAIN_TRAINERS, build, predictor_for, volume

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class AutocastProbe(nn.Module):
    """``network`` that records, per call, whether CPU autocast was on and in which dtype."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.seen: list[torch.dtype | None] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return self.network(x)


@pytest.mark.parametrize("tiles_per_batch", [1, 4], ids=["one_tile", "batched"])
@pytest.mark.parametrize("precision, expected", [(None, None), ("fp32", None), ("bf16", torch.bfloat16)])
def test_the_network_runs_in_the_requested_precision_on_both_sliding_window_paths(precision, expected,
                                                                                     tiles_per_batch):
    _, _, _, network = build("SAMedTrainer")
    probe = AutocastProbe(network)
    predictor = predictor_for("SAMedTrainer", probe, mirroring=True, tiles_per_batch=tiles_per_batch,
                              precision=precision)
    logits = predictor.predict_sliding_window_return_logits(volume())
    assert probe.seen and set(probe.seen) == {expected}
    assert torch.isfinite(torch.as_tensor(logits).float()).all()


@pytest.mark.parametrize("trainer_name", list(MAIN_TRAINERS))
def test_every_main_network_segments_in_bf16_as_in_fp32(trainer_name):
    _, _, _, network = build(trainer_name)
    segmentations = {}
    for precision in ("fp32", "bf16"):
        predictor = predictor_for(trainer_name, network, mirroring=False, tiles_per_batch=4, precision=precision)
        logits = torch.as_tensor(predictor.predict_sliding_window_return_logits(volume())).float()
        assert torch.isfinite(logits).all()
        segmentations[precision] = logits.argmax(0)
    agreement = (segmentations["fp32"] == segmentations["bf16"]).float().mean().item()
    assert agreement >= 0.95, f"{trainer_name}: bf16 and fp32 segmentations agree on only {agreement:.1%} of voxels"


def test_a_precision_the_device_cannot_run_is_refused_when_the_predictor_is_built():
    with pytest.raises(ConfigurationError, match="fp16 needs a CUDA device"):
        batched_predictor.BatchedPredictor(device=torch.device("cpu"), allow_tqdm=False, precision="fp16")
    with pytest.raises(ConfigurationError, match="unknown precision"):
        batched_predictor.BatchedPredictor(device=torch.device("cpu"), allow_tqdm=False, precision="int8")


def test_bf16_on_a_cpu_without_native_bfloat16_is_run_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(precision_module, "cpu_has_native_bfloat16", lambda: False)
    with caplog.at_level(logging.WARNING, logger=precision_module.__name__):
        predictor = batched_predictor.BatchedPredictor(device=torch.device("cpu"), allow_tqdm=False, precision="bf16")
    assert predictor.precision.name == "bf16"
    assert "no native bfloat16" in caplog.text


def test_samunet_predict_takes_the_precision_and_defaults_to_nnunets():
    arguments = ["-i", "in", "-o", "out", "-d", "1"]
    assert build_parser().parse_args(arguments).precision is None
    assert build_parser().parse_args([*arguments, "--precision", "bf16"]).precision == "bf16"
