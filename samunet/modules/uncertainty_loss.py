"""AutoMedSAM's uncertainty-aware joint loss over four terms: MSE (knowledge transfer), CE, Dice, shape distance.

``L = sum_i L_i / (2 s_i^2) + log s_i`` with learnable s_i. Parametrised by the log-variance
``v_i = log s_i^2`` (start 0, s_i = 1): ``L_i / (2 s_i^2) + log s_i = 0.5 exp(-v_i) L_i + 0.5 v_i``,
the same value, numerically stable and free of a positivity constraint.

Signed distance maps and every term run batched in torch on the tensors' device: no read of device
values by the host, no boolean-mask indexing, no loop over the batch.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from samunet.modules.distance_transform import distance_to_other_label

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


def signed_distance_maps(masks: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) binary (> 0.5 is the object) -> (B, 1, H, W) float32 in [-1, 1], on the masks' device:
    the Euclidean distance to the object's boundary, negative inside, positive outside, each side
    divided by its maximum. Inside, the distance of an object pixel to the nearest background pixel,
    outside that of a background pixel to the nearest object pixel (SciPy's ``distance_transform_edt``
    of the mask and of its complement; the image border is no boundary). An empty mask is +1
    everywhere (all outside), a full one -1 everywhere."""
    inside = masks.detach() > 0.5
    distance = distance_to_other_label(inside)  # inf everywhere in an empty or a full mask
    distance = torch.where(torch.isfinite(distance), distance, torch.zeros_like(distance))
    inner = torch.where(inside, distance, torch.zeros_like(distance))
    outer = distance - inner

    def normalised(side: torch.Tensor) -> torch.Tensor:
        return side / side.flatten(1).amax(dim=1).clamp_min(1.0).view(-1, 1, 1, 1)

    maps = normalised(outer) - normalised(inner)
    empty = ~inside.flatten(1).any(dim=1).view(-1, 1, 1, 1)
    full = inside.flatten(1).all(dim=1).view(-1, 1, 1, 1)
    return torch.where(empty, torch.ones_like(maps), torch.where(full, -torch.ones_like(maps), maps))


def shape_distance_loss(probabilities: torch.Tensor, target: torch.Tensor, distance_maps: torch.Tensor) -> torch.Tensor:
    """Mean of (predicted probability - ground truth) times the ground truth's signed distance map, all (B, 1, H, W).

    The paper's term is ``mean(p * phi)``; subtracting its value at the ground truth, ``mean(g * phi)``,
    changes no gradient but makes the term >= 0 with 0 at a perfect prediction. The uncertainty
    weighting needs that: for a negative L_i, ``L_i / (2 s_i^2) + log s_i`` falls without bound as
    s_i -> 0, and training diverges.
    """
    return ((probabilities - target) * distance_maps).mean()


def class_batch_dice_loss(probabilities: torch.Tensor, target: torch.Tensor, labels: torch.Tensor,
                          present: torch.Tensor, *, num_labels: int, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice per prompted class over the whole batch, averaged over the classes that are present in
    at least one of their samples: probabilities and target (B, 1, H, W), labels (B,) long in
    0..``num_labels``-1 (the class each sample was prompted with), present (B,) bool; 0 when no class is.

    A class's Dice sums intersection and volume over all its samples, present and absent alike (nnU-Net's
    ``batch_dice``): foreground predicted for a sample whose class is absent enlarges the class's denominator,
    so it costs in proportion to the class's true volume in the batch, not to the image size as in the CE.
    Per sample, an absent class has no Dice of its own: smoothed, it would be 1 - smooth / (sum p + smooth),
    whose gradient per pixel approaches 1 / smooth as the prediction empties, and it drove the class prompts
    of the demo phantom's small organs into answering every image with an empty mask; left out instead (the
    Dice over present samples only, samunet for most of 2026-11-30), the absent samples were taught by the CE and
    the shape distance alone, whose per-pixel weight 1 / (H W) let the prompted classes answer slices
    without them with foreground (real brain MRI: 87% of the amygdala's predicted voxels lay in slices
    without amygdala; docs/methods/automedsam.md). A class none of whose samples is present gets no Dice,
    as before. The paper does not say how its Dice (Eq. 14) reduces over samples.
    """
    membership = F.one_hot(labels.long(), num_labels).to(probabilities.dtype)  # (B, L)
    intersection = membership.T @ (probabilities * target).flatten(1).sum(1)
    total = membership.T @ (probabilities.flatten(1).sum(1) + target.flatten(1).sum(1))
    class_present = (membership.T @ present.to(probabilities.dtype)) > 0
    return mean_over_present(1 - (2 * intersection + smooth) / (total + smooth), class_present)


def mean_over_present(per_sample: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Mean of per-sample values (B,) over the samples marked in ``present`` (B,) bool; 0 when none is. Absent
    samples are weighted 0 rather than indexed out, so the host never waits for a count."""
    weights = present.to(per_sample.dtype)
    return (per_sample * weights).sum() / weights.sum().clamp_min(1.0)


def knowledge_transfer_mse(sparse: torch.Tensor, dense: torch.Tensor, teacher_sparse: torch.Tensor,
                           teacher_dense: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """MSE(sparse) + MSE(dense) over the samples whose class is present (B,) bool; 0 when none is.

    sparse, teacher_sparse: (B, n, C); dense, teacher_dense: (B, C, h, w). Each MSE is the mean over the
    present samples of their mean squared difference (every sample has as many elements, so this is the
    MSE of the present samples' elements), with absent samples weighted 0 rather than indexed out.
    """
    def mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return mean_over_present((student - teacher.to(student.dtype)).pow(2).flatten(1).mean(dim=1), present)

    return mse(sparse, teacher_sparse) + mse(dense, teacher_dense)


class JointLossOutput(NamedTuple):
    """total: scalar; terms: (4,) detached values in ``LOSS_TERMS`` order."""

    total: torch.Tensor
    terms: torch.Tensor


class AutoMedSAMJointLoss(nn.Module):
    """Binary mask of the prompted class + prompt embeddings -> uncertainty-weighted sum of the four terms.

    The MSE is taken over the samples whose class is present, the Dice per prompted class over the batch
    (:func:`class_batch_dice_loss`); with no sample present both terms are left out of the sum (their log s_i
    too). CE and shape distance cover every sample."""

    def __init__(self, *, weighting: UncertaintyWeighting, num_labels: int) -> None:
        """``num_labels``: the label values a prompted class can take are below it (the network's K)."""
        super().__init__()
        self.weighting = weighting
        self.num_labels = num_labels

    def forward(self, *, mask_logits: torch.Tensor, target: torch.Tensor, distance_maps: torch.Tensor,
                sparse: torch.Tensor, dense: torch.Tensor, teacher_sparse: torch.Tensor, teacher_dense: torch.Tensor,
                labels: torch.Tensor, present: torch.Tensor) -> JointLossOutput:
        """mask_logits, target (0/1), distance_maps: (B, 1, H, W); labels: (B,) prompted label values below
        ``num_labels``; present: (B,) bool."""
        logits = mask_logits.float()
        probabilities = torch.sigmoid(logits)
        losses = torch.stack([
            knowledge_transfer_mse(sparse.float(), dense.float(), teacher_sparse.float(), teacher_dense.float(),
                                   present),
            F.binary_cross_entropy_with_logits(logits, target),
            class_batch_dice_loss(probabilities, target, labels, present, num_labels=self.num_labels),
            shape_distance_loss(probabilities, target, distance_maps),
        ])
        any_present = present.any().view(1)
        always = torch.ones(1, dtype=torch.bool, device=losses.device)
        active = torch.cat([any_present, always, any_present, always])  # mse, ce, dice, shape distance
        return JointLossOutput(total=self.weighting(losses, active), terms=losses.detach())
