"""``samunet_ensemble -i FOLDER1 FOLDER2 [...] -o OUT [-np N]``: average softmax probabilities into label maps.

Each input folder holds ``CASE.npz`` + ``CASE.pkl`` per case, as written by
``samunet_predict --save_probabilities`` (or a fold's ``validation/`` after training with ``--npz``),
plus the model's ``dataset.json`` and ``plans.json``. All folders must hold the same cases. The
probabilities of a case are averaged and the argmax is written as ``CASE<file_ending>`` in OUT
(nnunetv2's ``merge_files``). nnunetv2's ``nnUNetv2_ensemble`` options have their nnU-Net spelling
(``--save_npz``).
"""
from __future__ import annotations

import argparse
import logging
from typing import Sequence

from samunet.cli.common import NnunetStyleParser, add_common_arguments, process_count, run_cli, setup_logging

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = NnunetStyleParser(prog="samunet_ensemble", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", "--input", nargs="+", required=True, help="two or more folders with .npz + .pkl")
    parser.add_argument("-o", "--output", required=True, help="folder for the ensembled label maps")
    parser.add_argument("-np", type=process_count, default=1, help="worker processes (default 1: in this process)")
    parser.add_argument("--save_npz", "--save-probabilities", dest="save_probabilities", action="store_true",
                        help="also write the averaged probabilities as .npz/.pkl")
    add_common_arguments(parser, device=False)
    return parser


def _main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from samunet.evaluation.model_selection import ensemble_prediction_folders
    written = ensemble_prediction_folders(args.input, args.output, num_processes=args.np,
                                          save_probabilities=args.save_probabilities)
    logger.info("wrote %d ensembled label maps to %s", len(written), args.output)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)
