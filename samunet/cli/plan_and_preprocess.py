"""``samunet_plan_and_preprocess``: nnunetv2 fingerprint -> samunet's SAM planner -> nnunetv2 preprocessing."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Sequence

from samunet.cli.common import (add_common_arguments, prepare_environment, process_count, run_cli,
                                 setup_logging)
from samunet.errors import ConfigurationError

logger = logging.getLogger(__name__)


def plan_and_preprocess(dataset: str | int, *, backbone: str = "litemedsam", image_size: int | None = None,
                        depth: int | None = None, num_processes: int = 2, verify_dataset_integrity: bool = False,
                        gpu_memory_gb: float = 8.0) -> Path:
    """Plan and preprocess ``dataset`` for samunet's ``2d`` configuration; returns the plans file."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset, preprocess_dataset
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw

    from samunet.backbones.catalog import check_img_size, get_backbone_spec
    from samunet.planners.sam_planner import PLANS_NAME, SAMPlanner
    from samunet.preprocessing.dataset_checks import resolve_dataset_name, validate_raw_dataset

    spec = get_backbone_spec(backbone)
    if image_size is not None:
        check_img_size(spec, image_size)
    dataset_name = resolve_dataset_name(dataset)
    dataset_id = int(dataset_name[len("Dataset"):len("Dataset") + 3])
    validate_raw_dataset(Path(nnUNet_raw) / dataset_name)
    logger.info("fingerprinting %s", dataset_name)
    extract_fingerprint_dataset(dataset_id, num_processes=num_processes,
                                check_dataset_integrity=verify_dataset_integrity, clean=True, verbose=False)
    planner = SAMPlanner(dataset_id, gpu_memory_target_in_gb=gpu_memory_gb, backbone=backbone,
                         image_size=image_size, depth=depth)
    planner.plan_experiment()
    logger.info("preprocessing %s (configuration 2d)", dataset_name)
    preprocess_dataset(dataset_id, PLANS_NAME, configurations=("2d",), num_processes=(num_processes,))
    return Path(nnUNet_preprocessed) / dataset_name / f"{PLANS_NAME}.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="samunet_plan_and_preprocess", description=__doc__)
    parser.add_argument("-d", "--dataset", required=True, help="dataset ID (218) or name (Dataset218_AMOS...)")
    parser.add_argument("-c", "--configuration", default="2d", help="only 2d: SAM encoders work on slices")
    parser.add_argument("--verify_dataset_integrity", action="store_true",
                        help="also run nnunetv2's full integrity check (reads every voxel)")
    parser.add_argument("-np", "--num-processes", type=process_count, default=2,
                        help="processes for fingerprint/preprocessing")
    parser.add_argument("--backbone", default="litemedsam", help="litemedsam (default), vit_b, vit_l or vit_h")
    parser.add_argument("--image-size", type=int, default=None, help="encoder input size (default: planned)")
    parser.add_argument("--depth", type=int, default=None, help="slices per stack for stacked-slice methods")
    parser.add_argument("--gpu-memory-gb", type=float, default=8.0, help="GPU memory the batch size is planned for")
    add_common_arguments(parser, device=False)
    return parser


def _main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.configuration != "2d":
        raise ConfigurationError(f"configuration {args.configuration!r} is not planned by samunet; use -c 2d")
    prepare_environment(args.num_processes)
    plans = plan_and_preprocess(args.dataset, backbone=args.backbone, image_size=args.image_size, depth=args.depth,
                                num_processes=args.num_processes,
                                verify_dataset_integrity=args.verify_dataset_integrity,
                                gpu_memory_gb=args.gpu_memory_gb)
    logger.info("plans written to %s", plans)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)
