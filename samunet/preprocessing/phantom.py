"""Synthetic CT-like abdominal phantom written as an nnU-Net raw dataset (for demos and tests).

Each case is an air background (-1000 HU) with an elliptical body (soft tissue 40 HU inside a fat
rim of -100 HU), an unlabelled spine-like disc (400 HU) and three labelled organs: a large liver
(110 HU, label 1), two small kidneys (190 HU, label 2) and a medium spleen darker than the
surrounding tissue (-25 HU, label 3). Organs are ellipsoids in physical space with random
position, size and in-plane rotation; they stay inside the body, off the first and last slice,
and at least ``ORGAN_GAP_MM`` away from each other, the spine and the fat rim. The image is
blurred slightly (partial volume) and gets Gaussian noise. In-plane spacing is 1.5 mm for every
case, slice thickness varies per case in [2.5, 3.5] mm; origin is zero and direction identity.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from samunet.image_io import replace_folder

logger = logging.getLogger(__name__)

LABELS = {"background": 0, "liver": 1, "kidney": 2, "spleen": 3}
HU = {"air": -1000.0, "fat": -100.0, "soft_tissue": 40.0, "bone": 400.0}
IN_PLANE_SPACING_MM = 1.5
SLICE_THICKNESS_RANGE_MM = (2.5, 3.5)
BLUR_SIGMA_MM = 1.0
NOISE_SIGMA_HU = 20.0
ORGAN_GAP_MM = 3.0
FILE_ENDING = ".nii.gz"
MAX_PLACEMENT_TRIES = 200

# Body outline as fractions of the in-plane field of view; fat rim as a fraction of the body.
BODY_SEMI_AXES_FRACTION = (0.36, 0.45)  # (y, x)
INNER_BODY_FRACTION = 0.88
# Spine: centre in normalised body coordinates (v, u) and radius as a fraction of the inner x semi-axis.
SPINE_CENTRE = (0.75, 0.0)
SPINE_RADIUS_FRACTION = 0.16
# Jitter of organ centres (normalised units), sizes (factor) and in-plane rotation (degrees).
CENTRE_JITTER = (0.08, 0.05, 0.05)  # (w, v, u)
SIZE_JITTER = (0.9, 1.1)
ROTATION_JITTER_DEG = 20.0


@dataclass(frozen=True)
class OrganTemplate:
    """An organ ellipsoid in normalised body coordinates (w, v, u) = (z, y, x), each in [-1, 1]."""

    name: str
    hu: float
    centre: tuple[float, float, float]
    semi_axes: tuple[float, float, float]


ORGANS = (
    OrganTemplate("liver", 110.0, (0.15, -0.20, -0.40), (0.70, 0.45, 0.42)),
    OrganTemplate("kidney", 190.0, (-0.25, 0.52, -0.40), (0.35, 0.20, 0.13)),
    OrganTemplate("kidney", 190.0, (-0.25, 0.52, 0.40), (0.35, 0.20, 0.13)),
    OrganTemplate("spleen", -25.0, (0.20, -0.05, 0.52), (0.45, 0.28, 0.22)),
)


def dataset_folder_name(dataset_id: int, dataset_name: str) -> str:
    """nnU-Net's folder name, e.g. ``Dataset990_Phantom``."""
    return f"Dataset{dataset_id:03d}_{dataset_name}"


def _physical_grid(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> list[np.ndarray]:
    """Voxel-centre coordinates in mm, (z, y, x), centred on the volume, broadcastable."""
    return [
        ((np.arange(n) - (n - 1) / 2.0) * s).reshape([-1 if axis == i else 1 for axis in range(3)])
        for i, (n, s) in enumerate(zip(shape, spacing))
    ]


def _ellipsoid(grid, centre_mm, semi_axes_mm, angle_rad: float) -> np.ndarray:
    z, y, x = (g - c for g, c in zip(grid, centre_mm))
    cos, sin = np.cos(angle_rad), np.sin(angle_rad)
    x_rot, y_rot = cos * x + sin * y, -sin * x + cos * y
    return (z / semi_axes_mm[0]) ** 2 + (y_rot / semi_axes_mm[1]) ** 2 + (x_rot / semi_axes_mm[2]) ** 2 <= 1.0


def _place_organs(rng, grid, shape, spacing, body_mm, obstacles) -> list[np.ndarray]:
    """Draw jittered organ masks until all are separated by ``ORGAN_GAP_MM`` from each other and obstacles."""
    half_z = shape[0] * spacing[0] / 2.0
    scale = (half_z, body_mm[0], body_mm[1])
    for _ in range(MAX_PLACEMENT_TRIES):
        masks = []
        for organ in ORGANS:
            centre = [(c + rng.uniform(-j, j)) * s for c, j, s in zip(organ.centre, CENTRE_JITTER, scale)]
            semi = [a * rng.uniform(*SIZE_JITTER) * s for a, s in zip(organ.semi_axes, scale)]
            angle = np.deg2rad(rng.uniform(-ROTATION_JITTER_DEG, ROTATION_JITTER_DEG))
            masks.append(_ellipsoid(grid, centre, semi, angle))
        if _well_separated(masks, obstacles, spacing):
            return masks
    raise RuntimeError(
        f"could not place the phantom organs without overlap in a volume of shape {shape} after "
        f"{MAX_PLACEMENT_TRIES} tries; use a larger shape (e.g. the default (24, 96, 96))"
    )


def _well_separated(masks: list[np.ndarray], obstacles: np.ndarray, spacing) -> bool:
    for mask in masks:
        if not mask.any() or mask[0].any() or mask[-1].any():
            return False
    for i, mask in enumerate(masks):
        distance = ndimage.distance_transform_edt(~mask, sampling=spacing)
        others = obstacles.copy()
        for other in masks[i + 1:]:
            others |= other
        if others.any() and distance[others].min() <= ORGAN_GAP_MM:
            return False
    return True


def generate_case(shape: tuple[int, int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, tuple]:
    """One phantom case: (image int16 HU, labels uint8, spacing (z, y, x) in mm)."""
    slice_thickness = round(float(rng.uniform(*SLICE_THICKNESS_RANGE_MM)), 2)
    spacing = (slice_thickness, IN_PLANE_SPACING_MM, IN_PLANE_SPACING_MM)
    grid = _physical_grid(shape, spacing)
    _, y, x = grid
    body_mm = [
        f * n * IN_PLANE_SPACING_MM * rng.uniform(0.95, 1.03) for f, n in zip(BODY_SEMI_AXES_FRACTION, shape[1:])
    ]
    body_centre = rng.uniform(-2.0, 2.0, size=2)
    radius = np.sqrt(((y - body_centre[0]) / body_mm[0]) ** 2 + ((x - body_centre[1]) / body_mm[1]) ** 2)
    full = np.ones(shape, dtype=bool)
    body = full & (radius <= 1.0)
    inner_body = full & (radius <= INNER_BODY_FRACTION)
    inner_mm = [INNER_BODY_FRACTION * a for a in body_mm]
    spine_centre = [c + f * a for c, f, a in zip(body_centre, SPINE_CENTRE, inner_mm)]
    spine_radius = SPINE_RADIUS_FRACTION * inner_mm[1]
    spine = full & ((y - spine_centre[0]) ** 2 + (x - spine_centre[1]) ** 2 <= spine_radius**2)

    organ_grid = [grid[0], y - body_centre[0], x - body_centre[1]]
    masks = _place_organs(rng, organ_grid, shape, spacing, inner_mm, spine | ~inner_body)

    image = np.full(shape, HU["air"], dtype=np.float32)
    image[body] = HU["fat"]
    image[inner_body] = HU["soft_tissue"]
    image[spine] = HU["bone"]
    labels = np.zeros(shape, dtype=np.uint8)
    for organ, mask in zip(ORGANS, masks):
        image[mask] = organ.hu
        labels[mask] = LABELS[organ.name]
    image = ndimage.gaussian_filter(image, sigma=[BLUR_SIGMA_MM / s for s in spacing])
    image += rng.normal(0.0, NOISE_SIGMA_HU, size=shape).astype(np.float32)
    info = np.iinfo(np.int16)
    return np.clip(np.rint(image), info.min, info.max).astype(np.int16), labels, spacing


def _write_image(array: np.ndarray, spacing_zyx: tuple, path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    image.SetOrigin((0.0, 0.0, 0.0))
    image.SetDirection(np.eye(3).ravel().tolist())
    sitk.WriteImage(image, str(path), useCompression=True)


def _write_split(folder: Path, images: str, labels: str, case_ids: range, shape, seed: int) -> None:
    (folder / images).mkdir()
    (folder / labels).mkdir()
    for index in case_ids:
        image, label_map, spacing = generate_case(shape, np.random.default_rng([seed, index]))
        case = f"case_{index:04d}"
        _write_image(image, spacing, folder / images / f"{case}_0000{FILE_ENDING}")
        _write_image(label_map, spacing, folder / labels / f"{case}{FILE_ENDING}")


def _validate(dataset_id: int, num_train: int, num_test: int, shape) -> None:
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset_id must be in 1..999 (nnU-Net's three digits), got {dataset_id}")
    if num_train < 1 or num_test < 0:
        raise ValueError(f"need num_train >= 1 and num_test >= 0, got num_train={num_train}, num_test={num_test}")
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be three voxel counts (z, y, x), each >= 8, got {tuple(shape)}")


def write_phantom_dataset(
    raw_root: str | os.PathLike,
    dataset_id: int = 990,
    dataset_name: str = "Phantom",
    num_train: int = 8,
    num_test: int = 3,
    shape: tuple[int, int, int] = (24, 96, 96),
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write ``<raw_root>/Dataset<id>_<name>/`` (imagesTr, labelsTr, imagesTs, labelsTs, dataset.json).

    The dataset is built in a temporary folder next to the target and moved into place at the end,
    so an interrupted run leaves nothing behind. An existing complete dataset (with dataset.json)
    is returned unchanged unless ``overwrite``. Deterministic given ``seed``.
    """
    _validate(dataset_id, num_train, num_test, shape)
    shape = tuple(int(n) for n in shape)
    raw_root = Path(raw_root)
    target = raw_root / dataset_folder_name(dataset_id, dataset_name)
    if (target / "dataset.json").is_file() and not overwrite:
        logger.info("%s already exists; returning it unchanged (pass overwrite=True to regenerate)", target)
        return target
    raw_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=raw_root, prefix=f".{target.name}.", suffix=".partial"))
    try:
        logger.info("writing phantom dataset %s (%d train, %d test, shape %s)", target, num_train, num_test, shape)
        _write_split(staging, "imagesTr", "labelsTr", range(num_train), shape, seed)
        _write_split(staging, "imagesTs", "labelsTs", range(num_train, num_train + num_test), shape, seed)
        dataset_json = {
            "name": dataset_name,
            "description": "Synthetic CT-like abdominal phantom generated by samunet (demo data).",
            "channel_names": {"0": "CT"},
            "labels": LABELS,
            "numTraining": num_train,
            "file_ending": FILE_ENDING,
        }
        (staging / "dataset.json").write_text(json.dumps(dataset_json, indent=2) + "\n", encoding="utf-8")
        if target.exists() and not (target / "dataset.json").is_file():
            logger.warning("replacing the incomplete dataset folder %s (it has no dataset.json)", target)
        replace_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def write_tiny_phantom_dataset(
    raw_root: str | os.PathLike,
    dataset_id: int = 991,
    dataset_name: str = "PhantomTiny",
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """A small phantom (shape (8, 48, 48), 4 train, 2 test cases) for fast end-to-end tests."""
    return write_phantom_dataset(
        raw_root, dataset_id, dataset_name, num_train=4, num_test=2, shape=(8, 48, 48), seed=seed, overwrite=overwrite
    )
