"""nnunetv2's sliding-window predictor for networks that see stacks of D slices.

nnU-Net slides (D, S, S) windows over the volume with overlap (step 0.5) and Gaussian weighting;
inner slices see context on both sides across the overlapping windows, but on its own the first
and last slices would only ever sit at a window's edge. :class:`SliceStackPredictor` first repeats
the edge slices D // 2 times on each side, so the outermost slices are the centre of a window too,
then crops the logits back. Trainers name it as their ``predictor_class``, which both
``samunet_predict`` and the final validation (:mod:`samunet.trainers.validation`) use. Stacks are predicted
several per network call (:class:`~samunet.inference.batched_predictor.BatchedPredictor`).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from samunet.inference.batched_predictor import BatchedPredictor


def depth_padding(depth: int) -> int:
    """Slices repeated at each end of the volume for stacks of ``depth`` slices."""
    return depth // 2


class SliceStackPredictor(BatchedPredictor):
    """``predict_sliding_window_return_logits`` on (C, Z, Y, X) with the edge slices repeated first."""

    def predict_sliding_window_return_logits(self, input_image: torch.Tensor) -> np.ndarray | torch.Tensor:
        pad = depth_padding(self.configuration_manager.patch_size[0])
        if pad == 0:
            return super().predict_sliding_window_return_logits(input_image)
        padded = F.pad(input_image[None].float(), (0, 0, 0, 0, pad, pad), mode="replicate")[0]
        logits = super().predict_sliding_window_return_logits(padded.to(input_image.dtype))
        return logits[:, pad:pad + input_image.shape[1]]
