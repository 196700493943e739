"""The prepared GPU check: every main trainer's real training step on a GPU, in one table.

For each main trainer and each setting (backbone, input size, batch), a fresh process builds the
trainer as nnU-Net does (``tests/trainer_harness.build_trainer``: the trainer's own ``initialize()``,
so torch.compile where nnU-Net compiles, and the trainer's precision, by default fp16 autocast with
the GradScaler on CUDA), runs ``--warmup`` steps (compilation happens there) and times ``--steps``
calls of ``trainer.train_step`` on one synthetic batch. Each row gives slices per second (a stack
of D slices counts D), seconds per step, the warm-up time (mostly compilation), the peak device
memory and whether every loss was finite. With two or more GPUs a last row runs SAMed's step with
DistributedDataParallel on two of them (nnU-Net's DDP: the batch split over the ranks).

    bash benchmarks/gpu_check.sh                      # CUDA; on a machine without one it says so, exit 0
    python benchmarks/gpu_check.py --device cpu --settings vit_test:64:2 --steps 1   # dry run of the code

The whole check keeps to ``--budget-minutes`` (default 9): a setting that would start after it is
listed as skipped. Not part of the test suite.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))  # tests/trainer_harness.py builds trainers without data on disk

MAIN_TRAINERS = ("SAMedTrainer", "SelfPromptSAMTrainer", "HSAMTrainer", "HSPSAMTrainer", "AutoMedSAMTrainer")
DEFAULT_SETTINGS = ("vit_b:256:8", "vit_b:1024:2", "litemedsam:256:8")
NUM_CLASSES = 16  # AMOS: 15 organs and background
STACK_DEPTH = 3  # slices per stack for slice-stack trainers (Self-Prompt-SAM)

logger = logging.getLogger("gpu_check")


def parse_setting(text: str) -> tuple[str, int, int]:
    """'backbone:size:batch' -> (backbone, size, batch)."""
    backbone, size, batch = text.split(":")
    return backbone, int(size), int(batch)


def build_benchmark_trainer(trainer_name: str, backbone: str, size: int, batch: int, *, device: str,
                            precision: str | None, depth: int = 1):
    """The trainer as nnU-Net builds it (``initialize()``), on a random-initialised backbone of ``size`` px
    with batch ``batch``; call inside ``nnunet_environment``."""
    from tests.trainer_harness import build_trainer
    return build_trainer(trainer_name, backbone=backbone, num_classes=NUM_CLASSES, img_size=size, depth=depth,
                         batch_size=batch, device=device,
                         hyperparameters=None if precision is None else {"precision": precision})


def measure_step(trainer_name: str, backbone: str, size: int, batch: int, *, device: str, steps: int,
                 warmup: int, precision: str | None) -> dict:
    """Build one trainer on ``device`` and time its train_step; runs in its own process."""
    from tests.trainer_harness import make_batch, nnunet_environment
    with tempfile.TemporaryDirectory() as root, nnunet_environment(Path(root)):
        depth = STACK_DEPTH if trainer_name == "SelfPromptSAMTrainer" else 1
        trainer = build_benchmark_trainer(trainer_name, backbone, size, batch, device=device, precision=precision,
                                          depth=depth)
        data = make_batch(trainer, batch_size=trainer.batch_size)
        return time_steps(trainer, data, device=device, steps=steps, warmup=warmup,
                          slices_per_step=trainer.batch_size * depth)


def time_steps(trainer, data: dict, *, device: str, steps: int, warmup: int, slices_per_step: int) -> dict:
    """Warm-up then timed ``trainer.train_step(data)`` calls; seconds, slices/s, peak memory, finite losses."""
    from bench_common import memory_baseline_mib, peak_memory_mib, synchronize
    trainer.network.train()
    baseline = memory_baseline_mib(device)
    start = time.perf_counter()
    losses = [trainer.train_step(data)["loss"] for _ in range(warmup)]
    synchronize(device)
    warmup_seconds = time.perf_counter() - start
    start = time.perf_counter()
    losses += [trainer.train_step(data)["loss"] for _ in range(steps)]
    synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    return {"seconds_per_step": seconds, "slices_per_second": slices_per_step / seconds,
            "warmup_seconds": warmup_seconds, "peak_mib": peak_memory_mib(device, baseline),
            "finite": bool(all(math.isfinite(float(loss)) for loss in losses)),
            "precision": trainer.precision.name, "compiled": hasattr(trainer.network, "_orig_mod")
            or hasattr(getattr(trainer.network, "module", None), "_orig_mod")}


def measure_ddp(backbone: str, size: int, batch: int, *, device_type: str, steps: int, warmup: int,
                precision: str | None, result_file: str) -> None:
    """SAMed's train_step in a 2-process DistributedDataParallel group; rank 0 writes the result."""
    import torch.distributed as dist

    from samunet.trainers.distributed import process_device
    from tests.trainer_harness import make_batch, nnunet_environment
    with tempfile.TemporaryDirectory() as root, nnunet_environment(Path(root)):
        trainer = build_benchmark_trainer("SAMedTrainer", backbone, size, batch,
                                          device=str(process_device(device_type)), precision=precision)
        data = make_batch(trainer, batch_size=trainer.batch_size, seed=dist.get_rank())
        result = time_steps(trainer, data, device=str(process_device(device_type)), steps=steps, warmup=warmup,
                            slices_per_step=trainer.batch_size * dist.get_world_size())
    if dist.get_rank() == 0:
        Path(result_file).write_text(json.dumps(result))


def run_one(arguments: list[str], timeout: float) -> dict:
    """This script with ``arguments`` in a fresh process; its JSON result or the reason it gave none."""
    try:
        completed = subprocess.run([sys.executable, __file__, *arguments], capture_output=True, text=True,
                                   timeout=timeout, cwd=REPOSITORY)
    except subprocess.TimeoutExpired:
        return {"error": f"over the time left ({timeout:.0f} s)"}
    if completed.returncode != 0:
        last = (completed.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": last[:120]}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def row(name: str, setting: str, result: dict) -> list[object]:
    if "error" in result:
        return [name, setting, "-", "-", "-", "-", "-", result["error"]]
    return [name, setting, f"{result['slices_per_second']:.1f}", f"{result['seconds_per_step']:.3f}",
            f"{result['warmup_seconds']:.0f}", f"{result['peak_mib']:.0f}",
            "yes" if result["finite"] else "NO", f"{result['precision']}{', compiled' if result['compiled'] else ''}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--trainers", nargs="+", default=list(MAIN_TRAINERS))
    parser.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS), metavar="BACKBONE:SIZE:BATCH")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per row")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    parser.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default=None,
                        help="default: the trainer's (fp16 + GradScaler on CUDA, as nnU-Net)")
    parser.add_argument("--budget-minutes", type=float, default=9.0)
    parser.add_argument("--ddp", action="store_true", help="also the 2-process DDP row on a device without "
                                                          "two GPUs (gloo on CPU; for trying the code)")
    parser.add_argument("--one", nargs=4, metavar=("TRAINER", "BACKBONE", "SIZE", "BATCH"), help=argparse.SUPPRESS)
    parser.add_argument("--one-ddp", nargs=4, metavar=("BACKBONE", "SIZE", "BATCH", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(REPOSITORY / "benchmarks"))
    options = dict(steps=args.steps, warmup=args.warmup, precision=args.precision)
    if args.one:
        name, backbone, size, batch = args.one
        print(json.dumps(measure_step(name, backbone, int(size), int(batch), device=args.device, **options)))
        return 0
    if args.one_ddp:
        from samunet.trainers.distributed import run_distributed
        backbone, size, batch, result_file = args.one_ddp
        device_type = "cuda" if args.device.startswith("cuda") else args.device
        run_distributed(_ddp_entry, (backbone, int(size), int(batch), device_type, options, result_file),
                        world_size=2, device_type=device_type)
        print(Path(result_file).read_text())
        return 0

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        logger.info("gpu_check: torch %s sees no CUDA GPU on this machine, so there is nothing to measure; "
                    "run it where a GPU is at hand (see README, Performance)", torch.__version__)
        return 0
    os.environ.setdefault("nnUNet_compile", "true")  # nnU-Net's default on CUDA, stated for every row
    gpus = torch.cuda.device_count() if args.device.startswith("cuda") else 0
    described = torch.cuda.get_device_name(0) if gpus else args.device
    logger.info("gpu_check: %s (%d GPU%s), torch %s, %d timed steps after %d warm-up steps, %d classes",
                described, gpus, "" if gpus == 1 else "s", torch.__version__, args.steps, args.warmup, NUM_CLASSES)
    deadline = time.monotonic() + 60 * args.budget_minutes
    common = ["--device", args.device, "--steps", str(args.steps), "--warmup", str(args.warmup)] + (
        ["--precision", args.precision] if args.precision else [])
    rows = []
    for setting in args.settings:
        backbone, size, batch = parse_setting(setting)
        for name in args.trainers:
            left = deadline - time.monotonic()
            result = (run_one(["--one", name, backbone, str(size), str(batch), *common], left) if left > 10
                      else {"error": "skipped: time budget spent"})
            rows.append(row(name, setting, result))
            logger.info("  %s", " | ".join(str(cell) for cell in rows[-1]))
    if gpus >= 2 or args.ddp:
        backbone, size, batch = parse_setting(args.settings[0])
        with tempfile.TemporaryDirectory() as tmp:
            left = deadline - time.monotonic()
            result = (run_one(["--one-ddp", backbone, str(size), str(batch), str(Path(tmp) / "ddp.json"), *common],
                              left) if left > 10 else {"error": "skipped: time budget spent"})
        rows.append(row("SAMedTrainer DDP x2", f"{backbone}:{size}:{batch}", result))
    from bench_common import format_table
    logger.info("%s", format_table(["trainer", "backbone:size:batch", "slices/s", "s/step", "warm-up s", "peak MiB",
                                    "finite", "precision"], rows))
    return 0


def _ddp_entry(backbone: str, size: int, batch: int, device_type: str, options: dict, result_file: str) -> None:
    sys.path.insert(0, str(REPOSITORY / "benchmarks"))
    measure_ddp(backbone, size, batch, device_type=device_type, result_file=result_file, **options)


if __name__ == "__main__":
    sys.exit(main())
