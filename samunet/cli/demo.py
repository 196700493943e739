"""``samunet_demo``: the whole pipeline on an embedded synthetic CT phantom, no data or set-up needed.

phantom data set (nnU-Net raw layout) -> plan and preprocess -> train (SAMedTrainer on
LiteMedSAM by default) -> predict the held-out test cases -> evaluate -> a report folder with
metrics (JSON + markdown), progress.png and PNG overlays.

Everything lives under one folder (default ``./samunet_demo``), which holds its own
nnUNet_raw / nnUNet_preprocessed / nnUNet_results: the demo never writes into the folders of
a user's real data sets, even when those variables are set.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Sequence

from samunet.atomic_files import write_atomically
from samunet.cli.common import (add_common_arguments, prepare_environment, run_cli,
                                 select_device, setup_logging)
from samunet.cli.train import (add_labelled_subset_options, add_max_minutes_option, add_precision_option,
                               hyperparameters_from_args)

logger = logging.getLogger(__name__)

DEMO_DATASET_ID = 990
# CPU-sized defaults, measured to finish in < 15 minutes on 2 cores (see README / docs/demo.md)
DEMO_IMAGE_SIZE = 96
DEMO_PHANTOM_SHAPE = (24, 96, 96)
DEMO_NUM_TRAIN = 10
DEMO_NUM_TEST = 3
DEMO_HYPERPARAMETERS = {"num_epochs": 10, "num_iterations_per_epoch": 40, "num_val_iterations_per_epoch": 4,
                        "batch_size": 4}
FALLBACK_BACKBONE = "tinyvit_test"


def use_demo_folders(root: Path) -> None:
    """Point nnU-Net's three folder variables (and the weights folder, if unset) into ``root``."""
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[name] = str(root / name)
    os.environ.setdefault("SAMUNET_WEIGHTS", str(Path.cwd() / "samunet_weights"))


def obtain_weights(backbone: str) -> tuple[str, str | None]:
    """(backbone, weights) to train with: the real LiteMedSAM weights, else a loud fallback."""
    from samunet.backbones.catalog import get_backbone_spec
    from samunet.weights import WeightsError, fetch
    default = get_backbone_spec(backbone).default_weights
    if default is None:
        return backbone, "none"
    try:
        return backbone, str(fetch(default))
    except WeightsError as error:
        logger.warning("!" * 78)
        logger.warning("COULD NOT GET THE PRETRAINED %s WEIGHTS: %s", default, error)
        logger.warning("THE DEMO FALLS BACK TO A TINY RANDOM BACKBONE (%s); ITS RESULTS SAY NOTHING "
                       "ABOUT SAM", FALLBACK_BACKBONE)
        logger.warning("!" * 78)
        return FALLBACK_BACKBONE, "none"


def _copy_atomically(source: Path, target: Path) -> None:
    """``source`` copied to ``target`` through a temporary file (:func:`samunet.atomic_files.write_atomically`)."""
    with open(source, "rb") as stream:
        write_atomically(target, lambda copy: shutil.copyfileobj(stream, copy), suffix=target.suffix)


CT_SOFT_TISSUE_WINDOW = (-160.0, 240.0)  # HU shown black and white in the report's overlays (the phantom is CT)


def write_report(report: Path, raw: Path, predictions: Path, training_folder: Path, summary: dict,
                 dataset_json: dict, timings: dict, settings: dict) -> None:
    """The report folder: an overlay per test case, progress.png, metrics.json and metrics.md, each written
    atomically (a full disk raises OSError naming the file and leaves the previous one as it was)."""
    from samunet.atomic_files import write_text_atomically
    from samunet.evaluation.evaluate_folder import format_table
    from samunet.reporting.overlays import write_overlay
    report.mkdir(parents=True, exist_ok=True)
    ending = dataset_json["file_ending"]
    for label_file in sorted((raw / "labelsTs").glob(f"*{ending}")):
        case = label_file.name[:-len(ending)]
        write_overlay(raw / "imagesTs" / f"{case}_0000{ending}", label_file, predictions / label_file.name,
                      report / f"overlay_{case}.png", dataset_json["labels"], window=CT_SOFT_TISSUE_WINDOW,
                      dataset_json=dataset_json)
    if (training_folder / "progress.png").is_file():
        _copy_atomically(training_folder / "progress.png", report / "progress.png")
    write_text_atomically(report / "metrics.json", json.dumps({"summary": summary, "timings_s": timings,
                                                           "settings": settings}, indent=2, default=str))
    lines = ["# samunet demo report", "",
             f"Trainer {settings['trainer']} on backbone {settings['backbone']} "
             f"(weights: {settings['weights']}), input {settings['image_size']} px, device {settings['device']}.", "",
             "Held-out test phantoms:", "", format_table(summary), "",
             "| step | seconds |", "|---|---|"] + [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    write_text_atomically(report / "metrics.md", "\n".join(lines) + "\n")


def run_demo(root: Path, *, trainer: str = "SAMedTrainer", backbone: str = "litemedsam",
             image_size: int = DEMO_IMAGE_SIZE, device: str | None = None,
             hyperparameters: dict | None = None, num_train: int = DEMO_NUM_TRAIN,
             num_test: int = DEMO_NUM_TEST, shape: tuple[int, int, int] = DEMO_PHANTOM_SHAPE,
             depth: int | None = None) -> dict:
    """Run the demo under ``root``; returns the evaluation summary (also written to root/report).
    ``depth``: slices per stack for slice-stack trainers (default: the plans')."""
    root = root.resolve()
    use_demo_folders(root)
    prepare_environment()
    from samunet.cli.plan_and_preprocess import plan_and_preprocess
    from samunet.cli.predict import build_predictor, predict_folder
    from samunet.cli.train import train
    from samunet.evaluation.evaluate_folder import evaluate_folders
    from samunet.preprocessing.phantom import write_phantom_dataset

    timings = {}
    start = time.perf_counter()
    raw = write_phantom_dataset(root / "nnUNet_raw", dataset_id=DEMO_DATASET_ID, num_train=num_train,
                                num_test=num_test, shape=shape)
    dataset_json = json.loads((raw / "dataset.json").read_text())
    timings["phantom"] = time.perf_counter() - start

    start = time.perf_counter()
    backbone, weights = obtain_weights(backbone)
    timings["weights"] = time.perf_counter() - start

    start = time.perf_counter()
    plan_and_preprocess(DEMO_DATASET_ID, backbone=backbone, image_size=image_size, num_processes=2)
    timings["plan_and_preprocess"] = time.perf_counter() - start

    start = time.perf_counter()
    settings = {**DEMO_HYPERPARAMETERS, **(hyperparameters or {}), "weights": weights}
    if "max_minutes" in settings and "num_epochs" not in (hyperparameters or {}):
        del settings["num_epochs"]  # --max-minutes alone: the budget decides, not the demo's 10 epochs
    fitted = train(DEMO_DATASET_ID, "2d", 0, trainer, device=device, hyperparameters=settings, depth=depth)
    timings["train_and_validate"] = time.perf_counter() - start

    start = time.perf_counter()
    predictions = root / "predictions"
    if predictions.exists():
        shutil.rmtree(predictions)
    # the test cases are predicted in the precision the model trained in (--precision; default nnU-Net's)
    predictor = build_predictor(raw.name, "2d", trainer, [0], device=device,
                                precision=(hyperparameters or {}).get("precision"))
    predict_folder(predictor, raw / "imagesTs", predictions)
    timings["predict"] = time.perf_counter() - start

    start = time.perf_counter()
    summary = evaluate_folders(raw / "labelsTs", predictions, dataset_json, 2.0, predictions / "summary.json")
    timings["evaluate"] = time.perf_counter() - start
    write_report(root / "report", raw, predictions, Path(fitted.output_folder), summary, dataset_json, timings,
                 {"trainer": trainer, "backbone": backbone, "weights": weights, "image_size": image_size,
                  "device": str(fitted.device), "depth": depth, **settings})
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="samunet_demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="samunet_demo", help="demo folder (default ./samunet_demo)")
    parser.add_argument("--trainer", default="SAMedTrainer", help="trainer to demonstrate")
    parser.add_argument("--backbone", default="litemedsam")
    # each also with underscores, as nnU-Net spells its flags
    parser.add_argument("--image-size", "--image_size", dest="image_size", type=int, default=DEMO_IMAGE_SIZE)
    parser.add_argument("--num-epochs", "--num_epochs", dest="num_epochs", type=int, default=None)
    parser.add_argument("--iters-per-epoch", "--iters_per_epoch", dest="iters_per_epoch", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None, help="override the trainer's initial learning rate")
    parser.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=None,
                        help=f"default {DEMO_HYPERPARAMETERS['batch_size']} (slice-stack trainers: stacks)")
    parser.add_argument("--depth", type=int, default=None, help="slices per stack (slice-stack trainers)")
    add_precision_option(parser)
    add_max_minutes_option(parser, continues=False)  # the demo has no --c
    add_labelled_subset_options(parser)
    add_common_arguments(parser)
    return parser


def _main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    device = select_device(args.device)
    from samunet.precision import choose_precision
    choose_precision(device.type, args.precision)  # refuse e.g. fp16 on a CPU before the phantom is written
    overrides = hyperparameters_from_args(args)  # checked before the phantom is written
    started = time.perf_counter()
    summary = run_demo(Path(args.output), trainer=args.trainer, backbone=args.backbone,
                       image_size=args.image_size, device=args.device, hyperparameters=overrides,
                       depth=args.depth)
    from samunet.evaluation.evaluate_folder import format_table
    print(format_table(summary))
    print(f"demo finished in {time.perf_counter() - started:.0f} s; report in {Path(args.output) / 'report'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)
