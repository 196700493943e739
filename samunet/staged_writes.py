"""Outputs written by other libraries' writers that appear whole or not at all.

nnunetv2 writes label maps, probabilities (``.npz``), geometry (``.pkl``) and JSON straight under their
final names (``write_seg``, ``merge_files``, ``load_postprocess_save``, ``save_summary_json``), and its
writers through ITK do not even report a full disk: SimpleITK leaves an empty or cut-off file without
an error (a ``.nii.gz`` whose gzip stream lacks its end reads without complaint). samunet lets these
writers write into a hidden scratch folder inside the output folder (the same file system, so a move is
a rename), checks each file there (:func:`verify_written`: flushed to the disk, a label map read back
with the data set's reader) and only then moves the files into place with ``os.replace``:

- :func:`staged_outputs`: a command's outputs, files and folders that the command replaces as a whole
  (``samunet_ensemble``, ``samunet_apply_postprocessing``, ``samunet_determine_postprocessing``,
  ``samunet_find_best``);
- :func:`samunet.inference.predict_cases.export_case_atomically`: one predicted case.

Scratch folders are named ``.samunet_partial_<pid>@<host>@*``: a run removes those whose process (on this
host) has ended (:func:`remove_stale_scratch`), so a killed run's leftovers go while processes sharing an
output folder keep theirs. A failed or incomplete write is an ``OSError`` naming the output file (never
the scratch file) with its errno: ENOSPC for a full disk, also when a writer left an incomplete file on a
(nearly) full disk; EIO for an incomplete file on a disk with space.
"""
from __future__ import annotations

import contextlib
import errno
import gzip
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

logger = logging.getLogger(__name__)

SCRATCH_PREFIX = ".samunet_partial_"
# free space below which a file that was written incompletely is reported as a full disk
LOW_SPACE_BYTES = 16 * 1024 ** 2


def scratch_prefix() -> str:
    """``.samunet_partial_<pid>@<host>@``: the name start of this process's temporary files and folders."""
    return f"{SCRATCH_PREFIX}{os.getpid()}@{socket.gethostname()}@"


def _owner(name: str) -> tuple[int, str] | None:
    """(pid, host) from a scratch name made with :func:`scratch_prefix`, None for any other name."""
    pid, _, rest = name[len(SCRATCH_PREFIX):].partition("@")
    host, separator, _ = rest.rpartition("@")
    return (int(pid), host) if pid.isdigit() and separator else None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_scratch(folder: str | os.PathLike) -> list[Path]:
    """Remove the scratch files and folders in ``folder`` that processes of this host left when they were
    killed (their pid no longer runs); those of running processes and of other hosts stay. Returns
    what was removed."""
    folder, host = Path(folder), socket.gethostname()
    removed = []
    for entry in sorted(folder.glob(f"{SCRATCH_PREFIX}*")) if folder.is_dir() else ():
        owner = _owner(entry.name)
        if owner is None or owner[1] != host or _running(owner[0]):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
        logger.info("removed %s, left by an interrupted run (process %d)", entry, owner[0])
    return removed


def incomplete_label_map(path: str | os.PathLike, reader_writer) -> str | None:
    """Why the label map ``path`` is not completely written (empty; a gzip stream without its end, which
    ITK reads without complaint; otherwise unreadable by ``reader_writer``, an nnunetv2 reader instance),
    or None."""
    path = os.fspath(path)
    if os.path.getsize(path) == 0:
        return "0 bytes"
    try:
        if path.endswith(".gz"):
            with gzip.open(path) as stream:
                while stream.read(1 << 24):
                    pass
        else:
            reader_writer.read_seg(path)
    except Exception as error:  # any reader's failure means the same: the file is not usable
        lines = str(error).strip().splitlines()
        return f"{type(error).__name__}: {lines[-1]}" if lines else type(error).__name__
    return None


def verify_written(staged: str | os.PathLike, output: str | os.PathLike, reader_writer=None) -> None:
    """Flush ``staged`` to disk (a full disk may only show here) and, given the data set's
    ``reader_writer``, read it back as a label map; an incomplete file raises OSError naming ``output``:
    ENOSPC when the disk is (nearly) full, else EIO."""
    try:
        with open(staged, "rb") as stream:
            os.fsync(stream.fileno())
    except OSError as error:
        raise OSError(error.errno, error.strerror, os.fspath(output)) from error
    problem = incomplete_label_map(staged, reader_writer) if reader_writer is not None else None
    if problem is None:
        return
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(staged))).free
    if free < LOW_SPACE_BYTES:
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({free} bytes free; the written file was "
                                    f"incomplete: {problem})", os.fspath(output))
    raise OSError(errno.EIO, f"the written file was incomplete ({problem})", os.fspath(output))


class Staging:
    """The scratch folder of :func:`staged_outputs`: files written under :attr:`root` appear under the same
    relative names in :attr:`folder` once :meth:`publish` has checked them."""

    def __init__(self, folder: Path, root: Path, reader_writer=None, label_ending: str | None = None) -> None:
        self.folder, self.root = folder, root
        self.reader_writer, self.label_ending = reader_writer, label_ending
        self._verified: set[Path] = set()

    def path(self, relative: str | os.PathLike) -> Path:
        """Where to write what becomes ``folder/relative`` (its parent folders are created)."""
        staged = self.root / relative
        staged.parent.mkdir(parents=True, exist_ok=True)
        return staged

    def final(self, staged: str | os.PathLike) -> Path:
        """The output path of a path inside the scratch folder."""
        return self.folder / Path(os.path.abspath(staged)).relative_to(self.root)

    def _is_label_map(self, path: Path) -> bool:
        return self.reader_writer is not None and self.label_ending is not None and \
            path.name.endswith(self.label_ending)

    def verify(self, staged: str | os.PathLike | None = None) -> None:
        """:func:`verify_written` on every file under ``staged`` (a file or folder inside the scratch folder,
        default all of it) not verified before, label maps read back; so that nothing is computed from a
        cut-off file."""
        top = Path(os.path.abspath(staged)) if staged is not None else self.root
        files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        for path in files:
            if path not in self._verified:
                verify_written(path, self.final(path), self.reader_writer if self._is_label_map(path) else None)
                self._verified.add(path)

    def publish(self, whole: Sequence[str] = ()) -> None:
        """Verify everything, then move it into place: each folder named in ``whole`` (relative to
        :attr:`folder`) replaces the existing one (or removes it, when nothing was staged under it), then
        the other files one by one, label maps last. A folder is swapped by two renames: a kill between
        them leaves no folder under that name, never a partial one."""
        self.verify()
        folders = [self.root / relative for relative in whole]
        files = sorted((p for p in self.root.rglob("*") if p.is_file() and not any(
            p.is_relative_to(folder) for folder in folders)), key=lambda p: (self._is_label_map(p), p))
        for staged in folders:
            target = self.final(staged)
            if target.exists():  # out of the way, into a fresh folder removed with the scratch folder
                os.replace(target, Path(tempfile.mkdtemp(dir=self.root)) / "previous")
            if staged.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged, target)
        for path in files:
            target = self.final(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)

    def naming_the_output(self, error: OSError) -> OSError:
        """``error`` naming the output file instead of a scratch file (``shutil.copy`` names the source first
        and the scratch file second); an error that names no file (a write into an open stream) names the
        output of the file written last, else :attr:`folder`."""
        names = [name for name in (error.filename, error.filename2) if name is not None]
        staged = next((name for name in names if _inside(name, self.root)), None)
        if error.errno is None or (names and staged is None):
            return error
        if staged is None:
            written = [p for p in self.root.rglob("*") if p.is_file()]
            newest = max(written, key=lambda p: p.stat().st_mtime_ns, default=None)
            output = self.final(newest) if newest is not None else self.folder
        else:
            output = self.final(staged)
        return OSError(error.errno, error.strerror or str(error), os.fspath(output))


def _inside(name: str | os.PathLike, folder: Path) -> bool:
    try:
        Path(os.path.abspath(os.fspath(name))).relative_to(folder)
    except (TypeError, ValueError):
        return False
    return True


@contextlib.contextmanager
def staged_outputs(folder: str | os.PathLike, *, reader_writer=None, label_ending: str | None = None,
                   whole: Sequence[str] = ()) -> Iterator[Staging]:
    """A :class:`Staging` in a new scratch folder inside ``folder`` (created if needed; scratch folders of
    ended runs are removed first). Write the outputs at ``staging.path(relative)``; when the block ends
    without an error they are verified (files flushed, label maps, the files ending in ``label_ending``,
    read back with ``reader_writer``) and moved into ``folder`` (:meth:`Staging.publish`, ``whole`` naming
    the folders replaced as a whole). On any error nothing is moved, the previous outputs stay as they
    were, and an ``OSError`` names the output file. The scratch folder is removed in every case."""
    folder = Path(os.path.abspath(folder))
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_scratch(folder)
    try:
        root = Path(tempfile.mkdtemp(prefix=scratch_prefix(), dir=folder))
    except OSError as error:  # a read-only or full folder: name it, not the scratch folder's random name
        raise OSError(error.errno, error.strerror, os.fspath(folder)) from error
    staging = Staging(folder, root, reader_writer, label_ending)
    try:
        yield staging
        staging.publish(whole)
    except OSError as error:
        named = staging.naming_the_output(error)
        if named is error:
            raise
        raise named from error
    finally:
        shutil.rmtree(staging.root, ignore_errors=True)
