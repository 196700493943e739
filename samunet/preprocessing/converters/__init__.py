"""Benchmark converters (AMOS22 task 1, ACDC, Synapse) into nnU-Net's raw layout, and what they share.

Every converter checks its whole input first (every file it reads: present, complete, readable, on
its image's grid, with the benchmark's labels) and lists every problem it finds in one
:class:`ConversionError`, one line; only then does it write. The dataset is built in a hidden folder next to
the target (``nnUNet_raw/.DatasetXXX_Name.*.partial``), checked with
:func:`samunet.preprocessing.dataset_checks.validate_raw_dataset`, and moved into place with
``os.replace``, so an interrupted conversion leaves no half-written dataset behind.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import SimpleITK as sitk

from samunet.errors import DatasetError
from samunet.image_io import GEOMETRY_FIELDS, geometry_difference, nifti_truncation, read_header, replace_folder

logger = logging.getLogger(__name__)

MAX_LISTED_PROBLEMS = 20
GEOMETRY_TOLERANCE = 1e-3


class ConversionError(DatasetError):
    """The source folder of a benchmark cannot be converted as it is."""


def raise_if_problems(problems: list[str], source: Path, what: str) -> None:
    """Raise one :class:`ConversionError` listing ``problems`` (at most 20 shown) in one line, if there are any."""
    if not problems:
        return
    more = f"; and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS else ""
    raise ConversionError(f"{what} source {source} has {len(problems)} problem(s); nothing was written: "
                          f"{'; '.join(problems[:MAX_LISTED_PROBLEMS])}{more}")


def unreadable(path: Path) -> str | None:
    """A sentence saying why the image or label file ``path`` cannot be used (empty, a NIfTI cut off before
    its voxel data ends, which SimpleITK reads without complaint, or a header SimpleITK cannot read), or None."""
    if path.stat().st_size == 0:
        return f"{path} is empty (0 bytes); copy it again from the release"
    lacking = nifti_truncation(path) if path.name.lower().endswith((".nii", ".nii.gz")) else None
    if lacking:
        return f"{path} is truncated ({lacking} missing); copy it again from the release"
    try:
        read_header(path)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if "ERROR" in line), lines[-1] if lines else "")
        reason = reason.split("ERROR: ", 1)[-1].replace(f'"{path}"', "it") or type(error).__name__
        return f"{path} cannot be read ({reason}); copy it again from the release"
    return None


def geometry_problem(image: Path, label: Path) -> str | None:
    """A sentence saying why the label cannot go with the image: either file unreadable (:func:`unreadable`),
    the image not 3D, or the label's grid different from the image's; None when they match."""
    broken = [problem for problem in map(unreadable, (image, label)) if problem]
    if broken:
        return "; ".join(broken)
    image_geometry, label_geometry = read_header(image), read_header(label)
    if len(image_geometry[0]) != 3:
        return f"{image} is {len(image_geometry[0])}D; a 3D volume is expected"
    field = geometry_difference(image_geometry, label_geometry, atol=GEOMETRY_TOLERANCE, rtol=GEOMETRY_TOLERANCE)
    if field is None:
        return None
    index = GEOMETRY_FIELDS.index(field)
    if field == "size":
        return f"{label} has size {label_geometry[0]} but its image {image.name} has size {image_geometry[0]}"
    return (f"{label} has {field} {np.round(label_geometry[index], 4).tolist()} but its image {image.name} has "
            f"{np.round(image_geometry[index], 4).tolist()}")


def label_values(path: Path) -> set[int]:
    """The distinct values of a label map (reads the voxels)."""
    return {int(v) for v in np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(path))))}


def target_folder(dataset_id: int, task_name: str, overwrite: bool) -> Path:
    """``$nnUNet_raw/DatasetXXX_<task_name>`` (nnUNet_raw filled with samunet's default when unset).

    Checked before the (slow) source checks: the ID must have three digits, and an existing dataset
    is refused unless ``overwrite``.
    """
    from samunet.paths import ensure_nnunet_paths
    if not 1 <= dataset_id <= 999:
        raise ConversionError(f"dataset ID must be in 1..999 (nnU-Net's three digits), got {dataset_id}")
    target = ensure_nnunet_paths()["nnUNet_raw"] / f"Dataset{dataset_id:03d}_{task_name}"
    _refuse_existing(target, overwrite)
    return target


def _refuse_existing(target: Path, overwrite: bool) -> None:
    if target.exists() and not overwrite:
        raise ConversionError(f"{target} already exists; pass --overwrite to replace it or choose another -d ID")


@contextlib.contextmanager
def staged_dataset(target: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a hidden staging folder next to ``target``; on success validate it and move it into place.

    An existing ``target`` is refused unless ``overwrite``; on any error the staging folder is removed.
    """
    from samunet.preprocessing.dataset_checks import validate_raw_dataset
    _refuse_existing(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial"))
    try:
        yield staging
        validate_raw_dataset(staging)
        replace_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("wrote %s", target)


def write_splits(dataset_name: str, splits: list[dict[str, list[str]]]) -> Path:
    """Write ``$nnUNet_preprocessed/<dataset_name>/splits_final.json`` atomically; returns its path."""
    from samunet.atomic_files import write_json_atomically
    from samunet.paths import ensure_nnunet_paths
    folder = ensure_nnunet_paths()["nnUNet_preprocessed"] / dataset_name
    folder.mkdir(parents=True, exist_ok=True)
    path = write_json_atomically(folder / "splits_final.json", splits, prefix=".splits_final.")
    logger.info("wrote %s (%d folds)", path, len(splits))
    return path
