"""Small file helpers shared by the data-set, conversion and export code.

- :func:`read_header`: an image's grid from its header alone (SimpleITK ``ReadImageInformation``);
  :func:`geometry_difference`: which part of two grids differs.
- :func:`replace_folder`: move a fully written staging folder over its target in one rename, so
  a reader never sees a half-written data set or submission.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk


GEOMETRY_FIELDS = ("size", "spacing", "origin", "direction")  # the order of read_header's tuple


def read_header(path: str | os.PathLike) -> tuple:
    """(size, spacing, origin, direction) of an image, read from its header only."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection()


def replace_folder(staging: Path, target: Path) -> None:
    """Put ``staging`` (a folder next to ``target``) in ``target``'s place; an existing target is
    moved aside first and removed only after the swap."""
    if not target.exists():
        os.replace(staging, target)
        return
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
    os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


def geometry_difference(a: tuple, b: tuple, *, atol: float, rtol: float = 0.0) -> str | None:
    """The first of size, spacing, origin, direction in which two :func:`read_header` results
    differ (beyond the tolerances for the float fields), or None when they match."""
    if a[0] != b[0]:
        return "size"
    for name, x, y in zip(GEOMETRY_FIELDS[1:], a[1:], b[1:]):
        if not np.allclose(x, y, atol=atol, rtol=rtol):
            return name
    return None
