"""samunet's torch Euclidean distance transforms equal SciPy's ``distance_transform_edt`` (issue 14).

Batched (B, H, W) masks and label maps, random and edge cases (empty, full, single pixel, touching the
border, one-pixel-wide shapes, one row or column, anisotropic sampling), compared to SciPy to 1e-5.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import distance_transform_edt as scipy_edt

import samunet.modules.distance_transform as distance_transform
from samunet.modules.distance_transform import (distance_to_other_label, distance_transform_edt,
                                                squared_distance_to_other_label)

TOLERANCE = 1e-5


def edge_case_masks(height: int = 17, width: int = 23) -> list[np.ndarray]:
    """Masks that hold at least one zero pixel: empty, single pixel (inside and in a corner), touching
    each border, a one-pixel ring, a diagonal line, a full mask but one pixel, random blobs."""
    generator = np.random.default_rng(0)
    masks = [np.zeros((height, width), bool)]
    for row, col in ((8, 11), (0, 0), (height - 1, width - 1)):
        mask = np.zeros((height, width), bool)
        mask[row, col] = True
        masks.append(mask)
    border = np.zeros((height, width), bool)
    border[:, :5] = True
    border[-3:, :] = True
    masks.append(border)
    masks.append(~border)
    ring = np.zeros((height, width), bool)
    ring[2:15, 3:20] = True
    ring[3:14, 4:19] = False
    masks.append(ring)
    masks.append(np.eye(height, width, dtype=bool))
    almost_full = np.ones((height, width), bool)
    almost_full[5, 7] = False
    masks.append(almost_full)
    masks += [generator.random((height, width)) > p for p in (0.2, 0.5, 0.9)]
    return masks


@pytest.mark.parametrize("sampling", [None, (1.0, 1.0), (2.5, 0.7), 3.0])
def test_edt_equals_scipy_on_edge_cases_and_random_masks(sampling):
    masks = edge_case_masks()
    result = distance_transform_edt(torch.from_numpy(np.stack(masks)), sampling=sampling)
    assert result.dtype == torch.float32 and result.shape == (len(masks), 17, 23)
    for mask, distances in zip(masks, result.numpy()):
        assert np.abs(distances - scipy_edt(mask, sampling=sampling)).max() < TOLERANCE


@pytest.mark.parametrize("shape", [(1, 9), (9, 1), (1, 1), (2, 40), (64, 64)])
def test_edt_equals_scipy_on_thin_and_larger_images(shape):
    generator = np.random.default_rng(1)
    masks = np.stack([generator.random(shape) > 0.3 for _ in range(4)])
    masks[:, 0, 0] = False  # every image holds a zero
    result = distance_transform_edt(torch.from_numpy(masks)).numpy()
    for mask, distances in zip(masks, result):
        assert np.abs(distances - scipy_edt(mask)).max() < TOLERANCE


def test_a_mask_without_zero_is_infinitely_far_from_one_unless_the_border_counts():
    full = torch.ones(2, 5, 7, dtype=torch.bool)
    assert bool(torch.isinf(distance_transform_edt(full)).all())
    bordered = distance_transform_edt(full, border_is_other=True)
    expected = scipy_edt(np.pad(np.ones((5, 7), bool), 1))[1:-1, 1:-1]
    assert np.abs(bordered[0].numpy() - expected).max() < TOLERANCE


@pytest.mark.parametrize("sampling", [None, (2.0, 0.5)])
def test_border_as_boundary_equals_scipy_on_the_mask_padded_with_background(sampling):
    masks = edge_case_masks()
    result = distance_transform_edt(torch.from_numpy(np.stack(masks)), sampling=sampling, border_is_other=True)
    for mask, distances in zip(masks, result.numpy()):
        expected = scipy_edt(np.pad(mask, 1), sampling=sampling)[1:-1, 1:-1]
        assert np.abs(distances - expected).max() < TOLERANCE


@pytest.mark.parametrize("border_is_other", [False, True])
def test_distance_to_other_label_is_every_class_masks_transform_at_once(border_is_other, monkeypatch):
    """For each label k, on the pixels of k: the EDT of the mask ``labels == k`` (padded with background
    when the border counts); computed in chunks as small as one row (the chunking changes nothing)."""
    monkeypatch.setattr(distance_transform, "CHUNK_ELEMENTS", 1)
    generator = np.random.default_rng(2)
    labels = generator.integers(0, 4, size=(3, 13, 11))
    labels[1] = 0
    labels[1, 3:9, 2:6] = 2  # one blob in a single-label background
    labels[2, :, :] = 3  # a single label: nothing to measure to without the border
    distances = distance_to_other_label(torch.from_numpy(labels), border_is_other=border_is_other).numpy()
    for image, result in zip(labels, distances):
        for k in np.unique(image):
            mask = image == k
            if border_is_other:
                expected = scipy_edt(np.pad(mask, 1))[1:-1, 1:-1]
            elif mask.all():
                assert np.isinf(result[mask]).all()
                continue
            else:
                expected = scipy_edt(mask)
            assert np.abs(result[mask] - expected[mask]).max() < TOLERANCE


def test_squared_distances_are_exact_integers_and_leading_axes_are_kept():
    labels = torch.randint(0, 3, (2, 3, 16, 12), generator=torch.Generator().manual_seed(0))
    squared = squared_distance_to_other_label(labels, border_is_other=True)
    assert squared.shape == labels.shape
    assert torch.equal(squared, squared.round())
    assert torch.equal(squared[1, 2], squared_distance_to_other_label(labels[1, 2], border_is_other=True))


def test_bad_input_raises_value_error():
    with pytest.raises(ValueError, match="sampling"):
        distance_transform_edt(torch.ones(1, 3, 3), sampling=(1.0, 0.0))
    with pytest.raises(ValueError, match="sampling"):
        distance_transform_edt(torch.ones(1, 3, 3), sampling=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="shape"):
        distance_transform_edt(torch.ones(3))
