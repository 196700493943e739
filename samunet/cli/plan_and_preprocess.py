"""``samunet_plan_and_preprocess -d ID [ID ...]``: nnunetv2 fingerprint -> SAM planner -> nnunetv2 preprocessing.

nnunetv2's ``nnUNetv2_plan_and_preprocess`` for samunet, with nnU-Net's options and spellings
(``-npfp``, ``-np``, ``--clean``, ``--no_pp``, ``-gpu_memory_target``, ``-overwrite_plans_name``,
``-preprocessor_name``, ``-fpe``, ``--no_pbar``). The planner is always samunet's ``SAMPlanner``
(one ``2d`` configuration for a SAM encoder); options that only make sense for nnU-Net's U-Net
planners (``-pl`` another planner, ``-overwrite_target_spacing`` for 3d_fullres) are refused.

A run killed at any moment is repaired by running the command again: plans and the preprocessed
``dataset.json`` are written atomically, an existing fingerprint that is unreadable or was taken of
other cases is extracted again (saying so), temporary files of killed runs are removed, and the
preprocessed data are marked complete only after nnunetv2's preprocessing has returned
(:mod:`samunet.preprocessing.completeness`); a preprocessing that fails on a full disk says so in one line.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import shutil
from pathlib import Path
from typing import Sequence

from samunet.cli.common import (NnunetStyleParser, add_common_arguments, prepare_environment, process_count,
                                 refuse_option, run_cli, setup_logging)
from samunet.errors import ConfigurationError

logger = logging.getLogger(__name__)

PLANNER_NAME = "SAMPlanner"
DEFAULT_FINGERPRINT_EXTRACTOR = "DatasetFingerprintExtractor"
DEFAULT_PREPROCESSOR = "DefaultPreprocessor"


def find_nnunet_class(kind: str, name: str):
    """nnunetv2's lookup of a fingerprint extractor (``experiment_planning``) or preprocessor
    (``preprocessing``) class by name, as nnUNetv2_plan_and_preprocess does; unknown names are refused."""
    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    package = {"fingerprint extractor": "experiment_planning", "preprocessor": "preprocessing"}[kind]
    found = recursive_find_python_class(str(Path(nnunetv2.__path__[0]) / package), name,
                                        current_module=f"nnunetv2.{package}")
    if found is None:
        raise ConfigurationError(f"no {kind} class named {name!r} in nnunetv2.{package} (nnU-Net looks only there)")
    return found


FINGERPRINT_FIELDS = ("spacings", "shapes_after_crop", "foreground_intensity_properties_per_channel",
                      "median_relative_size_after_cropping")


def fingerprint_problem(fingerprint_file: Path, num_cases: int, num_channels: int) -> str | None:
    """Why an existing ``dataset_fingerprint.json`` cannot be reused (unreadable, fields missing, taken of
    another number of cases or channels), or None when it can."""
    try:
        fingerprint = json.loads(fingerprint_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"it is unreadable (cut off by an interrupted run?): {error}"
    if not isinstance(fingerprint, dict) or any(field not in fingerprint for field in FINGERPRINT_FIELDS):
        return f"it lacks some of {', '.join(FINGERPRINT_FIELDS)}"
    if len(fingerprint["spacings"]) != num_cases:
        return f"it describes {len(fingerprint['spacings'])} training cases, the raw data set has {num_cases}"
    if len(fingerprint["foreground_intensity_properties_per_channel"]) != num_channels:
        return (f"it describes {len(fingerprint['foreground_intensity_properties_per_channel'])} channels, "
                f"dataset.json names {num_channels}")
    return None


def remove_partial_files(folder: Path) -> None:
    """Remove temporary files that killed planning runs left in ``folder`` (planning a data set is one
    process at a time: nnunetv2's preprocessing deletes the data folder it writes)."""
    from samunet.preprocessing.completeness import PARTIAL_PREFIX
    for partial in folder.glob(f"{PARTIAL_PREFIX}*") if folder.is_dir() else ():
        partial.unlink()
        logger.info("removed %s, left by an interrupted planning run", partial)


# below this much free space (or twice the largest file written so far, if more), a failed write is a full disk
MIN_FREE_BYTES = 1 << 20


def disk_is_full(folder: Path) -> bool:
    """Whether the disk holding ``folder`` has too little space left for another preprocessed case: less than
    twice the largest file under ``folder`` and less than :data:`MIN_FREE_BYTES` at least."""
    existing = next(path for path in (folder, *folder.parents, Path(".")) if path.exists())
    largest = max((entry.stat().st_size for entry in folder.rglob("*") if entry.is_file()),
                  default=0) if folder.is_dir() else 0
    return shutil.disk_usage(existing).free < max(MIN_FREE_BYTES, 2 * largest)


@contextlib.contextmanager
def reporting_full_disk(folder: Path):
    """Turn a failure of nnunetv2's preprocessing on a full disk (blosc2 says only "Error while creating the
    NDArray", from a worker process) into ``OSError(ENOSPC)`` naming ``folder``, which the CLI reports in one
    line; other failures pass unchanged. The data folder stays marked incomplete, so training refuses it."""
    try:
        yield
    except Exception as error:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC and error.filename is not None:
            raise
        if not disk_is_full(folder):
            raise
        raise OSError(errno.ENOSPC, f"no space left while preprocessing into {folder} "
                                    f"({type(error).__name__}: {error})", str(folder)) from error


def plan_and_preprocess(dataset: str | int, *, backbone: str = "litemedsam", image_size: int | None = None,
                        depth: int | None = None, num_processes: int = 2, verify_dataset_integrity: bool = False,
                        gpu_memory_gb: float = 8.0, fingerprint_processes: int | None = None,
                        clean: bool = True, preprocess: bool = True, plans_name: str | None = None,
                        preprocessor_name: str = DEFAULT_PREPROCESSOR,
                        fingerprint_extractor: str = DEFAULT_FINGERPRINT_EXTRACTOR, verbose: bool = False,
                        progress_bar: bool = True) -> Path:
    """Plan (and unless ``preprocess`` is False, preprocess) ``dataset`` for samunet's ``2d`` configuration.

    ``clean=False`` keeps an existing dataset fingerprint (nnU-Net's default without ``--clean``) unless
    it cannot be reused (:func:`fingerprint_problem`); ``fingerprint_processes`` defaults to
    ``num_processes``. Returns the plans file.
    """
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset, preprocess_dataset
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    from samunet.backbones.catalog import check_img_size, get_backbone_spec
    from samunet.planners.sam_planner import PLANS_NAME, SAMPlanner
    from samunet.preprocessing.completeness import finish_preprocessing, start_preprocessing
    from samunet.preprocessing.dataset_checks import resolve_dataset_name, validate_raw_dataset

    spec = get_backbone_spec(backbone)
    if image_size is not None:
        check_img_size(spec, image_size)
    extractor = find_nnunet_class("fingerprint extractor", fingerprint_extractor)
    find_nnunet_class("preprocessor", preprocessor_name)
    plans_name = plans_name or PLANS_NAME
    dataset_name = resolve_dataset_name(dataset)
    dataset_id = int(dataset_name[len("Dataset"):len("Dataset") + 3])
    raw_folder, preprocessed_folder = Path(nnUNet_raw) / dataset_name, Path(nnUNet_preprocessed) / dataset_name
    validate_raw_dataset(raw_folder, num_processes=fingerprint_processes or num_processes)
    remove_partial_files(preprocessed_folder)
    fingerprint_file = preprocessed_folder / "dataset_fingerprint.json"
    if not clean and fingerprint_file.is_file():
        dataset_json = json.loads((raw_folder / "dataset.json").read_text(encoding="utf-8"))
        problem = fingerprint_problem(
            fingerprint_file, len(get_filenames_of_train_images_and_targets(str(raw_folder), dataset_json)),
            len(dataset_json.get("channel_names", dataset_json.get("modality", {}))))
        if problem:
            logger.warning("the existing fingerprint %s cannot be reused: %s; extracting it again", fingerprint_file,
                           problem)
            clean = True
    logger.info("fingerprinting %s", dataset_name)
    extract_fingerprint_dataset(dataset_id, extractor, num_processes=fingerprint_processes or num_processes,
                                check_dataset_integrity=verify_dataset_integrity, clean=clean, verbose=verbose,
                                show_progress_bar=progress_bar)
    planner = SAMPlanner(dataset_id, gpu_memory_target_in_gb=gpu_memory_gb, preprocessor_name=preprocessor_name,
                         plans_name=plans_name, backbone=backbone, image_size=image_size, depth=depth)
    planner.plan_experiment()
    plans_file = preprocessed_folder / f"{plans_name}.json"
    if preprocess:
        logger.info("preprocessing %s (configuration 2d)", dataset_name)
        start_preprocessing(dataset_name, plans_name, "2d")
        with reporting_full_disk(preprocessed_folder):
            preprocess_dataset(dataset_id, plans_name, configurations=("2d",), num_processes=(num_processes,),
                               verbose=verbose, show_progress_bar=progress_bar)
        finish_preprocessing(dataset_name, plans_name, "2d")
    return plans_file


def build_parser() -> argparse.ArgumentParser:
    parser = NnunetStyleParser(prog="samunet_plan_and_preprocess", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--dataset", nargs="+", required=True,
                        help="dataset ID(s) (218) or name(s) (Dataset218_AMOS...); each is planned in turn")
    parser.add_argument("-c", "--configuration", nargs="+", default=["2d"],
                        help="only 2d: SAM encoders work on slices")
    parser.add_argument("--verify_dataset_integrity", action="store_true",
                        help="also run nnunetv2's full integrity check (reads every voxel)")
    parser.add_argument("-np", "--num-processes", dest="num_processes", nargs="+", type=process_count, default=[2],
                        help="processes for preprocessing (one number, or one per -c configuration); default 2")
    parser.add_argument("-npfp", type=process_count, default=None,
                        help="processes for fingerprint extraction (default: the -np value)")
    parser.add_argument("--clean", action="store_true",
                        help="re-extract the dataset fingerprint even if one exists (required after changing the "
                             "raw data)")
    parser.add_argument("--no_pp", "--no-pp", dest="no_pp", action="store_true",
                        help="only fingerprint and plan; do not preprocess")
    parser.add_argument("-pl", default=PLANNER_NAME,
                        help=f"planner class; samunet has one, {PLANNER_NAME} (nnU-Net's U-Net planners belong to "
                             f"nnUNetv2_plan_and_preprocess)")
    parser.add_argument("-gpu_memory_target", "--gpu-memory-gb", dest="gpu_memory_gb", type=float, default=8.0,
                        help="GPU memory (GB) the batch size is planned for (default 8)")
    parser.add_argument("-preprocessor_name", default=DEFAULT_PREPROCESSOR,
                        help="nnunetv2 preprocessor class written into the plans (default DefaultPreprocessor)")
    parser.add_argument("-overwrite_plans_name", "--plans-name", dest="plans_name", default=None,
                        help="plans identifier to write (default samunetPlans); pass it as -p to the other commands")
    parser.add_argument("-fpe", default=DEFAULT_FINGERPRINT_EXTRACTOR,
                        help="nnunetv2 fingerprint extractor class (default DatasetFingerprintExtractor)")
    parser.add_argument("--no_pbar", "--no-pbar", dest="no_pbar", action="store_true", help="no progress bars")
    refuse_option(parser, "-overwrite_target_spacing", nargs="+",
                  reason="nnU-Net applies it to 3d_fullres/3d_cascade_fullres only, and samunet plans only 2d "
                         "(its in-plane spacing follows the encoder input size)")
    parser.add_argument("--backbone", default="litemedsam", help="litemedsam (default), vit_b, vit_l or vit_h")
    parser.add_argument("--image-size", type=int, default=None, help="encoder input size (default: planned)")
    parser.add_argument("--depth", type=int, default=None, help="slices per stack for stacked-slice methods")
    add_common_arguments(parser, device=False)
    return parser


def _main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.configuration != ["2d"]:
        raise ConfigurationError(f"configuration(s) {' '.join(args.configuration)} are not planned by samunet; "
                                 f"use -c 2d")
    if args.pl != PLANNER_NAME:
        raise ConfigurationError(f"-pl {args.pl}: samunet plans SAM encoders with its one planner, {PLANNER_NAME}; "
                                 f"nnU-Net's U-Net planners are run by nnUNetv2_plan_and_preprocess")
    if len(args.num_processes) != 1:
        raise ConfigurationError(f"-np takes one number per configuration, and samunet plans one (2d); got "
                                 f"{len(args.num_processes)}")
    num_processes = args.num_processes[0]
    prepare_environment(num_processes)
    for dataset in args.dataset:
        plans = plan_and_preprocess(dataset, backbone=args.backbone, image_size=args.image_size, depth=args.depth,
                                    num_processes=num_processes, fingerprint_processes=args.npfp,
                                    verify_dataset_integrity=args.verify_dataset_integrity,
                                    gpu_memory_gb=args.gpu_memory_gb, clean=args.clean, preprocess=not args.no_pp,
                                    plans_name=args.plans_name, preprocessor_name=args.preprocessor_name,
                                    fingerprint_extractor=args.fpe, verbose=args.verbose,
                                    progress_bar=not args.no_pbar)
        logger.info("plans written to %s", plans)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)
