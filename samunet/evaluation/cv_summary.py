"""Five-fold cross-validation summary: every fold's validation predictions scored against the references.

A trained model folder ``$nnUNet_results/<dataset>/<trainer>__<plans>__<configuration>`` holds
``fold_0`` .. ``fold_4``; each finished fold has ``checkpoint_final.pth`` and ``validation/`` with
one prediction per validation case of ``$nnUNet_preprocessed/<dataset>/splits_final.json``. The
references are nnunetv2's copies in ``$nnUNet_preprocessed/<dataset>/gt_segmentations``.

Every fold is checked before anything is computed; a missing or incomplete fold is refused with
the list of what is missing. Each fold is then scored with
:func:`samunet.evaluation.evaluate_folder.evaluate_folders` (same metrics, conventions and checks as
``samunet_evaluate``), and the cases of all folds are pooled. Per class the summary gives the mean
and the standard deviation over cases (population, ddof=0; NaN-aware: a case where reference and prediction are both
empty is left out). Overall: the mean is the mean of the class means (as in ``samunet_evaluate``),
the standard deviation is taken over the cases' foreground means.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

from samunet.atomic_files import write_text_atomically
from samunet.evaluation.evaluate_folder import EvaluationError, evaluate_folders, json_safe
from samunet.evaluation.metrics import (DEFAULT_HD95, DEFAULT_NSD, EMPTY_MASK_CONVENTION, METRIC_NAMES,
                                        metric_conventions, summarise)

logger = logging.getLogger(__name__)

NUM_FOLDS = 5
FINAL_CHECKPOINT = "checkpoint_final.pth"
OUTPUT_NAME = "cv_summary_samunet.json"
MAX_LISTED_CASES = 10


class CrossValidationError(EvaluationError):
    """Folds of a cross-validation are missing or incomplete."""


def _nanstd(values: list[float]) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN -> NaN is the intended result
        return float(np.nanstd(np.asarray(values, dtype=float))) if values else float("nan")


def _nanmean(values: list[float]) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(np.asarray(values, dtype=float))) if values else float("nan")


def _read_splits(preprocessed: Path) -> list[dict]:
    path = preprocessed / "splits_final.json"
    if not path.is_file():
        raise CrossValidationError(f"{path} is missing; it is written when fold 0 starts training "
                                   f"(or by samunet_convert acdc), and names each fold's validation cases")
    try:
        splits = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CrossValidationError(f"{path} is not valid JSON ({error}); restore or delete it") from error
    if len(splits) < NUM_FOLDS:
        raise CrossValidationError(f"{path} holds {len(splits)} fold(s); a 5-fold cross-validation needs 5")
    return splits


def train_command(model_folder: Path, fold: int | str, *options: str) -> str:
    """The ``samunet_train`` command that trains (with ``options``: validates) ``fold`` of the model in
    ``model_folder`` (``$nnUNet_results/<dataset>/<trainer>__<plans>__<configuration>``)."""
    trainer, _, rest = model_folder.name.partition("__")
    plans, _, configuration = rest.rpartition("__")
    plans_option = [] if plans in ("", "samunetPlans") else ["-p", plans]
    return " ".join(["samunet_train", model_folder.parent.name, configuration or "CONFIGURATION", str(fold),
                     "-tr", trainer, *plans_option, *options])


def check_folds(model_folder: Path, splits: list[dict], file_ending: str) -> list[str]:
    """Problems of the five folds (empty when all are complete), each with the command that mends it."""
    problems = []
    for fold in range(NUM_FOLDS):
        folder = model_folder / f"fold_{fold}"
        if not folder.is_dir():
            problems.append(f"fold {fold}: {folder} does not exist (train it: {train_command(model_folder, fold)})")
            continue
        if not (folder / FINAL_CHECKPOINT).is_file():
            problems.append(f"fold {fold}: no {FINAL_CHECKPOINT} in {folder}; training has not finished")
        validation = folder / "validation"
        predicted = {p.name[:-len(file_ending)] for p in validation.glob(f"*{file_ending}")} \
            if validation.is_dir() else set()
        missing = sorted(set(splits[fold]["val"]) - predicted)
        if missing:
            shown = ", ".join(missing[:MAX_LISTED_CASES]) + (" ..." if len(missing) > MAX_LISTED_CASES else "")
            problems.append(f"fold {fold}: {len(missing)} of {len(splits[fold]['val'])} validation case(s) have no "
                            f"prediction in {validation}: {shown} (re-run its validation: "
                            f"{train_command(model_folder, fold, '--val')})")
        extra = sorted(predicted - set(splits[fold]["val"]))
        if extra:
            problems.append(f"fold {fold}: {validation} holds predictions of cases outside the fold's validation "
                            f"split: {', '.join(extra[:MAX_LISTED_CASES])}; splits_final.json changed after training?")
    return problems


def _score_fold(references: Path, validation: Path, cases: list[str], dataset_json: dict,
                tolerance_mm: float, num_processes: int, nsd: str, hd95: str) -> dict:
    """Per-case metrics of one fold; references are linked into a scratch folder holding the fold's cases."""
    ending = dataset_json["file_ending"]
    with tempfile.TemporaryDirectory(prefix="samunet_cv_") as scratch:
        for case in cases:
            reference = references / f"{case}{ending}"
            if not reference.is_file():
                raise CrossValidationError(f"reference {reference} is missing; re-run samunet_plan_and_preprocess, "
                                           f"which copies the labels to gt_segmentations")
            os.symlink(reference.resolve(), Path(scratch) / reference.name)
        summary = evaluate_folders(scratch, validation, dataset_json, tolerance_mm, num_processes=num_processes,
                                   nsd=nsd, hd95=hd95)
    return summary["per_case"]


def _class_statistics(per_case: dict) -> dict:
    names = list(dict.fromkeys(name for case in per_case.values() for name in case))
    return {name: {metric: {"mean": _nanmean([c[name][metric] for c in per_case.values() if name in c]),
                            "std": _nanstd([c[name][metric] for c in per_case.values() if name in c])}
                   for metric in METRIC_NAMES} for name in names}


def _format_markdown(summary: dict) -> str:
    def cell(statistics: dict, digits: int) -> str:
        mean, std = statistics["mean"], statistics["std"]
        if mean is None or (isinstance(mean, float) and math.isnan(mean)):
            return "n/a"
        return f"{mean:.{digits}f} ± {std:.{digits}f}"
    tolerance = summary["tolerance_mm"]
    rows = [f"# {summary['model']}: 5-fold cross-validation ({summary['num_cases']} cases)", "",
            f"| Class | Dice | NSD@{tolerance:g}mm | HD95 mm |", "|---|---|---|---|"]
    for name, statistics in [*summary["per_class"].items(), ("overall (foreground)", summary["overall"])]:
        rows.append(f"| {name} | {cell(statistics['Dice'], 4)} | {cell(statistics['NSD'], 4)} "
                    f"| {cell(statistics['HD95'], 2)} |")
    rows += ["", "| Fold | cases | foreground Dice |", "|---|---|---|"]
    for fold, statistics in summary["per_fold"].items():
        rows.append(f"| {fold} | {statistics['num_cases']} | {statistics['foreground_dice']:.4f} |")
    return "\n".join(rows) + "\n"


def summarise_cross_validation(model_folder: Path, preprocessed: Path, dataset_json: dict,
                               tolerance_mm: float = 2.0, output_json: Path | None = None,
                               num_processes: int = 1, *, nsd: str = DEFAULT_NSD, hd95: str = DEFAULT_HD95) -> dict:
    """Score all five folds of ``model_folder`` with the NSD and HD95 conventions ``nsd`` / ``hd95``
    (:mod:`samunet.evaluation.metrics`); write JSON + markdown (default: in the model folder)."""
    if not model_folder.is_dir():
        raise CrossValidationError(f"model folder {model_folder} does not exist; check -d, -tr, -p and -c")
    splits = _read_splits(preprocessed)
    problems = check_folds(model_folder, splits, dataset_json["file_ending"])
    if problems:
        raise CrossValidationError(f"cannot summarise {model_folder}: {len(problems)} problem(s): "
                                   + "; ".join(problems))
    per_case, per_fold = {}, {}
    for fold in range(NUM_FOLDS):
        logger.info("scoring fold %d (%d cases)", fold, len(splits[fold]["val"]))
        fold_cases = _score_fold(preprocessed / "gt_segmentations", model_folder / f"fold_{fold}" / "validation",
                                 splits[fold]["val"], dataset_json, tolerance_mm, num_processes, nsd, hd95)
        per_fold[f"fold_{fold}"] = {"num_cases": len(fold_cases),
                                    "foreground_dice": summarise(fold_cases)["foreground_mean"]["Dice"]}
        per_case.update(fold_cases)
    case_means = {metric: [_nanmean([classes[metric] for classes in case.values()]) for case in per_case.values()]
                  for metric in METRIC_NAMES}
    means = summarise(per_case)["foreground_mean"]
    summary = {
        "model": model_folder.name,
        "model_folder": str(model_folder),
        "tolerance_mm": tolerance_mm,
        "empty_mask_convention": EMPTY_MASK_CONVENTION,
        "metric_conventions": metric_conventions(nsd, hd95),
        "num_cases": len(per_case),
        "per_class": _class_statistics(per_case),
        "overall": {metric: {"mean": means[metric], "std": _nanstd(case_means[metric])} for metric in METRIC_NAMES},
        "per_fold": per_fold,
        "per_case": per_case,
    }
    output_json = output_json or model_folder / OUTPUT_NAME
    write_text_atomically(output_json, json.dumps(json_safe(summary), indent=2, allow_nan=False) + "\n")
    write_text_atomically(output_json.with_suffix(".md"), _format_markdown(summary))
    logger.info("wrote %s and %s", output_json, output_json.with_suffix(".md"))
    return summary
