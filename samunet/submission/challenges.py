"""What each challenge expects: submitted file names, label values and packaging.

* AMOS22 task 1: a zip holding ``results/amos_XXXX.nii.gz``, one per CT test image, labels 0-15.
* ACDC: ``patientXXX_ED.nii.gz`` and ``patientXXX_ES.nii.gz`` for patients 101-150, labels
  0 background, 1 RV, 2 MYO, 3 LV; the phase of each frame comes from dataset.json's
  ``acdc_phases`` (written by ``samunet_convert acdc``).
* Synapse: one file per TransUNet test case, named like its image (``img0001.nii.gz``), labels 0-8.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from samunet.preprocessing.converters import acdc, amos, synapse
from samunet.preprocessing.converters.acdc import LABELS as ACDC_LABELS
from samunet.preprocessing.converters.acdc import TEST_PATIENTS as ACDC_TEST_PATIENTS
from samunet.preprocessing.converters.synapse import LABELS as SYNAPSE_LABELS
from samunet.preprocessing.converters.synapse import load_split

AMOS_NUM_LABELS = 16
ACDC_CASE = re.compile(r"^patient(\d{3})_frame\d{2}$")
AMOS_CASE = re.compile(r"^amos_\d{4}$")
# nnunetv2's own ACDC converter names the same values RV / MLV / LVC.
ACDC_ACCEPTED_LABELS = (ACDC_LABELS, {"background": 0, "RV": 1, "MLV": 2, "LVC": 3})


@dataclass(frozen=True)
class Challenge:
    """One challenge's submission format.

    ``name_for(case, dataset_json)`` returns the submitted file name of a case, or raises
    ``ValueError`` with the reason the case cannot be submitted.
    """

    name: str
    dataset_id: int
    label_values: frozenset[int]
    name_for: Callable[[str, dict], str]
    labels_problem: Callable[[dict], str | None]
    zip_required: bool
    zip_folder: str
    official_count: int | None


def _amos_name(case: str, dataset_json: dict) -> str:
    if not AMOS_CASE.match(case):
        raise ValueError("AMOS cases are named amos_XXXX")
    return f"{case}.nii.gz"


def _amos_labels(dataset_json: dict) -> str | None:
    values = sorted(int(v) for v in dataset_json["labels"].values())
    if values != list(range(AMOS_NUM_LABELS)):
        return f"AMOS22 task 1 has labels 0-{AMOS_NUM_LABELS - 1}, dataset.json defines {values}"
    return None


def _acdc_name(case: str, dataset_json: dict) -> str:
    match = ACDC_CASE.match(case)
    if not match:
        raise ValueError("ACDC cases are named patientXXX_frameYY")
    if int(match.group(1)) not in ACDC_TEST_PATIENTS:
        raise ValueError(f"ACDC test patients are {ACDC_TEST_PATIENTS.start}-{ACDC_TEST_PATIENTS.stop - 1}")
    phase = dataset_json.get("acdc_phases", {}).get(case)
    if phase not in ("ED", "ES"):
        raise ValueError("dataset.json's acdc_phases names no ED/ES phase for it (convert with samunet_convert acdc)")
    return f"patient{match.group(1)}_{phase}.nii.gz"


def _acdc_labels(dataset_json: dict) -> str | None:
    if dataset_json["labels"] not in ACDC_ACCEPTED_LABELS:
        return (f"ACDC submissions use 1 RV, 2 MYO, 3 LV; dataset.json defines {dataset_json['labels']}, "
                f"so the predicted values would mean something else")
    return None


def _synapse_name(case: str, dataset_json: dict) -> str:
    test_cases = [f"img{number}" for number in load_split()["test"]]
    if case not in test_cases:
        raise ValueError("not one of the 12 TransUNet test cases (img0001, img0002, ...)")
    return f"{case}.nii.gz"


def _synapse_labels(dataset_json: dict) -> str | None:
    if dataset_json["labels"] != SYNAPSE_LABELS:
        return f"Synapse uses the 8 organs {SYNAPSE_LABELS}; dataset.json defines {dataset_json['labels']}"
    return None


CHALLENGES = {
    "amos": Challenge("amos", amos.DEFAULT_DATASET_ID, frozenset(range(AMOS_NUM_LABELS)), _amos_name,
                      _amos_labels, zip_required=True, zip_folder="results/", official_count=None),
    "acdc": Challenge("acdc", acdc.DEFAULT_DATASET_ID, frozenset(ACDC_LABELS.values()), _acdc_name,
                      _acdc_labels, zip_required=False, zip_folder="", official_count=2 * len(ACDC_TEST_PATIENTS)),
    "synapse": Challenge("synapse", synapse.DEFAULT_DATASET_ID, frozenset(SYNAPSE_LABELS.values()), _synapse_name,
                         _synapse_labels, zip_required=False, zip_folder="", official_count=len(load_split()["test"])),
}
