"""AMOS22 task 1 (abdominal CT, 15 organs) -> nnU-Net raw Dataset218, through nnunetv2's own converter.

nnunetv2's ``convert_amos_task1`` works in 2.8.1 and is used as it is: it takes the CT cases
(numbers up to 410 in training, 409 in validation, 500 in test; higher numbers are MRI), adds the
validation cases to the training set (so 5-fold CV covers them), and writes a dataset.json that
selects ``NibabelIOWithReorient`` (images are reoriented to RAS for training and predictions are
written back in each image's original orientation). samunet adds what it lacks: every file it will
copy is checked first (present, 3D, label on its image's grid, label values defined by the
source dataset.json), and it writes into a staging folder that is moved into place at the end.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from samunet.preprocessing.converters import (ConversionError, geometry_problem, label_values, raise_if_problems,
                                              staged_dataset, target_folder)

logger = logging.getLogger(__name__)

TASK_NAME = "AMOS2022_postChallenge_task1"
DEFAULT_DATASET_ID = 218
FILE_ENDING = ".nii.gz"
# The CT case numbers nnunetv2's converter keeps, per part of the source dataset.json (higher = MRI).
CT_LIMITS = {"training": ("imagesTr", "labelsTr", 410), "validation": ("imagesVa", "labelsVa", 409),
             "test": ("imagesTs", None, 500)}


def _read_source_json(source: Path) -> dict:
    path = source / "dataset.json"
    if not path.is_file():
        raise ConversionError(f"{path} is missing; pass the extracted AMOS22 folder (amos22/ from "
                              f"https://zenodo.org/record/7262581) that holds dataset.json, imagesTr, labelsTr, ...")
    try:
        dataset_json = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConversionError(f"{path} is not valid JSON ({error}); re-extract the AMOS22 archive") from error
    missing = [key for key in ("labels", *CT_LIMITS) if key not in dataset_json]
    if missing:
        raise ConversionError(f"{path} lacks {missing}; it is not AMOS22's dataset.json")
    return dataset_json


def ct_cases(dataset_json: dict, part: str) -> list[str]:
    """Case names (``amos_0001``) of one part of AMOS's dataset.json that are CT scans."""
    limit = CT_LIMITS[part][2]
    cases = []
    for entry in dataset_json[part]:
        image = entry.get("image", "") if isinstance(entry, dict) else ""
        name = image.split("/")[-1][:-len(FILE_ENDING)]
        if not (image.endswith(FILE_ENDING) and name.split("_")[-1].isdigit()):
            raise ConversionError(f"dataset.json's '{part}' entry {entry!r} is not like "
                                  f"{{'image': './imagesTr/amos_0001.nii.gz'}}; is this AMOS22's dataset.json?")
        if int(name.split("_")[-1]) <= limit:
            cases.append(name)
    return cases


def check_source(source: Path) -> tuple[dict, int]:
    """Check every CT file nnunetv2's converter will copy; returns (source dataset.json, training count)."""
    dataset_json = _read_source_json(source)
    allowed = {int(value) for value in dataset_json["labels"]}
    problems: list[str] = []
    num_training = 0
    for part, (images, labels, _) in CT_LIMITS.items():
        for case in ct_cases(dataset_json, part):
            image = source / images / f"{case}{FILE_ENDING}"
            label = source / labels / f"{case}{FILE_ENDING}" if labels else None
            missing = [str(p) for p in (image, label) if p is not None and not p.is_file()]
            if missing:
                problems.append(f"{part} case {case}: missing {', '.join(missing)}")
                continue
            if label is None:
                continue
            num_training += 1
            mismatch = geometry_problem(image, label)
            if mismatch:
                problems.append(mismatch)
                continue
            unexpected = sorted(label_values(label) - allowed)
            if unexpected:
                problems.append(f"{label} holds label values {unexpected}; dataset.json defines {sorted(allowed)}")
    if num_training == 0:
        problems.append("no CT training or validation cases listed in dataset.json")
    raise_if_problems(problems, source, "AMOS22")
    return dataset_json, num_training


def convert_amos(source: str | Path, dataset_id: int = DEFAULT_DATASET_ID, overwrite: bool = False) -> Path:
    """Check the AMOS22 release in ``source``, then convert it with nnunetv2; returns the dataset folder."""
    from nnunetv2.dataset_conversion.Dataset218_Amos2022_task1 import convert_amos_task1
    source = Path(source)
    target = target_folder(dataset_id, TASK_NAME, overwrite)
    _, num_training = check_source(source)
    logger.info("converting %d CT training cases of %s with nnunetv2's AMOS converter", num_training, source)
    with staged_dataset(target, overwrite) as staging:
        work_root = staging / ".nnunetv2"
        work_root.mkdir()
        previous = os.environ.get("nnUNet_raw")
        os.environ["nnUNet_raw"] = str(work_root)  # nnunetv2 writes to $nnUNet_raw/<target name>
        try:
            convert_amos_task1(str(source), dataset_id)
        finally:
            if previous is None:
                os.environ.pop("nnUNet_raw", None)
            else:
                os.environ["nnUNet_raw"] = previous
        for entry in (work_root / target.name).iterdir():
            os.replace(entry, staging / entry.name)
        shutil.rmtree(work_root)
    return target
