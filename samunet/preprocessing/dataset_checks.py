"""Checks of a data set in nnU-Net's raw layout, run before anything is written.

nnunetv2's own ``verify_dataset_integrity`` is optional (``--verify_dataset_integrity``) and
reads every voxel; these checks are always on and read image headers only (SimpleITK's
``ReadImageInformation``), so a bad dataset.json or a label that does not fit its image is
reported, with every problem listed, before fingerprinting or planning starts.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from samunet.errors import DatasetError, UnknownNameError
from samunet.image_io import geometry_difference, read_header

REQUIRED_FIELDS = ("labels", "numTraining", "file_ending")
GEOMETRY_TOLERANCE = 1e-4
MAX_LISTED_PROBLEMS = 20


def resolve_dataset_name(dataset: str | int) -> str:
    """``218`` or ``Dataset218_AMOS2022_postChallenge_task1`` -> the dataset's folder name."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    text = str(dataset)
    if not text.startswith("Dataset") and not text.isdigit():
        raise UnknownNameError(f"dataset {text!r} is neither an ID (e.g. 218) nor a name like Dataset218_AMOS")
    try:
        return maybe_convert_to_dataset_name(int(text) if text.isdigit() else text)
    except RuntimeError:
        searched = ", ".join(f"{name}={os.environ.get(name)}" for name in
                             ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"))
        raise UnknownNameError(f"no dataset {text} found (searched {searched}); a raw dataset lives in "
                               f"nnUNet_raw/DatasetXXX_Name with XXX its three-digit ID") from None


def _read_dataset_json(folder: Path) -> dict:
    path = folder / "dataset.json"
    if not path.is_file():
        raise DatasetError(f"{path} is missing; every nnU-Net raw dataset needs a dataset.json")
    try:
        dataset_json = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path} is not valid JSON: {error}") from error
    missing = [f for f in REQUIRED_FIELDS if f not in dataset_json]
    if "channel_names" not in dataset_json and "modality" not in dataset_json:
        missing.append("channel_names")
    if missing:
        raise DatasetError(f"{path} lacks the required field(s) {missing}; see nnU-Net's dataset_format.md "
                           f"(channel_names, labels with background 0, numTraining, file_ending)")
    labels = dataset_json["labels"]
    if not isinstance(labels, dict) or labels.get("background") != 0:
        raise DatasetError(f"{path}: 'labels' must map names to values and include \"background\": 0, "
                           f"got {labels!r}")
    return dataset_json


def validate_raw_dataset(folder: str | os.PathLike) -> dict:
    """Validate ``folder`` (``nnUNet_raw/DatasetXXX_Name``); returns its dataset.json.

    Raises :class:`DatasetError` listing every problem found: missing fields, a training case
    without a label or a channel, a count that differs from ``numTraining``, and images whose
    size, spacing, origin or direction differ from their label's.
    """
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    folder = Path(folder)
    dataset_json = _read_dataset_json(folder)
    num_channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
    try:
        cases = get_filenames_of_train_images_and_targets(str(folder), dataset_json)
    except (FileNotFoundError, RuntimeError, AssertionError) as error:
        raise DatasetError(f"cannot list the training cases of {folder}: {error}") from error
    problems = []
    if len(cases) != dataset_json["numTraining"]:
        problems.append(f"dataset.json says numTraining={dataset_json['numTraining']} but "
                        f"{folder / 'imagesTr'} holds {len(cases)} cases")
    for case, files in sorted(cases.items()):
        if len(files["images"]) != num_channels:
            problems.append(f"case {case}: {len(files['images'])} image channels, dataset.json names {num_channels}")
            continue
        missing = [f for f in [*files["images"], files["label"]] if not os.path.isfile(f)]
        if missing:
            problems.append(f"case {case}: missing file(s) {missing}")
            continue
        label_geometry = read_header(files["label"])
        for image in files["images"]:
            image_geometry = read_header(image)
            if geometry_difference(image_geometry, label_geometry, atol=GEOMETRY_TOLERANCE) is not None:
                problems.append(f"case {case}: image {os.path.basename(image)} (size {image_geometry[0]}, spacing "
                                f"{np.round(image_geometry[1], 4).tolist()}, origin "
                                f"{np.round(image_geometry[2], 4).tolist()}) does not match its label "
                                f"(size {label_geometry[0]}, spacing {np.round(label_geometry[1], 4).tolist()}, "
                                f"origin {np.round(label_geometry[2], 4).tolist()}); resample the label onto the image")
    if problems:
        listed = "\n  ".join(problems[:MAX_LISTED_PROBLEMS])
        more = f"\n  ... and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS else ""
        raise DatasetError(f"dataset {folder} has {len(problems)} problem(s):\n  {listed}{more}")
    return dataset_json
