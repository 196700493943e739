"""Small file helpers shared by the data-set, conversion and export code.

- :func:`read_image_header`: an image's grid and pixel components from its header alone (SimpleITK
  ``ReadImageInformation``), :func:`read_header` its grid; :func:`differing_geometry_fields` /
  :func:`geometry_difference`: which parts of two grids differ.
- :func:`nifti_truncation`: whether a NIfTI file lacks voxel data, which SimpleITK does not notice.
- :func:`replace_folder`: move a fully written staging folder over its target in one rename, so
  a reader never sees a half-written data set or submission.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import SimpleITK as sitk


GEOMETRY_FIELDS = ("size", "spacing", "origin", "direction")  # the order of read_header's tuple


class ImageHeader(NamedTuple):
    """An image's grid (SimpleITK's x, y, z order) and the number of values per pixel (3 for RGB)."""
    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    components: int


def read_image_header(path: str | os.PathLike) -> ImageHeader:
    """:class:`ImageHeader` of an image, read from its header only; SimpleITK's RuntimeError when
    SimpleITK cannot read that header."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return ImageHeader(reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection(),
                       reader.GetNumberOfComponents())


def read_header(path: str | os.PathLike) -> tuple:
    """(size, spacing, origin, direction) of an image, read from its header only."""
    return tuple(read_image_header(path)[:4])


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


def differing_geometry_fields(a: tuple, b: tuple, *, atol: float, rtol: float = 0.0) -> list[str]:
    """Those of size, spacing, origin, direction (in that order) in which two :func:`read_header`
    results differ, beyond the tolerances for the float fields; empty when they match."""
    def same(name: str, x: tuple, y: tuple) -> bool:
        if len(x) != len(y) or name == "size":
            return tuple(x) == tuple(y)
        return bool(np.allclose(x, y, atol=atol, rtol=rtol))
    return [name for name, x, y in zip(GEOMETRY_FIELDS, a[:4], b[:4]) if not same(name, x, y)]


def geometry_difference(a: tuple, b: tuple, *, atol: float, rtol: float = 0.0) -> str | None:
    """The first of size, spacing, origin, direction in which two :func:`read_header` results
    differ (beyond the tolerances for the float fields), or None when they match."""
    fields = differing_geometry_fields(a, b, atol=atol, rtol=rtol)
    return fields[0] if fields else None


def nifti_truncation(path: str | os.PathLike) -> str | None:
    """What a NIfTI file (``.nii`` or ``.nii.gz``) lacks, e.g. ``"2176 of 4448 bytes"``, or None when
    it holds all the voxel data its header announces (or nibabel cannot read its header at all).

    SimpleITK 2.5 (ITK 5.4) reads a truncated NIfTI without an error and fills the missing voxels
    with zeros, so a file cut short by an interrupted copy would be trained on as it is. A ``.gz``
    file is complete when its gzip trailer announces the expected size; otherwise it is decompressed
    to its end (without keeping the data) to count what it holds."""
    import nibabel as nib
    try:
        voxels = nib.load(str(path)).dataobj  # header only: offset, shape and type of the voxel data
        expected = int(voxels.offset) + int(np.prod(voxels.shape)) * np.dtype(voxels.dtype).itemsize
    except Exception:  # nibabel's header errors have no common base; the image reader reports them
        return None
    if not str(path).lower().endswith(".gz"):
        found = os.path.getsize(path)
    elif _gzip_trailer_size(path) == expected % 2 ** 32:
        return None  # a complete gzip stream ends with its uncompressed size (modulo 2**32)
    else:  # cut short, or several gzip members: count
        found = _gunzipped_size(path)
    return f"{expected - found} of {expected} bytes" if found < expected else None


def _gzip_trailer_size(path: str | os.PathLike) -> int | None:
    """The uncompressed size (modulo 2**32) a gzip file's last four bytes announce."""
    with open(path, "rb") as stream:
        if stream.seek(0, os.SEEK_END) < 18:  # shorter than gzip's header and trailer
            return None
        stream.seek(-4, os.SEEK_END)
        return int.from_bytes(stream.read(4), "little")


def _gunzipped_size(path: str | os.PathLike) -> int:
    """Bytes a gzip file decompresses to, counted up to where it ends or breaks off."""
    found, decompressor = 0, zlib.decompressobj(wbits=31)
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            try:
                while chunk:
                    found += len(decompressor.decompress(chunk, 1 << 24))
                    chunk = decompressor.unconsumed_tail
                    if decompressor.eof and decompressor.unused_data:  # another gzip member follows
                        chunk, decompressor = decompressor.unused_data, zlib.decompressobj(wbits=31)
            except zlib.error:
                break
    return found
