"""Evaluate a folder of predictions against a folder of references and write a summary.

Files are paired by name (``<case><file_ending>``; names starting with ``.`` are temporary files and
are skipped) and read with the nnunetv2 reader that dataset.json selects (as nnunetv2's planner
selects it: NIfTI, NRRD, MHA, png/bmp/tif, ...), so a 2D png is a (1, H, W) volume, evaluated in 2D
with its pixel spacing (see :mod:`samunet.evaluation.metrics` for the metric conventions and the
``ignore`` label).

Before anything is written, every pair is checked and all problems are reported together in one
:class:`EvaluationError`: unpaired files or files in another format than dataset.json's
``file_ending`` (raised before any file is read), unreadable (empty, truncated) files, label files
with several channels, non-finite or non-whole values, values dataset.json does not declare, a
prediction holding the ``ignore`` label, and a prediction whose grid (size, spacing, origin,
direction, each named) differs from its reference.

The summary JSON holds per-case and per-class metrics, the means, the NSD tolerance and the metric
and empty-mask conventions; NaN is written as ``null``. A markdown table with the same name (``.md``)
is written next to it. Both are written atomically: a failure leaves the previous files as they were.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import multiprocessing
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from samunet.atomic_files import write_json_atomically, write_text_atomically
from samunet.errors import SamunetError, problems_in_one_line
from samunet.evaluation.metrics import (DEFAULT_HD95, DEFAULT_NSD, EMPTY_MASK_CONVENTION, check_conventions,
                                        evaluate_case, ignore_label, metric_conventions, summarise)

logger = logging.getLogger(__name__)

GEOMETRY_TOLERANCE = 1e-4
MAX_LISTED = 8
# kind -> (what is wrong, how to fix it); the order of first appearance orders the message
PROBLEM_KINDS = {
    "unreadable": ("files that cannot be read",
                   "replace each with a complete copy (an empty or truncated file is usually an interrupted write "
                   "or copy), or save it in a form the reader named takes"),
    "channels": ("label files with several channels or values per pixel",
                 "save label maps with one integer value per pixel (a grey-scale png, not RGB)"),
    "non_finite": ("non-finite values (NaN or inf) in label files",
                   "label maps hold class indices: save them again with an integer type"),
    "not_integer": ("label values that are not whole numbers",
                    "label maps hold class indices: save them again with an integer type (after nearest-neighbour, "
                    "never linear, resampling)"),
    "undeclared": ("label values that dataset.json does not declare",
                   "declare each value in dataset.json's 'labels' or correct the segmentation"),
    "ignore_in_prediction": ("predictions holding the 'ignore' label",
                             "only references carry nnU-Net's ignore label; are the reference and prediction "
                             "folders swapped?"),
    "geometry": ("predictions on another grid than their reference",
                 "predict again (nnunetv2 writes predictions in the geometry of the input image) or resample the "
                 "prediction onto the reference grid with nearest-neighbour interpolation"),
}


class EvaluationError(SamunetError, ValueError):
    """The inputs of an evaluation are inconsistent (missing files, geometry or label mismatch)."""


def _listed(names: list[str]) -> str:
    more = f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
    return ", ".join(names[:MAX_LISTED]) + more


def _case_files(folder: Path, file_ending: str) -> dict[str, Path]:
    """``{case: file}`` of the visible ``*file_ending`` entries of ``folder``; an entry named like a label map
    that is no readable file (a broken symbolic link, a folder, a fifo) is refused, not skipped."""
    from samunet.input_checks import not_a_readable_file
    if not folder.is_dir():
        raise EvaluationError(f"folder {folder} does not exist; check the path")
    entries = [path for path in sorted(folder.iterdir())
               if path.name.endswith(file_ending) and not path.name.startswith(".")]
    broken = [f"{path} {why}" for path in entries if (why := not_a_readable_file(path))]
    if broken:
        raise EvaluationError(f"{len(broken)} entries of {folder} are named like label maps but cannot be read: "
                              f"{_listed(broken)}; replace them with the files, or remove them")
    return {path.name[: -len(file_ending)]: path for path in entries}


def _other_files(folder: Path, file_ending: str) -> list[str]:
    """Visible files of ``folder`` that do not end with ``file_ending`` (images in another format?)."""
    return [path.name for path in sorted(folder.iterdir())
            if path.is_file() and not path.name.startswith(".") and not path.name.endswith(file_ending)]


def _nothing_found(folder: Path, role: str, file_ending: str) -> EvaluationError:
    others = _other_files(folder, file_ending)
    if others:
        return EvaluationError(
            f"no '*{file_ending}' {role} in {folder}, which holds {len(others)} other file(s): {_listed(others)}; "
            f"dataset.json's file_ending is '{file_ending}': convert the files to it or correct file_ending")
    return EvaluationError(f"the {role} folder {folder} is empty; point it at the folder holding the "
                           f"'*{file_ending}' {role}")


def _with_other_ending(cases: list[str], folder: Path, file_ending: str) -> str:
    """``cases``, each with a note when ``folder`` holds it in another format."""
    others = _other_files(folder, file_ending)
    noted = []
    for case in cases:
        found = [name for name in others if name.startswith(case + ".")]
        noted.append(f"{case} ({found[0]} is there, not in {file_ending})" if found else case)
    return _listed(noted)


def _pair_cases(reference_dir: Path, prediction_dir: Path, file_ending: str) -> dict[str, tuple[Path, Path]]:
    references = _case_files(reference_dir, file_ending)
    predictions = _case_files(prediction_dir, file_ending)
    if not references:
        raise _nothing_found(reference_dir, "references", file_ending)
    if not predictions:
        raise _nothing_found(prediction_dir, "predictions", file_ending)
    no_reference = sorted(set(predictions) - set(references))
    if no_reference:
        raise EvaluationError(
            f"{len(no_reference)} prediction(s) in {prediction_dir} have no reference in {reference_dir}: "
            f"{_with_other_ending(no_reference, reference_dir, file_ending)}; add the references or remove those "
            f"predictions")
    no_prediction = sorted(set(references) - set(predictions))
    if no_prediction:
        raise EvaluationError(
            f"{len(no_prediction)} reference(s) in {reference_dir} have no prediction in {prediction_dir}: "
            f"{_with_other_ending(no_prediction, prediction_dir, file_ending)}; predict those cases or remove the "
            f"references (samunet_evaluate --chill evaluates only the predicted cases)")
    return {case: (references[case], predictions[case]) for case in references}


def _label_values(labels: dict) -> tuple[set[int], int | None]:
    """All values dataset.json's ``labels`` declare, and the ignore label's value (or None)."""
    values = set()
    for name, value in labels.items():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, bool) or not isinstance(item, int):
                raise EvaluationError(f"dataset.json's label {name!r} has the value {value!r}; labels are integers "
                                      f"(or lists of integers for regions), as nnU-Net's dataset.json requires")
            values.add(item)
    try:
        return values, ignore_label(labels)
    except ValueError as error:
        raise EvaluationError(f"dataset.json: {error}, as nnU-Net requires") from error


def _geometry(shape: tuple[int, ...], properties: dict) -> dict[str, tuple]:
    """The grid of a file as its reader describes it (SimpleITK: in its own x, y, z order)."""
    sitk_stuff = properties.get("sitk_stuff")
    if sitk_stuff:
        return {"size": tuple(reversed(shape)), "spacing": tuple(sitk_stuff["spacing"]),
                "origin": tuple(sitk_stuff["origin"]), "direction": tuple(sitk_stuff["direction"])}
    geometry = {"size": tuple(shape), "spacing": tuple(float(s) for s in properties["spacing"])}
    nibabel_stuff = properties.get("nibabel_stuff")
    if nibabel_stuff:
        affine = np.asarray(nibabel_stuff["original_affine"], dtype=float)
        geometry["origin"] = tuple(affine[:3, 3])
        geometry["direction"] = tuple((affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)).ravel())
    return geometry


def _shown(field: str, values: tuple | None) -> tuple | None:
    if values is None:
        return None
    return tuple(int(v) for v in values) if field == "size" else tuple(round(float(v), 6) for v in values)


def _geometry_difference(reference: dict[str, tuple], prediction: dict[str, tuple]) -> str | None:
    """Each differing field with both values (``spacing ((a) vs (b))``), or None when the grids match."""
    differing = []
    for field, expected in reference.items():
        found = prediction.get(field)
        same = found is not None and len(found) == len(expected) and (
            tuple(found) == tuple(expected) if field == "size"
            else bool(np.allclose(found, expected, atol=GEOMETRY_TOLERANCE)))
        if not same:
            differing.append(f"{field} ({_shown(field, found)} vs {_shown(field, expected)})")
    return " and ".join(differing) or None


class LabelMap(NamedTuple):
    """A label file as read: integer array without the channel axis, the reader's properties, the values present."""
    array: np.ndarray
    properties: dict
    values: set[int]


def _read_label_map(path: Path, reader_class, problems: list[tuple[str, str]]) -> LabelMap | None:
    """The label file read with ``reader_class``, or None after adding its problems to ``problems``."""
    import pandas as pd
    try:
        if path.stat().st_size == 0:
            problems.append(("unreadable", f"{path} is empty (0 bytes)"))
            return None
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            array, properties = reader_class().read_seg(str(path))  # nnunetv2's readers print on errors
    except Exception as error:  # any failure of a reader means the file cannot be used
        line = next((text for text in reversed(str(error).splitlines()) if text.strip()), "")
        problems.append(("unreadable", f"{path} ({reader_class.__name__}: {type(error).__name__}"
                                       f"{': ' + line.strip()[:160] if line else ''})"))
        return None
    if array.shape[0] != 1:
        problems.append(("channels", f"{path} holds {array.shape[0]} channels"))
        return None
    values = pd.unique(array.ravel())
    finite = np.isfinite(values)
    if not finite.all():
        count = array.size - int(np.count_nonzero(np.isfinite(array)))
        problems.append(("non_finite", f"{path} has {count} of {array.size}"))
        return None
    fractional = values[values != np.round(values)]
    if fractional.size:
        problems.append(("not_integer", f"{path} has {', '.join(str(round(float(v), 4)) for v in fractional[:5])}"))
        return None
    return LabelMap(array[0].astype(np.int32), properties, {int(v) for v in values})


def _evaluate_pair(case: str, reference_file: Path, prediction_file: Path, labels: dict, tolerance_mm: float,
                   reader_class, nsd: str = DEFAULT_NSD, hd95: str = DEFAULT_HD95) -> dict | list[tuple[str, str]]:
    """Metrics of one case, or the list of its problems (kind, detail)."""
    problems: list[tuple[str, str]] = []
    reference = _read_label_map(reference_file, reader_class, problems)
    prediction = _read_label_map(prediction_file, reader_class, problems)
    declared, ignored = _label_values(labels)
    for path, label_map in ((reference_file, reference), (prediction_file, prediction)):
        if label_map is not None and label_map.values - declared:
            problems.append(("undeclared", f"{path} has {sorted(label_map.values - declared)} (declared: "
                                           f"{sorted(declared)})"))
    if prediction is not None and ignored is not None and ignored in prediction.values:
        problems.append(("ignore_in_prediction", f"{prediction_file} holds {ignored}"))
    if reference is not None and prediction is not None:
        difference = _geometry_difference(_geometry(reference.array.shape, reference.properties),
                                          _geometry(prediction.array.shape, prediction.properties))
        if difference:
            problems.append(("geometry", f"case {case}: the prediction {prediction_file} differs from the "
                                         f"reference {reference_file} in {difference}"))
    if problems:
        return problems
    spacing = tuple(float(s) for s in reference.properties["spacing"])
    return evaluate_case(reference.array, prediction.array, spacing, labels, tolerance_mm, nsd=nsd, hd95=hd95)


def _raise_problems(prediction_dir: Path, reference_dir: Path, problems: list[tuple[str, str]]) -> None:
    raise EvaluationError(problems_in_one_line(f"evaluating {prediction_dir} against {reference_dir}", problems,
                                               PROBLEM_KINDS, max_listed=MAX_LISTED, nothing_written=True))


def json_safe(value):
    """``value`` with NaN replaced by None (``null`` in JSON), through dicts, lists and tuples."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


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


def write_summary(output_json: str | os.PathLike, summary: dict) -> Path:
    """The summary as JSON (NaN as null) and its markdown table (``.md`` beside it, with the metric
    conventions under it), each written atomically."""
    output_json = Path(output_json)
    conventions = summary.get("metric_conventions")
    markdown = format_table(summary)
    if conventions:
        markdown += f"\nNSD: {conventions['nsd']} ({conventions['nsd_definition']}). HD95: {conventions['hd95']} " \
                    f"({conventions['hd95_definition']}).\n"
    output_json.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(output_json, json_safe(summary))
    write_text_atomically(output_json.with_suffix(".md"), markdown)
    logger.info("wrote %s and %s", output_json, output_json.with_suffix(".md"))
    return output_json


def evaluate_folders(
    reference_dir: str | os.PathLike,
    prediction_dir: str | os.PathLike,
    dataset_json: dict,
    tolerance_mm: float = 2.0,
    output_json: str | os.PathLike | None = None,
    num_processes: int = 1,
    *,
    nsd: str = DEFAULT_NSD,
    hd95: str = DEFAULT_HD95,
) -> dict:
    """Evaluate every prediction against its reference; write JSON + markdown if ``output_json`` is given.

    ``nsd`` / ``hd95``: the conventions of :mod:`samunet.evaluation.metrics`. Raises
    :class:`EvaluationError` (before writing anything) for the problems listed in this module's
    docstring, all cases' problems in one message.
    """
    from samunet.input_checks import reader_class_for
    check_conventions(nsd, hd95)
    reference_dir, prediction_dir = Path(reference_dir), Path(prediction_dir)
    missing_keys = [key for key in ("labels", "file_ending") if key not in dataset_json]
    if missing_keys:
        raise EvaluationError(f"dataset.json lacks {missing_keys}; add them as nnU-Net's dataset.json format requires")
    labels = dataset_json["labels"]
    _, ignored = _label_values(labels)
    pairs = _pair_cases(reference_dir, prediction_dir, dataset_json["file_ending"])
    reader_class = reader_class_for(dataset_json, str(next(iter(pairs.values()))[0]))
    arguments = [(case, ref, pred, labels, tolerance_mm, reader_class, nsd, hd95)
                 for case, (ref, pred) in pairs.items()]
    logger.info("evaluating %d case(s) from %s against %s", len(arguments), prediction_dir, reference_dir)
    if num_processes > 1 and len(arguments) > 1:
        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(arguments))) as pool:
            results = pool.starmap(_evaluate_pair, arguments)
    else:
        results = [_evaluate_pair(*args) for args in arguments]
    problems = [problem for result in results if isinstance(result, list) for problem in result]
    if problems:
        _raise_problems(prediction_dir, reference_dir, problems)
    per_case = dict(zip(pairs, results))
    summary = {
        "reference_dir": str(reference_dir),
        "prediction_dir": str(prediction_dir),
        "tolerance_mm": tolerance_mm,
        "metric_conventions": metric_conventions(nsd, hd95),
        "empty_mask_convention": EMPTY_MASK_CONVENTION,
        "labels": labels,
        "ignore_label": ignored,
        "per_case": per_case,
        **summarise(per_case),
    }
    if output_json is not None:
        write_summary(output_json, summary)
    return summary
