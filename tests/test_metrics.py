"""Tests of samunet.evaluation.metrics: Dice, NSD, HD95 and the empty-mask conventions."""
import math

import numpy as np
import pytest

from samunet.evaluation.metrics import class_metrics, dice, evaluate_case, image_diagonal_mm, summarise

SHAPE = (20, 30, 30)


def _box(z0, z1, y0, y1, x0, x1, shape=SHAPE):
    mask = np.zeros(shape, dtype=bool)
    mask[z0:z1, y0:y1, x0:x1] = True
    return mask


def _sphere(radius_mm, spacing, shape):
    grid = np.meshgrid(*[(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing)], indexing="ij")
    return sum(g**2 for g in grid) <= radius_mm**2


def test_dice_of_known_overlaps():
    a = _box(5, 10, 5, 10, 0, 10)
    assert dice(a, a) == 1.0
    assert dice(a, _box(5, 10, 5, 10, 5, 15)) == pytest.approx(0.5)
    assert dice(a, _box(5, 10, 5, 10, 10, 20)) == 0.0
    assert dice(a, _box(5, 10, 5, 10, 0, 5)) == pytest.approx(2 * 125 / (250 + 125))


def test_identical_masks_have_perfect_scores():
    a = _box(4, 12, 6, 20, 3, 17)
    result = class_metrics(a, a, (2.5, 1.0, 1.0), tolerance_mm=1.0)
    assert result == {"Dice": 1.0, "NSD": 1.0, "HD95": 0.0}


def test_nsd_is_one_for_a_one_voxel_shift_within_tolerance():
    spacing = (2.5, 1.0, 1.0)
    a = _box(4, 12, 6, 20, 3, 17)
    shifted_z = _box(5, 13, 6, 20, 3, 17)
    shifted_x = _box(4, 12, 6, 20, 4, 18)
    assert class_metrics(a, shifted_z, spacing, tolerance_mm=2.5)["NSD"] == 1.0
    assert class_metrics(a, shifted_x, spacing, tolerance_mm=1.0)["NSD"] == 1.0
    assert class_metrics(a, shifted_z, spacing, tolerance_mm=2.5)["HD95"] == pytest.approx(2.5)


def test_nsd_below_one_for_a_shift_beyond_tolerance():
    a = _box(4, 12, 6, 20, 3, 17)
    shifted = _box(4, 12, 6, 20, 6, 20)  # 3 voxels = 3 mm in x
    result = class_metrics(a, shifted, (2.5, 1.0, 1.0), tolerance_mm=2.0)
    assert 0.0 < result["NSD"] < 1.0
    assert result["HD95"] == pytest.approx(3.0)


def test_hd95_of_concentric_spheres_is_the_radius_difference_with_anisotropic_spacing():
    spacing, shape = (2.0, 0.8, 0.8), (31, 71, 71)
    outer, inner = _sphere(20.0, spacing, shape), _sphere(12.0, spacing, shape)
    result = class_metrics(outer, inner, spacing, tolerance_mm=2.0)
    assert result["HD95"] == pytest.approx(8.0, abs=1.0)
    assert result["NSD"] == 0.0
    # ignoring the spacing would measure the 10-voxel in-plane gap instead of 8 mm
    assert class_metrics(outer, inner, (1.0, 1.0, 1.0), tolerance_mm=2.0)["HD95"] > 9.0


def test_both_empty_gives_nan_for_every_metric():
    empty = np.zeros(SHAPE, dtype=bool)
    result = class_metrics(empty, empty, (1.0, 1.0, 1.0), tolerance_mm=2.0)
    assert all(math.isnan(v) for v in result.values())


@pytest.mark.parametrize("reference_empty", [True, False])
def test_one_empty_gives_zero_scores_and_the_image_diagonal(reference_empty):
    spacing = (3.0, 1.5, 1.5)
    empty, mask = np.zeros(SHAPE, dtype=bool), _box(4, 8, 4, 8, 4, 8)
    reference, prediction = (empty, mask) if reference_empty else (mask, empty)
    result = class_metrics(reference, prediction, spacing, tolerance_mm=2.0)
    diagonal = math.sqrt((20 * 3.0) ** 2 + (30 * 1.5) ** 2 + (30 * 1.5) ** 2)
    assert image_diagonal_mm(SHAPE, spacing) == pytest.approx(diagonal)
    assert result == {"Dice": 0.0, "NSD": 0.0, "HD95": pytest.approx(diagonal)}


def test_evaluate_case_skips_background_and_summarise_ignores_nan():
    labels = {"background": 0, "a": 1, "b": 2}
    reference = np.zeros(SHAPE, dtype=np.uint8)
    reference[2:6, 2:6, 2:6] = 1
    case_1 = evaluate_case(reference, reference, (1.0, 1.0, 1.0), labels, tolerance_mm=1.0)
    assert set(case_1) == {"a", "b"}
    assert case_1["a"]["Dice"] == 1.0 and math.isnan(case_1["b"]["Dice"])
    prediction = reference.copy()
    prediction[10:12, 10:12, 10:12] = 2
    case_2 = evaluate_case(reference, prediction, (1.0, 1.0, 1.0), labels, tolerance_mm=1.0)
    assert case_2["b"]["Dice"] == 0.0
    summary = summarise({"c1": case_1, "c2": case_2})
    assert summary["mean_per_class"]["a"]["Dice"] == 1.0
    assert summary["mean_per_class"]["b"]["Dice"] == 0.0  # the NaN of c1 is left out
    assert summary["foreground_mean"]["Dice"] == pytest.approx(0.5)
    assert summary["foreground_mean"]["HD95"] == pytest.approx(image_diagonal_mm(SHAPE, (1.0, 1.0, 1.0)) / 2)


def test_summarise_all_nan_class_stays_nan():
    nan = float("nan")
    summary = summarise({"c1": {"a": {"Dice": nan, "NSD": nan, "HD95": nan}}})
    assert math.isnan(summary["mean_per_class"]["a"]["Dice"])
    assert math.isnan(summary["foreground_mean"]["NSD"])


def test_evaluate_case_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        evaluate_case(np.zeros((2, 3, 4)), np.zeros((2, 3, 5)), (1.0, 1.0, 1.0), {"a": 1}, 1.0)
