"""``samunet_find_best -d ID -tr NAME1 NAME2 ... [-c 2d] [--ensembles]``: pick the best model by cross-validation.

Like ``nnUNetv2_find_best_configuration``: every trainer's 5-fold cross-validation is scored
(its ``cv_summary_samunet.json``, computed by samunet_cv_summary's code when absent) and ranked
by mean foreground Dice. With ``--ensembles`` each pair of trainers is also ensembled on the
folds' validation probabilities (present only when trained with ``--npz``; trainers without them
are left out with a warning) and scored the same way. The ranking is written as JSON (default
``$nnUNet_results/DATASET/find_best_samunet.json``) and the commands to predict with the best
model or ensemble are printed. No postprocessing is determined.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from samunet.cli.common import add_common_arguments, process_count, run_cli, setup_logging

OUTPUT_NAME = "find_best_samunet.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="samunet_find_best", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", required=True, help="dataset ID (218) or name")
    parser.add_argument("-tr", nargs="+", required=True, help="trainer names, e.g. SAMedTrainer HSAMTrainer")
    parser.add_argument("-c", default="2d", help="configuration (default 2d)")
    parser.add_argument("-p", "--plans", default="samunetPlans", help="plans identifier (default samunetPlans)")
    parser.add_argument("--ensembles", action="store_true", help="also evaluate ensembles of pairs of trainers")
    parser.add_argument("--recompute", action="store_true", help="recompute cv summaries even when present")
    parser.add_argument("-o", default=None, help=f"output JSON (default $nnUNet_results/DATASET/{OUTPUT_NAME})")
    parser.add_argument("-np", type=process_count, default=1, help="worker processes (default 1)")
    add_common_arguments(parser, device=False)
    return parser


def _main(argv: Sequence[str] | None = None) -> int:
    from samunet.evaluation.evaluate_folder import atomic_write_text, json_safe
    from samunet.evaluation.model_selection import find_best
    from samunet.paths import ensure_nnunet_paths
    from samunet.preprocessing.dataset_checks import resolve_dataset_name
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    folders = ensure_nnunet_paths()
    dataset_name = resolve_dataset_name(args.d)
    results = Path(folders["nnUNet_results"])
    result = find_best(dataset_name, results, Path(folders["nnUNet_preprocessed"]) / dataset_name, args.tr, args.c,
                       args.plans, ensembles=args.ensembles, num_processes=args.np, recompute=args.recompute)
    output = Path(args.o) if args.o else results / dataset_name / OUTPUT_NAME
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output, json.dumps(json_safe(result), indent=2) + "\n")
    print("All results (cross-validation foreground Dice):")
    for entry in result["ranking"]:
        print(f"  {entry['foreground_dice']:.4f}  {entry['name']}")
    for trainer, reason in result["left_out_of_ensembles"].items():
        print(f"  (not ensembled: {trainer}: {reason})")
    print(f"Best: {result['best']['name']} ({result['best']['foreground_dice']:.4f})")
    print("Predict with:")
    for command in result["commands"]:
        print(f"  {command}")
    print(f"Ranking written to {output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)
