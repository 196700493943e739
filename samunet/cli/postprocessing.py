"""``samunet_apply_postprocessing`` and ``samunet_determine_postprocessing``: nnU-Net's connected-component
postprocessing (nnunetv2's ``nnUNetv2_apply_postprocessing`` / ``nnUNetv2_determine_postprocessing``,
same options and spellings).

``samunet_find_best`` determines the postprocessing on the chosen model's cross-validation and
prints the ``samunet_apply_postprocessing`` command for new predictions:

    samunet_apply_postprocessing -i OUTPUT_FOLDER -o OUTPUT_FOLDER_PP -pp_pkl_file .../postprocessing.pkl

The files are nnunetv2's, so either tool can apply them. See :mod:`samunet.evaluation.postprocessing`.
"""
from __future__ import annotations

import argparse
import logging
from typing import Sequence

from samunet.cli.common import NnunetStyleParser, add_common_arguments, process_count, run_cli, setup_logging

logger = logging.getLogger(__name__)


def build_apply_parser() -> argparse.ArgumentParser:
    parser = NnunetStyleParser(prog="samunet_apply_postprocessing",
                               description="Apply the postprocessing in a postprocessing.pkl (samunet_find_best, "
                                           "nnUNetv2_determine_postprocessing) to a folder of predictions.")
    parser.add_argument("-i", required=True, help="folder with predictions (samunet_predict / samunet_ensemble)")
    parser.add_argument("-o", required=True, help="output folder for the postprocessed predictions")
    parser.add_argument("-pp_pkl_file", required=True, help="postprocessing.pkl")
    parser.add_argument("-np", type=process_count, default=1, help="worker processes (default 1: in this process)")
    parser.add_argument("-plans_json", default=None, help="plans.json (default: the one in the input folder)")
    parser.add_argument("-dataset_json", default=None, help="dataset.json (default: the one in the input folder)")
    add_common_arguments(parser, device=False)
    return parser


def build_determine_parser() -> argparse.ArgumentParser:
    parser = NnunetStyleParser(prog="samunet_determine_postprocessing",
                               description="Decide nnU-Net's connected-component postprocessing on a folder of "
                                           "(cross-validation) predictions; writes postprocessing.pkl and .json "
                                           "into it.")
    parser.add_argument("-i", required=True, help="folder with the predictions")
    parser.add_argument("-ref", required=True, help="folder with the reference segmentations")
    parser.add_argument("-plans_json", default=None, help="plans.json (default: the one in the input folder)")
    parser.add_argument("-dataset_json", default=None, help="dataset.json (default: the one in the input folder)")
    parser.add_argument("-np", type=process_count, default=1, help="worker processes (default 1: in this process)")
    parser.add_argument("--remove_postprocessed", "--remove-postprocessed", dest="remove_postprocessed",
                        action="store_true", help="do not keep the postprocessed files (INPUT/postprocessed)")
    add_common_arguments(parser, device=False)
    return parser


def _apply(argv: Sequence[str] | None = None) -> int:
    from samunet.evaluation.postprocessing import apply_postprocessing_to_folder, load_postprocessing
    args = build_apply_parser().parse_args(argv)
    setup_logging(args.verbose)
    functions, kwargs = load_postprocessing(args.pp_pkl_file)
    written = apply_postprocessing_to_folder(args.i, args.o, functions, kwargs, args.plans_json, args.dataset_json,
                                             args.np, origin=args.pp_pkl_file)
    print(f"Postprocessed {len(written)} prediction(s) into {args.o} "
          f"({', '.join(f.__name__ for f in functions) or 'no change: nothing was adopted'})")
    return 0


def _determine(argv: Sequence[str] | None = None) -> int:
    from pathlib import Path

    from samunet.errors import DatasetError
    from samunet.evaluation.postprocessing import PP_PICKLE, determine_postprocessing
    args = build_determine_parser().parse_args(argv)
    setup_logging(args.verbose)
    folder = Path(args.i)
    plans = args.plans_json or folder / "plans.json"
    dataset_json = args.dataset_json or folder / "dataset.json"
    for name, path in (("-plans_json", plans), ("-dataset_json", dataset_json)):
        if not Path(path).is_file():
            raise DatasetError(f"{path} is missing; pass {name}")
    functions, kwargs = determine_postprocessing(folder, args.ref, plans, dataset_json, args.np,
                                                 keep_postprocessed_files=not args.remove_postprocessed)
    print(f"Postprocessing: {', '.join(f'{f.__name__}({k})' for f, k in zip(functions, kwargs)) or 'none'}; "
          f"written to {folder / PP_PICKLE}")
    return 0


def main_apply(argv: Sequence[str] | None = None) -> int:
    return run_cli(_apply, argv)


def main_determine(argv: Sequence[str] | None = None) -> int:
    return run_cli(_determine, argv)
