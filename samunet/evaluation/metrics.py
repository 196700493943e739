"""Per-class segmentation metrics of 2D and 3D label maps: Dice, NSD and HD95.

Arrays are indexed (z, y, x) as SimpleITK's ``GetArrayFromImage`` and nnunetv2's readers return
them, so ``spacing`` is given in the same order (mm). A volume with a single slice (shape
``(1, H, W)``, as nnunetv2 reads a png with the placeholder slice spacing 999) is evaluated as a
2D image with its in-plane spacing: its surfaces are contours and its "areas" lengths.

Dice = 2 |R and P| / (|R| + |P|).

Surfaces and surface distances (both NSD and HD95 use them), two conventions (``nsd=``):

* ``"surface_area"`` (default): the surface-element definition of Nikolov et al., "Clinically
  applicable segmentation of head and neck anatomy for radiotherapy: deep learning algorithm
  development and validation study", JMIR 2021 (DeepMind's ``surface-distance`` package). Every
  2x2x2 block of voxels (2x2 in 2D; voxels outside the image are background) whose corners are
  neither all inside nor all outside the mask holds a piece of the mask's surface, built as in
  marching cubes: its vertices are the midpoints of the block's edges whose ends differ. On a face
  of the block whose two inside corners lie on a diagonal, the corners of the side with fewer
  corners in the block are cut off (the inside ones when at most four of the eight are inside);
  each closed polygon is split into triangles so that its area is the largest (all splits are
  equal for a planar polygon). The element's size is its area in mm^2 (in 2D: the contour length
  in mm) with the given spacing. This reproduces the lookup table of the reference implementation
  for all 256 configurations. The distance of an element is the Euclidean distance (mm) from its
  block to the nearest block holding an element of the other surface.
* ``"voxel"``: the surface is the set of border voxels (mask minus its binary erosion with face
  connectivity, voxels outside the image count as background), each of size 1, and distances run
  between border voxels.

* NSD (normalised surface distance, surface Dice) at ``tolerance_mm`` = the size of both surfaces'
  elements whose distance to the other surface is <= ``tolerance_mm``, over the size of both
  surfaces (``"voxel"``: the fraction of border voxels).
* HD95, ``hd95=``: ``"max_directed"`` (default; DeepMind's ``compute_robust_hausdorff``, MONAI's
  ``compute_hausdorff_distance``) is the larger of the two directed 95th percentiles (reference to
  prediction, prediction to reference); ``"pooled"`` is the 95th percentile of the distances of
  both directions together. Percentiles of ``"surface_area"`` distances are weighted by element
  size: the smallest distance d such that the elements with distance <= d hold at least 95 % of the
  size; ``"voxel"`` distances use ``numpy.percentile`` (linear interpolation between voxels).

Ignored region (nnU-Net's ``ignore`` label; ``ignore`` = the boolean mask of reference voxels that
carry it): as in nnunetv2's ``compute_metrics``, Dice counts only voxels outside it, so both masks
are restricted to its complement, and emptiness is decided there. Surfaces are those of the
reference and of the prediction as predicted (including what it predicts in the ignored region),
but an element within one voxel of the ignored region (a ``"surface_area"`` element whose 2x2x2
block holds an ignored voxel; a border voxel that is ignored or face-adjacent to an ignored voxel)
is not scored: such a boundary is where the annotation stops, not where the object does. When no
element of either surface is left, NSD and HD95 are NaN.

Empty-mask conventions (reference R, prediction P, per class, outside the ignored region):

* R and P both empty: Dice, NSD and HD95 are NaN, and ``nanmean`` leaves the case out of means
  (nnU-Net's convention).
* Exactly one of them empty: Dice = 0, NSD = 0 and HD95 = the physical diagonal of the image in mm
  (the worst possible distance, finite so that means stay defined).

Errors: :class:`samunet.errors.ConfigurationError` for an unknown convention, ``ValueError`` for
arrays that do not fit together.
"""
from __future__ import annotations

import functools
import itertools
import warnings
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from samunet.errors import ConfigurationError

METRIC_NAMES = ("Dice", "NSD", "HD95")
HD_PERCENTILE = 95.0
NSD_CONVENTIONS = {
    "surface_area": "Nikolov et al. 2021 (DeepMind surface-distance): marching-cubes surface elements of each 2x2x2 "
                    "voxel block (2x2 in 2D), weighted by their area in mm^2 (length in mm in 2D)",
    "voxel": "border voxels (mask minus its erosion with face connectivity), each counted once",
}
HD95_CONVENTIONS = {
    "max_directed": "maximum of the two directed 95th percentiles (reference->prediction, prediction->reference)",
    "pooled": "95th percentile of the distances of both directions pooled",
}
DEFAULT_NSD = "surface_area"
DEFAULT_HD95 = "max_directed"
IGNORE_LABEL_NAME = "ignore"
BOTH_EMPTY_VALUE = float("nan")
ONE_EMPTY_DICE = 0.0
ONE_EMPTY_NSD = 0.0
ONE_EMPTY_HD95 = "image_diagonal_mm"
EMPTY_MASK_CONVENTION = {
    "both_empty": {"Dice": "NaN", "NSD": "NaN", "HD95": "NaN", "note": "excluded from means (nanmean)"},
    "one_empty": {"Dice": ONE_EMPTY_DICE, "NSD": ONE_EMPTY_NSD, "HD95": ONE_EMPTY_HD95},
}


def metric_conventions(nsd: str = DEFAULT_NSD, hd95: str = DEFAULT_HD95) -> dict:
    """The conventions a summary was computed with, for its JSON."""
    check_conventions(nsd, hd95)
    return {
        "nsd": nsd,
        "nsd_definition": NSD_CONVENTIONS[nsd],
        "hd95": hd95,
        "hd95_definition": HD95_CONVENTIONS[hd95],
        "hd95_weighting": "by element size (lower weighted percentile)" if nsd == "surface_area"
        else "numpy.percentile, linear interpolation",
        "ignore_label": "voxels of the reference carrying dataset.json's 'ignore' label are excluded from every "
                        "class (as nnunetv2's compute_metrics); surface elements within one voxel of them are not "
                        "scored",
        "single_slice": "a volume of one slice is evaluated in 2D with its in-plane spacing",
    }


def check_conventions(nsd: str, hd95: str) -> None:
    """Raise :class:`ConfigurationError` for an unknown NSD or HD95 convention."""
    if nsd not in NSD_CONVENTIONS:
        raise ConfigurationError(f"unknown NSD convention {nsd!r}; use one of {', '.join(NSD_CONVENTIONS)}")
    if hd95 not in HD95_CONVENTIONS:
        raise ConfigurationError(f"unknown HD95 convention {hd95!r}; use one of {', '.join(HD95_CONVENTIONS)}")


def image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Physical length of the image diagonal in mm (the HD95 used when exactly one mask is empty)."""
    return float(np.linalg.norm(np.asarray(shape, dtype=float) * np.asarray(spacing, dtype=float)))


def dice(reference: np.ndarray, prediction: np.ndarray) -> float:
    """Dice of two boolean masks; NaN when both are empty."""
    total = int(reference.sum()) + int(prediction.sum())
    if total == 0:
        return BOTH_EMPTY_VALUE
    return 2.0 * int(np.logical_and(reference, prediction).sum()) / total


# ---------------------------------------------------------------------------------- surface elements

def _block_corners(ndim: int) -> list[tuple[int, ...]]:
    """Corners of a 2x2(x2) block; corner ``c`` is bit ``int(c as a binary number)`` of a block's code."""
    return list(itertools.product((0, 1), repeat=ndim))


def _corner_bit(corner: tuple[int, ...]) -> int:
    return int("".join(map(str, corner)), 2)


def _block_faces(ndim: int) -> list[list[tuple[int, ...]]]:
    """The square faces of a block, each as its four corners in cyclic order."""
    square = [(0, 0), (0, 1), (1, 1), (1, 0)]
    if ndim == 2:
        return [square]
    faces = []
    for axis in range(3):
        in_plane = [d for d in range(3) if d != axis]
        for side in (0, 1):
            face = []
            for p, q in square:
                corner = [0, 0, 0]
                corner[axis], corner[in_plane[0]], corner[in_plane[1]] = side, p, q
                face.append(tuple(corner))
            faces.append(face)
    return faces


def _midpoint(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[float, ...]:
    return tuple((x + y) / 2.0 for x, y in zip(a, b))


def _contour_segments(inside: dict, ndim: int) -> list[tuple[tuple[float, ...], tuple[float, ...]]]:
    """Segments of the surface on the faces of one block (edge midpoint to edge midpoint)."""
    cut_off_inside = sum(inside.values()) <= len(inside) // 2
    segments = []
    for face in _block_faces(ndim):
        states = [inside[corner] for corner in face]
        edges = [(face[i], face[(i + 1) % 4]) for i in range(4)]
        crossing = [_midpoint(*edge) for i, edge in enumerate(edges) if states[i] != states[(i + 1) % 4]]
        if len(crossing) == 2:
            segments.append((crossing[0], crossing[1]))
        elif len(crossing) == 4:  # two inside corners on a diagonal: cut off the corners of one side
            for k in range(4):
                if states[k] == cut_off_inside:
                    segments.append((_midpoint(*edges[k - 1]), _midpoint(*edges[k])))
    return segments


def _closed_polygons(segments: list) -> list[list[tuple[float, ...]]]:
    """Chain segments that share end points into closed polygons (every end point is shared by two)."""
    neighbours: dict = {}
    for a, b in segments:
        neighbours.setdefault(a, []).append(b)
        neighbours.setdefault(b, []).append(a)
    seen, polygons = set(), []
    for start in neighbours:
        if start in seen:
            continue
        polygon, current = [start], start
        seen.add(start)
        while True:
            following = [p for p in neighbours[current] if p not in seen]
            if not following:
                break
            current = following[0]
            polygon.append(current)
            seen.add(current)
        polygons.append(polygon)
    return polygons


def _triangulations(polygon: list) -> list[list[tuple]]:
    """Every split of a polygon into triangles (by the triangle that holds its last edge)."""
    if len(polygon) == 3:
        return [[tuple(polygon)]]
    splits = []
    last = len(polygon) - 1
    for apex in range(1, last):
        lower = _triangulations(polygon[:apex + 1]) if apex >= 2 else [[]]
        upper = _triangulations(polygon[apex:]) if last - apex >= 2 else [[]]
        for part_a in lower:
            for part_b in upper:
                splits.append(part_a + part_b + [(polygon[0], polygon[apex], polygon[last])])
    return splits


def _simplex_sizes(simplices: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Lengths (segments) or areas (triangles) of simplices given in voxel units, in mm / mm^2."""
    if len(simplices) == 0:
        return np.zeros(0)
    scaled = simplices * np.asarray(spacing, dtype=float)
    if simplices.shape[1] == 2:
        return np.linalg.norm(scaled[:, 1] - scaled[:, 0], axis=1)
    return np.linalg.norm(np.cross(scaled[:, 1] - scaled[:, 0], scaled[:, 2] - scaled[:, 0]), axis=1) / 2.0


@functools.lru_cache(maxsize=2)
def _block_simplices(ndim: int) -> tuple[np.ndarray, ...]:
    """Per block code: the surface's segments (2D) or triangles (3D), vertices in voxel units."""
    corners = _block_corners(ndim)
    table = []
    for code in range(2 ** len(corners)):
        inside = {corner: bool(code >> _corner_bit(corner) & 1) for corner in corners}
        segments = _contour_segments(inside, ndim)
        if ndim == 2:
            simplices = segments
        else:
            simplices = []
            for polygon in _closed_polygons(segments):
                splits = _triangulations(polygon)
                simplices += max(splits, key=lambda split: _simplex_sizes(np.array(split), (1, 1, 1)).sum())
        table.append(np.array(simplices, dtype=float).reshape(-1, ndim, ndim))
    return tuple(table)


@functools.lru_cache(maxsize=16)
def _block_sizes(ndim: int, spacing: tuple[float, ...]) -> np.ndarray:
    """Surface size (mm^2, or mm in 2D) of every block code with this spacing."""
    return np.array([_simplex_sizes(simplices, spacing).sum() for simplices in _block_simplices(ndim)])


def _block_codes(mask: np.ndarray) -> np.ndarray:
    """Code of every 2x2(x2) block of ``mask`` padded with background: shape ``mask.shape + 1``;
    block ``p`` holds voxels ``p - 1`` and ``p`` along each axis."""
    padded = np.pad(mask.astype(np.uint8), 1)
    codes = np.zeros(tuple(n + 1 for n in mask.shape), dtype=np.uint8)
    for corner in _block_corners(mask.ndim):
        window = tuple(slice(c, c + n + 1) for c, n in zip(corner, mask.shape))
        codes |= padded[window] << _corner_bit(corner)
    return codes


def _surface_elements(mask: np.ndarray, spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Where the surface elements of ``mask`` lie (block grid) and their sizes."""
    codes = _block_codes(mask)
    full = 2 ** (2 ** mask.ndim) - 1
    return (codes != 0) & (codes != full), _block_sizes(mask.ndim, spacing)[codes]


def _border_voxels(mask: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


class SurfaceDistances(NamedTuple):
    """Distances (mm) of the scored surface elements of each mask to the other surface, with their sizes."""
    reference_to_prediction: np.ndarray
    reference_sizes: np.ndarray
    prediction_to_reference: np.ndarray
    prediction_sizes: np.ndarray


def _union_box(*masks: np.ndarray) -> tuple[slice, ...]:
    """Joint bounding box of the masks plus one voxel (clipped to the image)."""
    union = np.logical_or.reduce(masks)
    return tuple(
        slice(max(int(idx.min()) - 1, 0), min(int(idx.max()) + 2, size))
        for idx, size in zip(np.nonzero(union), union.shape)
    )


def surface_distances(
    reference: np.ndarray,
    prediction: np.ndarray,
    spacing: Sequence[float],
    surface: str = DEFAULT_NSD,
    ignore: np.ndarray | None = None,
) -> SurfaceDistances:
    """Surface distances of two non-empty boolean masks (2D or 3D) under the ``surface`` convention
    (``"surface_area"`` or ``"voxel"``); elements within one voxel of ``ignore`` are left out."""
    spacing = tuple(float(s) for s in spacing)
    box = _union_box(reference, prediction)
    reference, prediction = reference[box], prediction[box]
    ignore = ignore[box] if ignore is not None else None
    if surface == "surface_area":
        ref_grid, ref_sizes = _surface_elements(reference, spacing)
        pred_grid, pred_sizes = _surface_elements(prediction, spacing)
        unscored = _block_codes(ignore) != 0 if ignore is not None else None
    else:
        ref_grid, pred_grid = _border_voxels(reference), _border_voxels(prediction)
        ref_sizes = pred_sizes = np.ones(ref_grid.shape)
        unscored = ndimage.binary_dilation(ignore, ndimage.generate_binary_structure(ignore.ndim, 1)) \
            if ignore is not None else None
    to_reference = ndimage.distance_transform_edt(~ref_grid, sampling=spacing)
    to_prediction = ndimage.distance_transform_edt(~pred_grid, sampling=spacing)
    if unscored is not None:
        ref_grid, pred_grid = ref_grid & ~unscored, pred_grid & ~unscored
    return SurfaceDistances(to_prediction[ref_grid], ref_sizes[ref_grid],
                            to_reference[pred_grid], pred_sizes[pred_grid])


def surface_dice(distances: SurfaceDistances, tolerance_mm: float) -> float:
    """Size of both surfaces within ``tolerance_mm`` of the other, over the size of both (NaN if none)."""
    total = distances.reference_sizes.sum() + distances.prediction_sizes.sum()
    if total == 0:
        return BOTH_EMPTY_VALUE
    within = (distances.reference_sizes[distances.reference_to_prediction <= tolerance_mm].sum()
              + distances.prediction_sizes[distances.prediction_to_reference <= tolerance_mm].sum())
    return float(within / total)


def _percentile(values: np.ndarray, sizes: np.ndarray, weighted: bool) -> float:
    if not weighted:
        return float(np.percentile(values, HD_PERCENTILE))
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(sizes[order]) / sizes.sum()
    index = int(np.searchsorted(cumulative, HD_PERCENTILE / 100.0))
    return float(values[order][min(index, len(values) - 1)])


def hausdorff_95(distances: SurfaceDistances, convention: str = DEFAULT_HD95, weighted: bool = True) -> float:
    """HD95 in mm: ``"max_directed"`` or ``"pooled"``; percentiles weighted by element size if ``weighted``."""
    directions = [(d, s) for d, s in ((distances.reference_to_prediction, distances.reference_sizes),
                                      (distances.prediction_to_reference, distances.prediction_sizes)) if d.size]
    if not directions:
        return BOTH_EMPTY_VALUE
    if convention == "pooled":
        return _percentile(np.concatenate([d for d, _ in directions]),
                           np.concatenate([s for _, s in directions]), weighted)
    return max(_percentile(d, s, weighted) for d, s in directions)


def _planar_if_single_slice(arrays: list, spacing: Sequence[float]) -> tuple[list, tuple[float, ...]]:
    """(1, H, W) volumes become (H, W) images with the in-plane spacing (nnunetv2's 2D convention)."""
    if len(spacing) == 3 and arrays[0].shape[0] == 1:
        return [a[0] if a is not None else None for a in arrays], tuple(spacing[1:])
    return arrays, tuple(spacing)


def class_metrics(
    reference: np.ndarray,
    prediction: np.ndarray,
    spacing: Sequence[float],
    tolerance_mm: float,
    *,
    nsd: str = DEFAULT_NSD,
    hd95: str = DEFAULT_HD95,
    ignore: np.ndarray | None = None,
) -> dict[str, float]:
    """Dice, NSD at ``tolerance_mm`` and HD95 (mm) of two boolean masks with the conventions of this
    module; ``ignore`` (optional) marks the ignored region of the reference."""
    check_conventions(nsd, hd95)
    (reference, prediction, ignore), spacing = _planar_if_single_slice([reference, prediction, ignore], spacing)
    scored_reference, scored_prediction = (reference, prediction) if ignore is None else \
        (reference & ~ignore, prediction & ~ignore)
    ref_empty, pred_empty = not scored_reference.any(), not scored_prediction.any()
    if ref_empty and pred_empty:
        return {name: BOTH_EMPTY_VALUE for name in METRIC_NAMES}
    if ref_empty or pred_empty:
        return {"Dice": ONE_EMPTY_DICE, "NSD": ONE_EMPTY_NSD, "HD95": image_diagonal_mm(reference.shape, spacing)}
    distances = surface_distances(reference, prediction, spacing, nsd, ignore)
    return {
        "Dice": dice(scored_reference, scored_prediction),
        "NSD": surface_dice(distances, tolerance_mm),
        "HD95": hausdorff_95(distances, hd95, weighted=nsd == "surface_area"),
    }


def _label_mask(label_map: np.ndarray, value: int | Sequence[int]) -> np.ndarray:
    if isinstance(value, (list, tuple)):
        return np.isin(label_map, value)
    return label_map == value


def ignore_label(labels: Mapping[str, int | Sequence[int]]) -> int | None:
    """The value of nnU-Net's ``ignore`` label in dataset.json's ``labels``, or None."""
    value = labels.get(IGNORE_LABEL_NAME)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"the 'ignore' label must be one integer, got {value!r}")
    return value


def foreground_labels(labels: Mapping[str, int | Sequence[int]]) -> dict[str, int | Sequence[int]]:
    """The classes of ``dataset.json``'s labels: without background (value 0) and without ``ignore``."""
    return {name: value for name, value in labels.items() if value != 0 and name != IGNORE_LABEL_NAME}


def evaluate_case(
    reference: np.ndarray,
    prediction: np.ndarray,
    spacing: Sequence[float],
    labels: Mapping[str, int | Sequence[int]],
    tolerance_mm: float,
    *,
    nsd: str = DEFAULT_NSD,
    hd95: str = DEFAULT_HD95,
) -> dict[str, dict[str, float]]:
    """Metrics of every class: ``{label_name: {"Dice", "NSD", "HD95"}}``.

    ``labels`` maps names to values as in dataset.json (a list/tuple value is a region); the
    background (value 0) is skipped, and an ``ignore`` label marks the region of the reference
    excluded from every class. ``spacing`` is in array order (z, y, x), in mm.
    """
    if reference.shape != prediction.shape:
        raise ValueError(f"reference shape {reference.shape} differs from prediction shape {prediction.shape}")
    if len(spacing) != reference.ndim:
        raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} values for a {reference.ndim}D image")
    ignored_value = ignore_label(labels)
    ignore = reference == ignored_value if ignored_value is not None else None
    if ignore is not None and not ignore.any():
        ignore = None
    return {
        name: class_metrics(_label_mask(reference, value), _label_mask(prediction, value), spacing, tolerance_mm,
                            nsd=nsd, hd95=hd95, ignore=ignore)
        for name, value in foreground_labels(labels).items()
    }


def _nanmean(values: Sequence[float]) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN -> NaN is the intended result
        return float(np.nanmean(np.asarray(values, dtype=float))) if len(values) else BOTH_EMPTY_VALUE


def summarise(per_case: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict:
    """Means over cases per class and the foreground mean (mean of the class means), NaN-aware."""
    class_names = list(dict.fromkeys(name for case in per_case.values() for name in case))
    mean_per_class = {
        name: {
            metric: _nanmean([case[name][metric] for case in per_case.values() if name in case])
            for metric in METRIC_NAMES
        }
        for name in class_names
    }
    foreground_mean = {
        metric: _nanmean([means[metric] for means in mean_per_class.values()]) for metric in METRIC_NAMES
    }
    return {"mean_per_class": mean_per_class, "foreground_mean": foreground_mean}
