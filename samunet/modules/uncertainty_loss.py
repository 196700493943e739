"""AutoMedSAM's uncertainty-aware joint loss over four terms: MSE (knowledge transfer), CE, Dice, shape distance.

``L = sum_i L_i / (2 s_i^2) + log s_i`` with learnable s_i. Parametrised by the log-variance
``v_i = log s_i^2`` (start 0, s_i = 1): ``L_i / (2 s_i^2) + log s_i = 0.5 exp(-v_i) L_i + 0.5 v_i``,
the same value, numerically stable and free of a positivity constraint.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import distance_transform_edt
from torch import nn

LOSS_TERMS = ("mse", "ce", "dice", "shape_distance")


class UncertaintyWeighting(nn.Module):
    """Learnable s_i (as log-variances, (N,)): losses (N,) -> scalar ``sum_i L_i / (2 s_i^2) + log s_i``.

    ``active`` (N,) bool drops terms that have no value in this batch (both parts of the term).
    """

    def __init__(self, *, num_terms: int) -> None:
        super().__init__()
        self.log_variances = nn.Parameter(torch.zeros(num_terms))

    def scales(self) -> torch.Tensor:
        """s_i = exp(v_i / 2), (N,)."""
        return torch.exp(0.5 * self.log_variances)

    def forward(self, losses: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        log_variances = self.log_variances.to(losses.dtype)
        weighted = 0.5 * torch.exp(-log_variances) * losses + 0.5 * log_variances
        if active is not None:
            weighted = torch.where(active, weighted, torch.zeros_like(weighted))
        return weighted.sum()


def signed_distance_map(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool -> (H, W) float32 in [-1, 1]: Euclidean distance to the object's boundary, negative
    inside, positive outside, each side divided by its maximum. An empty mask is +1 everywhere (all
    outside), a full one -1 everywhere."""
    mask = mask.astype(bool)
    if not mask.any():
        return np.ones(mask.shape, dtype=np.float32)
    if mask.all():
        return -np.ones(mask.shape, dtype=np.float32)
    outside = distance_transform_edt(~mask)
    inside = distance_transform_edt(mask)
    return (outside / outside.max() - inside / inside.max()).astype(np.float32)


def signed_distance_maps(masks: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) binary -> (B, 1, H, W) float signed distance maps (on the masks' device)."""
    array = masks.detach().cpu().numpy() > 0.5
    maps = np.stack([signed_distance_map(m[0])[None] for m in array])
    return torch.from_numpy(maps).to(masks.device)


def shape_distance_loss(probabilities: torch.Tensor, target: torch.Tensor, distance_maps: torch.Tensor) -> torch.Tensor:
    """Mean of (predicted probability - ground truth) times the ground truth's signed distance map, all (B, 1, H, W).

    The paper's term is ``mean(p * phi)``; subtracting its value at the ground truth, ``mean(g * phi)``,
    changes no gradient but makes the term >= 0 with 0 at a perfect prediction. The uncertainty
    weighting needs that: for a negative L_i, ``L_i / (2 s_i^2) + log s_i`` falls without bound as
    s_i -> 0, and training diverges.
    """
    return ((probabilities - target) * distance_maps).mean()


def soft_dice_loss(probabilities: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice per sample, averaged: (B, 1, H, W) each. ``smooth`` keeps an empty target finite."""
    intersection = (probabilities * target).flatten(1).sum(1)
    total = probabilities.flatten(1).sum(1) + target.flatten(1).sum(1)
    return (1 - (2 * intersection + smooth) / (total + smooth)).mean()


def knowledge_transfer_mse(sparse: torch.Tensor, dense: torch.Tensor, teacher_sparse: torch.Tensor,
                           teacher_dense: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """MSE(sparse) + MSE(dense) over the samples whose class is present (B,) bool; 0 when none is.

    sparse, teacher_sparse: (B, n, C); dense, teacher_dense: (B, C, h, w).
    """
    if not bool(present.any()):
        return sparse.sum() * 0
    return (F.mse_loss(sparse[present], teacher_sparse[present].to(sparse.dtype))
            + F.mse_loss(dense[present], teacher_dense[present].to(dense.dtype)))


class JointLossOutput(NamedTuple):
    """total: scalar; terms: (4,) detached values in ``LOSS_TERMS`` order."""

    total: torch.Tensor
    terms: torch.Tensor


class AutoMedSAMJointLoss(nn.Module):
    """Binary mask of the prompted class + prompt embeddings -> uncertainty-weighted sum of the four terms."""

    def __init__(self, *, weighting: UncertaintyWeighting) -> None:
        super().__init__()
        self.weighting = weighting

    def forward(self, *, mask_logits: torch.Tensor, target: torch.Tensor, distance_maps: torch.Tensor,
                sparse: torch.Tensor, dense: torch.Tensor, teacher_sparse: torch.Tensor, teacher_dense: torch.Tensor,
                present: torch.Tensor) -> JointLossOutput:
        """mask_logits, target (0/1), distance_maps: (B, 1, H, W); present: (B,) bool."""
        logits = mask_logits.float()
        probabilities = torch.sigmoid(logits)
        losses = torch.stack([
            knowledge_transfer_mse(sparse.float(), dense.float(), teacher_sparse.float(), teacher_dense.float(),
                                   present),
            F.binary_cross_entropy_with_logits(logits, target),
            soft_dice_loss(probabilities, target),
            shape_distance_loss(probabilities, target, distance_maps),
        ])
        active = torch.tensor([bool(present.any()), True, True, True], device=losses.device)
        return JointLossOutput(total=self.weighting(losses, active), terms=losses.detach())
