"""``samunet_export_submission --challenge amos|acdc|synapse -i PRED_DIR -o OUT [-d ID]``."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from samunet.cli.common import add_common_arguments, run_cli, setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samunet_export_submission",
        description="Check test-set predictions (count, names, geometry against the test images, label values) "
                    "and write them in a challenge's submission format. See docs/submission.md.")
    parser.add_argument("--challenge", required=True, choices=("amos", "acdc", "synapse"))
    parser.add_argument("-i", required=True, help="folder with the predictions of the test images (samunet_predict)")
    parser.add_argument("-o", required=True, help="output: a .zip (AMOS: required) or a folder")
    parser.add_argument("-d", default=None, help="the converted dataset (ID or name) whose imagesTs were predicted "
                                                 "(default: amos 218, acdc 27, synapse 120)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    add_common_arguments(parser, device=False)
    return parser


def _main(argv: Sequence[str] | None = None) -> int:
    from samunet.paths import ensure_nnunet_paths
    from samunet.preprocessing.dataset_checks import resolve_dataset_name
    from samunet.submission.challenges import CHALLENGES
    from samunet.submission.export import export_submission
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    folders = ensure_nnunet_paths()
    dataset = args.d if args.d is not None else str(CHALLENGES[args.challenge].dataset_id)
    dataset_folder = Path(folders["nnUNet_raw"]) / resolve_dataset_name(dataset)
    output = export_submission(args.challenge, args.i, args.o, dataset_folder, overwrite=args.overwrite)
    print(f"Submission written to {output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)
