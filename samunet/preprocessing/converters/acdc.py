"""ACDC (cine-MRI, 2017) -> nnU-Net raw Dataset027_ACDC, with patient-grouped 5-fold splits.

nnunetv2 2.8.1's own ACDC converter crashes (it calls ``nnUNet_raw.replace`` on a lazy path
object), so this one is samunet's. Source layout (the challenge release)::

    SRC/training/patient001/Info.cfg          ED: 1 / ES: 12 / ...
    SRC/training/patient001/patient001_frame01.nii.gz, patient001_frame01_gt.nii.gz, ...
    SRC/testing/patient101/...                (ground truth optional)

``SRC`` may also be the folder holding ``database/`` (the later re-release). Only the ED and ES
frames named in Info.cfg are converted, one case each, named like the frame file
(``patient001_frame01``); the phase of every case is stored in dataset.json under
``acdc_phases`` for the submission export. Labels: 1 RV, 2 MYO, 3 LV. Both frames of a patient
always fall into the same cross-validation fold.
"""
from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import numpy as np

from samunet.preprocessing.converters import (ConversionError, geometry_problem, label_values, raise_if_problems,
                                              read_header, staged_dataset, target_folder, unreadable, write_splits)

logger = logging.getLogger(__name__)

TASK_NAME = "ACDC"
DEFAULT_DATASET_ID = 27
LABELS = {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
PHASES = ("ED", "ES")
TRAINING_PATIENTS = range(1, 101)
TEST_PATIENTS = range(101, 151)
PATIENT_PATTERN = re.compile(r"^patient(\d{3})$")
NUM_FOLDS = 5
SPLIT_SEED = 12345
FILE_ENDING = ".nii.gz"


def read_info(path: Path) -> dict[str, str]:
    """The ``key: value`` lines of an Info.cfg."""
    entries = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        key, separator, value = line.partition(":")
        if separator:
            entries[key.strip()] = value.strip()
    return entries


def _source_root(source: Path) -> Path:
    for candidate in (source, source / "database"):
        if (candidate / "training").is_dir():
            return candidate
    raise ConversionError(f"{source} has no 'training' folder (nor database/training); pass the extracted ACDC "
                          f"folder that holds training/ and testing/")


def _patient_frames(folder: Path, number: int, needs_labels: bool, expected: range,
                    problems: list[str]) -> dict[str, tuple[Path, Path | None]]:
    """{phase: (frame image, frame label or None)} of one patient folder; problems are appended."""
    if number not in expected:
        problems.append(f"{folder}: patient {number:03d} is outside {expected.start:03d}-{expected.stop - 1:03d}, "
                        f"the range of this part of ACDC")
    info_path = folder / "Info.cfg"
    if not info_path.is_file():
        problems.append(f"{folder}: Info.cfg is missing (it names the ED and ES frames)")
        return {}
    info = read_info(info_path)
    frames = {}
    for phase in PHASES:
        if not info.get(phase, "").isdigit():
            problems.append(f"{info_path}: no line '{phase}: <frame number>' (found {info.get(phase)!r})")
            continue
        frames[phase] = int(info[phase])
    if len(frames) == 2 and frames["ED"] == frames["ES"]:
        problems.append(f"{info_path}: ED and ES name the same frame {frames['ED']}")
        return {}
    result = {}
    for phase, frame in frames.items():
        image = folder / f"{folder.name}_frame{frame:02d}{FILE_ENDING}"
        label = folder / f"{folder.name}_frame{frame:02d}_gt{FILE_ENDING}"
        if not image.is_file():
            problems.append(f"{folder}: {image.name} ({phase} frame of Info.cfg) is missing")
            continue
        if not label.is_file():
            if needs_labels:
                problems.append(f"{folder}: {label.name} (ground truth of the {phase} frame) is missing")
                continue
            label = None
        broken = unreadable(image)
        if broken:
            problems.append(broken)
            continue
        dimension = len(read_header(image)[0])
        if dimension != 3:
            problems.append(f"{image} is {dimension}D; ACDC frames are 3D volumes")
            continue
        if label is not None:
            mismatch = geometry_problem(image, label)
            if mismatch:
                problems.append(mismatch)
                continue
            unexpected = sorted(label_values(label) - set(LABELS.values()))
            if unexpected:
                problems.append(f"{label} holds label values {unexpected}; ACDC uses 0-3 (RV 1, MYO 2, LV 3)")
                continue
        result[phase] = (image, label)
    return result


def _scan(folder: Path, needs_labels: bool, expected: range, problems: list[str]) -> dict[str, dict]:
    """{patient name: {phase: (image, label)}} of every patient folder under ``folder``."""
    patients = {}
    if not folder.is_dir():
        return patients
    for entry in sorted(folder.iterdir()):
        match = PATIENT_PATTERN.match(entry.name)
        if entry.is_dir() and match:
            patients[entry.name] = _patient_frames(entry, int(match.group(1)), needs_labels, expected, problems)
    return patients


def patient_grouped_splits(patients: list[str], cases: dict[str, list[str]],
                           seed: int = SPLIT_SEED) -> list[dict[str, list[str]]]:
    """Five folds over shuffled patients; every case of a patient lands in the same fold."""
    order = [patients[i] for i in np.random.default_rng(seed).permutation(len(patients))]
    splits = []
    for fold in range(NUM_FOLDS):
        val_patients = set(order[fold::NUM_FOLDS])
        splits.append({
            "train": sorted(c for p in patients if p not in val_patients for c in cases[p]),
            "val": sorted(c for p in patients if p in val_patients for c in cases[p]),
        })
    return splits


def _copy_cases(patients: dict[str, dict], images: Path, labels: Path | None, phases: dict[str, str]) -> dict:
    cases = {}
    for patient, frames in patients.items():
        cases[patient] = []
        for phase, (image, label) in frames.items():
            case = image.name[:-len(FILE_ENDING)]
            shutil.copyfile(image, images / f"{case}_0000{FILE_ENDING}")
            if label is not None and labels is not None:
                shutil.copyfile(label, labels / f"{case}{FILE_ENDING}")
            phases[case] = phase
            cases[patient].append(case)
    return cases


def convert_acdc(source: str | Path, dataset_id: int = DEFAULT_DATASET_ID, overwrite: bool = False) -> Path:
    """Convert the ACDC release in ``source``; returns the dataset folder. Writes splits_final.json too."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
    source = Path(source)
    target = target_folder(dataset_id, TASK_NAME, overwrite)
    root = _source_root(source)
    problems: list[str] = []
    training = _scan(root / "training", True, TRAINING_PATIENTS, problems)
    testing = _scan(root / "testing", False, TEST_PATIENTS, problems)
    if not training:
        problems.append(f"{root / 'training'} holds no patientXXX folders")
    raise_if_problems(problems, source, "ACDC")
    test_labels = all(label is not None for frames in testing.values() for _, label in frames.values())
    if len(training) != len(TRAINING_PATIENTS) or len(testing) != len(TEST_PATIENTS):
        logger.warning("ACDC has %d training and %d test patients; found %d and %d", len(TRAINING_PATIENTS),
                       len(TEST_PATIENTS), len(training), len(testing))
    with staged_dataset(target, overwrite) as staging:
        folders = {name: staging / name for name in ("imagesTr", "labelsTr", "imagesTs", "labelsTs")}
        for name, folder in folders.items():
            if name != "labelsTs" or (testing and test_labels):
                folder.mkdir()
        phases: dict[str, str] = {}
        train_cases = _copy_cases(training, folders["imagesTr"], folders["labelsTr"], phases)
        _copy_cases(testing, folders["imagesTs"], folders["labelsTs"] if test_labels else None, phases)
        generate_dataset_json(str(staging), {0: "cineMRI"}, dict(LABELS),
                              sum(len(c) for c in train_cases.values()), FILE_ENDING, dataset_name=TASK_NAME,
                              reference="https://www.creatis.insa-lyon.fr/Challenge/acdc/",
                              description="ACDC ED and ES frames (labels: RV 1, MYO 2, LV 3), converted by samunet",
                              acdc_phases=dict(sorted(phases.items())))
    if len(train_cases) >= NUM_FOLDS:
        write_splits(target.name, patient_grouped_splits(sorted(train_cases), train_cases))
    else:
        logger.warning("only %d training patients: no patient-grouped 5-fold split written; train fold 'all'",
                       len(train_cases))
    return target
