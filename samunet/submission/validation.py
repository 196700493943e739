"""Check a prediction folder against a converted benchmark's test images before it is submitted.

The expected cases are the images in ``<dataset>/imagesTs`` (channel ``_0000``). Every problem is
collected and reported together, in one line grouped by kind (each kind with its fix): predictions
missing or without a test image, names the challenge cannot take, files that cannot be read (or are
cut off), a grid (size, spacing, origin, direction) that differs from the test image, label values
that are not whole numbers or not the challenge's, and a dataset.json whose label convention is not
the challenge's.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from samunet.errors import problems_in_one_line
from samunet.image_io import GEOMETRY_FIELDS, geometry_difference, nifti_truncation, read_header
from samunet.submission import SubmissionError
from samunet.submission.challenges import Challenge

logger = logging.getLogger(__name__)

GEOMETRY_TOLERANCE = 1e-3
MAX_LISTED_PROBLEMS = 10
MAX_LISTED_VALUES = 6
CHANNEL_SUFFIX = "_0000"


# kind -> (what is wrong, how to fix it), in the order the message lists them
PROBLEM_KINDS = {
    "convention": ("a label convention that is not the challenge's",
                   "convert the benchmark with samunet_convert, which writes the challenge's labels"),
    "missing": ("test images without a prediction", "predict every test image (samunet_predict -i imagesTs)"),
    "extra": ("predictions without a test image", "move them out of the prediction folder"),
    "name": ("cases without a submission name",
             "predict the test images that samunet_convert wrote, whose names the challenge takes"),
    "unreadable": ("predictions that cannot be read", "predict these cases again (an empty or cut-off file is usually "
                                                      "an interrupted write or copy)"),
    "geometry": ("predictions on another grid than their test image",
                 "predict with samunet_predict, which exports in the test image's geometry"),
    "values": ("label values the challenge does not take",
               "predict with samunet_predict, which writes whole-number labels of the data set (a label map is "
               "never linearly resampled or saved as float fractions)"),
}


def _short_error(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    line = next((line for line in reversed(lines) if "ERROR" in line), lines[-1] if lines else "")
    return f"{type(error).__name__}: {line.split('ERROR: ', 1)[-1]}" if line else type(error).__name__


def _geometry_problem(prediction: Path, image: Path) -> tuple[str, str] | None:
    """(kind, detail) when the prediction's grid differs from its test image's or a header cannot be read."""
    try:
        predicted = read_header(prediction)
    except RuntimeError as error:
        return "unreadable", f"{prediction} ({_short_error(error)})"
    try:
        expected = read_header(image)
    except RuntimeError as error:
        return "unreadable", f"test image {image} ({_short_error(error)})"
    field = geometry_difference(predicted, expected, atol=GEOMETRY_TOLERANCE, rtol=GEOMETRY_TOLERANCE)
    if field is None:
        return None
    index = GEOMETRY_FIELDS.index(field)
    return "geometry", (f"{prediction.name}: {field} {np.round(predicted[index], 4).tolist()} differs from its test "
                        f"image's {np.round(expected[index], 4).tolist()}")


def _value_problem(prediction: Path, challenge: Challenge) -> tuple[str, str] | None:
    """(kind, detail) when a prediction holds values that are not whole numbers or not the challenge's labels."""
    lacking = nifti_truncation(prediction) if prediction.name.endswith((".nii", ".nii.gz")) else None
    if lacking:  # SimpleITK reads a cut-off NIfTI without complaint
        return "unreadable", f"{prediction} is truncated ({lacking} missing)"
    try:
        values = np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(prediction))))
    except RuntimeError as error:
        return "unreadable", f"{prediction} ({_short_error(error)})"
    fractional = values[~np.isfinite(values) | (values != np.round(values))]
    if fractional.size:
        shown = ", ".join(str(round(float(v), 4)) for v in fractional[:MAX_LISTED_VALUES])
        return "values", f"{prediction.name}: label values {shown} are not whole numbers"
    unexpected = sorted({int(v) for v in values} - challenge.label_values)
    if unexpected:
        return "values", (f"{prediction.name}: label values {unexpected} are not in the challenge's "
                          f"{sorted(challenge.label_values)}")
    return None


def _raise_problems(subject: str, problems: list[tuple[str, str]]) -> None:
    """One :class:`SubmissionError` in one line: the problems grouped by kind, each kind with its fix."""
    if problems:
        raise SubmissionError(problems_in_one_line(subject, problems, PROBLEM_KINDS, max_listed=MAX_LISTED_PROBLEMS,
                                                   nothing_written=True))


def _cases(folder: Path, suffix: str) -> dict[str, Path]:
    return {path.name[:-len(suffix)]: path for path in sorted(folder.iterdir())
            if path.is_file() and path.name.endswith(suffix)}


def read_dataset(dataset_folder: Path) -> tuple[dict, dict[str, Path]]:
    """(dataset.json, {case: test image}) of a converted dataset."""
    dataset_json_path = dataset_folder / "dataset.json"
    if not dataset_json_path.is_file():
        raise SubmissionError(f"{dataset_json_path} is missing; convert the benchmark with samunet_convert first")
    try:
        dataset_json = json.loads(dataset_json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise SubmissionError(f"{dataset_json_path} is not valid JSON ({error}); re-run samunet_convert") from error
    if "labels" not in dataset_json:
        raise SubmissionError(f"{dataset_json_path} has no 'labels'; re-run samunet_convert")
    images_folder = dataset_folder / "imagesTs"
    ending = dataset_json.get("file_ending", ".nii.gz")
    images = _cases(images_folder, CHANNEL_SUFFIX + ending) if images_folder.is_dir() else {}
    if not images:
        raise SubmissionError(f"no test images (*{CHANNEL_SUFFIX}{ending}) in {images_folder}; the expected cases "
                              f"are taken from there")
    return dataset_json, images


def validate_predictions(challenge: Challenge, prediction_dir: Path, dataset_folder: Path) -> dict[str, Path]:
    """{submitted file name: prediction file}, or :class:`SubmissionError` listing every problem."""
    if not prediction_dir.is_dir():
        raise SubmissionError(f"prediction folder {prediction_dir} does not exist")
    dataset_json, images = read_dataset(dataset_folder)
    predictions = _cases(prediction_dir, dataset_json.get("file_ending", ".nii.gz"))
    problems = []
    convention = challenge.labels_problem(dataset_json)
    if convention:
        problems.append(("convention", f"{dataset_folder / 'dataset.json'}: {convention}"))
    missing = sorted(set(images) - set(predictions))
    if missing:
        problems.append(("missing", ", ".join(missing)))
    extra = sorted(set(predictions) - set(images))
    if extra:
        problems.append(("extra", f"{', '.join(extra)} (no such image in {dataset_folder / 'imagesTs'})"))
    submitted = {}
    for case in sorted(set(images) & set(predictions)):
        try:
            name = challenge.name_for(case, dataset_json)
        except ValueError as reason:
            problems.append(("name", f"{case}: cannot be named for {challenge.name}: {reason}"))
            continue
        if name in submitted:
            problems.append(("name", f"{case} would be submitted as {name}, which another case already takes"))
            continue
        problem = _geometry_problem(predictions[case], images[case]) or _value_problem(predictions[case], challenge)
        if problem:
            problems.append(problem)
            continue
        submitted[name] = predictions[case]
    _raise_problems(f"the {challenge.name} prediction folder {prediction_dir}", problems)
    if challenge.official_count is not None and len(submitted) != challenge.official_count:
        logger.warning("the official %s test set has %d cases; this submission holds %d", challenge.name,
                       challenge.official_count, len(submitted))
    return submitted
