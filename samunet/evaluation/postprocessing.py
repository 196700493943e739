"""nnU-Net's connected-component postprocessing: decided on cross-validation predictions, applied to new ones.

:func:`determine_postprocessing` takes the decisions of nnunetv2's
``nnunetv2.postprocessing.remove_connected_components.determine_postprocessing``, step by step
and with its pieces (``remove_all_but_largest_component_from_segmentation``,
``load_postprocess_save``, ``compute_metrics``, the summary format):

1. keep only the largest connected component of the whole foreground; adopted if the foreground
   mean Dice rises and no class's mean Dice falls;
2. then, for each label in the order of dataset.json, keep only its largest component; adopted if
   that label's mean Dice rises.

It writes what nnunetv2 writes into the predictions folder: ``summary.json`` (nnU-Net's metrics),
``postprocessing.pkl`` (``(functions, kwargs)``, readable by ``nnUNetv2_apply_postprocessing``),
``postprocessing.json`` and ``postprocessed/`` (the postprocessed predictions with their summary).
The differences: with ``num_processes=1`` everything runs in this process (nnunetv2 always starts
a pool of spawned workers, which costs seconds per pool on small machines), and nothing is written
under its final name until it is complete: the work happens in a scratch folder inside the
predictions folder, every label map nnunetv2 writes is read back before its metrics count (SimpleITK
leaves a cut-off file on a full disk without an error), and the files then move into place, the
``postprocessed/`` folder as a whole (:mod:`samunet.staged_writes`). A full disk raises an
``OSError`` naming the file and leaves the previous outputs as they were; so does
:func:`apply_postprocessing_to_folder`.

:func:`apply_postprocessing_to_folder` applies such a file to a folder of predictions
(``samunet_apply_postprocessing``). ``postprocessing.pkl`` is read with an unpickler that only
admits nnunetv2's postprocessing function, so a pickle cannot run other code.
"""
from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from samunet.errors import DatasetError
from samunet.staged_writes import staged_outputs

logger = logging.getLogger(__name__)

PP_PICKLE = "postprocessing.pkl"
PP_JSON = "postprocessing.json"
POSTPROCESSED = "postprocessed"
SUMMARY = "summary.json"
_NNUNET_PP_MODULE = "nnunetv2.postprocessing.remove_connected_components"
_PP_FUNCTION = "remove_all_but_largest_component_from_segmentation"
_ALLOWED_GLOBALS = {(_NNUNET_PP_MODULE, _PP_FUNCTION), ("numpy.core.multiarray", "scalar"),
                    ("numpy._core.multiarray", "scalar"), ("numpy", "dtype")}


def _starmap(function: Callable, arguments: list[tuple], num_processes: int) -> list:
    if num_processes <= 1 or len(arguments) <= 1:
        return [function(*a) for a in arguments]
    with multiprocessing.get_context("spawn").Pool(min(num_processes, len(arguments))) as pool:
        return pool.starmap(function, arguments)


def _files(folder: Path, file_ending: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.name.endswith(file_ending))


def folder_metrics(folder_ref: Path, folder_pred: Path, output_file: Path | None, reader_writer, file_ending: str,
                   labels_or_regions: list, ignore_label: int | None, num_processes: int = 1) -> dict:
    """nnunetv2's ``compute_metrics_on_folder``: its per-case ``compute_metrics`` over the predicted
    cases, its means (NaN-aware per label; foreground mean over labels) and its summary.json."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics, save_summary_json
    from nnunetv2.utilities.json_export import recursive_fix_for_json_export
    files = _files(folder_pred, file_ending)
    if not files:
        raise DatasetError(f"{folder_pred} holds no '*{file_ending}' predictions")
    missing = [f for f in files if not (folder_ref / f).is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} prediction(s) in {folder_pred} have no reference in {folder_ref}: "
                           f"{', '.join(missing[:10])}")
    results = _starmap(compute_metrics, [(str(folder_ref / f), str(folder_pred / f), reader_writer,
                                          labels_or_regions, ignore_label) for f in files], num_processes)
    metric_names = list(results[0]["metrics"][labels_or_regions[0]].keys())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a label absent everywhere: NaN, as in nnunetv2
        means = {r: {m: np.nanmean([case["metrics"][r][m] for case in results]) for m in metric_names}
                 for r in labels_or_regions}
        foreground_mean = {m: np.mean([means[k][m] for k in means if k not in (0, "0")]) for m in metric_names}
    for case in results:
        recursive_fix_for_json_export(case)
    recursive_fix_for_json_export(means)
    recursive_fix_for_json_export(foreground_mean)
    summary = {"metric_per_case": results, "mean": means, "foreground_mean": foreground_mean}
    if output_file is not None:
        save_summary_json(summary, str(output_file))
    return summary


def _postprocess_folder(source: Path, target: Path, files: list[str], reader_writer, functions: list,
                        kwargs: list[dict], num_processes: int) -> None:
    from nnunetv2.postprocessing.remove_connected_components import load_postprocess_save
    target.mkdir(parents=True, exist_ok=True)
    _starmap(load_postprocess_save, [(str(source / f), str(target / f), reader_writer, functions, kwargs)
                                     for f in files], num_processes)


def _managers(plans: dict | str | os.PathLike, dataset_json: dict | str | os.PathLike):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    if not isinstance(plans, dict):
        plans = json.loads(Path(plans).read_text(encoding="utf-8"))
    if not isinstance(dataset_json, dict):
        dataset_json = json.loads(Path(dataset_json).read_text(encoding="utf-8"))
    plans_manager = PlansManager(plans)
    return plans_manager, dataset_json, plans_manager.get_label_manager(dataset_json)


def determine_postprocessing(folder_predictions: str | os.PathLike, folder_ref: str | os.PathLike,
                             plans: dict | str | os.PathLike, dataset_json: dict | str | os.PathLike,
                             num_processes: int = 1, keep_postprocessed_files: bool = True) -> tuple[list, list]:
    """nnU-Net's postprocessing decision for the predictions in ``folder_predictions`` (see the module
    docstring); returns ``(functions, kwargs)`` and writes postprocessing.pkl / .json there."""
    from nnunetv2.evaluation.evaluate_predictions import label_or_region_to_key, load_summary_json
    from nnunetv2.postprocessing.remove_connected_components import \
        remove_all_but_largest_component_from_segmentation as keep_largest
    from nnunetv2.utilities.json_export import recursive_fix_for_json_export

    predictions, references = Path(folder_predictions), Path(folder_ref)
    plans_manager, dataset_json, label_manager = _managers(plans, dataset_json)
    reader_writer = plans_manager.image_reader_writer_class()
    ending = dataset_json["file_ending"]
    labels_or_regions = label_manager.foreground_regions if label_manager.has_regions \
        else label_manager.foreground_labels
    files = _files(predictions, ending)
    missing = sorted(set(_files(references, ending)) - set(files)) if references.is_dir() else []
    if missing:
        logger.warning("%d reference case(s) have no prediction in %s; postprocessing should be determined on the "
                       "whole cross-validation", len(missing), predictions)
    with staged_outputs(predictions, reader_writer=reader_writer, label_ending=ending,
                        whole=(POSTPROCESSED,)) as staging:
        output = staging.path(POSTPROCESSED)
        temporary = output / "temp"

        def metrics(folder: Path, summary: Path) -> dict:
            folder_metrics(references, folder, summary, reader_writer, ending, labels_or_regions,
                           label_manager.ignore_label, num_processes)
            return load_summary_json(str(summary))

        def postprocessed(source: Path, name: str, candidate: dict) -> Path:
            here = temporary / name
            _postprocess_folder(source, here, files, reader_writer, [keep_largest], [candidate], num_processes)
            staging.verify(here)  # no decision rests on a cut-off label map
            return here

        functions, kwargs = [], []
        baseline = metrics(predictions, staging.path(SUMMARY))
        # 1. the whole foreground's largest component
        candidate = {"labels_or_regions": label_manager.foreground_labels}
        here = postprocessed(predictions, "keep_largest_fg", candidate)
        result = metrics(here, here / SUMMARY)
        # nnunetv2's rule, NaN comparisons included: no class may get worse
        adopt = result["foreground_mean"]["Dice"] > baseline["foreground_mean"]["Dice"] and \
            not any(result["mean"][k]["Dice"] < baseline["mean"][k]["Dice"] for k in result["mean"])
        logger.info("keeping the largest foreground component: foreground Dice %.5f -> %.5f (%s)",
                    baseline["foreground_mean"]["Dice"], result["foreground_mean"]["Dice"],
                    "adopted" if adopt else "not adopted")
        source, current = (here, result) if adopt else (predictions, baseline)
        if adopt:
            functions.append(keep_largest)
            kwargs.append(candidate)
        # 2. each label's (region's) largest component, in dataset.json's order
        if len(labels_or_regions) > 1:
            for label in labels_or_regions:
                candidate = {"labels_or_regions": label}
                here = postprocessed(source, "keep_largest_perClassOrRegion", candidate)
                result = metrics(here, here / SUMMARY)
                adopt = result["mean"][label]["Dice"] > current["mean"][label]["Dice"]
                logger.info("keeping the largest component of %s: Dice %.5f -> %.5f (%s)", label,
                            current["mean"][label]["Dice"], result["mean"][label]["Dice"],
                            "adopted" if adopt else "not adopted")
                if adopt:
                    best = temporary / "keep_largest_perClassOrRegion_currentBest"
                    if best.exists():
                        shutil.rmtree(best)
                    shutil.move(str(here), str(best))
                    source, current = best, result
                    functions.append(keep_largest)
                    kwargs.append(candidate)
                else:
                    shutil.rmtree(here)
        # the chosen predictions with their summary (the baseline's is staged, not in the predictions folder)
        for path in source.iterdir():
            if path.is_file() and path.name != SUMMARY:
                shutil.copy(path, output / path.name)
        shutil.copy(staging.path(SUMMARY) if source == predictions else source / SUMMARY, output / SUMMARY)
        with open(staging.path(PP_PICKLE), "wb") as stream:
            pickle.dump((functions, kwargs), stream)
        record = {
            "input_folder": {k: baseline[k] for k in ("foreground_mean", "mean")},
            "postprocessed": {k: current[k] for k in ("foreground_mean", "mean")},
            "postprocessing_fns": [f.__name__ for f in functions],
            "postprocessing_kwargs": kwargs,
        }
        for part in ("input_folder", "postprocessed"):
            record[part]["mean"] = {label_or_region_to_key(k): v for k, v in record[part]["mean"].items()}
        recursive_fix_for_json_export(record)
        staging.path(PP_JSON).write_text(json.dumps(record, indent=2), encoding="utf-8")
        shutil.rmtree(temporary)
        if not keep_postprocessed_files:
            shutil.rmtree(output)
    return functions, kwargs


class _PostprocessingUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise DatasetError(f"the postprocessing file refers to {module}.{name}; only nnU-Net's "
                               f"{_PP_FUNCTION} is accepted")
        return super().find_class(module, name)


def load_postprocessing(path: str | os.PathLike) -> tuple[list[Callable], list[dict]]:
    """``(functions, kwargs)`` of a postprocessing.pkl (nnunetv2's or samunet's)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"postprocessing file {path} does not exist; samunet_find_best writes it next to the "
                           f"chosen configuration")
    try:
        functions, kwargs = _PostprocessingUnpickler(io.BytesIO(path.read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise DatasetError(f"{path} is not a postprocessing file ({error})") from error
    if len(functions) != len(kwargs) or not all(callable(f) for f in functions):
        raise DatasetError(f"{path} is not a postprocessing file (expected matching functions and kwargs)")
    return list(functions), list(kwargs)


def check_postprocessing_labels(kwargs: Sequence[dict], label_manager, origin: str, labels_source: str) -> None:
    """Refuse (one line) postprocessing steps whose ``labels_or_regions`` name a label that dataset.json
    (``labels_source``, read into ``label_manager``) does not declare as foreground: a postprocessing.pkl
    of another data set would otherwise be applied silently, to values the predictions do not hold."""
    declared = {int(v) for v in label_manager.foreground_labels}
    unknown, malformed = set(), []
    for step in kwargs:
        target = step.get("labels_or_regions") if isinstance(step, dict) else None
        values = target if isinstance(target, (list, tuple)) else [target]
        flat = [v for value in values for v in (value if isinstance(value, (list, tuple)) else [value])]
        if target is None or not all(isinstance(v, (int, np.integer)) for v in flat):
            malformed.append(repr(step))
            continue
        unknown.update(int(v) for v in flat if int(v) not in declared)
    if malformed or unknown:
        found = f"steps without integer labels_or_regions: {', '.join(malformed)}" if malformed else \
            f"labels_or_regions {sorted(unknown)}"
        raise DatasetError(f"{origin} acts on {found}, but {labels_source} declares the foreground labels "
                           f"{sorted(declared)}; use the postprocessing.pkl determined for this data set's model "
                           f"(samunet_find_best or samunet_determine_postprocessing writes it)")


def apply_postprocessing_to_folder(input_folder: str | os.PathLike, output_folder: str | os.PathLike,
                                   functions: Sequence[Callable], kwargs: Sequence[dict],
                                   plans: dict | str | os.PathLike | None = None,
                                   dataset_json: dict | str | os.PathLike | None = None,
                                   num_processes: int = 1, *, origin: str = "the postprocessing") -> list[Path]:
    """nnunetv2's ``apply_postprocessing_to_folder``: every prediction of ``input_folder`` postprocessed
    into ``output_folder`` (plans.json / dataset.json default to the input folder's, which
    samunet_predict and samunet_ensemble write), each moved into place once all are written and read
    back. Returns the files written. Steps acting on labels dataset.json does not declare are refused
    (:func:`check_postprocessing_labels`; ``origin`` names the postprocessing file in that message)."""
    source, target = Path(input_folder), Path(output_folder)
    if not source.is_dir():
        raise DatasetError(f"input folder {source} does not exist")
    if target.resolve() == source.resolve():
        raise DatasetError("the output folder must differ from the input folder")
    for name, given in (("plans.json", plans), ("dataset.json", dataset_json)):
        if given is None and not (source / name).is_file():
            raise DatasetError(f"{source / name} is missing (samunet_predict writes it); pass -plans_json / "
                               f"-dataset_json, e.g. the model folder's")
    plans = source / "plans.json" if plans is None else plans
    dataset_json = source / "dataset.json" if dataset_json is None else dataset_json
    labels_source = "the given dataset.json" if isinstance(dataset_json, dict) else str(dataset_json)
    plans_manager, dataset_json, label_manager = _managers(plans, dataset_json)
    check_postprocessing_labels(kwargs, label_manager, origin, labels_source)
    files = _files(source, dataset_json["file_ending"])
    if not files:
        raise DatasetError(f"{source} holds no '*{dataset_json['file_ending']}' predictions")
    reader_writer = plans_manager.image_reader_writer_class()
    with staged_outputs(target, reader_writer=reader_writer, label_ending=dataset_json["file_ending"]) as staging:
        _postprocess_folder(source, staging.root, files, reader_writer, list(functions), list(kwargs), num_processes)
    return [target / f for f in files]
