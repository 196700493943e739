"""``samunet_evaluate -ref REF -pred PRED -d ID``: per-case, per-class Dice, NSD and HD95 (mm)."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Sequence

from samunet.cli.common import process_count, run_cli
from samunet.errors import ConfigurationError, DatasetError
from samunet.paths import ensure_nnunet_paths

DEFAULT_OUTPUT_NAME = "summary_samunet.json"
SEARCHED_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed")


def find_dataset_json(dataset: str) -> Path:
    """dataset.json of ``218`` / ``Dataset218_Name`` in $nnUNet_raw, else $nnUNet_preprocessed."""
    from samunet.preprocessing.dataset_checks import resolve_dataset_name
    folders = ensure_nnunet_paths()
    dataset_name = resolve_dataset_name(dataset)
    candidates = [folders[name] / dataset_name / "dataset.json" for name in SEARCHED_VARIABLES]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DatasetError(f"no dataset.json for {dataset_name} (looked for {', '.join(map(str, candidates))}); "
                       f"set nnUNet_raw or nnUNet_preprocessed to the folder holding {dataset_name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samunet_evaluate",
        description="Compare predicted label maps with references: per-class Dice, NSD and HD95.")
    parser.add_argument("-ref", required=True, help="folder with the reference segmentations")
    parser.add_argument("-pred", required=True, help="folder with the predicted segmentations (same file names)")
    parser.add_argument("-d", required=True, help="dataset id (218) or name (Dataset218_Name); gives dataset.json")
    parser.add_argument("--tolerance-mm", type=float, default=2.0, help="NSD tolerance in mm (default 2)")
    parser.add_argument("-o", default=None, help=f"output JSON (default PRED/{DEFAULT_OUTPUT_NAME}); .md beside it")
    parser.add_argument("-np", type=process_count, default=1, help="number of worker processes (default 1)")
    return parser


def _main(argv: Sequence[str] | None = None) -> int:
    from samunet.evaluation.evaluate_folder import EvaluationError, evaluate_folders, format_table
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if args.tolerance_mm <= 0:
        raise ConfigurationError(f"--tolerance-mm must be positive, got {args.tolerance_mm}")
    output_json = Path(args.o) if args.o else Path(args.pred) / DEFAULT_OUTPUT_NAME
    dataset_json_path = find_dataset_json(args.d)
    try:
        dataset_json = json.loads(dataset_json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EvaluationError(f"{dataset_json_path} is not valid JSON ({exc}); fix or regenerate it") from exc
    summary = evaluate_folders(args.ref, args.pred, dataset_json, args.tolerance_mm, output_json, args.np)
    print(format_table(summary))
    print(f"Summary written to {output_json} and {output_json.with_suffix('.md')}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)
