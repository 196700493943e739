"""``samunet_evaluate -ref REF -pred PRED -d ID`` (or nnU-Net's ``REF PRED -djfile dataset.json``):
per-case, per-class Dice, NSD and HD95 (mm), with the NSD and HD95 conventions of
:mod:`samunet.evaluation.metrics` (``--nsd surface_area|voxel``, ``--hd95 max_directed|pooled``),
recorded in the summary JSON. Bad input (see :mod:`samunet.evaluation.evaluate_folder`) is one line
on stderr and exit code 2, with nothing written."""
from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Sequence

from samunet.cli.common import NnunetStyleParser, process_count, run_cli
from samunet.errors import ConfigurationError, DatasetError
from samunet.evaluation.metrics import DEFAULT_HD95, DEFAULT_NSD, HD95_CONVENTIONS, NSD_CONVENTIONS
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
    parser = NnunetStyleParser(
        prog="samunet_evaluate",
        description="Compare predicted label maps with references: per-class Dice, NSD and HD95. Takes "
                    "nnUNetv2_evaluate_folder's arguments (REF PRED -djfile dataset.json [-pfile plans.json] "
                    "[--chill]) as well as samunet's (-ref REF -pred PRED -d DATASET).")
    parser.add_argument("gt_folder", nargs="?", default=None, help="folder with the reference segmentations")
    parser.add_argument("pred_folder", nargs="?", default=None, help="folder with the predicted segmentations")
    parser.add_argument("-ref", default=None, help="folder with the reference segmentations (same as GT_FOLDER)")
    parser.add_argument("-pred", default=None, help="folder with the predicted segmentations (same file names)")
    parser.add_argument("-d", default=None, help="dataset id (218) or name (Dataset218_Name); gives dataset.json")
    parser.add_argument("-djfile", default=None, help="the dataset.json file itself (instead of -d)")
    parser.add_argument("-pfile", default=None,
                        help="plans.json: its label handling is checked (samunet evaluates label maps with an "
                             "optional 'ignore' label, no regions)")
    parser.add_argument("--chill", action="store_true",
                        help="evaluate only the references that have a prediction instead of refusing")
    parser.add_argument("--tolerance-mm", type=float, default=2.0, help="NSD tolerance in mm (default 2)")
    parser.add_argument("--nsd", choices=tuple(NSD_CONVENTIONS), default=DEFAULT_NSD,
                        help="surface_area (default): Nikolov et al.'s surface elements weighted by area, as "
                             "DeepMind's surface-distance; voxel: border voxels counted (also the surface HD95 uses)")
    parser.add_argument("--hd95", choices=tuple(HD95_CONVENTIONS), default=DEFAULT_HD95,
                        help="max_directed (default): the larger of the two directed 95th percentiles, as "
                             "DeepMind's compute_robust_hausdorff and MONAI; pooled: the 95th percentile of both "
                             "directions' distances together")
    parser.add_argument("-o", default=None, help=f"output JSON (default PRED/{DEFAULT_OUTPUT_NAME}); .md beside it")
    parser.add_argument("-np", type=process_count, default=1, help="number of worker processes (default 1)")
    return parser


def _folders(args: argparse.Namespace) -> tuple[Path, Path]:
    if (args.gt_folder is None) != (args.pred_folder is None) or \
            (args.gt_folder is not None and (args.ref or args.pred)):
        raise ConfigurationError("give the folders either as REF PRED or as -ref REF -pred PRED")
    ref, pred = (args.gt_folder, args.pred_folder) if args.gt_folder is not None else (args.ref, args.pred)
    if ref is None or pred is None:
        raise ConfigurationError("the reference and prediction folders are required (REF PRED, or -ref/-pred)")
    return Path(ref), Path(pred)


def _dataset_json(args: argparse.Namespace) -> dict:
    from samunet.evaluation.evaluate_folder import EvaluationError
    from samunet.preprocessing.dataset_checks import check_dataset_json_fields
    if (args.d is None) == (args.djfile is None):
        raise ConfigurationError("give the labels either with -d DATASET or with -djfile dataset.json")
    path = Path(args.djfile) if args.djfile else find_dataset_json(args.d)
    if not path.is_file():
        raise DatasetError(f"-djfile {path} does not exist")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EvaluationError(f"{path} is not valid JSON ({exc}); fix or regenerate it") from exc
    if not isinstance(content, dict):
        raise EvaluationError(f"{path} holds a {type(content).__name__}, not dataset.json's object; "
                              f"fix or regenerate it")
    missing = [key for key in ("labels", "file_ending") if key not in content]
    if missing:
        raise EvaluationError(f"{path} lacks {', '.join(missing)}, so it is not a data set's dataset.json "
                              f"(plans.json and summary.json are not); give the dataset.json of the data set "
                              f"(nnUNet_raw/DatasetXXX_Name/dataset.json) with -djfile, or -d DATASET")
    check_dataset_json_fields(content, path, training=False)
    return content


def check_label_handling(plans_file: str, dataset_json: dict) -> None:
    """What nnU-Net reads -pfile for: the label manager. samunet's metrics take label maps (with an
    optional ignore label), not regions."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    path = Path(plans_file)
    if not path.is_file():
        raise DatasetError(f"-pfile {path} does not exist")
    try:
        label_manager = PlansManager(str(path)).get_label_manager(dataset_json)
    except (AssertionError, RuntimeError, KeyError, ValueError) as error:
        raise ConfigurationError(f"nnunetv2 refuses the labels of {path} and its dataset.json: "
                                 f"{str(error) or type(error).__name__}; correct dataset.json's 'labels'") from error
    if label_manager.has_regions:
        raise ConfigurationError(f"{path} and its dataset.json define regions; samunet's metrics evaluate "
                                 f"label maps, use nnUNetv2_evaluate_folder for these")


def _chill_references(reference: Path, prediction: Path, file_ending: str, scratch: Path) -> list[str]:
    """Links in ``scratch`` to the references that have a prediction; returns the references left out."""
    from samunet.evaluation.evaluate_folder import EvaluationError
    if not reference.is_dir():
        raise EvaluationError(f"folder {reference} does not exist; check the path")
    predicted = {p.name for p in prediction.iterdir() if p.is_file() and p.name.endswith(file_ending)} \
        if prediction.is_dir() else set()
    left_out = []
    for path in sorted(reference.iterdir()):
        if not (path.is_file() and path.name.endswith(file_ending)):
            continue
        if path.name in predicted:
            os.symlink(path.resolve(), scratch / path.name)
        else:
            left_out.append(path.name[:-len(file_ending)])
    return left_out


def _main(argv: Sequence[str] | None = None) -> int:
    from samunet.evaluation.evaluate_folder import evaluate_folders, format_table, write_summary
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if not args.tolerance_mm > 0:  # also refuses nan
        raise ConfigurationError(f"--tolerance-mm must be a positive number of mm, got {args.tolerance_mm}")
    ref, pred = _folders(args)
    output_json = Path(args.o) if args.o else pred / DEFAULT_OUTPUT_NAME
    if output_json.suffix != ".json":
        raise ConfigurationError(f"-o {output_json} must end with .json; the markdown table is written beside it, "
                                 f"ending with .md")
    dataset_json = _dataset_json(args)
    if args.pfile:
        check_label_handling(args.pfile, dataset_json)
    conventions = {"nsd": args.nsd, "hd95": args.hd95}
    if not args.chill:
        summary = evaluate_folders(ref, pred, dataset_json, args.tolerance_mm, output_json, args.np, **conventions)
    else:
        with tempfile.TemporaryDirectory(prefix="samunet_chill_") as scratch:
            left_out = _chill_references(ref, pred, dataset_json.get("file_ending", ""), Path(scratch))
            summary = evaluate_folders(scratch, pred, dataset_json, args.tolerance_mm, None, args.np, **conventions)
        summary["reference_dir"] = str(ref)
        summary["references_without_prediction"] = left_out
        write_summary(output_json, summary)
        if left_out:
            print(f"--chill: {len(left_out)} reference(s) without a prediction were left out: "
                  f"{', '.join(left_out[:10])}{' ...' if len(left_out) > 10 else ''}")
    print(format_table(summary))
    print(f"Summary written to {output_json} and {output_json.with_suffix('.md')}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)
