"""Writing files so that a reader never sees half of one: write a temporary file in the same folder, then
``os.replace`` it over the target (atomic on one file system); on failure the temporary file is removed
and the previous target, if any, stays as it was.

An ``OSError`` raised while writing (a full disk, a quota, a read-only mount) names the target file, so
that :func:`samunet.cli.common.run_cli` can say which disk is full; a write into an open stream raises
one that names no file.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

PARTIAL_PREFIX = ".partial_"


@contextlib.contextmanager
def naming_the_file(target: str | os.PathLike, *, prefix: str = PARTIAL_PREFIX) -> Iterator[None]:
    """Re-raise an ``OSError`` that names no file, or a temporary file or folder of ``target`` (one in its
    folder whose name starts with ``prefix``), as naming ``target``."""
    try:
        yield
    except OSError as error:
        if error.errno is not None and (error.filename is None or _is_temporary(error.filename, target, prefix)):
            raise OSError(error.errno, error.strerror, os.fspath(target)) from error
        raise


def _is_temporary(name: str | os.PathLike, target: str | os.PathLike, prefix: str) -> bool:
    try:
        relative = Path(os.path.abspath(os.fspath(name))).relative_to(Path(os.path.abspath(target)).parent)
    except (TypeError, ValueError):
        return False
    return bool(relative.parts) and relative.parts[0].startswith(prefix)


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], None], *, prefix: str = PARTIAL_PREFIX,
                     suffix: str = "") -> Path:
    """Call ``write(stream)`` on a temporary file next to ``path`` (named ``prefix...suffix``), flush it to the
    disk, then move it over ``path``. Raises what ``write`` raises, and ``OSError`` naming ``path`` when the
    disk is full or not writable; ``path`` is then unchanged and the temporary file is gone."""
    def write_stream(name: str) -> None:
        with open(name, "wb") as stream:
            write(stream)
    return write_atomically_by_name(path, write_stream, prefix=prefix, suffix=suffix)


def write_atomically_by_name(path: str | os.PathLike, write: Callable[[str], None], *,
                             prefix: str = PARTIAL_PREFIX, suffix: str = "") -> Path:
    """:func:`write_atomically` for writers that take a file name (nnunetv2's ``save_summary_json``, a
    ``zipfile.ZipFile``): ``write(temporary_name)`` on an empty file next to ``path``, then flushed and moved
    over it."""
    path = Path(path)
    with naming_the_file(path, prefix=prefix):
        handle, temporary = _create_temporary(path.parent, prefix, suffix)
        os.close(handle)
        try:
            write(os.fspath(temporary))
            with open(temporary, "rb") as written:
                os.fsync(written.fileno())  # a full disk may only show here, and the rename must not outrun the data
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
    return path


def _create_temporary(folder: Path, prefix: str, suffix: str) -> tuple[int, Path]:
    """A new file ``folder/prefix<random>suffix`` opened for writing, with the permissions the umask gives
    (``tempfile.mkstemp`` makes it private, so a checkpoint would be unreadable to the user's group)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    while True:
        candidate = folder / f"{prefix}{secrets.token_hex(8)}{suffix}"
        try:
            return os.open(candidate, flags, 0o666), candidate
        except FileExistsError:
            continue


def write_text_atomically(path: str | os.PathLike, text: str, *, prefix: str = PARTIAL_PREFIX) -> Path:
    """``text`` (UTF-8) into ``path`` atomically, creating its folder; the temporary file starts with ``prefix``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomically(path, lambda stream: stream.write(text.encode("utf-8")), prefix=prefix, suffix=path.suffix)


def write_json_atomically(path: str | os.PathLike, content, *, prefix: str = PARTIAL_PREFIX) -> Path:
    """``json.dump(content)`` (indented) into ``path`` atomically; the temporary file starts with ``prefix``."""
    return write_text_atomically(path, json.dumps(content, indent=2), prefix=prefix)
