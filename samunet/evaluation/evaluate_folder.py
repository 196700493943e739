"""Evaluate a folder of predictions against a folder of references and write a summary.

Files are paired by name (``<case><file_ending>``). The summary JSON holds per-case and per-class
metrics, the means, the NSD tolerance and the empty-mask convention; NaN is written as ``null``.
A markdown table with the same name (``.md``) is written next to it.
"""
from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from samunet.errors import SamunetError
from samunet.evaluation.metrics import EMPTY_MASK_CONVENTION, evaluate_case, summarise

logger = logging.getLogger(__name__)

GEOMETRY_TOLERANCE = 1e-4


class EvaluationError(SamunetError, ValueError):
    """The inputs of an evaluation are inconsistent (missing files, geometry or label mismatch)."""


def _case_files(folder: Path, file_ending: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise EvaluationError(f"folder {folder} does not exist; check the path")
    return {
        path.name[: -len(file_ending)]: path
        for path in sorted(folder.iterdir())
        if path.is_file() and path.name.endswith(file_ending)
    }


def _pair_cases(reference_dir: Path, prediction_dir: Path, file_ending: str) -> dict[str, tuple[Path, Path]]:
    references = _case_files(reference_dir, file_ending)
    predictions = _case_files(prediction_dir, file_ending)
    no_reference = sorted(set(predictions) - set(references))
    if no_reference:
        raise EvaluationError(
            f"{len(no_reference)} prediction(s) in {prediction_dir} have no reference in {reference_dir}: "
            f"{', '.join(no_reference)}; add the references or remove those predictions"
        )
    no_prediction = sorted(set(references) - set(predictions))
    if no_prediction:
        raise EvaluationError(
            f"{len(no_prediction)} reference(s) in {reference_dir} have no prediction in {prediction_dir}: "
            f"{', '.join(no_prediction)}; predict those cases or remove the references"
        )
    if not references:
        raise EvaluationError(
            f"no '*{file_ending}' files in {reference_dir}; check the folder and dataset.json's file_ending"
        )
    return {case: (references[case], predictions[case]) for case in references}


def _geometry(image: sitk.Image) -> dict[str, tuple]:
    return {
        "size": image.GetSize(),
        "spacing": tuple(round(v, 6) for v in image.GetSpacing()),
        "origin": tuple(round(v, 6) for v in image.GetOrigin()),
        "direction": tuple(round(v, 6) for v in image.GetDirection()),
    }


def _same_geometry(a: dict[str, tuple], b: dict[str, tuple]) -> bool:
    return a["size"] == b["size"] and all(
        np.allclose(a[key], b[key], atol=GEOMETRY_TOLERANCE) for key in ("spacing", "origin", "direction")
    )


def _check_labels(label_map: np.ndarray, allowed: set[int], path: Path) -> None:
    unexpected = sorted(set(np.unique(label_map).tolist()) - allowed)
    if unexpected:
        raise EvaluationError(
            f"{path} contains label values {unexpected} that dataset.json does not define "
            f"(allowed: {sorted(allowed)}); fix the segmentation or dataset.json's 'labels'"
        )


def _allowed_values(labels: dict) -> set[int]:
    values = set()
    for value in labels.values():
        values.update(value if isinstance(value, (list, tuple)) else [value])
    return {int(v) for v in values}


def _evaluate_pair(case: str, reference_file: Path, prediction_file: Path, labels: dict, tolerance_mm: float) -> dict:
    reference = sitk.ReadImage(str(reference_file))
    prediction = sitk.ReadImage(str(prediction_file))
    ref_geometry, pred_geometry = _geometry(reference), _geometry(prediction)
    if not _same_geometry(ref_geometry, pred_geometry):
        raise EvaluationError(
            f"case {case}: geometry of the prediction {prediction_file} {pred_geometry} differs from the reference "
            f"{reference_file} {ref_geometry}; resample the prediction onto the reference grid"
        )
    ref_array = sitk.GetArrayFromImage(reference)
    pred_array = sitk.GetArrayFromImage(prediction)
    allowed = _allowed_values(labels)
    _check_labels(ref_array, allowed, reference_file)
    _check_labels(pred_array, allowed, prediction_file)
    spacing = reference.GetSpacing()[::-1]
    return evaluate_case(ref_array, pred_array, spacing, labels, tolerance_mm)


def json_safe(value):
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file in ``path``'s folder, then move it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _format_value(value: float, digits: int) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def format_table(summary: dict) -> str:
    """Markdown table with one row per class and a foreground-mean row: Dice, NSD@tol, HD95 mm."""
    tolerance = summary.get("tolerance_mm")
    nsd_header = f"NSD@{tolerance:g}mm" if tolerance is not None else "NSD"
    rows = [f"| Class | Dice | {nsd_header} | HD95 mm |", "|---|---|---|---|"]
    named_means = list(summary["mean_per_class"].items()) + [("foreground mean", summary["foreground_mean"])]
    for name, means in named_means:
        rows.append(
            f"| {name} | {_format_value(means['Dice'], 4)} | {_format_value(means['NSD'], 4)} "
            f"| {_format_value(means['HD95'], 2)} |"
        )
    return "\n".join(rows) + "\n"


def evaluate_folders(
    reference_dir: str | os.PathLike,
    prediction_dir: str | os.PathLike,
    dataset_json: dict,
    tolerance_mm: float = 2.0,
    output_json: str | os.PathLike | None = None,
    num_processes: int = 1,
) -> dict:
    """Evaluate every prediction against its reference; write JSON + markdown if ``output_json`` is given.

    Raises :class:`EvaluationError` (before writing anything) on unpaired files, geometry mismatches
    or label values that dataset.json does not define.
    """
    reference_dir, prediction_dir = Path(reference_dir), Path(prediction_dir)
    missing_keys = [key for key in ("labels", "file_ending") if key not in dataset_json]
    if missing_keys:
        raise EvaluationError(f"dataset.json lacks {missing_keys}; add them as nnU-Net's dataset.json format requires")
    labels = dataset_json["labels"]
    pairs = _pair_cases(reference_dir, prediction_dir, dataset_json["file_ending"])
    arguments = [(case, ref, pred, labels, tolerance_mm) for case, (ref, pred) in pairs.items()]
    logger.info("evaluating %d case(s) from %s against %s", len(arguments), prediction_dir, reference_dir)
    if num_processes > 1:
        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(arguments))) as pool:
            results = pool.starmap(_evaluate_pair, arguments)
    else:
        results = [_evaluate_pair(*args) for args in arguments]
    per_case = dict(zip(pairs, results))
    summary = {
        "reference_dir": str(reference_dir),
        "prediction_dir": str(prediction_dir),
        "tolerance_mm": tolerance_mm,
        "empty_mask_convention": EMPTY_MASK_CONVENTION,
        "labels": labels,
        "per_case": per_case,
        **summarise(per_case),
    }
    if output_json is not None:
        output_json = Path(output_json)
        atomic_write_text(output_json, json.dumps(json_safe(summary), indent=2, allow_nan=False) + "\n")
        atomic_write_text(output_json.with_suffix(".md"), format_table(summary))
        logger.info("wrote %s and %s", output_json, output_json.with_suffix(".md"))
    return summary
