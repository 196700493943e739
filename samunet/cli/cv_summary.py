"""``samunet_cv_summary -d ID -tr NAME [-c 2d]``: Dice, NSD and HD95 over all five folds' validation cases."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from samunet.cli.common import NnunetStyleParser, add_common_arguments, process_count, run_cli, setup_logging
from samunet.errors import ConfigurationError
from samunet.evaluation.metrics import DEFAULT_HD95, DEFAULT_NSD, HD95_CONVENTIONS, NSD_CONVENTIONS


def build_parser() -> argparse.ArgumentParser:
    parser = NnunetStyleParser(
        prog="samunet_cv_summary",
        description="Collect the validation predictions of folds 0-4, score them and write a summary "
                    "(JSON + markdown) with mean and standard deviation per class and overall.")
    parser.add_argument("-d", required=True, help="dataset ID (218) or name")
    parser.add_argument("-tr", required=True, help="trainer name, e.g. SAMedTrainer")
    parser.add_argument("-c", default="2d", help="configuration (default 2d)")
    parser.add_argument("-p", "--plans", default="samunetPlans", help="plans identifier (default samunetPlans)")
    parser.add_argument("--tolerance-mm", type=float, default=2.0, help="NSD tolerance in mm (default 2)")
    parser.add_argument("--nsd", choices=tuple(NSD_CONVENTIONS), default=DEFAULT_NSD,
                        help="NSD convention, as in samunet_evaluate (default surface_area: Nikolov et al.)")
    parser.add_argument("--hd95", choices=tuple(HD95_CONVENTIONS), default=DEFAULT_HD95,
                        help="HD95 convention, as in samunet_evaluate (default max_directed)")
    parser.add_argument("-o", default=None, help="output JSON (default MODEL_FOLDER/cv_summary_samunet.json)")
    parser.add_argument("-np", type=process_count, default=1, help="worker processes for scoring (default 1)")
    add_common_arguments(parser, device=False)
    return parser


def _main(argv: Sequence[str] | None = None) -> int:
    from samunet.evaluation.cv_summary import OUTPUT_NAME, CrossValidationError, summarise_cross_validation
    from samunet.evaluation.evaluate_folder import format_table
    from samunet.paths import ensure_nnunet_paths
    from samunet.preprocessing.dataset_checks import resolve_dataset_name
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.tolerance_mm <= 0:
        raise ConfigurationError(f"--tolerance-mm must be positive, got {args.tolerance_mm}")
    folders = ensure_nnunet_paths()
    dataset_name = resolve_dataset_name(args.d)
    model_folder = Path(folders["nnUNet_results"]) / dataset_name / f"{args.tr}__{args.plans}__{args.c}"
    preprocessed = Path(folders["nnUNet_preprocessed"]) / dataset_name
    dataset_json_path = next((p for p in (model_folder / "dataset.json", preprocessed / "dataset.json")
                              if p.is_file()), None)
    if dataset_json_path is None:
        raise CrossValidationError(f"no dataset.json in {model_folder} or {preprocessed}; train the model first")
    dataset_json = json.loads(dataset_json_path.read_text(encoding="utf-8"))
    summary = summarise_cross_validation(model_folder, preprocessed, dataset_json, args.tolerance_mm,
                                         Path(args.o) if args.o else None, args.np,
                                         nsd=args.nsd, hd95=args.hd95)
    means = {name: {metric: values["mean"] for metric, values in statistics.items()}
             for name, statistics in summary["per_class"].items()}
    overall = {metric: values["mean"] for metric, values in summary["overall"].items()}
    print(format_table({"tolerance_mm": args.tolerance_mm, "mean_per_class": means, "foreground_mean": overall}))
    output = Path(args.o) if args.o else model_folder / OUTPUT_NAME
    print(f"Summary of {summary['num_cases']} cases written to {output} and {output.with_suffix('.md')}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)
