"""Synapse multi-organ CT (BTCV) -> nnU-Net raw layout with the 8 organs and TransUNet's 18/12 split.

Source: the BTCV "Abdomen" training data, ``img00XX.nii.gz`` and ``label00XX.nii.gz`` in ``img/``
and ``label/``, found in ``SRC``, ``SRC/Training`` or ``SRC/RawData/Training``. The 30 labelled
cases are split as in TransUNet (case lists in ``synapse_split.json``): 18 go to imagesTr/labelsTr,
12 to imagesTs/labelsTs. Case names keep the image names (``img0001``), so predictions carry the
test images' naming. BTCV's 13 organ labels are reduced to the 8 the papers report, renumbered
1..8; every other BTCV label becomes background. Images are copied unchanged (no intensity
clipping: nnU-Net normalises CT itself).
"""
from __future__ import annotations

import json
import logging
import shutil
from importlib import resources
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from samunet.preprocessing.converters import (ConversionError, geometry_problem, label_values, raise_if_problems,
                                              staged_dataset, target_folder)

logger = logging.getLogger(__name__)

TASK_NAME = "Synapse8"
DEFAULT_DATASET_ID = 120
FILE_ENDING = ".nii.gz"
BTCV_MAX_LABEL = 13
# (name, BTCV label value) in the order of the new values 1..8.
ORGANS = (("spleen", 1), ("right kidney", 2), ("left kidney", 3), ("gallbladder", 4), ("liver", 6),
          ("stomach", 7), ("aorta", 8), ("pancreas", 11))
LABELS = {"background": 0, **{name: index for index, (name, _) in enumerate(ORGANS, start=1)}}
SOURCE_LAYOUTS = (".", "Training", "RawData/Training")


def load_split() -> dict[str, list[str]]:
    """TransUNet's split: ``{"train": [18 case numbers], "test": [12 case numbers]}``."""
    text = resources.files(__package__).joinpath("synapse_split.json").read_text(encoding="utf-8")
    split = json.loads(text)
    return {"train": split["train"], "test": split["test"]}


def remap_labels(label_map: np.ndarray) -> np.ndarray:
    """BTCV values -> 0..8 (the 8 organs in ``ORGANS`` order; every other value -> 0)."""
    lookup = np.zeros(BTCV_MAX_LABEL + 1, dtype=np.uint8)
    for new_value, (_, btcv_value) in enumerate(ORGANS, start=1):
        lookup[btcv_value] = new_value
    return lookup[label_map]


def _source_root(source: Path) -> Path:
    for layout in SOURCE_LAYOUTS:
        candidate = source / layout
        if (candidate / "img").is_dir() and (candidate / "label").is_dir():
            return candidate
    searched = ", ".join(str(source / layout) for layout in SOURCE_LAYOUTS)
    raise ConversionError(f"no img/ and label/ folders found (searched {searched}); pass the BTCV Abdomen "
                          f"training data folder (RawData/Training holds img/img00XX.nii.gz, label/label00XX.nii.gz)")


def _check_case(root: Path, number: str, problems: list[str]) -> tuple[Path, Path] | None:
    image, label = root / "img" / f"img{number}{FILE_ENDING}", root / "label" / f"label{number}{FILE_ENDING}"
    missing = [str(p) for p in (image, label) if not p.is_file()]
    if missing:
        problems.append(f"case {number} of the TransUNet split: missing {', '.join(missing)}")
        return None
    mismatch = geometry_problem(image, label)
    if mismatch:
        problems.append(mismatch)
        return None
    values = label_values(label)
    unexpected = sorted(v for v in values if not 0 <= v <= BTCV_MAX_LABEL)
    if unexpected:
        problems.append(f"{label} holds label values {unexpected}; BTCV uses 0-{BTCV_MAX_LABEL}")
        return None
    return image, label


def _write_case(image: Path, label: Path, images: Path, labels: Path) -> None:
    case = image.name[:-len(FILE_ENDING)]
    shutil.copyfile(image, images / f"{case}_0000{FILE_ENDING}")
    source = sitk.ReadImage(str(label))
    remapped = sitk.GetImageFromArray(remap_labels(sitk.GetArrayFromImage(source).astype(np.int64)))
    remapped.CopyInformation(source)
    sitk.WriteImage(remapped, str(labels / f"{case}{FILE_ENDING}"), useCompression=True)


def convert_synapse(source: str | Path, dataset_id: int = DEFAULT_DATASET_ID, overwrite: bool = False) -> Path:
    """Convert BTCV's labelled training data in ``source``; returns the dataset folder."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
    source = Path(source)
    target = target_folder(dataset_id, TASK_NAME, overwrite)
    root = _source_root(source)
    split = load_split()
    problems: list[str] = []
    cases = {part: [_check_case(root, number, problems) for number in numbers] for part, numbers in split.items()}
    raise_if_problems(problems, source, "Synapse (BTCV)")
    logger.info("converting %d training and %d test cases of %s (TransUNet split, 8 organs)",
                len(cases["train"]), len(cases["test"]), root)
    with staged_dataset(target, overwrite) as staging:
        for part, (images, labels) in {"train": ("imagesTr", "labelsTr"), "test": ("imagesTs", "labelsTs")}.items():
            (staging / images).mkdir()
            (staging / labels).mkdir()
            for image, label in cases[part]:
                _write_case(image, label, staging / images, staging / labels)
        generate_dataset_json(str(staging), {0: "CT"}, dict(LABELS), len(cases["train"]), FILE_ENDING,
                              dataset_name=TASK_NAME, reference="https://www.synapse.org/#!Synapse:syn3193805",
                              description="BTCV abdomen, 8 organs, TransUNet 18/12 train/test split; "
                                          "converted by samunet",
                              btcv_label_values={name: value for name, value in ORGANS})
    return target
