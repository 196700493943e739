"""Boxes and interior points of binary masks: the geometry behind box and point prompts.

Used by AutoMedSAM (ground-truth boxes for the teacher prompt encoder) and Self-Prompt-SAM (box
and point prompts from the auxiliary masks). The distance transform is SciPy's.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt


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


def farthest_from_boundary(mask: np.ndarray) -> tuple[int, int]:
    """(H, W) bool, not empty -> (row, col) of the argmax of the mask's Euclidean distance transform.

    scipy's ``distance_transform_edt`` measures the distance to the nearest zero *inside* the
    array, so the image border would not count as boundary; the transform therefore runs on the
    mask's bounding box padded by one background pixel, which makes the border a boundary and gives
    the same distances as the whole (padded) image, since the ring around the box is all background.
    Ties go to the first pixel in row-major order (numpy's argmax).
    """
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    crop = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    distance = distance_transform_edt(np.pad(crop, 1))[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(distance)), crop.shape)
    return int(rows[0] + row), int(cols[0] + col)
