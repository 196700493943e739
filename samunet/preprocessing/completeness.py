"""Whether a data set's preprocessed folder is complete, recorded by a marker written last.

nnunetv2's preprocessing writes ``nnUNet_preprocessed/DATASET/<data identifier>/`` case by case and then
copies the reference label maps into ``gt_segmentations/``; a process killed in between leaves a folder
that looks usable and fails later (a missing case in training, a missing reference in the final
validation). samunet_plan_and_preprocess therefore brackets nnunetv2's ``preprocess_dataset``:

- :func:`start_preprocessing` (before): the marker ``<data identifier>.complete.json`` next to the data
  folder is replaced by one saying "in progress", and reference copies whose size differs from their raw
  label map (a copy cut off by a kill; nnunetv2 only re-copies files older than their source) are removed;
- :func:`finish_preprocessing` (after it returns): every case is checked and the marker is rewritten as
  "complete", listing the cases and what the preprocessing depended on in the plans.

:func:`check_preprocessed_dataset` is what training runs before it starts. All markers and their
temporary files are written atomically (temporary file, then ``os.replace``).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from samunet.atomic_files import write_json_atomically
from samunet.errors import DatasetError

logger = logging.getLogger(__name__)

# temporary files of planning runs (plans, dataset.json, markers); the next planning run removes them
PARTIAL_PREFIX = ".samunet_planning_partial_"
MARKER_SUFFIX = ".complete.json"
MARKER_FORMAT = 1
GROUND_TRUTH_FOLDER = "gt_segmentations"
# the fields of the plans and of a configuration that the preprocessed data depend on (nnunetv2's
# DefaultPreprocessor: transpose, reader, spacing, normalisation, resampling); batch size or network
# settings may change without preprocessing again
PLANS_FIELDS = ("transpose_forward", "image_reader_writer", "foreground_intensity_properties_per_channel")
CONFIGURATION_FIELDS = ("data_identifier", "preprocessor_name", "spacing", "normalization_schemes",
                        "use_mask_for_norm", "resampling_fn_data", "resampling_fn_data_kwargs", "resampling_fn_seg",
                        "resampling_fn_seg_kwargs")
SHOWN = 5  # cases named in a message


def _preprocessed_folder(dataset_name: str) -> Path:
    from nnunetv2.paths import nnUNet_preprocessed
    return Path(nnUNet_preprocessed) / dataset_name


def _raw_folder(dataset_name: str) -> Path:
    from nnunetv2.paths import nnUNet_raw
    return Path(nnUNet_raw) / dataset_name


def repair_command(dataset_name: str, plans_identifier: str) -> str:
    """The planning command that rebuilds ``dataset_name``'s preprocessed data for these plans."""
    from samunet.planners.sam_planner import PLANS_NAME
    dataset_id = int(dataset_name[len("Dataset"):len("Dataset") + 3])
    plans = "" if plans_identifier == PLANS_NAME else f" -overwrite_plans_name {plans_identifier}"
    return f"samunet_plan_and_preprocess -d {dataset_id}{plans}"


def _refuse(problem: str, dataset_name: str, plans_identifier: str):
    raise DatasetError(f"{problem}; run {repair_command(dataset_name, plans_identifier)} to repair it")


def _read_json(path: Path, what: str, dataset_name: str, plans_identifier: str) -> dict:
    if not path.is_file():
        _refuse(f"{what} {path} is missing", dataset_name, plans_identifier)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        _refuse(f"{what} {path} is unreadable (cut off by an interrupted run?): {error}", dataset_name,
                plans_identifier)
    if not isinstance(content, dict):
        _refuse(f"{what} {path} does not hold a JSON object", dataset_name, plans_identifier)
    return content


def preprocessing_identity(plans: dict, configuration: str) -> dict:
    """What the preprocessed data of ``configuration`` depend on in ``plans`` (JSON-comparable)."""
    settings = plans["configurations"][configuration]
    identity = {"plans_name": plans.get("plans_name"), "configuration": configuration,
                **{field: plans.get(field) for field in PLANS_FIELDS},
                **{field: settings.get(field) for field in CONFIGURATION_FIELDS}}
    return json.loads(json.dumps(identity))


def marker_path(dataset_name: str, data_identifier: str) -> Path:
    """``nnUNet_preprocessed/DATASET/<data identifier>.complete.json`` (outside the data folder, where
    nnunetv2 expects one kind of file only)."""
    return _preprocessed_folder(dataset_name) / f"{data_identifier}{MARKER_SUFFIX}"


def _data_identifier(plans: dict, configuration: str) -> str:
    return plans["configurations"][configuration].get("data_identifier") or \
        f"{plans.get('plans_name')}_{configuration}"


def _raw_cases(dataset_name: str, dataset_json: dict) -> dict[str, str] | None:
    """case -> raw label file, by nnunetv2's listing; None when the raw data set is not here."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    raw = _raw_folder(dataset_name)
    if not (raw / "dataset.json").is_file():
        return None
    return {case: entry["label"] for case, entry in
            get_filenames_of_train_images_and_targets(str(raw), dataset_json).items()}


def _missing_data(data_folder: Path, cases) -> list[str]:
    """Cases without all their files in the data folder (nnunetv2's blosc2 layout, or the older npz one)."""
    present = set(os.listdir(data_folder))
    return [case for case in cases
            if not {f"{case}.b2nd", f"{case}_seg.b2nd", f"{case}.pkl"} <= present
            and not {f"{case}.npz", f"{case}.pkl"} <= present]


def _missing_ground_truth(gt_folder: Path, cases, file_ending: str,
                          raw_labels: dict[str, str] | None = None) -> list[str]:
    """Cases whose reference copy is absent, or (when ``raw_labels`` are given) differs in size from it."""
    missing = []
    for case in cases:
        copy = gt_folder / f"{case}{file_ending}"
        if not copy.is_file() or (raw_labels is not None and
                                  copy.stat().st_size != os.path.getsize(raw_labels[case])):
            missing.append(case)
    return missing


def _named(cases: list[str]) -> str:
    return ", ".join(cases[:SHOWN]) + (f" and {len(cases) - SHOWN} more" if len(cases) > SHOWN else "")


def start_preprocessing(dataset_name: str, plans_identifier: str, configuration: str) -> None:
    """Before nnunetv2's ``preprocess_dataset``: mark the data as in progress and remove reference copies
    cut off by an earlier interrupted run (so that nnunetv2 copies them again)."""
    folder = _preprocessed_folder(dataset_name)
    plans = json.loads((folder / f"{plans_identifier}.json").read_text(encoding="utf-8"))
    write_json_atomically(marker_path(dataset_name, _data_identifier(plans, configuration)),
                          {"format": MARKER_FORMAT, "state": "in progress"}, prefix=PARTIAL_PREFIX)
    dataset_json = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    raw_labels, ending = _raw_cases(dataset_name, dataset_json) or {}, dataset_json["file_ending"]
    gt_folder = folder / GROUND_TRUTH_FOLDER
    cut_off = [case for case in _missing_ground_truth(gt_folder, raw_labels, ending, raw_labels)
               if (gt_folder / f"{case}{ending}").is_file()]
    for case in cut_off:
        (gt_folder / f"{case}{ending}").unlink()
    if cut_off:
        logger.warning("removed %d reference copies in %s whose size differs from the raw label map (an "
                       "interrupted copy): %s; they are copied again", len(cut_off), gt_folder, _named(cut_off))


def finish_preprocessing(dataset_name: str, plans_identifier: str, configuration: str) -> Path:
    """After nnunetv2's ``preprocess_dataset`` returned: check every case and write the complete marker
    (cases, file ending, :func:`preprocessing_identity`); returns the marker. Raises DatasetError when a
    case is missing after all."""
    folder = _preprocessed_folder(dataset_name)
    plans = json.loads((folder / f"{plans_identifier}.json").read_text(encoding="utf-8"))
    dataset_json = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    raw_labels = _raw_cases(dataset_name, dataset_json) or {}
    data_identifier = _data_identifier(plans, configuration)
    cases = sorted(raw_labels)
    _check_cases(folder, data_identifier, cases, dataset_json["file_ending"], raw_labels, dataset_name,
                 plans_identifier)
    marker = {"format": MARKER_FORMAT, "state": "complete", "file_ending": dataset_json["file_ending"],
              "identity": preprocessing_identity(plans, configuration), "cases": cases}
    return write_json_atomically(marker_path(dataset_name, data_identifier), marker, prefix=PARTIAL_PREFIX)


def _check_cases(folder: Path, data_identifier: str, cases: list[str], file_ending: str,
                 raw_labels: dict[str, str] | None, dataset_name: str, plans_identifier: str) -> None:
    data_folder, gt_folder = folder / data_identifier, folder / GROUND_TRUTH_FOLDER
    missing = _missing_data(data_folder, cases)
    if missing:
        _refuse(f"{len(missing)} of {len(cases)} cases are missing or incomplete in {data_folder}: {_named(missing)}",
                dataset_name, plans_identifier)
    missing = _missing_ground_truth(gt_folder, cases, file_ending, raw_labels)
    if missing:
        _refuse(f"{len(missing)} of {len(cases)} reference label maps are missing or cut off in {gt_folder}: "
                f"{_named(missing)}", dataset_name, plans_identifier)


def check_preprocessed_dataset(dataset_name: str, plans_identifier: str, configuration: str) -> None:
    """Refuse (DatasetError, one line naming what is missing, the folder and the repair command) a
    preprocessed data set that training cannot use as it is.

    Checked: the plans file (present, readable, holding ``configuration``), the preprocessed
    ``dataset.json``, the data folder and ``gt_segmentations``, and the marker written last by
    samunet_plan_and_preprocess: it must say "complete", its recorded preprocessing settings must equal
    the plans' (batch size and network settings may change) and each case it lists must have its files.

    Data sets preprocessed before the marker existed (or by nnunetv2's own ``nnUNetv2_preprocess``) have
    none: they are accepted when every training case of the raw data set (nnunetv2's listing) has its
    data files and a reference copy of the raw label map's size. Without the raw data set (e.g. only
    the preprocessed folder was copied to a cluster), the cases found in the data folder must each have
    their files and a reference copy, and a warning says that completeness could not be confirmed.
    """
    folder = _preprocessed_folder(dataset_name)
    if not folder.is_dir():
        _refuse(f"no preprocessed data set {folder}", dataset_name, plans_identifier)
    plans = _read_json(folder / f"{plans_identifier}.json", "the plans file", dataset_name, plans_identifier)
    if configuration not in (plans.get("configurations") or {}):
        _refuse(f"the plans file {folder / f'{plans_identifier}.json'} has no configuration {configuration!r}",
                dataset_name, plans_identifier)
    dataset_json = _read_json(folder / "dataset.json", "the preprocessed data set's description", dataset_name,
                              plans_identifier)
    file_ending = dataset_json.get("file_ending")
    if not isinstance(file_ending, str):
        _refuse(f"{folder / 'dataset.json'} has no file_ending", dataset_name, plans_identifier)
    data_identifier = _data_identifier(plans, configuration)
    data_folder = folder / data_identifier
    for needed, what in ((data_folder, "preprocessed data folder"), (folder / GROUND_TRUTH_FOLDER,
                                                                     "reference folder")):
        if not needed.is_dir():
            _refuse(f"the {what} {needed} is missing", dataset_name, plans_identifier)

    path = marker_path(dataset_name, data_identifier)
    if path.exists():
        marker = _read_json(path, "the preprocessing marker", dataset_name, plans_identifier)
        if marker.get("state") != "complete":
            _refuse(f"the preprocessing of {data_folder} was interrupted ({path.name} says "
                    f"{marker.get('state')!r})", dataset_name, plans_identifier)
        identity = preprocessing_identity(plans, configuration)
        recorded = marker.get("identity") or {}
        changed = sorted(key for key in set(identity) | set(recorded) if identity.get(key) != recorded.get(key))
        if changed:
            _refuse(f"{data_folder} was preprocessed with other plans than {plans_identifier}.json "
                    f"({', '.join(changed)} {'differs' if len(changed) == 1 else 'differ'})", dataset_name,
                    plans_identifier)
        _check_cases(folder, data_identifier, list(marker.get("cases") or []), file_ending, None, dataset_name,
                     plans_identifier)
        return
    raw_labels = _raw_cases(dataset_name, dataset_json)
    if raw_labels is not None:
        _check_cases(folder, data_identifier, sorted(raw_labels), file_ending, raw_labels, dataset_name,
                     plans_identifier)
        logger.info("%s has no preprocessing marker (preprocessed before samunet wrote one); all %d cases of "
                    "the raw data set are there", data_folder, len(raw_labels))
        return
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2, nnUNetDatasetNumpy
    cases = sorted(set(nnUNetDatasetBlosc2.get_identifiers(str(data_folder))) |
                   set(nnUNetDatasetNumpy.get_identifiers(str(data_folder))))
    if not cases:
        _refuse(f"the preprocessed data folder {data_folder} holds no cases", dataset_name, plans_identifier)
    _check_cases(folder, data_identifier, cases, file_ending, None, dataset_name, plans_identifier)
    logger.warning("%s has no preprocessing marker and the raw data set %s is not here: its %d cases have all "
                   "their files, but whether every case was preprocessed cannot be confirmed", data_folder,
                   _raw_folder(dataset_name), len(cases))
