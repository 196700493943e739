"""Check a prediction folder against a converted benchmark's test images before it is submitted.

The expected cases are the images in ``<dataset>/imagesTs`` (channel ``_0000``). Every problem is
collected and reported together: predictions missing or without a test image, names the challenge
cannot take, a grid (size, spacing, origin, direction) that differs from the test image, label
values outside the challenge's, and a dataset.json whose label convention is not the challenge's.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from samunet.image_io import GEOMETRY_FIELDS, geometry_difference, read_header
from samunet.submission import SubmissionError
from samunet.submission.challenges import Challenge

logger = logging.getLogger(__name__)

GEOMETRY_TOLERANCE = 1e-3
MAX_LISTED_PROBLEMS = 30
CHANNEL_SUFFIX = "_0000"


def _geometry_problem(prediction: Path, image: Path) -> str | None:
    predicted, expected = read_header(prediction), read_header(image)
    field = geometry_difference(predicted, expected, atol=GEOMETRY_TOLERANCE, rtol=GEOMETRY_TOLERANCE)
    if field is None:
        return None
    if field == "size":
        return f"{prediction.name}: size {predicted[0]} differs from its test image's {expected[0]}"
    index = GEOMETRY_FIELDS.index(field)
    return (f"{prediction.name}: {field} {np.round(predicted[index], 4).tolist()} differs from its test image's "
            f"{np.round(expected[index], 4).tolist()} (predict with samunet_predict, which exports in the original "
            f"geometry)")


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
        problems.append(f"{dataset_folder / 'dataset.json'}: {convention}")
    missing = sorted(set(images) - set(predictions))
    if missing:
        problems.append(f"{len(missing)} test image(s) have no prediction: {', '.join(missing)}")
    extra = sorted(set(predictions) - set(images))
    if extra:
        problems.append(f"{len(extra)} prediction(s) have no test image in {dataset_folder / 'imagesTs'}: "
                        f"{', '.join(extra)}")
    submitted = {}
    for case in sorted(set(images) & set(predictions)):
        try:
            name = challenge.name_for(case, dataset_json)
        except ValueError as reason:
            problems.append(f"{case}: cannot be named for {challenge.name}: {reason}")
            continue
        if name in submitted:
            problems.append(f"{case}: would be submitted as {name}, which another case already takes")
            continue
        mismatch = _geometry_problem(predictions[case], images[case])
        if mismatch:
            problems.append(mismatch)
            continue
        values = {int(v) for v in np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(predictions[case]))))}
        unexpected = sorted(values - challenge.label_values)
        if unexpected:
            problems.append(f"{predictions[case].name}: label values {unexpected} are not in the challenge's "
                            f"{sorted(challenge.label_values)}")
            continue
        submitted[name] = predictions[case]
    if problems:
        listed = "\n  ".join(problems[:MAX_LISTED_PROBLEMS])
        more = f"\n  ... and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS else ""
        raise SubmissionError(f"{len(problems)} problem(s) with the {challenge.name} predictions in {prediction_dir}; "
                              f"nothing was written:\n  {listed}{more}")
    if challenge.official_count is not None and len(submitted) != challenge.official_count:
        logger.warning("the official %s test set has %d cases; this submission holds %d", challenge.name,
                       challenge.official_count, len(submitted))
    return submitted
