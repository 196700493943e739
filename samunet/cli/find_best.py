"""``samunet_find_best DATASET -tr NAME1 NAME2 ... [-c 2d ...] [-p PLANS ...]``: the best model by cross-validation.

nnunetv2's ``nnUNetv2_find_best_configuration`` for samunet models, with its options and spellings:
every combination of ``-tr``, ``-c`` and ``-p`` is scored on the cross-validation of the folds
``-f`` (samunet's metrics: foreground Dice, the mean of the class means over all cases) and, unless
``--disable_ensembling``, every pair of them that has validation probabilities (trained with
``--npz``; the others are left out with a warning) is ensembled and scored the same way. Then
nnU-Net's connected-component postprocessing is determined on the winner's cross-validation
predictions and written next to them (``postprocessing.pkl`` / ``.json``). The ranking is written as
JSON (default ``$nnUNet_results/DATASET/find_best_samunet.json``), and the commands to predict,
ensemble and postprocess are printed and written to ``inference_instructions_samunet.txt`` beside it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from samunet.cli.common import NnunetStyleParser, add_common_arguments, process_count, run_cli, setup_logging
from samunet.errors import ConfigurationError

OUTPUT_NAME = "find_best_samunet.json"
INSTRUCTIONS_NAME = "inference_instructions_samunet.txt"


def fold_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"folds are numbers (0-4), not {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = NnunetStyleParser(prog="samunet_find_best", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset_name_or_id", nargs="?", default=None, help="dataset ID (218) or name")
    parser.add_argument("-d", default=None, help="the dataset, as an option (same as DATASET_NAME_OR_ID)")
    parser.add_argument("-tr", nargs="+", default=["SAMedTrainer"],
                        help="trainer names, e.g. SAMedTrainer HSAMTrainer (default SAMedTrainer)")
    parser.add_argument("-c", nargs="+", default=["2d"], help="configurations (default 2d)")
    parser.add_argument("-p", "--plans", dest="plans", nargs="+", default=["samunetPlans"],
                        help="plans identifiers (default samunetPlans)")
    parser.add_argument("-f", nargs="+", type=fold_number, default=[0, 1, 2, 3, 4],
                        help="folds whose validation predictions are used (default 0 1 2 3 4)")
    ensembling = parser.add_mutually_exclusive_group()
    ensembling.add_argument("--disable_ensembling", "--disable-ensembling", dest="ensembles", action="store_false",
                            help="do not evaluate ensembles of pairs of models")
    ensembling.add_argument("--ensembles", dest="ensembles", action="store_true",
                            help="evaluate ensembles of pairs of models (the default)")
    parser.set_defaults(ensembles=True)
    parser.add_argument("--no_overwrite", "--no-overwrite", dest="no_overwrite", action="store_true",
                        help="keep cross-validation folders and ensembles that are already complete")
    parser.add_argument("--recompute", action="store_true",
                        help="recompute the models' cv_summary_samunet.json even when present (five folds)")
    parser.add_argument("-o", default=None, help=f"output JSON (default $nnUNet_results/DATASET/{OUTPUT_NAME})")
    parser.add_argument("-np", type=process_count, default=1, help="worker processes (default 1)")
    add_common_arguments(parser, device=False)
    return parser


def _main(argv: Sequence[str] | None = None) -> int:
    from samunet.evaluation.best_configuration import candidate_models, find_best
    from samunet.atomic_files import write_text_atomically
    from samunet.evaluation.evaluate_folder import json_safe
    from samunet.paths import ensure_nnunet_paths
    from samunet.preprocessing.dataset_checks import resolve_dataset_name
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if (args.dataset_name_or_id is None) == (args.d is None):
        raise ConfigurationError("name the dataset once: samunet_find_best DATASET ... (or -d DATASET)")
    folders = ensure_nnunet_paths()
    dataset_name = resolve_dataset_name(args.dataset_name_or_id or args.d)
    results = Path(folders["nnUNet_results"])
    models = candidate_models(args.tr, args.c, args.plans)
    result = find_best(dataset_name, results, Path(folders["nnUNet_preprocessed"]) / dataset_name, models,
                       ensembles=args.ensembles, folds=args.f, num_processes=args.np, recompute=args.recompute,
                       overwrite=not args.no_overwrite)
    output = Path(args.o) if args.o else results / dataset_name / OUTPUT_NAME
    output.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(output, json.dumps(json_safe(result), indent=2) + "\n")
    for note in result["left_out_models"]:
        print(f"  (left out: {note})")
    print("All results (cross-validation foreground Dice):")
    for entry in result["ranking"]:
        print(f"  {entry['foreground_dice']:.4f}  {entry['name']}")
    for model, reason in result["left_out_of_ensembles"].items():
        print(f"  (not ensembled: {model}: {reason})")
    print(f"Best: {result['best']['name']} ({result['best']['foreground_dice']:.4f})")
    post = result["postprocessing"]
    if post is not None:
        chosen = ", ".join(f"{f}({k})" for f, k in zip(post["functions"], post["kwargs"])) or "none"
        print(f"Postprocessing (nnU-Net's connected components): {chosen}; nnU-Net foreground Dice "
              f"{post['nnunet_foreground_dice_before']:.4f} -> {post['nnunet_foreground_dice_after']:.4f}")
    instructions = ["Predict with:", *[f"  {c}" for c in result["commands"] if not c.startswith(
        ("samunet_ensemble", "samunet_apply_postprocessing"))]]
    ensemble = [c for c in result["commands"] if c.startswith("samunet_ensemble")]
    if ensemble:
        instructions += ["Then ensemble with:", *[f"  {c}" for c in ensemble]]
    postprocess = [c for c in result["commands"] if c.startswith("samunet_apply_postprocessing")]
    if postprocess:
        instructions += ["Once inference is completed, postprocess with:", *[f"  {c}" for c in postprocess]]
    print("\n".join(instructions))
    write_text_atomically(output.with_name(INSTRUCTIONS_NAME), "\n".join(instructions) + "\n")
    print(f"Ranking written to {output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)
