"""Checks of a data set in nnU-Net's raw layout, run before anything is written.

nnunetv2's own ``verify_dataset_integrity`` is optional (``--verify_dataset_integrity``), prints
its findings and stops at the first failing assertion. These checks are always on and list every
problem in one :class:`~samunet.errors.InputFilesError` before fingerprinting or planning starts:
dataset.json (required fields, the label declaration: integers, consecutive, regions, ignore),
the folder layout (names, endings, pairs of images and labels, ``numTraining``) and, through
:mod:`samunet.input_checks`, the contents of every file (read once, in a process pool).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from samunet.errors import DatasetError, UnknownNameError
from samunet.input_checks import (CHANNEL_SUFFIX, Problem, channel_names_of, channel_suffix_problems, display_name,
                                  files_with_ending, inspect_cases, raise_if_problems, reader_class_for)

REQUIRED_FIELDS = ("labels", "numTraining", "file_ending")


def resolve_dataset_name(dataset: str | int) -> str:
    """``218`` or ``Dataset218_AMOS2022_postChallenge_task1`` -> the dataset's folder name."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    text = str(dataset)
    if not text.startswith("Dataset") and not text.isdigit():
        raise UnknownNameError(f"dataset {text!r} is neither an ID (e.g. 218) nor a name like Dataset218_AMOS")
    if text.isdigit():
        several = _folders_of_dataset_id(int(text))
        if len(several) > 1:
            found = "; ".join(f"{name} (in {', '.join(places)})" for name, places in several.items())
            raise UnknownNameError(f"dataset ID {text} names {len(several)} folders: {found}; an ID must name one "
                                   f"data set: rename or move the others (or give the full name, e.g. "
                                   f"{next(iter(several))})")
    try:
        return maybe_convert_to_dataset_name(int(text) if text.isdigit() else text)
    except RuntimeError:
        searched = ", ".join(f"{name}={os.environ.get(name)}" for name in
                             ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"))
        raise UnknownNameError(f"no dataset {text} found (searched {searched}); a raw dataset lives in "
                               f"nnUNet_raw/DatasetXXX_Name with XXX its three-digit ID") from None


def _folders_of_dataset_id(dataset_id: int) -> dict[str, list[str]]:
    """The folder names nnunetv2 finds for ``dataset_id`` (``find_candidate_datasets``), each with the
    variables (nnUNet_raw, nnUNet_preprocessed, nnUNet_results) it lies under."""
    from nnunetv2.utilities.dataset_name_id_conversion import find_candidate_datasets
    places = {}
    for name in (str(candidate) for candidate in find_candidate_datasets(dataset_id)):
        places[name] = [variable for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
                        if os.environ.get(variable) and (Path(os.environ[variable]) / name).is_dir()]
    return places


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
    check_dataset_json_fields(dataset_json, path)
    return dataset_json


def dataset_json_field_problems(dataset_json: dict, *, training: bool = True) -> list[str]:
    """What is wrong with the form of dataset.json's fields, before any of them is used: ``file_ending`` a
    string with its leading dot (``.nii.gz``), ``channel_names`` (or ``modality``) a non-empty mapping of
    the channel numbers 0..C-1 to names, ``labels`` a mapping with ``"background": 0`` and, for a raw
    training data set (``training``), ``numTraining`` a non-negative integer. Fields that are absent are
    not reported here (the caller says which it requires)."""
    problems = []
    if not isinstance(dataset_json, dict):
        return [f"it holds a {type(dataset_json).__name__}, not an object of fields"]
    ending = dataset_json.get("file_ending")
    if "file_ending" in dataset_json:
        if not isinstance(ending, str) or not ending.strip(".").strip():
            problems.append(f"file_ending is {ending!r}; write the image files' ending as a string with its dot, "
                            f"e.g. \".nii.gz\"")
        elif not ending.startswith("."):
            problems.append(f"file_ending is {ending!r} without its leading dot; write \".{ending}\"")
    field = "channel_names" if "channel_names" in dataset_json else "modality" if "modality" in dataset_json else None
    if field is not None:
        channels = dataset_json[field]
        if not isinstance(channels, dict) or not channels:
            problems.append(f"{field} is {channels!r}; it must name every image channel by its number, e.g. "
                            f"{{\"0\": \"CT\"}} for one channel (images named CASE_0000<file_ending>)")
        elif sorted(str(key) for key in channels) != sorted(str(n) for n in range(len(channels))):
            problems.append(f"{field} has the keys {sorted(channels)}; they must be the channel numbers "
                            f"{[str(n) for n in range(len(channels))]} (the _0000, _0001, ... of the image names)")
    if "labels" in dataset_json:
        labels = dataset_json["labels"]
        if not isinstance(labels, dict) or labels.get("background") != 0:
            problems.append(f"labels must map names to values and include \"background\": 0, got {labels!r}")
    if training and "numTraining" in dataset_json:
        count = dataset_json["numTraining"]
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            problems.append(f"numTraining is {count!r} ({type(count).__name__}); it must be the number of training "
                            f"cases as a JSON integer, e.g. 4 (not \"4\")")
    return problems


def check_dataset_json_fields(dataset_json: dict, path: str | os.PathLike, *, training: bool = True) -> None:
    """Raise :class:`DatasetError` naming ``path`` and every problem of :func:`dataset_json_field_problems`;
    planning, prediction and evaluation call it on each dataset.json they read, before using its fields
    (``training=False`` for a model's or an evaluation's dataset.json, where ``numTraining`` is not used)."""
    problems = dataset_json_field_problems(dataset_json, training=training)
    if problems:
        raise DatasetError(f"{path}: {'; '.join(problems)} (see nnU-Net's dataset_format.md)")


def label_declaration_problems(dataset_json: dict) -> list[Problem]:
    """What is wrong with dataset.json's ``labels`` (and ``regions_class_order``), as nnunetv2's
    ``LabelManager`` and ``verify_dataset_integrity`` need them: integer values (a non-empty list of
    them for a region), none negative, the labels consecutive 0..N, ``ignore`` an integer N+1,
    and for regions a ``regions_class_order`` with one declared label per region."""
    labels = dataset_json["labels"]
    problems = []
    for name, value in labels.items():
        if name == "ignore" or not isinstance(value, (list, tuple)):
            if not _is_integer(value):
                problems.append(Problem("dataset_json", f"label {name!r} is {value!r}, not an integer"))
            elif value < 0:
                problems.append(Problem("dataset_json", f"label {name!r} is {value}; labels are never negative"))
        elif not value or not all(_is_integer(v) for v in value):
            problems.append(Problem("dataset_json", f"region {name!r} is {value!r}, not a non-empty list of "
                                                    f"integer labels"))
        elif any(v < 0 for v in value):
            problems.append(Problem("dataset_json", f"region {name!r} is {value}; labels are never negative"))
    if problems:
        return problems
    values = sorted({int(v) for name, value in labels.items() if name != "ignore"
                     for v in (value if isinstance(value, (list, tuple)) else [value])})
    if values != list(range(len(values))):
        problems.append(Problem("dataset_json", f"labels are {values}, not the consecutive 0..{len(values) - 1}; "
                                                f"renumber them (and the label files)"))
    if "ignore" in labels and labels["ignore"] != len(values):
        problems.append(Problem("dataset_json", f"the ignore label is {labels['ignore']}; it must be the highest, "
                                                f"{len(values)}"))
    regions = [name for name, value in labels.items() if isinstance(value, (list, tuple)) and len(value) > 1]
    if regions:
        order = dataset_json.get("regions_class_order")
        counted = [name for name, value in labels.items() if name != "ignore" and
                   set(value if isinstance(value, (list, tuple)) else [value]) != {0}]
        if order is None:
            problems.append(Problem("dataset_json", f"labels {regions} are regions (lists) but there is no "
                                                    f"regions_class_order; add one label value per region "
                                                    f"({len(counted)}: {counted}), in the order they are painted"))
        elif not isinstance(order, list) or not all(_is_integer(v) for v in order) or len(order) != len(counted):
            problems.append(Problem("dataset_json", f"regions_class_order is {order!r}; it needs one integer label "
                                                    f"per region ({len(counted)}: {counted})"))
        elif any(v not in values or v == 0 for v in order):
            problems.append(Problem("dataset_json", f"regions_class_order {order} holds values that are not "
                                                    f"declared labels 1..{values[-1]}"))
    return problems


def declared_label_values(dataset_json: dict) -> set[int]:
    """The label values a label file may hold: nnunetv2's ``LabelManager.all_labels`` and ``ignore``."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    manager = LabelManager(dataset_json["labels"], regions_class_order=dataset_json.get("regions_class_order"))
    return {int(v) for v in manager.all_labels} | ({int(manager.ignore_label)} if manager.has_ignore_label else set())


def validate_raw_dataset(folder: str | os.PathLike, *, num_processes: int | None = None) -> dict:
    """Validate ``folder`` (``nnUNet_raw/DatasetXXX_Name``); returns its dataset.json.

    Raises :class:`DatasetError` for a missing or unreadable dataset.json or missing required
    fields, and :class:`~samunet.errors.InputFilesError` listing every other problem found: the
    label declaration (:func:`label_declaration_problems`), the files of imagesTr and labelsTr
    (names, endings, duplicates, images without label and labels without image, ``numTraining``)
    and each training case's contents (:func:`samunet.input_checks.inspect_case`), read by
    ``num_processes`` processes (default nnunetv2's ``default_num_processes``).
    """
    from nnunetv2.configuration import default_num_processes
    folder = Path(folder)
    dataset_json = _read_dataset_json(folder)
    ending = dataset_json["file_ending"]
    problems = label_declaration_problems(dataset_json)
    declared = None if problems else declared_label_values(dataset_json)
    cases = _training_cases(folder, dataset_json, problems)
    misnamed = any(problem.kind == "channel_suffix" for problem in problems)  # then the count means nothing
    if len(cases) != dataset_json["numTraining"] and not misnamed:
        problems.append(Problem("num_training", f"dataset.json says numTraining={dataset_json['numTraining']} but "
                                                f"{display_name(folder / 'imagesTr', folder)} holds {len(cases)} "
                                                f"cases"))
    if not cases and not problems:
        problems.append(Problem("no_images", f"{display_name(folder / 'imagesTr', folder)} holds no images named "
                                             f"CASE_0000{ending}"))
    if any(files["images"] for files in cases.values()):
        reader_class = reader_class_for(dataset_json, next(f for f in cases.values() if f["images"])["images"][0])
        tasks = [(case, files["images"], files["label"]) for case, files in sorted(cases.items()) if files["images"]]
        problems += inspect_cases(tasks, reader_class, channel_names_of(dataset_json), declared, folder, ending,
                                  default_num_processes if num_processes is None else num_processes)
    raise_if_problems(f"dataset {folder}", problems)
    return dataset_json


def _is_integer(value) -> bool:
    """An integer label value as JSON gives it: 2, or 2.0 (nnunetv2 takes int() of it); never True or "2"."""
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float) and value.is_integer())


def _training_cases(folder: Path, dataset_json: dict, problems: list[Problem]) -> dict[str, dict]:
    """nnunetv2's listing of the training cases (``get_filenames_of_train_images_and_targets``), each
    ``{"images": [...], "label": path or None}`` (no images when one is missing, no label when it is
    missing), with the problems of names and pairs appended to ``problems``."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    ending = dataset_json["file_ending"]
    if "dataset" in dataset_json:  # dataset.json lists the files itself
        cases = get_filenames_of_train_images_and_targets(str(folder), dataset_json)
        counts = Counter(path for files in cases.values() for path in [*files["images"], files["label"]])
        problems += [Problem("duplicate", f"{display_name(path, folder)} is listed {count} times in dataset.json's "
                                          f"'dataset'") for path, count in counts.items() if count > 1]
    else:
        missing = [name for name in ("imagesTr", "labelsTr") if not (folder / name).is_dir()]
        if missing:
            problems.append(Problem("folder", f"{folder} has no {' and no '.join(missing)}"))
            return {}
        names, found = files_with_ending(folder / "imagesTr", ending, folder)
        suffix_problems, misnamed = channel_suffix_problems(names, ending, folder / "imagesTr", folder)
        label_names, label_found = files_with_ending(folder / "labelsTr", ending, folder)
        problems += found + suffix_problems + label_found
        cases = {case: files for case, files in get_filenames_of_train_images_and_targets(str(folder),
                                                                                          dataset_json).items()
                 if files["images"] and not any(os.path.basename(f) in misnamed for f in files["images"])}
        for name in label_names:
            stem = name[:-len(ending)]
            if stem not in cases:
                suffixed = CHANNEL_SUFFIX.fullmatch(stem)
                hint = (f" (labels carry no channel suffix: name it {suffixed['case']}{ending})"
                        if suffixed and suffixed["case"] in cases else "")
                problems.append(Problem("unpaired", f"labelsTr/{name} has no image imagesTr/{stem}_0000{ending}{hint}"))
    for case, files in cases.items():
        absent = [display_name(path, folder) for path in files["images"] if not os.path.isfile(path)]
        if absent:
            problems.append(Problem("unpaired", f"case {case}: no image {', '.join(absent)}"))
            files["images"] = []  # nothing to inspect
        if not os.path.isfile(files["label"]):
            problems.append(Problem("unpaired", f"case {case}: no label {display_name(files['label'], folder)}"))
            files["label"] = None
    return cases
