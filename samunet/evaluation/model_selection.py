"""Ensembling of softmax probabilities and choice of the best model or pair of models.

Built on nnunetv2's own pieces: :func:`nnunetv2.ensembling.ensemble.merge_files` (average the
``.npz`` probabilities of a case, argmax, write the label map with the ``.pkl`` geometry),
:func:`~nnunetv2.ensembling.ensemble.ensemble_folders`. samunet adds the checks that
nnunetv2 leaves to asserts or tracebacks (missing, unreadable or cut-off probability files, files of
another class count or shape, folders that disagree on cases: all found before anything is written and
reported in one line, each naming the file) and scores
with its own metrics, as ``samunet_cv_summary`` does, so single models and ensembles compare
on the same foreground Dice (mean of the class means over all cross-validation cases).
nnunetv2 writes the ensembled files into a scratch folder; they are checked and moved into place
only when complete (:mod:`samunet.staged_writes`). The ranking itself is
:mod:`samunet.evaluation.best_configuration`.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

from samunet.errors import DatasetError, problems_in_one_line
from samunet.staged_writes import staged_outputs

logger = logging.getLogger(__name__)

MAX_LISTED = 10


def _listed(names: Sequence[str]) -> str:
    names = sorted(names)
    return ", ".join(names[:MAX_LISTED]) + (" ..." if len(names) > MAX_LISTED else "")


# kind -> (what is wrong, how to fix it), in the order the message lists them
PROBABILITY_PROBLEMS = {
    "missing": ("probability files missing",
                "write the softmax probabilities of every case into every folder (samunet_predict "
                "--save_probabilities writes CASE.npz and CASE.pkl next to CASE's label map), or remove the case "
                "from all folders"),
    "unreadable": ("probability files that cannot be read",
                   "predict these cases again with --save_probabilities (an empty or cut-off file is usually an "
                   "interrupted write or copy)"),
    "classes": ("probabilities with another number of classes than dataset.json's labels",
                "ensemble only predictions of models trained on this data set's labels"),
    "shape": ("cases whose probabilities differ in shape between the folders",
              "ensemble predictions of the same test images, made by models of the same data set"),
}


def _raise_problems(subject: str, problems: Sequence[tuple[str, str]]) -> None:
    """One :class:`DatasetError` in one line for ``(kind, detail)`` problems, grouped by kind (the kinds of
    :data:`PROBABILITY_PROBLEMS`), each kind with how to fix it; nothing when there are none."""
    if problems:
        raise DatasetError(problems_in_one_line(subject, problems, PROBABILITY_PROBLEMS, max_listed=MAX_LISTED,
                                                nothing_written=True))


def probability_cases(folder: Path) -> set[str]:
    """Cases of ``folder`` that have a ``CASE.npz`` or a ``CASE.pkl``; refuses a folder without any .npz."""
    if not folder.is_dir():
        raise DatasetError(f"folder {folder} does not exist")
    npz = {p.name[:-4] for p in folder.glob("*.npz")}
    if not npz:
        raise DatasetError(f"{folder} holds no softmax probabilities (CASE.npz + CASE.pkl); predict with "
                           f"`samunet_predict ... --save-probabilities` (or train/validate with --npz)")
    return npz | {p.name[:-4] for p in folder.glob("*.pkl")}


def check_same_cases(folders: Sequence[Path]) -> list[str]:
    """The cases of all folders; refuses (one line, naming each file) a case whose .npz or .pkl is missing
    in a folder."""
    cases = [probability_cases(folder) for folder in folders]
    union = sorted(set().union(*cases))
    problems = [("missing", str(folder / f"{case}{suffix}")) for case in union for folder in folders
                for suffix in (".npz", ".pkl") if not (folder / f"{case}{suffix}").is_file()]
    _raise_problems(f"ensembling {len(folders)} folders", problems)
    return union


def _probability_shape(path: Path) -> tuple[tuple[int, ...] | None, str | None]:
    """(shape of the ``probabilities`` array of an .npz, None) after reading it whole, or (None, why not)."""
    import numpy as np
    try:
        with np.load(path) as archive:
            if "probabilities" not in archive.files:
                return None, f"{path} holds no 'probabilities' array (it holds {archive.files})"
            return tuple(archive["probabilities"].shape), None
    except Exception as error:  # numpy, zipfile and zlib fail in many ways on a broken file; all mean the same
        return None, f"{path} ({_short_error(error)})"


def _short_error(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[-1]}" if lines else type(error).__name__


def check_probability_files(file_lists: Sequence[Sequence[Path]], num_classes: int, subject: str) -> None:
    """Read every probability file to be ensembled (one list of ``CASE.npz`` per case, one file per folder or
    model) and its ``CASE.pkl``, before anything is written: each must be readable, hold ``num_classes``
    classes (dataset.json's labels, as nnunetv2's label manager counts them) and have the same shape as the
    case's other files. Raises one :class:`DatasetError` in one line naming each file otherwise, starting
    with ``subject`` (what is ensembled)."""
    from batchgenerators.utilities.file_and_folder_operations import load_pickle
    problems = []
    for files in file_lists:
        shapes = {}
        for path in map(Path, files):
            try:
                load_pickle(str(path.with_suffix(".pkl")))
            except Exception as error:  # any unpickling failure: the geometry cannot be used
                problems.append(("unreadable", f"{path.with_suffix('.pkl')} ({_short_error(error)})"))
            shape, problem = _probability_shape(path)
            if problem is not None:
                problems.append(("unreadable", problem))
            elif len(shape) < 3 or shape[0] != num_classes:
                problems.append(("classes", f"{path} has shape {list(shape)}: {shape[0]} classes, dataset.json's "
                                            f"labels make {num_classes}"))
            else:
                shapes[path] = shape[1:]
        if len(set(shapes.values())) > 1:
            problems.append(("shape", ", ".join(f"{path} {list(shape)}" for path, shape in shapes.items())))
    _raise_problems(subject, problems)


def _json_from(folders: Sequence[Path], name: str, given: dict | None) -> dict:
    if given is not None:
        return given
    for folder in folders:
        if (folder / name).is_file():
            return json.loads((folder / name).read_text(encoding="utf-8"))
    raise DatasetError(f"none of the folders holds {name} (samunet_predict --save-probabilities writes it); "
                       f"copy it from the model folder $nnUNet_results/DATASET/TRAINER__PLANS__CONFIG")


def _check_labels(folders: Sequence[Path]) -> None:
    labels = {}
    for folder in folders:
        if (folder / "dataset.json").is_file():
            labels[str(folder)] = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))["labels"]
    if len({json.dumps(v, sort_keys=True) for v in labels.values()}) > 1:
        raise DatasetError(f"the folders' dataset.json files define different labels: {labels}")


def _merge(file_lists: list[list[str]], outputs: list[str], plans_manager, dataset_json: dict,
           num_processes: int, save_probabilities: bool = False) -> None:
    """nnunetv2's merge_files per case; in this process when num_processes is 1 (a spawned worker costs seconds)."""
    from nnunetv2.ensembling.ensemble import merge_files
    reader_writer = plans_manager.image_reader_writer_class()
    label_manager = plans_manager.get_label_manager(dataset_json)
    arguments = [(files, out, dataset_json["file_ending"], reader_writer, label_manager, save_probabilities)
                 for files, out in zip(file_lists, outputs)]
    if num_processes <= 1:
        for argument in arguments:
            merge_files(*argument)
        return
    import multiprocessing
    with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
        pool.starmap(merge_files, arguments)


def ensemble_prediction_folders(folders: Sequence[str | os.PathLike], output_folder: str | os.PathLike, *,
                                num_processes: int = 1, save_probabilities: bool = False,
                                dataset_json: dict | None = None, plans: dict | None = None) -> list[Path]:
    """Average the probabilities of the same cases in several folders; returns the label maps written.

    Same result as ``nnunetv2.ensembling.ensemble.ensemble_folders``, with its asserts turned into
    one-line errors; every .npz and .pkl is read and checked first (:func:`check_probability_files`). The
    outputs (label maps, with ``save_probabilities`` the ``.npz`` / ``.pkl``, and dataset.json / plans.json)
    are staged, checked and moved into ``output_folder`` only when all are
    complete (:func:`samunet.staged_writes.staged_outputs`): a full disk raises OSError naming the file and
    leaves the folder's previous files as they were.
    """
    folders = [Path(f) for f in folders]
    if len(folders) < 2:
        raise DatasetError(f"ensembling needs at least two folders, got {len(folders)}")
    output_folder = Path(output_folder)
    if output_folder.resolve() in {f.resolve() for f in folders}:
        raise DatasetError(f"the output folder {output_folder} is one of the inputs; choose another")
    cases = check_same_cases(folders)
    _check_labels(folders)
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    dataset_json = _json_from(folders, "dataset.json", dataset_json)
    plans = _json_from(folders, "plans.json", plans)
    plans_manager = PlansManager(plans)
    ending = dataset_json["file_ending"]
    file_lists = [[f / f"{c}.npz" for f in folders] for c in cases]
    check_probability_files(file_lists, plans_manager.get_label_manager(dataset_json).num_segmentation_heads,
                            f"ensembling {len(folders)} folders")
    with staged_outputs(output_folder, reader_writer=plans_manager.image_reader_writer_class(),
                        label_ending=ending) as staging:
        _merge([list(map(str, files)) for files in file_lists], [str(staging.path(c)) for c in cases],
               plans_manager, dataset_json, num_processes, save_probabilities)
        for name, content in (("dataset.json", dataset_json), ("plans.json", plans)):
            staging.path(name).write_text(json.dumps(content, indent=2), encoding="utf-8")
    return [output_folder / f"{c}{ending}" for c in cases]


# ---------------------------------------------------------------------------------------------- model choice

def model_identifier(trainer: str, plans: str, configuration: str) -> str:
    """nnU-Net's model folder name: ``<trainer>__<plans>__<configuration>``."""
    return f"{trainer}__{plans}__{configuration}"


def cv_foreground_dice(model_folder: Path, preprocessed: Path, dataset_json: dict, *, recompute: bool = False,
                       num_processes: int = 1) -> float:
    """Mean foreground Dice of a model's cross-validation (its cv_summary_samunet.json, computed if absent)."""
    from samunet.evaluation.cv_summary import OUTPUT_NAME, summarise_cross_validation
    path = model_folder / OUTPUT_NAME
    if path.is_file() and not recompute:
        summary = json.loads(path.read_text(encoding="utf-8"))
        logger.info("read %s", path)
    else:
        summary = summarise_cross_validation(model_folder, preprocessed, dataset_json, num_processes=num_processes)
    return summary["overall"]["Dice"]["mean"]


def validation_probability_files(model_folder: Path, folds: Sequence[int]) -> dict[str, Path] | str:
    """Case -> validation .npz over the folds, or the reason why the model cannot be ensembled."""
    from samunet.evaluation.cv_summary import train_command
    files: dict[str, Path] = {}
    for fold in folds:
        validation = model_folder / f"fold_{fold}" / "validation"
        found = sorted(validation.glob("*.npz")) if validation.is_dir() else []
        if not found:
            return (f"{validation} holds no .npz probabilities (train with --npz, or re-run the validation: "
                    f"{train_command(model_folder, fold, '--val', '--npz')})")
        for path in found:
            if not path.with_suffix(".pkl").is_file():
                return f"{path} has no .pkl next to it"
            files[path.name[:-4]] = path
    return files


def score_predictions(prediction_folder: Path, references: Path, cases: Sequence[str], dataset_json: dict,
                      num_processes: int = 1) -> float:
    """Foreground Dice (mean of class means, pooled over cases) of a folder, as samunet_cv_summary scores."""
    from samunet.evaluation.evaluate_folder import evaluate_folders
    from samunet.evaluation.metrics import summarise
    ending = dataset_json["file_ending"]
    with tempfile.TemporaryDirectory(prefix="samunet_best_") as scratch:
        for case in cases:
            reference = references / f"{case}{ending}"
            if not reference.is_file():
                raise DatasetError(f"reference {reference} is missing; re-run samunet_plan_and_preprocess")
            os.symlink(reference.resolve(), Path(scratch) / reference.name)
        per_case = evaluate_folders(scratch, prediction_folder, dataset_json, num_processes=num_processes)["per_case"]
    return summarise(per_case)["foreground_mean"]["Dice"]


def ensemble_cross_validation(model_folders: Sequence[Path], output_folder: Path, probability_files: list[dict],
                              num_processes: int = 1) -> list[str]:
    """Average the given validation probability files (one dict case -> file per model) of several models
    with nnunetv2's ``merge_files``, in ``num_processes`` processes, into ``output_folder`` with the first
    model's dataset.json and plans.json. The folder is staged, checked and replaces the previous one as a
    whole (:func:`samunet.staged_writes.staged_outputs`): a full disk raises OSError naming the file and
    leaves the previous folder as it was."""
    cases = [set(files) for files in probability_files]
    union = set().union(*cases)
    problems = [f"{folder.name} lacks {_listed(union - have)}" for folder, have in zip(model_folders, cases)
                if union - have]
    if problems:
        raise DatasetError("the models' validation probabilities cover different cases: " + "; ".join(problems))
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    folder = model_folders[0]
    plans_manager = PlansManager(json.loads((folder / "plans.json").read_text(encoding="utf-8")))
    dataset_json = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    ordered = sorted(union)
    check_probability_files([[files[c] for files in probability_files] for c in ordered],
                            plans_manager.get_label_manager(dataset_json).num_segmentation_heads,
                            f"ensembling the validation probabilities of {len(model_folders)} models")
    name = output_folder.name
    with staged_outputs(output_folder.parent, reader_writer=plans_manager.image_reader_writer_class(),
                        label_ending=dataset_json["file_ending"], whole=(name,)) as staging:
        for meta in ("dataset.json", "plans.json"):
            shutil.copy(folder / meta, staging.path(f"{name}/{meta}"))
        # the given files, not nnunetv2's ensemble_crossvalidations: that one always reads folds 0-4
        _merge([[str(files[c]) for files in probability_files] for c in ordered],
               [str(staging.path(f"{name}/{c}")) for c in ordered], plans_manager, dataset_json, num_processes)
    return ordered
