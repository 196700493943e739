"""Self-Prompt-SAM's automatic prompts: a box, a point and a mask prompt per class.

The prompt generator's auxiliary multi-class logits give, for every image and class k (the
background, class 0, included: the paper decodes "all binary masks for the total classes", one
channel of the one-hot auxiliary mask each), the binary mask ``argmax == k``; its bounding box is
the box prompt, the pixel farthest from the mask's boundary (argmax of the Euclidean distance
transform) the positive point prompt, and class k's logits resized to the prompt encoder's mask
size the mask prompt. An absent class gets an all-zero box and point (the paper's rule).
segment-anything's PromptEncoder encodes them. All of it runs batched on the logits' device, with
no read of device values by the host (no per-class loop, no boolean-mask indexing).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from samunet.modules.mask_geometry import farthest_from_boundary, label_boxes, label_presence

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
    :func:`~samunet.modules.mask_geometry.farthest_from_boundary` (the argmax of the class mask's
    Euclidean distance transform, the image border counting as boundary; ties to the first pixel in
    row-major order). Box and point are pixel indices (segment-anything's encoder adds the half-pixel
    shift itself), multiplied by ``image_size / W`` (x) and ``image_size / H`` (y) when the generator
    runs at another resolution than the S x S encoder input. An absent class has an all-zero box and
    point and ``present`` False. Mask prompt = ``logits`` resized (bilinear, align_corners=False) to
    ``mask_size`` (m_h, m_w), not detached. Everything stays on the logits' device.
    """
    if logits.ndim != 4 or logits.shape[1] < 2:
        raise ValueError(f"expected (N, K >= 2, H, W) logits, got shape {tuple(logits.shape)}")
    num_classes, height, width = logits.shape[1:]
    labels = logits.detach().argmax(dim=1)  # (N, H, W)
    x_scale, y_scale = image_size / width, image_size / height
    boxes = label_boxes(labels, num_classes)  # (N, K, 4) x_min, y_min, x_max, y_max
    boxes = torch.stack([boxes[..., 0] * x_scale, boxes[..., 1] * y_scale, boxes[..., 2] * x_scale,
                         boxes[..., 3] * y_scale], dim=-1)
    farthest = farthest_from_boundary(labels, num_classes).float()  # (N, K, 2) row, col
    points = torch.stack([farthest[..., 1] * x_scale, farthest[..., 0] * y_scale], dim=-1)
    mask_logits = F.interpolate(logits, size=tuple(mask_size), mode="bilinear", align_corners=False)
    return ClassPrompts(boxes=boxes, points=points, present=label_presence(labels, num_classes),
                        mask_logits=mask_logits)


def _class_major(tensor: torch.Tensor) -> torch.Tensor:
    """(N, K, ...) -> (M, ...) with row m = k * N + n."""
    return tensor.transpose(0, 1).reshape(-1, *tensor.shape[2:])


def positive_point_tokens(prompt_encoder: nn.Module, coords: torch.Tensor, *, pad: bool) -> torch.Tensor:
    """segment-anything's sparse tokens of one positive point per row: coords (M, 1, 2) (x, y) in input
    pixels -> (M, 1, C), or (M, 2, C) with the "not a point" padding token appended (``pad``: no box
    follows). The values of ``PromptEncoder._embed_points`` with every label 1, computed without its
    boolean-mask indexing by label, which makes the host wait for the device."""
    tokens = (prompt_encoder.pe_layer.forward_with_coords(coords + 0.5, prompt_encoder.input_image_size)
              + prompt_encoder.point_embeddings[1].weight)
    if pad:
        padding = prompt_encoder.not_a_point_embed.weight.to(tokens.dtype).expand(tokens.shape[0], 1, -1)
        tokens = torch.cat([tokens, padding], dim=1)
    return tokens


def encode_class_prompts(prompt_encoder: nn.Module, prompts: ClassPrompts, *, use_box: bool = True,
                         use_point: bool = True, use_mask: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode the selected prompt kinds with segment-anything's PromptEncoder.

    Returns sparse (M, n, C) and dense (M, C, h, w), M = K * N in CLASS-MAJOR order: row
    m = k * N + n (k the class, n the image), so the images of one class are consecutive. Sparse
    tokens, in the encoder's order: point then box corners; box + point -> 3, box -> 2, point alone -> 2 (the encoder appends a "not a point" padding token when no box is
    given), mask alone -> 0. Each class has one positive point (label 1); an absent class's zero
    point and zero box are encoded as they are (the paper's rule). Without the mask prompt the dense
    output is the encoder's learned no-mask embedding. The point tokens come from
    :func:`positive_point_tokens` (the encoder's own values); boxes and masks from the encoder's
    forward. Raises ValueError when all three are off.
    """
    if not (use_box or use_point or use_mask):
        raise ValueError(f"at least one of the prompt kinds {PROMPT_KINDS} must be used")
    rows = prompts.boxes.shape[0] * prompts.boxes.shape[1]
    boxes = _class_major(prompts.boxes) if use_box else None
    masks = _class_major(prompts.mask_logits).unsqueeze(1) if use_mask else None
    sparse, dense = prompt_encoder(points=None, boxes=boxes, masks=masks)  # batch 1 when both are None
    sparse, dense = sparse.expand(rows, -1, -1), dense.expand(rows, -1, -1, -1)
    if use_point:
        points = positive_point_tokens(prompt_encoder, _class_major(prompts.points).unsqueeze(1), pad=not use_box)
        sparse = torch.cat([points.to(sparse.dtype), sparse], dim=1)
    return sparse, dense
