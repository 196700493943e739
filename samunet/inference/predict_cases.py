"""Case-by-case prediction that survives interruption and splits over processes, on nnunetv2's predictor.

This is nnunetv2's ``nnUNetPredictor.predict_from_files`` with one change: every case's outputs are
written atomically as soon as that case is done. The pieces are nnunetv2's own:

- which cases: ``predictor._manage_input_and_output_lists`` (``cases[part_id::num_parts]``); with
  ``--continue_prediction`` the cases whose outputs exist are skipped, as nnunetv2 skips them, once each
  output is verified complete (:func:`incomplete_outputs`): a cut-off one is redone;
- preprocessing: ``preprocessing_iterator_fromfiles`` with ``-npp`` worker processes (0: in this
  process, with the configuration's preprocessor);
- the network: ``predictor.predict_logits_from_preprocessed_data`` (sliding window over the case,
  with nnunetv2's per-case progress bar when the predictor has ``allow_tqdm``), so slice-stack
  predictors (``trainer.predictor_class()``) work unchanged;
- export: ``export_prediction_from_logits`` with ``-nps`` worker processes (0: in this process).

Atomic outputs: a case is exported into a hidden scratch folder inside the output folder
(``.samunet_partial_<pid>@<host>@*``, same file system), each staged file is flushed to disk and the
label map read back (nnunetv2's writers through ITK do not report a full disk: they leave an empty or
cut-off file; :mod:`samunet.staged_writes`), and only then is each file moved into place with
``os.replace``, the label map last. The output folder therefore only ever holds complete files under
their final names, and a failed write is an ``OSError`` naming the output file (``errno.ENOSPC`` when
the disk is full), raised in this process even when the export ran in a worker process. A run killed
by a signal leaves its finished cases and a scratch folder; the next run into the same folder removes
scratch folders whose process (same host, pid in the name) has ended, so processes sharing one output
folder (``-num_parts``) keep theirs.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import tempfile
from contextlib import nullcontext
from pathlib import Path
from time import sleep
from typing import Iterator, Sequence

import numpy as np
import torch
from nnunetv2.inference.export_prediction import export_prediction_from_logits
from tqdm import tqdm

from samunet.atomic_files import write_json_atomically
from samunet.errors import DatasetError
from samunet.staged_writes import incomplete_label_map, remove_stale_scratch, scratch_prefix, verify_written

logger = logging.getLogger(__name__)

QUEUED_EXPORTS = 2  # cases waiting for an export worker before prediction pauses (nnU-Net's value)


def select_cases(predictor, case_files: list[list[str]], output_folder: str | os.PathLike, *,
                 continue_prediction: bool = False, num_parts: int = 1, part_id: int = 0,
                 save_probabilities: bool = False) -> tuple[list[list[str]], list[str]]:
    """(input files, output path without ending) of the cases this process predicts.

    nnunetv2's rule: ``cases[part_id::num_parts]``; with ``continue_prediction`` the cases whose label
    map (and, with ``save_probabilities``, ``.npz`` and ``.pkl``) exist and are complete
    (:func:`incomplete_outputs`) are left out; a case with an incomplete output is predicted again, and a
    warning names the file.
    """
    from samunet.errors import ConfigurationError
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise ConfigurationError(f"-part_id must be in 0..num_parts-1 (num_parts {num_parts}), got {part_id}")
    files, outputs, _ = predictor._manage_input_and_output_lists(
        case_files, str(output_folder), None, overwrite=True, part_id=part_id, num_parts=num_parts,
        save_probabilities=save_probabilities)
    if not continue_prediction:
        return files, list(outputs)
    ending = predictor.dataset_json["file_ending"]
    suffixes = (ending, ".npz", ".pkl") if save_probabilities else (ending,)
    reader_writer = predictor.plans_manager.image_reader_writer_class()
    kept = []
    for case_files_, output in zip(files, outputs):
        if not all(os.path.isfile(output + suffix) for suffix in suffixes):
            kept.append((case_files_, output))
            continue
        problems = incomplete_outputs(output, suffixes, reader_writer)
        if problems:
            logger.warning("predicting %s again: %s", os.path.basename(output), "; ".join(problems))
            kept.append((case_files_, output))
    logger.info("--continue_prediction: %d of %d case(s) already predicted, %d to do", len(files) - len(kept),
                len(files), len(kept))
    return [f for f, _ in kept], [o for _, o in kept]


def incomplete_outputs(output_truncated: str, suffixes: Sequence[str], reader_writer) -> list[str]:
    """Why the existing outputs ``output_truncated + suffix`` are not complete, one entry per such file
    naming it: a label map that :func:`samunet.staged_writes.incomplete_label_map` finds cut off or
    unreadable, an ``.npz`` whose arrays do not all load, a ``.pkl`` that does not unpickle."""
    import pickle
    import zipfile
    found = []
    for suffix in suffixes:
        path = output_truncated + suffix
        if suffix == ".npz":
            try:
                with np.load(path) as archive:
                    for key in archive.files:
                        archive[key]
                problem = None
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
                problem = f"{type(error).__name__}: {error}"
        elif suffix == ".pkl":
            try:
                with open(path, "rb") as stream:
                    pickle.load(stream)
                problem = None
            except Exception as error:  # any failure to unpickle: the file is not usable
                problem = f"{type(error).__name__}: {error}"
        else:
            problem = incomplete_label_map(path, reader_writer)
        if problem is not None:
            found.append(f"{path} is incomplete ({problem})")
    return found


def _preprocess_here(predictor, case_files: list[list[str]], outputs: list[str]) -> Iterator[dict]:
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=predictor.verbose_preprocessing)
    for files, output in zip(case_files, outputs):
        data, _, properties = preprocessor.run_case(files, None, predictor.plans_manager,
                                                    predictor.configuration_manager, predictor.dataset_json)
        yield {"data": torch.from_numpy(data).to(dtype=torch.float32, memory_format=torch.contiguous_format),
               "data_properties": properties, "ofile": output}


def preprocessed_cases(predictor, case_files: list[list[str]], outputs: list[str],
                       num_processes: int) -> Iterator[dict]:
    """nnunetv2's preprocessing iterator (``num_processes`` spawned workers), or this process when 0."""
    if num_processes <= 0:
        return _preprocess_here(predictor, case_files, outputs)
    from nnunetv2.inference.data_iterators import preprocessing_iterator_fromfiles
    return preprocessing_iterator_fromfiles(case_files, None, outputs, predictor.plans_manager,
                                            predictor.dataset_json, predictor.configuration_manager,
                                            num_processes, predictor.device.type == "cuda",
                                            predictor.verbose_preprocessing)


def export_case_atomically(logits, properties: dict, configuration_manager, plans_manager, dataset_json: dict,
                           output_truncated: str, save_probabilities: bool, scratch: str) -> str:
    """nnunetv2's ``export_prediction_from_logits`` into ``scratch``, each file checked
    (:func:`samunet.staged_writes.verify_written`), then ``os.replace`` into place (probabilities first,
    the label map last); returns the label map's path. A failed or incomplete write raises OSError with
    its errno and the output file's name, and nothing of the case is moved into place."""
    ending = dataset_json["file_ending"]
    staged = os.path.join(scratch, os.path.basename(output_truncated))
    suffixes = (".npz", ".pkl", ending) if save_probabilities else (ending,)
    reader_writer = plans_manager.image_reader_writer_class()
    try:
        export_prediction_from_logits(logits, properties, configuration_manager, plans_manager, dataset_json,
                                      staged, save_probabilities)
        for suffix in suffixes:
            verify_written(staged + suffix, output_truncated + suffix, reader_writer if suffix == ending else None)
    except OSError as error:  # name the output, not the scratch file (or no file, as zipfile's writes do)
        if error.filename is not None and not str(error.filename).startswith(scratch):
            raise
        # without a file name: the last file nnunetv2 started writing (probabilities, geometry, label map)
        suffix = next((s for s in suffixes if error.filename == staged + s), None) or \
            next((s for s in reversed(suffixes) if os.path.lexists(staged + s)), ending)
        output = output_truncated + suffix
        raise OSError(error.errno, error.strerror or str(error), output) from error
    for suffix in suffixes:
        os.replace(staged + suffix, output_truncated + suffix)
    return output_truncated + ending


def predict_cases(predictor, case_files: Sequence[Sequence[str]], outputs: Sequence[str], *,
                  save_probabilities: bool = False, num_processes_preprocessing: int = 0,
                  num_processes_export: int = 0, progress: bool = True) -> list[Path]:
    """Predict ``case_files`` into ``outputs`` (paths without the file ending), each case written as soon
    as it is exported; returns the label maps in the order they were written.

    ``progress`` shows a bar over the cases; the bar inside each case (sliding-window steps) is
    nnunetv2's and follows the predictor's ``allow_tqdm``.
    """
    case_files, outputs = [list(f) for f in case_files], list(outputs)
    if not case_files:
        return []
    output_folder = Path(outputs[0]).parent
    output_folder.mkdir(parents=True, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=scratch_prefix(), dir=output_folder)
    written: list[Path] = []
    configuration_manager, plans_manager = predictor.configuration_manager, predictor.plans_manager
    pool_context = multiprocessing.get_context("spawn").Pool(num_processes_export) \
        if num_processes_export > 0 else nullcontext()
    bar = tqdm(total=len(case_files), desc="cases", unit="case", disable=not progress, position=0)
    try:
        with pool_context as pool:
            workers = list(pool._pool) if pool is not None else []
            pending: list = []

            def collect(block: bool) -> None:
                for result in [r for r in pending if block or r.ready()]:
                    while not result.ready():  # a killed worker's case never finishes: do not wait forever
                        if not all(worker.is_alive() for worker in workers):
                            raise RuntimeError("an export worker process ended without finishing its case "
                                               "(killed, e.g. out of memory); finished cases are kept: run again "
                                               "with --continue_prediction")
                        result.wait(0.1)
                    written.append(Path(result.get()))
                    pending.remove(result)
                    bar.update()

            for item in preprocessed_cases(predictor, case_files, outputs, num_processes_preprocessing):
                data = item["data"]
                if isinstance(data, str):  # nnunetv2's workers may hand over large cases as .npy files
                    path, data = data, torch.from_numpy(np.load(data))
                    os.remove(path)
                logits = predictor.predict_logits_from_preprocessed_data(data).cpu()
                arguments = (logits.numpy(), item["data_properties"], configuration_manager, plans_manager,
                             predictor.dataset_json, item["ofile"], save_probabilities, scratch)
                if pool is None:
                    written.append(Path(export_case_atomically(*arguments)))
                    bar.update()
                    continue
                from nnunetv2.utilities.file_path_utilities import check_workers_alive_and_busy
                while check_workers_alive_and_busy(pool, workers, pending, allowed_num_queued=QUEUED_EXPORTS):
                    sleep(0.1)
                pending.append(pool.apply_async(export_case_atomically, arguments))
                collect(block=False)
            collect(block=True)
    finally:
        bar.close()
        shutil.rmtree(scratch, ignore_errors=True)
    return written


def check_output_folder_model(predictor, output_folder: str | os.PathLike) -> None:
    """Refuse an output folder whose ``plans.json`` / ``dataset.json`` (written by an earlier prediction)
    belong to another model than ``predictor``'s: another data set, other labels, or plans with another
    fingerprint (:func:`samunet.trainers.run_identity.plans_fingerprint`, per configuration). Its
    predictions would be mixed with this model's (and ``--continue_prediction`` would keep them). Raises
    :class:`DatasetError` naming both models, before anything is written."""
    import json

    from samunet.trainers.run_identity import plans_fingerprint
    folder = Path(output_folder)
    ours_plans, ours_dataset = predictor.plans_manager.plans, predictor.dataset_json
    found: dict[str, dict] = {}
    for name in ("plans.json", "dataset.json"):
        if (folder / name).is_file():
            try:
                found[name] = json.loads((folder / name).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
                raise DatasetError(f"{folder / name} cannot be read ({type(error).__name__}), so whose predictions "
                                   f"{folder} holds is unknown: predict into another folder (-o) or empty "
                                   f"{folder} first") from None
    theirs_plans, theirs_dataset = found.get("plans.json"), found.get("dataset.json")
    differences = []
    if theirs_plans is not None:
        if theirs_plans.get("dataset_name") != ours_plans.get("dataset_name"):
            differences.append("another data set")
        configurations = set(ours_plans.get("configurations", {})) | set(theirs_plans.get("configurations", {}))
        if any(plans_fingerprint(ours_plans, c) != _fingerprint_or_none(theirs_plans, c) for c in configurations):
            differences.append("other plans")
    labels_differ = theirs_dataset is not None and theirs_dataset.get("labels") != ours_dataset.get("labels")
    if labels_differ:
        differences.append("other labels")
    if not differences:
        return

    def named(plans: dict | None, dataset: dict | None) -> str:
        plans, dataset = plans or {}, dataset or {}
        labels = f", labels {dataset.get('labels', '?')}" if labels_differ else ""
        return (f"{plans.get('dataset_name', dataset.get('name', 'an unknown data set'))} (plans "
                f"{plans.get('plans_name', '?')}{labels})")
    raise DatasetError(f"{folder} holds the predictions of another model, {named(theirs_plans, theirs_dataset)}, "
                       f"not of this one, {named(ours_plans, ours_dataset)}: {' and '.join(differences)}; predict "
                       f"into another folder (-o), or empty {folder} first")


def _fingerprint_or_none(plans: dict, configuration: str) -> str | None:
    """:func:`~samunet.trainers.run_identity.plans_fingerprint`, None for plans nnunetv2 cannot resolve."""
    from samunet.trainers.run_identity import plans_fingerprint
    try:
        return plans_fingerprint(plans, configuration)
    except Exception:  # malformed plans (edited by hand): not this model's either way
        return None


def write_model_files(predictor, output_folder: str | os.PathLike) -> None:
    """dataset.json and plans.json next to the predictions, as nnunetv2's predictor writes them
    (needed to postprocess or ensemble the folder later), after removing what killed runs left in the
    folder (:func:`remove_stale_scratch`): the first step of every prediction run."""
    folder = Path(output_folder)
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_scratch(folder)
    write_json_atomically(folder / "dataset.json", predictor.dataset_json, prefix=scratch_prefix())
    write_json_atomically(folder / "plans.json", predictor.plans_manager.plans, prefix=scratch_prefix())
