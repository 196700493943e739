"""Boxes and interior points of binary masks and label maps: the geometry behind box and point prompts.

Used by AutoMedSAM (ground-truth boxes for the teacher prompt encoder) and Self-Prompt-SAM (box and
point prompts of every class of the auxiliary label maps). Everything runs batched in torch on the
tensors' device, with data-independent control flow and no read of device values by the host.
"""
from __future__ import annotations

import torch

from samunet.modules.distance_transform import squared_distance_to_other_label


def _first_true(flags: torch.Tensor) -> torch.Tensor:
    """(B, L) bool -> (B,) index of the first True (0 where there is none)."""
    return flags.int().argmax(dim=1)


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool -> boxes (B, 4) float (x_min, y_min, x_max, y_max) in pixels; zeros for empty masks."""
    columns, rows = masks.any(dim=1), masks.any(dim=2)  # (B, W), (B, H)
    boxes = torch.stack([_first_true(columns), _first_true(rows),
                         masks.shape[2] - 1 - _first_true(columns.flip(1)),
                         masks.shape[1] - 1 - _first_true(rows.flip(1))], dim=1).float()
    return boxes * rows.any(dim=1, keepdim=True)


def _per_label(labels: torch.Tensor, values: torch.Tensor, num_labels: int, reduce: str,
               initial: float | int) -> torch.Tensor:
    """labels (N, P) long in 0..num_labels-1, values (N, P) -> (N, num_labels): ``reduce`` ("amin" /
    "amax") of the values of each label's pixels, ``initial`` for a label without pixels."""
    out = values.new_full((labels.shape[0], num_labels), initial)
    return out.scatter_reduce(1, labels, values, reduce=reduce, include_self=True)


def label_presence(labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """(N, ...) label maps with values 0..num_labels-1 -> (N, num_labels) bool: which labels occur."""
    flat = labels.flatten(1).long()
    return _per_label(flat, torch.ones_like(flat), num_labels, "amax", 0) > 0


def label_boxes(labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """(N, H, W) label maps with values 0..num_labels-1 -> (N, num_labels, 4) float: each label's tight box
    (x_min, y_min, x_max, y_max) in pixels over all its pixels (every component); zeros for an absent label."""
    batch, height, width = labels.shape
    flat = labels.flatten(1).long()
    pixels = torch.arange(height * width, device=labels.device).expand(batch, -1)
    rows, columns = pixels // width, pixels % width
    boxes = torch.stack([_per_label(flat, columns, num_labels, "amin", width),
                         _per_label(flat, rows, num_labels, "amin", height),
                         _per_label(flat, columns, num_labels, "amax", -1),
                         _per_label(flat, rows, num_labels, "amax", -1)], dim=-1)
    present = label_presence(labels, num_labels)
    return torch.where(present[..., None], boxes, torch.zeros_like(boxes)).float()


def farthest_from_boundary(labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """(N, H, W) label maps with values 0..num_labels-1 -> (N, num_labels, 2) long (row, col): for every label,
    its pixel farthest from the label's boundary, (0, 0) for an absent label.

    "Farthest" is the argmax of the Euclidean distance to the nearest pixel of another label, the image
    border counting as one (:func:`~samunet.modules.distance_transform.squared_distance_to_other_label`
    with ``border_is_other``): for the binary mask of label k this is its distance transform with the
    mask padded by background. Ties go to the first pixel in row-major order; the squared distances are
    integers, exact in float32, so the ties are exact too.
    """
    batch, height, width = labels.shape
    squared = squared_distance_to_other_label(labels, border_is_other=True).flatten(1)  # (N, P)
    flat = labels.flatten(1).long()
    best = _per_label(flat, squared, num_labels, "amax", -1.0)  # (N, K)
    pixels = torch.arange(height * width, device=labels.device).expand(batch, -1)
    candidates = torch.where(squared == best.gather(1, flat), pixels, height * width)
    first = _per_label(flat, candidates, num_labels, "amin", height * width)
    first = torch.where(first < height * width, first, torch.zeros_like(first))
    return torch.stack([first // width, first % width], dim=-1)
