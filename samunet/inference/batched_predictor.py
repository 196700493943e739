"""nnunetv2's sliding-window predictor with several tiles per network call.

nnunetv2 2.8.1 (``nnUNetPredictor._internal_predict_sliding_window_return_logits``) runs the network on
one tile at a time: a (1, C, S, S) slice window of a 2d configuration, or a (1, C, D, S, S) stack. SAM
encoders then run with batch 1, which leaves most of a GPU idle and costs about twice the time per slice on
a CPU. :class:`BatchedPredictor` overrides only that method: it takes nnunetv2's tiles (the same slicers,
``_internal_get_sliding_window_slicers``), stacks ``tiles_per_batch`` of them into one batch, runs
nnunetv2's ``_internal_maybe_mirror_and_predict`` on the batch (so each mirrored copy of a slice is encoded
once, in one call for the whole batch), and adds each tile's prediction into nnunetv2's accumulators exactly
as nnunetv2 does: in the same order, times the same Gaussian (``compute_gaussian``), into float16 arrays on
the same results device, divided by the summed weights at the end. Everything around it (padding, autocast on
CUDA, the fallback to CPU result arrays when the GPU runs out of memory, fold averaging, export) is
nnunetv2's. With one tile per batch nnunetv2's own method runs.

Tiles per batch (:func:`default_tiles_per_batch`):
- on CUDA, the configuration's planned training batch size (slices for ``2d``, stacks for slice-stack
  trainers): the planner sized it for training, which holds activations and gradients, so the same
  number of tiles fits without gradients;
- on a CPU (and MPS), :data:`CPU_PIXELS_PER_BATCH` input pixels per call (8 slices at 256 px, 2 at 512, 1 at
  1024), at least one tile: the memory of a call grows with its pixels, and on a CPU a larger batch only costs
  memory (the gain comes from filling the matrix kernels and from fewer small operations, which a few images
  already do). A (D, S, S) slice stack (Self-Prompt-SAM) runs one per call: a stack already fills the kernels,
  and two stacks per call were slower than one (24 x 256 x 256 volume, LiteMedSAM, D = 3, 2-core AMD EPYC,
  2026-12-01: 0.97x in float32, 0.80x in bfloat16; ``benchmarks/bench_predict_volume.py``). The planned batch
  is not used there: it is sized for a GPU and capped by the data set's size;
- overridden by the constructor's ``tiles_per_batch`` or the environment variable
  ``SAMUNET_TILES_PER_BATCH`` (the constructor wins); 1 gives nnunetv2's one-tile-at-a-time path.

Precision (``precision``, samunet_predict's ``--precision``; :mod:`samunet.precision`): None keeps
nnunetv2's choice (autocast float16 on CUDA, float32 elsewhere: nnunetv2 leaves autocast off on a CPU because
bfloat16 is slow on CPUs without native support). ``bf16`` runs the network under autocast bfloat16, on CUDA or
on a CPU (where it pays on CPUs with native bfloat16 instructions, e.g. AVX512-BF16 or AMX, and costs time on
others: :func:`samunet.precision.choose_precision` logs a warning there); ``fp16`` (CUDA only) is nnunetv2's
default there; ``fp32`` turns autocast off, CUDA included. The network's output is taken to float32 before
the Gaussian weighting; the mirrored copies of a tile are summed in the network's dtype, as nnunetv2 does.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os

import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_gaussian
from nnunetv2.utilities.helpers import empty_cache
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
from tqdm import tqdm

from samunet.errors import ConfigurationError
from samunet.host_allocator import return_freed_memory_when_tight
from samunet.precision import Precision, choose_precision

logger = logging.getLogger(__name__)

TILES_PER_BATCH_VARIABLE = "SAMUNET_TILES_PER_BATCH"
CPU_PIXELS_PER_BATCH = 8 * 256 * 256  # input pixels per network call on a CPU: 8 slices at 256 px


def default_tiles_per_batch(configuration_manager: ConfigurationManager, device: torch.device) -> int:
    """Tiles per network call when none is asked for (module docstring): the planned batch size on CUDA; on
    other devices :data:`CPU_PIXELS_PER_BATCH` pixels, at least one tile, and one (D, S, S) slice stack."""
    if device.type == "cuda":
        return max(1, int(configuration_manager.configuration.get("batch_size", 1)))
    if len(configuration_manager.patch_size) == 3:
        return 1
    return max(1, CPU_PIXELS_PER_BATCH // math.prod(configuration_manager.patch_size))


def requested_tiles_per_batch(value: int | str | None) -> int | None:
    """``value`` (the constructor's, else ``$SAMUNET_TILES_PER_BATCH``) as a whole number >= 1, or None
    (choose by device). Anything else raises ConfigurationError."""
    source = "tiles_per_batch"
    if value is None:
        value = os.environ.get(TILES_PER_BATCH_VARIABLE) or None
        source = TILES_PER_BATCH_VARIABLE
    if value is None:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or str(number) != str(value).strip():
        raise ConfigurationError(f"{source}={value!r} must be a whole number of tiles >= 1 (1: one tile per "
                                 f"network call, as nnU-Net)")
    return number


class BatchedPredictor(nnUNetPredictor):
    """``nnUNetPredictor`` whose sliding window runs ``tiles_per_batch`` tiles per network call (None: by
    device, see :func:`default_tiles_per_batch`); results equal nnunetv2's one-tile-at-a-time path.
    ``precision`` (None, ``fp32``, ``fp16``, ``bf16``): the network's numeric precision (module docstring);
    one the device cannot run raises ConfigurationError here."""

    def __init__(self, *args, tiles_per_batch: int | None = None, precision: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tiles_per_batch = requested_tiles_per_batch(tiles_per_batch)
        self.precision: Precision | None = (None if precision is None
                                            else choose_precision(self.device.type, precision))

    def _internal_maybe_mirror_and_predict(self, x: torch.Tensor) -> torch.Tensor:
        """nnunetv2's network call with mirroring, under this predictor's precision when one was asked for
        (nested inside nnunetv2's own CUDA autocast, which it overrides); float32 out."""
        if self.precision is None:
            return super()._internal_maybe_mirror_and_predict(x)
        if self.precision.autocast_dtype is None:  # fp32: switch off nnunetv2's CUDA autocast, nothing elsewhere
            context = torch.autocast("cuda", enabled=False) if self.device.type == "cuda" else contextlib.nullcontext()
        else:
            context = self.precision.autocast()
        with context:
            return super()._internal_maybe_mirror_and_predict(x).float()

    def effective_tiles_per_batch(self) -> int:
        """The tiles per network call this predictor uses with its configuration and device."""
        if self.tiles_per_batch is not None:
            return self.tiles_per_batch
        return default_tiles_per_batch(self.configuration_manager, self.device)

    @torch.inference_mode()
    def _internal_predict_sliding_window_return_logits(self, data: torch.Tensor, slicers,
                                                       do_on_device: bool = True) -> torch.Tensor:
        """nnunetv2's accumulation (float16 sums of Gaussian-weighted tile logits and of the weights, on
        ``self.device`` with ``do_on_device``, else on the CPU) over tiles predicted a batch at a time."""
        tiles_per_batch = self.effective_tiles_per_batch()
        logger.debug("sliding window: %d tiles, %d per network call", len(slicers), tiles_per_batch)
        if tiles_per_batch == 1:
            return super()._internal_predict_sliding_window_return_logits(data, slicers, do_on_device)
        results_device = self.device if do_on_device else torch.device("cpu")
        predicted_logits = n_predictions = tiles = predictions = None
        try:
            empty_cache(self.device)
            data = data.to(results_device)
            predicted_logits = torch.zeros((self.label_manager.num_segmentation_heads, *data.shape[1:]),
                                           dtype=torch.half, device=results_device)
            n_predictions = torch.zeros(data.shape[1:], dtype=torch.half, device=results_device)
            gaussian = (compute_gaussian(tuple(self.configuration_manager.patch_size), sigma_scale=1. / 8,
                                         value_scaling_factor=10, device=results_device)
                        if self.use_gaussian else 1)
            with tqdm(desc=None, total=len(slicers), disable=not self.allow_tqdm) as bar:
                for start in range(0, len(slicers), tiles_per_batch):
                    batch_slicers = slicers[start:start + tiles_per_batch]
                    tiles = torch.stack([data[sl] for sl in batch_slicers]).to(self.device)
                    predictions = self._internal_maybe_mirror_and_predict(tiles).to(results_device)
                    for prediction, sl in zip(predictions, batch_slicers):
                        if self.use_gaussian:
                            prediction *= gaussian
                        predicted_logits[sl] += prediction
                        n_predictions[sl[1:]] += gaussian
                    bar.update(len(batch_slicers))
                    return_freed_memory_when_tight()  # at once unless the CPU keeps freed memory
            torch.div(predicted_logits, n_predictions, out=predicted_logits)
            if torch.any(torch.isinf(predicted_logits)):
                raise RuntimeError("Encountered inf in predicted array. Aborting... If this problem persists, "
                                   "reduce value_scaling_factor in compute_gaussian or increase the dtype of "
                                   "predicted_logits to fp32")
            return predicted_logits
        except Exception:
            del predicted_logits, n_predictions, tiles, predictions  # freed before nnunetv2 retries on the CPU
            empty_cache(self.device)
            empty_cache(results_device)
            raise
