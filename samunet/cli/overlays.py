"""``samunet_overlays -i IMAGES -p PREDICTIONS [-r REFERENCES] -o OUT``: PNG overlays of any folder of results.

Draws each label map of PREDICTIONS (CASE + file ending) on its image (CASE_0000 + file ending in IMAGES;
of several channels the first is shown), next to its reference (CASE + file ending in REFERENCES) when
``-r`` is given, into ``OUT/CASE.png``: the slices with the most foreground, a legend with dataset.json's
label names, intensities from the image's own 0.5-99.5 percentiles unless ``--window LOW HIGH``
(:mod:`samunet.reporting.overlays`). So the results of samunet_predict, of a fold's validation or of any
nnU-Net model can be looked at without a viewer.

dataset.json (file ending, labels, reader) is taken from ``-djfile``, else from PREDICTIONS (samunet_predict
writes it there), else from the model folder two levels up (``<model>/fold_X/validation``).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Sequence

from samunet.cli.common import NnunetStyleParser, add_common_arguments, run_cli, setup_logging, whole_number_at_least
from samunet.errors import ConfigurationError, DatasetError

logger = logging.getLogger(__name__)


def find_dataset_json(predictions: Path, given: str | None) -> Path:
    """``given``, else PREDICTIONS/dataset.json, else PREDICTIONS/../../dataset.json (a fold's validation
    folder); raises :class:`DatasetError` when none exists."""
    if not predictions.is_dir():
        raise DatasetError(f"predictions folder {predictions} does not exist" if not predictions.exists() else
                           f"{predictions} is a file; -p takes the folder holding the label maps")
    candidates = [Path(given)] if given is not None else [predictions / "dataset.json",
                                                          predictions.parent.parent / "dataset.json"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DatasetError(f"no dataset.json found ({', '.join(str(c) for c in candidates)}); give the data set's "
                       f"with -djfile (e.g. $nnUNet_raw/DatasetXXX_NAME/dataset.json)")


def read_dataset_json(path: Path) -> dict:
    """The checked contents of dataset.json ``path`` (``file_ending`` and ``labels`` present)."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(f"{path} cannot be read ({error}); give a valid dataset.json with -djfile") from error
    missing = [key for key in ("file_ending", "labels") if not isinstance(content, dict) or key not in content]
    if missing:
        raise DatasetError(f"{path} has no {' or '.join(missing)}; give the data set's dataset.json with -djfile")
    return content


def build_parser() -> argparse.ArgumentParser:
    parser = NnunetStyleParser(prog="samunet_overlays", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", "--images", required=True, help="folder with the images CASE_0000<ending>")
    parser.add_argument("-p", "--predictions", required=True, help="folder with the label maps CASE<ending>")
    parser.add_argument("-r", "--references", default=None,
                        help="folder with the reference label maps CASE<ending> (drawn next to the prediction)")
    parser.add_argument("-o", "--output", required=True,
                        help="folder for the PNGs (CASE.png); not a folder of -i, -p or -r (refused: the PNGs "
                             "could replace a .png data set's label maps)")
    parser.add_argument("-djfile", "--dataset-json", dest="dataset_json", default=None,
                        help="the data set's dataset.json (default: PREDICTIONS/dataset.json, else "
                             "PREDICTIONS/../../dataset.json)")
    parser.add_argument("--slices", type=whole_number_at_least(0), default=3,
                        help="rows: the slices with the most foreground (default 3)")
    parser.add_argument("--even-slices", dest="even_slices", type=whole_number_at_least(0), default=0,
                        help="also this many evenly spaced slices (default 0)")
    parser.add_argument("--window", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None,
                        help="intensities shown black and white (e.g. -160 240 for CT soft tissue); default: the "
                             "image's own 0.5 and 99.5 percentiles")
    parser.add_argument("--cases", nargs="+", default=None, help="only these cases (default: every prediction)")
    add_common_arguments(parser, device=False)
    return parser


def _main(argv: Sequence[str] | None = None) -> int:
    from samunet.reporting.overlays import cases_from_folders, write_overlays
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.window is not None and args.window[1] <= args.window[0]:
        raise ConfigurationError(f"--window {args.window[0]:g} {args.window[1]:g}: HIGH must be above LOW")
    predictions = Path(args.predictions)
    dataset_json = read_dataset_json(find_dataset_json(predictions, args.dataset_json))
    cases = cases_from_folders(args.images, predictions, dataset_json, args.references, names=args.cases)
    write_overlays(cases, args.output, dataset_json, window=tuple(args.window) if args.window else None,
                   num_slices=args.slices, even_slices=args.even_slices)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)
