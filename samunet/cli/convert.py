"""``samunet_convert amos|acdc|synapse SRC [-d ID]``: a benchmark's release -> nnU-Net raw layout."""
from __future__ import annotations

import argparse
from typing import Sequence

from samunet.cli.common import add_common_arguments, run_cli, setup_logging
from samunet.preprocessing.converters import acdc, amos, synapse

CONVERTERS = {"amos": amos.convert_amos, "acdc": acdc.convert_acdc, "synapse": synapse.convert_synapse}
DEFAULT_IDS = {"amos": amos.DEFAULT_DATASET_ID, "acdc": acdc.DEFAULT_DATASET_ID,
               "synapse": synapse.DEFAULT_DATASET_ID}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samunet_convert",
        description="Convert AMOS22 task 1, ACDC or Synapse (BTCV) into nnU-Net's raw layout in $nnUNet_raw. "
                    "The source is checked first; every problem is listed and nothing is written then.")
    parser.add_argument("benchmark", choices=sorted(DEFAULT_IDS))
    parser.add_argument("source", help="the extracted release: AMOS22's amos22/ folder, ACDC's folder with "
                                       "training/ and testing/, or BTCV's RawData/Training (img/, label/)")
    parser.add_argument("-d", type=int, default=None,
                        help="dataset ID (default: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_IDS.items()) + ")")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset with this ID")
    add_common_arguments(parser, device=False)
    return parser


def _main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    dataset_id = DEFAULT_IDS[args.benchmark] if args.d is None else args.d
    target = CONVERTERS[args.benchmark](args.source, dataset_id, overwrite=args.overwrite)
    print(f"Converted {args.benchmark} into {target}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)
