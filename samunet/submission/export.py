"""Write a validated submission: a zip (AMOS always; others when OUT ends in .zip) or a folder.

Files are copied byte for byte under their submitted names. The output is built as a hidden
temporary file or folder next to OUT, flushed to the disk and moved into place with ``os.replace``;
a failed write (a full disk) raises an ``OSError`` naming the output file, leaves no temporary file
and keeps a previous output as it was.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from samunet.atomic_files import write_atomically_by_name
from samunet.image_io import replace_folder
from samunet.submission import SubmissionError
from samunet.submission.challenges import CHALLENGES
from samunet.submission.validation import validate_predictions

logger = logging.getLogger(__name__)


def _naming(error: OSError, output: Path) -> OSError:
    """``error`` naming ``output`` (a write into a temporary file names that file, or nothing at all)."""
    return OSError(error.errno, error.strerror or str(error), os.fspath(output))


def _write_zip(files: dict[str, Path], output: Path, folder: str) -> None:
    def write(name: str) -> None:
        with zipfile.ZipFile(name, "w", compression=zipfile.ZIP_STORED) as archive:
            for member, source in sorted(files.items()):
                archive.write(source, folder + member)
    try:
        write_atomically_by_name(output, write, prefix=f".{output.name}.", suffix=".tmp")
    except OSError as error:
        raise _naming(error, output) from error


def _write_folder(files: dict[str, Path], output: Path) -> None:
    staging = None
    try:
        staging = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.", suffix=".partial"))
        for name, source in files.items():
            try:
                shutil.copyfile(source, staging / name)
                with open(staging / name, "rb") as stream:
                    os.fsync(stream.fileno())
            except OSError as error:
                raise _naming(error, output / name) from error
        replace_folder(staging, output)
    except OSError as error:
        if error.filename is not None and Path(error.filename).is_relative_to(output):
            raise
        raise _naming(error, output) from error
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def export_submission(challenge_name: str, prediction_dir: str | Path, output: str | Path,
                      dataset_folder: str | Path, overwrite: bool = False) -> Path:
    """Validate ``prediction_dir`` against ``dataset_folder``'s test images and write the submission to ``output``."""
    challenge = CHALLENGES[challenge_name]
    output = Path(output)
    as_zip = output.suffix == ".zip"
    if challenge.zip_required and not as_zip:
        raise SubmissionError(f"{challenge.name} takes a zip file; give an output path ending in .zip, not {output}")
    if output.exists() and not overwrite:
        raise SubmissionError(f"{output} already exists; pass --overwrite to replace it")
    if output.exists() and as_zip != output.is_file():
        raise SubmissionError(f"{output} exists and is a {'folder' if output.is_dir() else 'file'}; "
                              f"remove it or choose another output path")
    files = validate_predictions(challenge, Path(prediction_dir), Path(dataset_folder))
    output.parent.mkdir(parents=True, exist_ok=True)
    if as_zip:
        _write_zip(files, output, challenge.zip_folder)
    else:
        _write_folder(files, output)
    logger.info("wrote %d %s prediction(s) to %s", len(files), challenge.name, output)
    return output
