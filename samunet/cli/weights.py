"""``samunet_weights list | fetch NAME | verify PATH``: the pretrained checkpoints samunet knows."""
from __future__ import annotations

import argparse
import logging
from typing import Sequence

from samunet.cli.common import run_cli, setup_logging
from samunet.paths import weights_folder
from samunet.weights import KNOWN_CHECKPOINTS, fetch, verify_checkpoint

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="samunet_weights", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="known checkpoints, their size, sha256 and source")
    fetch_parser = commands.add_parser("fetch", help="obtain a checkpoint into the weights folder")
    fetch_parser.add_argument("name", choices=sorted(KNOWN_CHECKPOINTS))
    verify_parser = commands.add_parser("verify", help="check a file's size and sha256")
    verify_parser.add_argument("path")
    return parser


def _main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    if args.command == "list":
        folder = weights_folder()
        print(f"weights folder: {folder}")
        for entry in KNOWN_CHECKPOINTS.values():
            present = "present" if (folder / entry.filename).is_file() else "absent"
            size = f"{entry.size:,} bytes" if entry.size else "size unpublished"
            print(f"{entry.name:13s} {entry.filename:22s} {size:>22s}  backbone {entry.backbone:10s} [{present}]\n"
                  f"{'':13s} sha256 {entry.sha256 or 'unpublished (only tensor names are checked)'}\n"
                  f"{'':13s} from {entry.source}")
    elif args.command == "fetch":
        print(fetch(args.name))
    else:
        entry = verify_checkpoint(args.path)
        print(f"{args.path}: OK ({entry.name})" if entry else
              f"{args.path}: exists, but is not a checkpoint samunet knows (no size/sha256 to check)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)
