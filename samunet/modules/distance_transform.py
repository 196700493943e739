"""Exact Euclidean distance transforms in torch: batched, on the tensors' device, without host syncs.

Definition (the one of ``scipy.ndimage.distance_transform_edt``): on a grid with spacing
``sampling = (s_y, s_x)``, the Euclidean distance transform of a binary image b at pixel p is

    EDT(p) = min over pixels q with b(q) = 0 of sqrt(((p_y - q_y) s_y)^2 + ((p_x - q_x) s_x)^2),

and 0 where b(p) = 0. :func:`distance_to_other_label` generalises it to label maps: the distance from
each pixel to the nearest pixel of another label (for a binary mask: the EDT inside the mask, and
the EDT of its complement outside), so one pass serves every class of a label map.

Computed separably, as in Saito & Toriwaki (1994) and Felzenszwalb & Huttenlocher ("Distance
Transforms of Sampled Functions", Theory of Computing 8, 2012). With ``r(k, j)`` the distance from
pixel (k, j) to the nearest pixel of another label than its own within row k, and ``v(i, j)`` the
same within column j (both exact in one dimension: the ends of each pixel's run of equal labels,
found with cumulative maxima), the squared distance at (i, j) is

    d(i, j)^2 = min( min_k r(k, j)^2 s_x^2 + (i - k)^2 s_y^2 ,  v(i, j)^2 s_y^2 ).

A row k whose pixel (k, j) carries the label of (i, j) contributes its exact term; a row whose pixel
carries another label contributes its exact term ``(i - k)^2 s_y^2`` through v and, in the first min,
only a value at least as large: so the minimum is exact for every label at once. The min over k is a
min-plus product with a parabola, evaluated for every row pair (O(H^2 W) per image, data-independent
control flow, in chunks of bounded memory) instead of the lower-envelope scan, which is sequential. For integer
spacings the squared distances are integers, exact in float32 (below 2^24); the square root rounds once.

Where an image has no pixel to measure to (an all-ones mask, a single label) the distance is ``inf``
(SciPy returns distances to a point outside the image there, an artefact of its algorithm). With
``border_is_other`` the pixels just outside the image count as another label (zeros of a mask), so
the image border is a boundary.
"""
from __future__ import annotations

from typing import Sequence

import torch

# Elements of the buffer of the eager min-plus product (float32: 16 MiB; larger ones are no faster on a CPU).
CHUNK_ELEMENTS = 2 ** 22


def _run_end_distances(labels: torch.Tensor, border_is_other: bool) -> torch.Tensor:
    """(B, H, W) integer labels -> (B, H, W) float32: distance along the last axis, in pixels, to the
    nearest pixel of another label (inf where the row has none, unless the border counts)."""
    width = labels.shape[-1]
    columns = torch.arange(width, device=labels.device, dtype=torch.float32)
    change = labels[..., 1:] != labels[..., :-1]  # (B, H, W - 1): a run starts at column m + 1
    # Nearest other label on the left of column j: the column before the start of j's run.
    starts = torch.where(change, columns[1:], 0.0).cummax(dim=-1).values
    starts = torch.cat([starts.new_zeros(*starts.shape[:-1], 1), starts], dim=-1)
    left = torch.where(starts > 0, columns - starts + 1,
                       columns + 1 if border_is_other else torch.full_like(columns, float("inf")))
    # Nearest other label on the right of column j: the start of the next run.
    nexts = torch.where(change, columns[1:], float(width)).flip(-1).cummin(dim=-1).values.flip(-1)
    nexts = torch.cat([nexts, nexts.new_full((*nexts.shape[:-1], 1), float(width))], dim=-1)
    right = torch.where(nexts < width, nexts - columns,
                        width - columns if border_is_other else torch.full_like(columns, float("inf")))
    return torch.minimum(left, right)


def _min_plus_parabola(rows: torch.Tensor, spacing: float) -> torch.Tensor:
    """(B, H, W) -> (B, H, W): ``out(i, j) = min_k rows(k, j) + ((i - k) * spacing)^2``.

    Compiled (torch.compile) as one broadcast reduction, which the compiler fuses; eager in chunks of
    rows i through one reused buffer (fresh chunk-sized allocations cost more than the arithmetic).
    """
    batch, height, width = rows.shape
    positions = torch.arange(height, device=rows.device, dtype=torch.float32) * spacing
    parabola = (positions[:, None] - positions[None, :]) ** 2  # (i, k)
    columns = rows.transpose(1, 2).contiguous()[:, None]  # (B, 1, W, k): the reduction runs over the last axis
    if torch.compiler.is_compiling():
        return (columns + parabola[:, None, :]).amin(dim=-1)
    step = min(height, max(1, CHUNK_ELEMENTS // max(batch * height * width, 1)))
    out = rows.new_empty(batch, height, width)
    buffer = rows.new_empty(batch, step, width, height)
    for start in range(0, height, step):
        size = min(step, height - start)
        candidates = torch.add(columns, parabola[start:start + size, None, :], out=buffer[:, :size])
        torch.amin(candidates, dim=-1, out=out[:, start:start + size])
    return out


def _spacing(sampling: Sequence[float] | float | None) -> tuple[float, float]:
    if sampling is None:
        return 1.0, 1.0
    values = (float(sampling),) * 2 if isinstance(sampling, (int, float)) else tuple(float(s) for s in sampling)
    if len(values) != 2 or min(values) <= 0:
        raise ValueError(f"sampling must be one positive spacing or two (row, column), got {sampling!r}")
    return values


def squared_distance_to_other_label(labels: torch.Tensor, *, sampling: Sequence[float] | float | None = None,
                                    border_is_other: bool = False) -> torch.Tensor:
    """Label maps (..., H, W) of any integer (or bool) dtype -> (..., H, W) float32: each pixel's squared
    Euclidean distance to the nearest pixel with a different label (inf where there is none).

    ``sampling``: pixel spacing (row, column) or one value for both (default 1). ``border_is_other``:
    the pixels just outside the image count as a different label. Raises ValueError for fewer than 2
    dimensions or a bad sampling.
    """
    if labels.ndim < 2:
        raise ValueError(f"expected label maps (..., H, W), got shape {tuple(labels.shape)}")
    row_spacing, column_spacing = _spacing(sampling)
    *leading, height, width = labels.shape
    flat = labels.reshape(-1, height, width)
    along_rows = _run_end_distances(flat, border_is_other)
    along_columns = _run_end_distances(flat.transpose(1, 2), border_is_other).transpose(1, 2)
    squared = torch.minimum(_min_plus_parabola((along_rows * column_spacing) ** 2, row_spacing),
                            (along_columns * row_spacing) ** 2)
    return squared.reshape(*leading, height, width)


def distance_to_other_label(labels: torch.Tensor, *, sampling: Sequence[float] | float | None = None,
                            border_is_other: bool = False) -> torch.Tensor:
    """The square root of :func:`squared_distance_to_other_label` (same arguments, same errors)."""
    return squared_distance_to_other_label(labels, sampling=sampling, border_is_other=border_is_other).sqrt()


def distance_transform_edt(mask: torch.Tensor, *, sampling: Sequence[float] | float | None = None,
                           border_is_other: bool = False) -> torch.Tensor:
    """Binary images (..., H, W) (non-zero = object) -> (..., H, W) float32: the distance of every object
    pixel to the nearest zero pixel, 0 on zero pixels, inf in an image without a zero pixel (unless
    ``border_is_other``: then the pixels just outside the image count as zeros).

    Equal to ``scipy.ndimage.distance_transform_edt(mask, sampling)`` on every image that holds a zero.
    Raises ValueError for fewer than 2 dimensions or a bad sampling.
    """
    inside = mask != 0
    distance = distance_to_other_label(inside, sampling=sampling, border_is_other=border_is_other)
    return torch.where(inside, distance, torch.zeros_like(distance))
