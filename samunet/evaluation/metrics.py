"""Per-class segmentation metrics for 3D label maps: Dice, NSD and HD95.

Arrays are indexed (z, y, x) as SimpleITK's ``GetArrayFromImage`` returns them, so ``spacing`` is
given in the same (z, y, x) order, i.e. ``image.GetSpacing()[::-1]``.

Definitions:

* Dice = 2 |R and P| / (|R| + |P|).
* Surface of a mask = its border voxels: the mask minus its binary erosion with the 3D cross
  (face connectivity, ``generate_binary_structure(3, 1)``); voxels outside the image count as
  background, so a mask touching the image border has a surface there.
* Surface distances = for every surface voxel of one mask, the Euclidean distance in mm to the
  nearest surface voxel of the other mask (``scipy.ndimage.distance_transform_edt`` with
  ``sampling=spacing``), taken in both directions.
* NSD (normalised surface distance, surface Dice) at ``tolerance_mm`` = fraction of both surfaces'
  voxels whose distance to the other surface is <= ``tolerance_mm``.
* HD95 = 95th percentile of the pooled surface distances of both directions, in mm.

Empty-mask conventions (reference R, prediction P, per class):

* R and P both empty: Dice, NSD and HD95 are NaN, and ``nanmean`` leaves the case out of means
  (nnU-Net's convention).
* Exactly one of them empty: Dice = 0, NSD = 0 and HD95 = the physical diagonal of the image in mm
  (the worst possible distance, finite so that means stay defined).
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

METRIC_NAMES = ("Dice", "NSD", "HD95")
HD_PERCENTILE = 95.0
SURFACE_STRUCTURE = ndimage.generate_binary_structure(3, 1)
BOTH_EMPTY_VALUE = float("nan")
ONE_EMPTY_DICE = 0.0
ONE_EMPTY_NSD = 0.0
ONE_EMPTY_HD95 = "image_diagonal_mm"
EMPTY_MASK_CONVENTION = {
    "both_empty": {"Dice": "NaN", "NSD": "NaN", "HD95": "NaN", "note": "excluded from means (nanmean)"},
    "one_empty": {"Dice": ONE_EMPTY_DICE, "NSD": ONE_EMPTY_NSD, "HD95": ONE_EMPTY_HD95},
    "surface": "mask minus its binary erosion with the 3D cross (face connectivity)",
}


def image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Physical length of the image diagonal in mm (the HD95 used when exactly one mask is empty)."""
    return float(np.linalg.norm(np.asarray(shape, dtype=float) * np.asarray(spacing, dtype=float)))


def dice(reference: np.ndarray, prediction: np.ndarray) -> float:
    """Dice of two boolean masks; NaN when both are empty."""
    total = int(reference.sum()) + int(prediction.sum())
    if total == 0:
        return BOTH_EMPTY_VALUE
    return 2.0 * int(np.logical_and(reference, prediction).sum()) / total


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=SURFACE_STRUCTURE, border_value=0)


def _crop_to_union(reference: np.ndarray, prediction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to their joint bounding box plus one voxel; surfaces and distances are unchanged."""
    union = reference | prediction
    slices = tuple(
        slice(max(int(idx.min()) - 1, 0), min(int(idx.max()) + 2, size))
        for idx, size in zip(np.nonzero(union), union.shape)
    )
    return reference[slices], prediction[slices]


def surface_distances(
    reference: np.ndarray, prediction: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Distances in mm from each reference surface voxel to the prediction surface, and vice versa.

    Both masks must be non-empty.
    """
    reference, prediction = _crop_to_union(reference, prediction)
    surface_ref = _surface(reference)
    surface_pred = _surface(prediction)
    to_ref = ndimage.distance_transform_edt(~surface_ref, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~surface_pred, sampling=spacing)
    return to_pred[surface_ref], to_ref[surface_pred]


def class_metrics(
    reference: np.ndarray, prediction: np.ndarray, spacing: Sequence[float], tolerance_mm: float
) -> dict[str, float]:
    """Dice, NSD at ``tolerance_mm`` and HD95 (mm) of two boolean masks, with the empty-mask conventions."""
    ref_empty = not reference.any()
    pred_empty = not prediction.any()
    if ref_empty and pred_empty:
        return {name: BOTH_EMPTY_VALUE for name in METRIC_NAMES}
    if ref_empty or pred_empty:
        return {
            "Dice": ONE_EMPTY_DICE,
            "NSD": ONE_EMPTY_NSD,
            "HD95": image_diagonal_mm(reference.shape, spacing),
        }
    ref_to_pred, pred_to_ref = surface_distances(reference, prediction, spacing)
    pooled = np.concatenate([ref_to_pred, pred_to_ref])
    return {
        "Dice": dice(reference, prediction),
        "NSD": float(np.count_nonzero(pooled <= tolerance_mm)) / pooled.size,
        "HD95": float(np.percentile(pooled, HD_PERCENTILE)),
    }


def _label_mask(label_map: np.ndarray, value: int | Sequence[int]) -> np.ndarray:
    if isinstance(value, (list, tuple)):
        return np.isin(label_map, value)
    return label_map == value


def foreground_labels(labels: Mapping[str, int | Sequence[int]]) -> dict[str, int | Sequence[int]]:
    """The labels of ``dataset.json`` without background (value 0)."""
    return {name: value for name, value in labels.items() if value != 0}


def evaluate_case(
    reference: np.ndarray,
    prediction: np.ndarray,
    spacing: Sequence[float],
    labels: Mapping[str, int | Sequence[int]],
    tolerance_mm: float,
) -> dict[str, dict[str, float]]:
    """Metrics of every foreground label: ``{label_name: {"Dice", "NSD", "HD95"}}``.

    ``labels`` maps names to values as in dataset.json (a list/tuple value is a region); the
    background (value 0) is skipped. ``spacing`` is in array order (z, y, x), in mm.
    """
    if reference.shape != prediction.shape:
        raise ValueError(f"reference shape {reference.shape} differs from prediction shape {prediction.shape}")
    if len(spacing) != reference.ndim:
        raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} values for a {reference.ndim}D image")
    return {
        name: class_metrics(_label_mask(reference, value), _label_mask(prediction, value), spacing, tolerance_mm)
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
