"""One training per fold folder at a time.

``samunet_train`` holds an exclusive ``flock`` on ``.samunet_train.lock`` in the fold folder while it trains
or validates; a second one into the same folder is refused in one line naming the process that holds it.
The kernel releases the lock when its holder dies, however it dies (kill -9 included), so a killed run
never leaves the folder locked. The lock file itself stays (deleting it would let two runs lock two files).
In a distributed run only rank 0 takes the lock: the other ranks of the same run write nothing there.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

from samunet.errors import SamunetError

LOCK_FILE = ".samunet_train.lock"


class FoldFolderBusyError(SamunetError, RuntimeError):
    """Another training or validation runs in the same fold folder."""


def takes_the_lock() -> bool:
    """True unless this process is a rank other than 0 of a distributed run."""
    import torch.distributed as dist
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@contextlib.contextmanager
def hold_fold_folder(folder: str | os.PathLike) -> Iterator[None]:
    """Hold ``folder``'s lock (creating the folder) while the context lasts. Raises
    :class:`FoldFolderBusyError` at once when another process holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stream = open(folder / LOCK_FILE, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            stream.seek(0)
            holder = stream.read().strip()
            raise FoldFolderBusyError(
                f"{folder} is in use by another samunet_train{f' (process {holder})' if holder else ''}; wait until "
                f"it ends or stop it, then run this command again") from None
        stream.seek(0)
        stream.truncate()
        stream.write(str(os.getpid()))
        stream.flush()
        yield
    finally:
        stream.close()  # closing the last descriptor releases the flock
