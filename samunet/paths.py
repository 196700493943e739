"""Where samunet reads and writes: nnU-Net's three folders and the weights folder.

nnunetv2 2.8 resolves ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results`` lazily from
the environment, so filling in unset variables before the first use is enough. When a variable
is unset samunet uses an embedded default under the current directory (``./samunet_data/...``)
and says so once, so that a new user needs no environment set-up.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

NNUNET_FOLDER_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
WEIGHTS_VARIABLE = "SAMUNET_WEIGHTS"
DEFAULT_DATA_ROOT = "samunet_data"
DEFAULT_WEIGHTS_FOLDER = "samunet_weights"

_announced: set[str] = set()


def _fill_default(variable: str, default: Path) -> Path:
    value = os.environ.get(variable)
    if value:
        return Path(value)
    os.environ[variable] = str(default)
    if variable not in _announced:
        _announced.add(variable)
        logger.warning("%s is not set; using the embedded default %s", variable, default)
    return default


def ensure_nnunet_paths(root: str | os.PathLike | None = None) -> dict[str, Path]:
    """Make sure nnU-Net's three folder variables are set; returns them as paths.

    Unset variables get ``<root or cwd>/samunet_data/<variable>``; set ones are left alone.
    """
    base = Path(root) if root is not None else Path.cwd()
    return {name: _fill_default(name, base / DEFAULT_DATA_ROOT / name) for name in NNUNET_FOLDER_VARIABLES}


def weights_folder() -> Path:
    """The folder holding pretrained checkpoints (``SAMUNET_WEIGHTS`` or ``./samunet_weights``)."""
    return _fill_default(WEIGHTS_VARIABLE, Path.cwd() / DEFAULT_WEIGHTS_FOLDER)
