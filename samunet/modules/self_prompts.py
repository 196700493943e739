"""Self-Prompt-SAM's automatic prompts: a box, a point and a mask prompt per class.

The prompt generator's auxiliary multi-class logits give, for every image and class k (the
background, class 0, included: the paper decodes "all binary masks for the total classes", one
channel of the one-hot auxiliary mask each), the binary mask ``argmax == k``; its bounding box is
the box prompt, the pixel farthest from the mask's boundary (argmax of the Euclidean distance
transform) the positive point prompt, and class k's logits resized to the prompt encoder's mask
size the mask prompt. An absent class gets an all-zero box and point (the paper's rule).
segment-anything's PromptEncoder encodes them.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from samunet.modules.mask_geometry import farthest_from_boundary, mask_boxes

PROMPT_KINDS = ("box", "point", "mask")


class ClassPrompts(NamedTuple):
    """Prompts of the K classes of N images: axis 0 is the image n, axis 1 the class (label k);
    class-major order is NOT used here.

    boxes: (N, K, 4) float (x_min, y_min, x_max, y_max) in pixels of the S x S encoder input,
    zeros for an absent class; points: (N, K, 2) float (x, y) in the same pixels, zeros for an
    absent class; present: (N, K) bool; mask_logits: (N, K, m_h, m_w), the class's auxiliary
    logits at the prompt encoder's mask input size, still in the autograd graph.
    """

    boxes: torch.Tensor
    points: torch.Tensor
    present: torch.Tensor
    mask_logits: torch.Tensor


def prompts_from_auxiliary_logits(logits: torch.Tensor, *, image_size: int,
                                  mask_size: tuple[int, int]) -> ClassPrompts:
    """logits (N, K, H, W) auxiliary multi-class logits (channel 0 = background) -> ClassPrompts.

    Class k's mask is ``argmax over channels == k``, computed without gradient. Box = tight box of
    ALL its pixels (every component): min / max column and row index. Point = (column, row) of
    :func:`farthest_from_boundary`. Box and point are pixel indices (segment-anything's encoder adds
    the half-pixel shift itself), multiplied by ``image_size / W`` (x) and ``image_size / H`` (y)
    when the generator runs at another resolution than the S x S encoder input. An absent class has
    an all-zero box and point and ``present`` False. Mask prompt = ``logits`` resized (bilinear,
    align_corners=False) to ``mask_size`` (m_h, m_w), not detached.
    """
    if logits.ndim != 4 or logits.shape[1] < 2:
        raise ValueError(f"expected (N, K >= 2, H, W) logits, got shape {tuple(logits.shape)}")
    batch, num_classes, height, width = logits.shape
    labels = logits.detach().argmax(dim=1).cpu()
    scale = torch.tensor([image_size / width, image_size / height])  # (x, y)
    masks = torch.stack([labels == k for k in range(num_classes)], dim=1)  # (N, K, H, W)
    present = masks.flatten(2).any(dim=2)
    boxes = mask_boxes(masks.flatten(0, 1)).view(batch, num_classes, 4) * scale.repeat(2)
    points = torch.zeros(batch, num_classes, 2)
    for n, k in present.nonzero().tolist():
        row, col = farthest_from_boundary(masks[n, k].numpy())
        points[n, k] = torch.tensor([col, row]) * scale
    mask_logits = F.interpolate(logits, size=tuple(mask_size), mode="bilinear", align_corners=False)
    return ClassPrompts(boxes=boxes.to(logits.device), points=points.to(logits.device),
                        present=present.to(logits.device), mask_logits=mask_logits)


def _class_major(tensor: torch.Tensor) -> torch.Tensor:
    """(N, K, ...) -> (M, ...) with row m = k * N + n."""
    return tensor.transpose(0, 1).reshape(-1, *tensor.shape[2:])


def encode_class_prompts(prompt_encoder: nn.Module, prompts: ClassPrompts, *, use_box: bool = True,
                         use_point: bool = True, use_mask: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode the selected prompt kinds with segment-anything's PromptEncoder.

    Returns sparse (M, n, C) and dense (M, C, h, w), M = K * N in CLASS-MAJOR order: row
    m = k * N + n (k the class, n the image), so the images of one class are consecutive. Sparse
    tokens, in the encoder's order: point then box corners; box + point -> 3, box -> 2, point alone -> 2 (the encoder appends a "not a point" padding token when no box is
    given), mask alone -> 0. Each class has one positive point (label 1); an absent class's zero
    point and zero box are encoded as they are (the paper's rule). Without the mask prompt the dense
    output is the encoder's learned no-mask embedding. Raises ValueError when all three are off.
    """
    if not (use_box or use_point or use_mask):
        raise ValueError(f"at least one of the prompt kinds {PROMPT_KINDS} must be used")
    boxes = _class_major(prompts.boxes) if use_box else None
    points = None
    if use_point:
        coords = _class_major(prompts.points).unsqueeze(1)
        points = (coords, torch.ones(coords.shape[:2], dtype=torch.int64, device=coords.device))
    masks = _class_major(prompts.mask_logits).unsqueeze(1) if use_mask else None
    return prompt_encoder(points=points, boxes=boxes, masks=masks)
