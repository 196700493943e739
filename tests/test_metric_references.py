"""NSD and HD95 against reference implementations, to 1e-6, on fixed small cases (2D and 3D,
anisotropic spacing, masks touching the image border).

The expected numbers were computed once, with the masks built exactly as below, and are stored here:

* ``surface_area`` NSD and ``max_directed`` HD95: DeepMind's ``surface-distance`` package
  (``compute_surface_distances``, ``compute_surface_dice_at_tolerance``,
  ``compute_robust_hausdorff(..., 95)``); ``surface_area`` ``pooled`` HD95: the same package's
  distances and surfel areas of both directions together, with its area-weighted percentile rule.
  MONAI 1.6.1's ``compute_surface_dice(use_subvoxels=True)`` gave the same NSD (float32).
* ``voxel`` NSD and ``max_directed`` HD95: MONAI 1.6.1's ``compute_surface_dice(use_subvoxels=False)``
  and ``compute_hausdorff_distance(percentile=95)`` (float32); ``voxel`` ``pooled`` HD95: MONAI's
  border-voxel distances (``get_mask_edges``, ``get_surface_distance``) of both directions together,
  ``numpy.percentile(..., 95)``; for the 3D cases also samunet's earlier implementation.
"""
import itertools
import math

import numpy as np
import pytest

from samunet.errors import ConfigurationError
from samunet.evaluation.metrics import _block_sizes, class_metrics, metric_conventions


def _ellipsoid(shape, center, radii):
    grid = np.indices(shape, dtype=float)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1.0


def _pattern(shape, weights, modulus, below):
    grid = np.indices(shape)
    return sum(w * g for w, g in zip(weights, grid)) % modulus < below


def _box(shape, corner, size):
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(c, c + s) for c, s in zip(corner, size))] = True
    return mask


S3, S2 = (9, 14, 16), (12, 15)
CASES = {
    "3d_ellipsoids_border_anisotropic": (
        _ellipsoid(S3, (2.0, 6.0, 0.5), (3.5, 5.0, 7.0)),
        _ellipsoid(S3, (3.0, 7.0, 1.5), (3.0, 5.5, 6.0)) | _box(S3, (6, 11, 12), (3, 3, 4)),
        (2.5, 0.8, 1.1), 1.5),
    "3d_rough_surface_anisotropic": (
        _ellipsoid(S3, (4.0, 7.0, 8.0), (3.0, 5.0, 6.0)),
        _ellipsoid(S3, (4.0, 7.0, 8.0), (4.0, 6.0, 7.0)) & ~_pattern(S3, (3, 5, 7), 11, 4),
        (1.3, 0.7, 2.1), 1.0),
    "2d_disc_and_box_border": (
        _ellipsoid(S2, (0.0, 6.0), (5.0, 4.5)),
        _box(S2, (0, 4), (5, 8)) | _box(S2, (9, 12), (3, 3)),
        (0.6, 1.7), 1.2),
    "2d_rough_surface": (
        _ellipsoid(S2, (6.0, 7.0), (4.0, 5.0)) & ~_pattern(S2, (3, 5), 7, 2),
        _ellipsoid(S2, (5.0, 8.0), (4.5, 4.0)),
        (1.0, 0.45), 0.8),
}

# case -> (nsd, hd95) -> {"NSD", "HD95"} of the reference implementations; "Dice" per case
REFERENCE = {
    "3d_ellipsoids_border_anisotropic": {
        "Dice": 0.7090620031796503,
        ("surface_area", "max_directed"): {"NSD": 0.7629876439495481, "HD95": 12.120231020900551},
        ("surface_area", "pooled"): {"NSD": 0.7629876439495481, "HD95": 11.0837719211467},
        ("voxel", "max_directed"): {"NSD": 0.6701298952102661, "HD95": 12.925113677978516},
        ("voxel", "pooled"): {"NSD": 0.6701298952102661, "HD95": 11.726279449462881},
    },
    "3d_rough_surface_anisotropic": {
        "Dice": 0.583756345177665,
        ("surface_area", "max_directed"): {"NSD": 0.7949058667082952, "HD95": 1.91049731745428},
        ("surface_area", "pooled"): {"NSD": 0.7949058667082952, "HD95": 1.4},
        ("voxel", "max_directed"): {"NSD": 0.6827697157859802, "HD95": 1.9104973077774048},
        ("voxel", "pooled"): {"NSD": 0.6827697157859802, "HD95": 1.4764822721481323},
    },
    "2d_disc_and_box_border": {
        "Dice": 0.7191011235955056,
        ("surface_area", "max_directed"): {"NSD": 0.7017266065731342, "HD95": 7.694153624668537},
        ("surface_area", "pooled"): {"NSD": 0.7017266065731342, "HD95": 7.427651041883967},
        ("voxel", "max_directed"): {"NSD": 0.6399999856948853, "HD95": 8.17452621459961},
        ("voxel", "pooled"): {"NSD": 0.6399999856948853, "HD95": 7.738315987586973},
    },
    "2d_rough_surface": {
        "Dice": 0.673469387755102,
        ("surface_area", "max_directed"): {"NSD": 0.6893051821741167, "HD95": 1.3453624047073711},
        ("surface_area", "pooled"): {"NSD": 0.6893051821741167, "HD95": 1.3453624047073711},
        ("voxel", "max_directed"): {"NSD": 0.6307692527770996, "HD95": 1.3490724563598633},
        ("voxel", "pooled"): {"NSD": 0.6307692527770996, "HD95": 1.3453624248504639},
    },
}
# samunet's voxel/pooled metrics before the conventions became selectable (3D only)
EARLIER_VOXEL_POOLED = {
    "3d_ellipsoids_border_anisotropic": {"NSD": 0.6701298701298701, "HD95": 11.726279819785942},
    "3d_rough_surface_anisotropic": {"NSD": 0.6827697262479872, "HD95": 1.47648230602334},
}
CONVENTIONS = list(itertools.product(("surface_area", "voxel"), ("max_directed", "pooled")))


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("nsd,hd95", CONVENTIONS)
def test_metrics_equal_the_reference_implementations(name, nsd, hd95):
    reference, prediction, spacing, tolerance = CASES[name]
    result = class_metrics(reference, prediction, spacing, tolerance, nsd=nsd, hd95=hd95)
    expected = REFERENCE[name][(nsd, hd95)]
    assert result["NSD"] == pytest.approx(expected["NSD"], abs=1e-6)
    assert result["HD95"] == pytest.approx(expected["HD95"], abs=1e-6)
    assert result["Dice"] == pytest.approx(REFERENCE[name]["Dice"], abs=1e-12)


@pytest.mark.parametrize("name", list(EARLIER_VOXEL_POOLED))
def test_voxel_pooled_is_the_earlier_samunet_definition(name):
    reference, prediction, spacing, tolerance = CASES[name]
    result = class_metrics(reference, prediction, spacing, tolerance, nsd="voxel", hd95="pooled")
    assert result["NSD"] == pytest.approx(EARLIER_VOXEL_POOLED[name]["NSD"], abs=1e-12)
    assert result["HD95"] == pytest.approx(EARLIER_VOXEL_POOLED[name]["HD95"], abs=1e-12)


def test_defaults_are_nikolov_nsd_and_the_maximum_of_the_directed_percentiles():
    reference, prediction, spacing, tolerance = CASES["3d_ellipsoids_border_anisotropic"]
    assert class_metrics(reference, prediction, spacing, tolerance) == pytest.approx(
        {"Dice": REFERENCE["3d_ellipsoids_border_anisotropic"]["Dice"],
         **REFERENCE["3d_ellipsoids_border_anisotropic"][("surface_area", "max_directed")]}, abs=1e-6)
    assert metric_conventions()["nsd"] == "surface_area" and metric_conventions()["hd95"] == "max_directed"


@pytest.mark.parametrize("name", ["2d_disc_and_box_border", "2d_rough_surface"])
def test_a_single_slice_volume_is_scored_in_2d_whatever_its_slice_spacing(name):
    """nnunetv2 reads a png as a (1, H, W) volume with spacing (999, 1, 1)."""
    reference, prediction, spacing, tolerance = CASES[name]
    for nsd, hd95 in CONVENTIONS:
        volume = class_metrics(reference[None], prediction[None], (999.0, *spacing), tolerance, nsd=nsd, hd95=hd95)
        assert volume == pytest.approx({"Dice": REFERENCE[name]["Dice"], **REFERENCE[name][(nsd, hd95)]}, abs=1e-6)


def test_surface_element_sizes_follow_the_marching_cubes_definition():
    """One voxel: 8 corner triangles (3D) / 4 corner segments (2D); a face of a large box: its area."""
    sizes_3d, sizes_2d = _block_sizes(3, (2.0, 3.0, 5.0)), _block_sizes(2, (2.0, 3.0))
    corner_triangle = np.linalg.norm([3.0 * 5.0, 2.0 * 5.0, 2.0 * 3.0]) / 8  # half-edge legs, scaled
    assert all(sizes_3d[1 << bit] == pytest.approx(corner_triangle) for bit in range(8))
    assert sizes_3d[0] == sizes_3d[255] == 0.0
    assert sizes_3d[0b00001111] == pytest.approx(3.0 * 5.0)  # the four corners of one x0-face: a y-z square
    assert sizes_2d[0b0001] == pytest.approx(math.hypot(2.0, 3.0) / 2)
    assert sizes_2d[0b0011] == pytest.approx(3.0) and sizes_2d[0b0101] == pytest.approx(2.0)
    assert sizes_2d[0b0110] == pytest.approx(math.hypot(2.0, 3.0))  # two diagonal corners cut off


def test_an_unknown_convention_is_a_configuration_error():
    reference, prediction, spacing, tolerance = CASES["2d_rough_surface"]
    with pytest.raises(ConfigurationError, match="unknown NSD convention 'area'.*surface_area, voxel"):
        class_metrics(reference, prediction, spacing, tolerance, nsd="area")
    with pytest.raises(ConfigurationError, match="unknown HD95 convention 'mean'"):
        class_metrics(reference, prediction, spacing, tolerance, hd95="mean")
