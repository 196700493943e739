"""The numeric precision a trainer's steps and a predictor's network calls run in, chosen the nnU-Net way.

nnU-Net trains and predicts on CUDA under ``torch.autocast`` (float16), training with a ``GradScaler``, and
on every other device in float32. samunet keeps those defaults and adds one choice, the ``precision``
hyper-parameter (``--precision`` of samunet_train, samunet_train_cv and samunet_demo; samunet_predict's
``--precision`` for prediction, :mod:`samunet.inference.batched_predictor`):

- ``fp16``: autocast float16 with nnU-Net's GradScaler; CUDA only (the default there);
- ``bf16``: autocast bfloat16 without a GradScaler (bfloat16 has float32's exponent range, so gradients
  do not underflow and nothing needs scaling; no ``found_inf`` read per step either); CUDA (GPUs that
  support bfloat16) and CPU;
- ``fp32``: no autocast (the default on CPU and MPS).

On a CPU without native bfloat16 instructions (AVX512-BF16, AMX) autocast bfloat16 is emulated and slower
than float32, so :func:`choose_precision` logs a warning there (:func:`cpu_has_native_bfloat16`); training and
prediction both choose their precision through it.

Losses see float32 network outputs whatever the precision (:func:`float32_loss_inputs`), so a loss
computes the same way on every device: CUDA's autocast runs softmax and cross-entropy in float32 by
itself, CPU's autocast leaves softmax in bfloat16 (nnU-Net's Dice loss would then sum probabilities
rounded to three significant digits), and a loss made of element-wise operations would otherwise run in
the network's half precision.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, ContextManager

import torch

from samunet.errors import ConfigurationError

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16")
_AUTOCAST_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Precision:
    """``name`` (one of ``PRECISIONS``) on ``device_type``: the autocast dtype (None: no autocast) and
    whether the backward goes through a GradScaler."""

    name: str
    device_type: str
    autocast_dtype: torch.dtype | None
    uses_grad_scaler: bool

    def autocast(self) -> ContextManager:
        """``torch.autocast`` for this device and dtype, or a context that changes nothing (fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)


def cpu_has_native_bfloat16() -> bool:
    """Whether oneDNN runs bfloat16 natively on this CPU (AVX512-BF16, AMX or similar); without it autocast
    bfloat16 is emulated and slower than float32. False where torch has no oneDNN or cannot tell (the check is
    torch's internal ``mkldnn._is_mkldnn_bf16_supported``)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def default_precision(device_type: str) -> str:
    """nnU-Net's choice: mixed float16 on CUDA, float32 elsewhere."""
    return "fp16" if device_type == "cuda" else "fp32"


def choose_precision(device_type: str, requested: str | None) -> Precision:
    """The precision ``requested`` (None: :func:`default_precision`) on a ``device_type`` device.

    Raises ConfigurationError for an unknown name, fp16 off CUDA, bf16 on a device other than CUDA or
    CPU, or bf16 on a GPU without bfloat16 support. bf16 on a CPU without native bfloat16 runs, with a
    warning: a (4096, 768) x (768, 768) linear layer under it ran 7x slower than in float32 on a 2-core AMD
    EPYC with AVX2 only (15 against 105 GFLOP/s, 2026-12-02).
    """
    name = default_precision(device_type) if requested is None else str(requested)
    if name not in PRECISIONS:
        raise ConfigurationError(f"unknown precision {name!r}; choose one of {', '.join(PRECISIONS)}")
    if name == "fp16" and device_type != "cuda":
        raise ConfigurationError(f"--precision fp16 needs a CUDA device (nnU-Net's float16 autocast with its "
                                 f"GradScaler); on {device_type} use --precision bf16 or fp32")
    if name == "bf16" and device_type not in ("cuda", "cpu"):
        raise ConfigurationError(f"--precision bf16 runs on cuda or cpu, not on {device_type}; use --precision fp32")
    if (name == "bf16" and device_type == "cuda" and torch.cuda.is_available()
            and not torch.cuda.is_bf16_supported()):
        raise ConfigurationError("--precision bf16: this GPU does not support bfloat16; use --precision fp16")
    if name == "bf16" and device_type == "cpu" and not cpu_has_native_bfloat16():
        logger.warning("--precision bf16: this CPU has no native bfloat16 instructions (AVX512-BF16 or AMX), so "
                       "bfloat16 is emulated and slower than float32; leave --precision out for nnU-Net's float32")
    return Precision(name=name, device_type=device_type, autocast_dtype=_AUTOCAST_DTYPES[name],
                     uses_grad_scaler=name == "fp16")


def to_float32(value: Any) -> Any:
    """float16 / bfloat16 tensors (also inside lists and tuples) as float32; everything else unchanged."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in (torch.float16, torch.bfloat16) else value
    if isinstance(value, (list, tuple)):
        return type(value)(to_float32(v) for v in value)
    return value


def float32_loss_inputs(loss: torch.nn.Module, args: tuple) -> tuple:
    """Forward pre-hook of a loss module: its half-precision inputs (network outputs) as float32, so the
    loss is computed in float32 under autocast on every device (register it with
    ``loss.register_forward_pre_hook``)."""
    return to_float32(args)
