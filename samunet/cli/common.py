"""What every samunet command does first: logging, folders, worker counts, device, folds.

nnunetv2 reads its worker counts (``nnUNet_def_n_proc``, ``nnUNet_n_proc_DA``) when its modules
are imported, so commands call :func:`prepare_environment` before importing nnunetv2.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from samunet.errors import ConfigurationError, SamunetError
from samunet.host_allocator import keep_freed_memory_for_reuse
from samunet.paths import ensure_nnunet_paths

logger = logging.getLogger("samunet")

FOLDS = ("0", "1", "2", "3", "4", "all")
# Above this many cores nnU-Net's own defaults (8 export workers, 12 augmentation workers) pay off.
SMALL_MACHINE_CORES = 4
_device_announced = False


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def prepare_environment(num_processes: int | None = None) -> None:
    """Fill unset nnU-Net folders and pick worker counts that suit this machine.

    On small machines (<= 4 cores) every spawned worker costs seconds and ~0.5 GB just to
    import torch, so augmentation runs in the main process (``nnUNet_n_proc_DA=0``) and
    export/preprocessing use at most the core count. Values the user set are kept.
    """
    ensure_nnunet_paths()
    cores = os.cpu_count() or 1
    if num_processes is not None:
        os.environ["nnUNet_def_n_proc"] = str(num_processes)
    os.environ.setdefault("nnUNet_def_n_proc", str(min(8, cores)))
    if cores <= SMALL_MACHINE_CORES:
        os.environ.setdefault("nnUNet_n_proc_DA", "0")


def select_device(name: str | None):
    """``cuda`` when available, else ``cpu`` (said once); ``mps`` and explicit choices honoured. On the CPU,
    the threads are shared among this machine's processes of a run and freed host memory is kept for reuse
    (:mod:`samunet.host_allocator`)."""
    import torch
    global _device_announced
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
        if not _device_announced:
            _device_announced = True
            logger.info("using device %s%s", name, "" if name == "cuda" else " (no CUDA GPU found; this is slow)")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError("-device cuda was asked for but torch sees no CUDA GPU; use -device cpu "
                                 "(samunet_train_cv: leave --devices out, or --devices cpu)")
    if name == "cpu":  # the cores are shared by the processes of a distributed run on this machine
        keep_freed_memory_for_reuse()
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_processes))
    return torch.device(name)


class NnunetStyleParser(argparse.ArgumentParser):
    """argparse with nnU-Net's single-dash long options matched whole.

    Plain argparse reads an unknown ``-pretrained_weights=model.pth`` as the short option ``-p`` with
    the value ``retrained_weights=model.pth``, and an abbreviated ``-pretrained`` as a prefix. Here a
    single-dash option is only ever the exact option (``-pretrained_weights X`` or
    ``-pretrained_weights=X``); anything else is refused as an unrecognised argument. Double-dash
    options keep argparse's rules (exact, ``--opt=value``, unambiguous prefixes).
    """

    def _get_option_tuples(self, option_string):
        if len(option_string) > 2 and option_string[0] in self.prefix_chars \
                and option_string[1] not in self.prefix_chars:
            return []
        return super()._get_option_tuples(option_string)


class _Refused(argparse.Action):
    """An nnU-Net option samunet cannot honour: using it stops the command with one line saying why."""

    def __init__(self, option_strings, dest, reason: str = "", **kwargs):
        self.reason = reason
        kwargs.pop("default", None)
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        raise ConfigurationError(f"{option_string} is not supported by {parser.prog}: {self.reason}")


def refuse_option(parser: argparse.ArgumentParser, *names: str, reason: str, takes_value: bool = True,
                  nargs: str | int | None = None) -> None:
    """Declare nnU-Net's option ``names`` so that it is recognised (never misread as another option) and
    refused with ``reason`` (a ConfigurationError: one line, exit code 2)."""
    parser.add_argument(*names, action=_Refused, reason=reason, nargs=nargs if takes_value else 0,
                        help=f"not supported: {reason}")


def add_common_arguments(parser: argparse.ArgumentParser, *, device: bool = True) -> None:
    """``-device`` (where it applies) and ``-v``, the same in every command."""
    if device:
        parser.add_argument("-device", "--device", choices=("cpu", "cuda", "mps"), default=None,
                            help="default: cuda when available, else cpu")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def whole_number_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``minimum``, else a one-line usage error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


process_count = whole_number_at_least(1)  # -np: worker processes
worker_count = whole_number_at_least(0)  # -npp / -nps: worker processes, 0 meaning this process


def parse_fold(text: str) -> int | str:
    """``0``..``4``, ``fold0``..``fold4`` or ``all``."""
    value = text.lower().removeprefix("fold").removeprefix("_")
    if value not in FOLDS:
        raise argparse.ArgumentTypeError(f"fold must be one of 0-4, fold0-fold4 or all, not {text!r}")
    return value if value == "all" else int(value)


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a command; a :class:`SamunetError`, or a write that a full, read-only or forbidden disk refused
    (:func:`describe_storage_error`), becomes one line on stderr and exit code 2."""
    try:
        return main(argv) or 0
    except SamunetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        message = describe_storage_error(error)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def describe_storage_error(error: OSError) -> str | None:
    """One line for an ``OSError`` of the storage (no space, quota, read-only file system, no permission, an
    input/output error on a named file, e.g. a label map found cut off after writing; an output path that
    collides with an existing file or folder), naming the file and the mount point of its disk; None for other
    errors."""
    name = os.fsdecode(error.filename) if error.filename is not None else None
    where = f"the device holding {name}{_mounted_at(name)}" if name else "a device this command writes to"
    if error.errno == errno.ENOSPC:
        return f"no space left on {where}; free space there or write to another disk, then run the command again"
    if error.errno == errno.EDQUOT:
        return f"disk quota exceeded on {where}; free space there or write to another disk, then run it again"
    if error.errno == errno.EROFS:
        return f"{where} is mounted read-only; write to a writable folder instead"
    if error.errno == errno.EIO and name:
        return (f"{name} could not be written or read completely ({error.strerror}); check the disk holding it"
                f"{_mounted_at(name)}, then run the command again")
    if error.errno == errno.EEXIST and name:
        return f"{name} exists and is not a folder; give another output path, or move that file away"
    if error.errno == errno.ENOTDIR and name:
        return f"{name}: a part of this path is a file, not a folder; give another output path"
    if error.errno == errno.EISDIR and name:
        return f"{name} is a folder, but a file is to be written there; give another output file name"
    if error.errno in (errno.EACCES, errno.EPERM):
        return (f"permission denied for {name or 'a file this command uses'}; check its permissions or use another "
                f"folder")
    return None


def _mounted_at(name: str) -> str:
    """`` (mounted at /mnt/x)`` for the disk ``name`` is on, or ``""`` when it is not found."""
    try:
        path = Path(os.path.abspath(name))
        mount = next((folder for folder in (path, *path.parents) if os.path.ismount(folder)), None)
    except OSError:
        return ""
    return f" (mounted at {mount})" if mount is not None else ""
