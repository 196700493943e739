"""progress.png written so that a crash or a full disk never leaves a truncated one.

nnunetv2's local logger saves its figure straight into ``progress.png``. :class:`AtomicProgressLogger` lets
it draw into a temporary ``.partial_progress_*`` folder next to it and moves the finished file into place;
a write that fails raises ``OSError`` naming ``progress.png`` and leaves the previous one as it was.
"""
from __future__ import annotations

import os
import shutil
import tempfile

from nnunetv2.training.logging.nnunet_logger import LocalLogger

from samunet.atomic_files import PARTIAL_PREFIX, naming_the_file

PROGRESS_PNG = "progress.png"


class AtomicProgressLogger(LocalLogger):
    """nnunetv2's ``LocalLogger`` whose ``progress.png`` appears whole or not at all."""

    def plot_progress_png(self, output_folder: str) -> None:
        target = os.path.join(output_folder, PROGRESS_PNG)
        with naming_the_file(target):
            scratch = tempfile.mkdtemp(prefix=f"{PARTIAL_PREFIX}progress_", dir=output_folder)
            try:
                super().plot_progress_png(scratch)
                os.replace(os.path.join(scratch, PROGRESS_PNG), target)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
