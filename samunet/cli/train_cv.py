"""``samunet_train_cv DATASET CONFIG -tr NAME [--folds 0 1 2 3 4] [--devices cuda:0 cuda:1 ...]``: train all folds.

Without ``--devices`` (or with one) the folds are trained one after another in this process
(:func:`samunet.cli.train.train` per fold). With several devices the folds are shared out
round-robin (fold i goes to device i mod N) and each device gets one worker that runs
``samunet_train`` for its folds one after another, with ``CUDA_VISIBLE_DEVICES`` set to that GPU.
All workers are waited for; if any fold fails, the command fails and names the failed folds.
The training overrides are those of ``samunet_train``.
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import threading
from typing import Sequence

from samunet.cli.common import NnunetStyleParser, parse_fold, prepare_environment, run_cli, setup_logging
from samunet.cli.train import (add_training_options, fold_training, hyperparameters_from_args,
                                train_on_processes, training_options_as_arguments)
from samunet.errors import ConfigurationError, SamunetError

logger = logging.getLogger(__name__)

# how to train several folds on a CPU: one worker per device would put two trainings on the same cores
SEQUENTIAL_ON_CPU = ("on a CPU, train the folds one after another: leave --devices out and give -device cpu (or "
                     "--devices cpu)")


class TrainingFailedError(SamunetError, RuntimeError):
    """One or more folds of a multi-device training failed."""


def partition_folds(folds: Sequence[int | str], devices: Sequence[str]) -> dict[str, list[int | str]]:
    """Round-robin: the i-th of ``folds`` goes to ``devices[i % len(devices)]``; devices without folds are dropped."""
    if not devices:
        raise ConfigurationError("no devices given")
    if len(set(devices)) != len(devices):
        raise ConfigurationError(f"devices are named more than once: {list(devices)}; each worker needs a device of "
                                 f"its own (--devices cuda:0 cuda:1 ...); {SEQUENTIAL_ON_CPU}")
    if len(set(folds)) != len(folds):
        raise ConfigurationError(f"folds are named more than once: {list(folds)}")
    shares: dict[str, list[int | str]] = {device: [] for device in devices}
    for index, fold in enumerate(folds):
        shares[devices[index % len(devices)]].append(fold)
    return {device: share for device, share in shares.items() if share}


def device_environment(device: str) -> tuple[str, dict[str, str]]:
    """``cuda:N`` -> (``cuda``, ``CUDA_VISIBLE_DEVICES=N``); ``cuda``, ``cpu``, ``mps`` as they are."""
    name, _, index = device.partition(":")
    if name not in ("cuda", "cpu", "mps"):
        raise ConfigurationError(f"device must be cuda:N, cuda, cpu or mps, not {device!r}")
    if index:
        if name != "cuda" or not index.isdigit():
            raise ConfigurationError(f"only CUDA devices take an index (cuda:0), not {device!r}"
                                     + (f"; {SEQUENTIAL_ON_CPU}" if name == "cpu" else ""))
        return name, {"CUDA_VISIBLE_DEVICES": index}
    return name, {}


def fold_command(args: argparse.Namespace, fold: int | str, device: str) -> list[str]:
    """The ``samunet_train`` command line (run through this Python) for one fold on one device."""
    return [sys.executable, "-c", "import sys; from samunet.cli.train import main; sys.exit(main())",
            str(args.dataset), args.configuration, str(fold), "-tr", args.trainer, "-device", device,
            *training_options_as_arguments(args)]


def _run_share(commands: list[tuple[int | str, list[str]]], environment: dict, failures: dict) -> None:
    for fold, command in commands:
        logger.info("fold %s: %s", fold, " ".join(command[3:]))
        code = subprocess.run(command, env=environment).returncode
        if code != 0:
            failures[fold] = code


def train_on_devices(args: argparse.Namespace, folds: Sequence[int | str], devices: Sequence[str]) -> None:
    """One worker per device, each training its share of the folds in sequence; raises if any fold failed."""
    threads, failures = [], {}
    for device, share in partition_folds(folds, devices).items():
        name, extra = device_environment(device)
        environment = {**os.environ, **extra}
        commands = [(fold, fold_command(args, fold, name)) for fold in share]
        logger.info("%s trains fold(s) %s", device, ", ".join(str(f) for f in share))
        thread = threading.Thread(target=_run_share, args=(commands, environment, failures), name=device)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    if failures:
        listed = ", ".join(f"fold {fold} (exit code {code})" for fold, code in sorted(failures.items(), key=str))
        raise TrainingFailedError(f"{len(failures)} of {len(folds)} fold(s) failed: {listed}; see their output "
                                  f"above, fix the cause and re-run those folds (samunet_train ... FOLD --c)")


def build_parser() -> argparse.ArgumentParser:
    """samunet_train's arguments with a list of folds instead of one."""
    parser = NnunetStyleParser(prog="samunet_train_cv", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", help="dataset ID (218) or name (Dataset218_AMOS...)")
    parser.add_argument("configuration", help="2d")
    add_training_options(parser)
    parser.add_argument("--folds", nargs="+", type=parse_fold, default=[0, 1, 2, 3, 4],
                        help="folds to train (default 0 1 2 3 4)")
    parser.add_argument("--devices", nargs="+", default=None,
                        help="cuda:0 cuda:1 ...: one worker per device, folds shared round-robin")
    return parser


def _main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    hyperparameters_from_args(args)  # bad values (--labelled-fraction 0) stop here, before any fold starts
    if args.devices and len(args.devices) > 1:
        if args.device is not None:
            raise ConfigurationError("use either -device or --devices, not both")
        train_on_devices(args, args.folds, args.devices)
        return 0
    partition_folds(args.folds, args.devices or ["single"])  # checks for repeated folds
    device = args.device
    if args.devices:
        device, extra = device_environment(args.devices[0])
        os.environ.update(extra)
    prepare_environment()
    for fold in args.folds:
        logger.info("training fold %s of %s", fold, ", ".join(str(f) for f in args.folds))
        run = fold_training(args, fold, device)
        train_on_processes(run, num_gpus=args.num_gpus, device=device, under_torchrun=False)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)
