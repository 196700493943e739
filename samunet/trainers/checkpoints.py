"""Training checkpoints on disk: written atomically, read with ``weights_only=True``, chosen for ``--c``.

- :func:`save_checkpoint_atomically`: ``torch.save`` into a ``.partial_*.pth`` file next to the target,
  flushed to the disk, then renamed over it; a crash or a full disk leaves the previous checkpoint as it was.
- :func:`remove_stale_partials`: what a killed run left behind (its ``.partial_*`` files and folders);
  called by the run that holds the fold folder's lock (:mod:`samunet.trainers.run_lock`), so never on the
  files of a run still writing.
- :func:`read_checkpoint`: a checkpoint that cannot be read (truncated, empty, not plain data) is named in a
  :class:`CheckpointUnreadableError`.
- :func:`checkpoint_to_continue`: nnU-Net's order for ``--c`` (final, latest, best), skipping the files that
  cannot be read and saying so; :func:`checkpoint_to_validate`: ``checkpoint_final.pth`` for ``--val``.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from samunet.atomic_files import PARTIAL_PREFIX, write_atomically
from samunet.errors import SamunetError

logger = logging.getLogger(__name__)

FINAL, LATEST, BEST = "checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth"
CONTINUE_ORDER = (FINAL, LATEST, BEST)  # nnunetv2's maybe_load_checkpoint: the newest first
REQUIRED_KEYS = ("network_weights", "optimizer_state", "current_epoch", "logging")


class CheckpointUnreadableError(SamunetError, RuntimeError):
    """A checkpoint file that cannot be loaded (truncated, empty, not a training checkpoint)."""


@dataclass
class ChosenCheckpoint:
    """A loaded checkpoint and the file it came from."""

    path: Path
    checkpoint: dict


def save_checkpoint_atomically(checkpoint: dict, filename: str | os.PathLike) -> None:
    """Write ``checkpoint`` to ``filename`` through a ``.partial_*.pth`` file in the same folder. Raises
    ``OSError`` naming ``filename`` when the disk is full or not writable; ``filename`` is then unchanged."""
    write_atomically(filename, lambda stream: torch.save(checkpoint, stream), prefix=PARTIAL_PREFIX, suffix=".pth")


def remove_stale_partials(folder: str | os.PathLike) -> list[Path]:
    """Delete the ``.partial_*`` files and folders directly in ``folder`` (left by a run that was killed while
    writing); returns them. Only the holder of the fold folder's lock may call this."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in sorted(folder.glob(f"{PARTIAL_PREFIX}*")):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    if removed:
        logger.info("removed %d unfinished file(s) of an interrupted run in %s: %s", len(removed), folder,
                    ", ".join(entry.name for entry in removed))
    return removed


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a training checkpoint with ``weights_only=True``. Raises :class:`CheckpointUnreadableError` naming
    the file when it is truncated, empty, holds more than plain data, or lacks a training checkpoint's keys."""
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except (OSError, MemoryError):
        raise
    except Exception as error:  # zip, pickle and weights_only refusals all mean: this file is not usable
        reason = "it is empty" if path.stat().st_size == 0 else f"{type(error).__name__}: {_first_sentence(error)}"
        raise CheckpointUnreadableError(f"{path} cannot be read ({reason.rstrip(': ')}); it is truncated or not a "
                                        f"samunet checkpoint: restore it from a copy, or delete it (--c then "
                                        f"continues from the newest other checkpoint)") from error
    missing = [key for key in REQUIRED_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise CheckpointUnreadableError(f"{path} is not a training checkpoint (it lacks {missing})")
    return checkpoint


def _first_sentence(error: BaseException, limit: int = 200) -> str:
    """The first line of ``error``'s message, cut after a whole sentence when it is longer than ``limit``."""
    line = (str(error).strip().splitlines() or [""])[0].strip()
    if len(line) <= limit:
        return line
    end = line.rfind(". ", 0, limit)
    return line[:end + 1] if end > 0 else line


def checkpoint_to_continue(folder: str | os.PathLike) -> tuple[ChosenCheckpoint | None, list[str]]:
    """The checkpoint ``--c`` continues from: the first of final, latest, best that can be read, and one line
    per file skipped because it cannot. (None, []) when the folder holds none of them. Raises
    :class:`CheckpointUnreadableError` when there are some and none can be read."""
    folder = Path(folder)
    present = [folder / name for name in CONTINUE_ORDER if (folder / name).is_file()]
    notes = []
    for path in present:
        try:
            chosen = ChosenCheckpoint(path, read_checkpoint(path))
        except CheckpointUnreadableError as error:
            notes.append(str(error))
            continue
        if notes:
            notes.append(f"continuing from the newest checkpoint that can be read instead: {path}")
        return chosen, notes
    if present:
        raise CheckpointUnreadableError(
            f"no checkpoint in {folder} can be read ({'; '.join(notes)}); restore a copy, or delete them and "
            f"train this fold anew")
    return None, notes


def checkpoint_to_validate(folder: str | os.PathLike) -> ChosenCheckpoint:
    """``checkpoint_final.pth`` of ``folder`` for ``--val``. Raises :class:`CheckpointUnreadableError` when it
    is missing (training not finished) or cannot be read."""
    path = Path(folder) / FINAL
    if not path.is_file():
        raise CheckpointUnreadableError(f"{path} does not exist: the training of this fold has not finished; "
                                        f"finish it with --c before --val")
    return ChosenCheckpoint(path, read_checkpoint(path))
