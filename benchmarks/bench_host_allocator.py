"""A CPU training step with glibc's default allocator against samunet's setting (samunet.host_allocator).

For each trainer, two fresh processes run one after the other (never side by side: on 2 cores that is noise):
the reference with glibc's defaults (``SAMUNET_CPU_ALLOCATOR=system``) and samunet's, which keeps freed large
blocks in the heap. Each builds the trainer as nnU-Net does (``tests/trainer_harness.build_trainer``: random
LiteMedSAM weights, 5 classes), calls ``select_device("cpu")`` as every samunet command does, and times
``train_step`` on fresh batches after one warm-up step. Printed per trainer: seconds per step for both, their
ratio, minor page faults per step, the share of CPU time spent in the kernel, and peak resident memory.

    python benchmarks/bench_host_allocator.py                       # the five main trainers, 128 px
    python benchmarks/bench_host_allocator.py --size 256 --trainers SAMedTrainer --steps 3
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))  # tests/trainer_harness.py builds trainers without data on disk
sys.path.insert(0, str(REPOSITORY / "benchmarks"))

MAIN_TRAINERS = ("SAMedTrainer", "SelfPromptSAMTrainer", "HSAMTrainer", "HSPSAMTrainer", "AutoMedSAMTrainer")
NUM_CLASSES = 5  # the real-MRI development set: 4 structures and background
STACK_DEPTH = 9  # Self-Prompt-SAM's planned stack on that set


def measure(trainer_name: str, size: int, batch: int, steps: int) -> dict:
    """Time ``steps`` training steps (after one warm-up) of one trainer in this process."""
    import torch

    from samunet.cli.common import select_device
    from tests.trainer_harness import build_trainer, make_batch, nnunet_environment
    select_device("cpu")
    stack = trainer_name.startswith("SelfPromptSAM")
    with tempfile.TemporaryDirectory() as root, nnunet_environment(Path(root)), \
            contextlib.redirect_stdout(io.StringIO()):
        trainer = build_trainer(trainer_name, backbone="litemedsam", num_classes=NUM_CLASSES, img_size=size,
                                depth=STACK_DEPTH if stack else 1, batch_size=1 if stack else batch)
        if trainer.training_phase_starts() != (0,):  # time the last phase: every module trains
            trainer.enter_training_phase(len(trainer.training_phase_starts()) - 1)
        trainer.train_step(make_batch(trainer, batch_size=trainer.batch_size, seed=0))
        before, faults_before = os.times(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        seconds = []
        for step in range(steps):
            data = make_batch(trainer, batch_size=trainer.batch_size, seed=step + 1)
            start = time.perf_counter()
            trainer.train_step(data)
            seconds.append(time.perf_counter() - start)
        after, faults_after = os.times(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    kernel = after.system - before.system
    return {"s_per_step": sum(seconds) / steps, "faults_per_step": (faults_after - faults_before) / steps,
            "kernel_share": kernel / max(kernel + after.user - before.user, 1e-9),
            "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            "threads": torch.get_num_threads()}


def run_child(trainer_name: str, size: int, batch: int, steps: int, allocator: str) -> dict:
    environment = {name: value for name, value in os.environ.items() if name != "SAMUNET_CPU_ALLOCATOR"}
    if allocator == "system":
        environment["SAMUNET_CPU_ALLOCATOR"] = "system"
    command = [sys.executable, __file__, "--child", trainer_name, "--size", str(size), "--batch", str(batch),
               "--steps", str(steps)]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainers", nargs="+", default=list(MAIN_TRAINERS))
    parser.add_argument("--size", type=int, default=128, help="input size in px (default 128)")
    parser.add_argument("--batch", type=int, default=9, help="slices per step of 2d trainers (default 9, "
                                                             "Self-Prompt-SAM: one stack of 9)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.size, args.batch, args.steps)))
        return 0

    from bench_common import format_table
    rows = []
    for name in args.trainers:
        reference = run_child(name, args.size, args.batch, args.steps, "system")
        samunet = run_child(name, args.size, args.batch, args.steps, "samunet")
        rows.append([name, f"{reference['s_per_step']:.2f}", f"{samunet['s_per_step']:.2f}",
                     f"{reference['s_per_step'] / samunet['s_per_step']:.2f}x",
                     f"{reference['faults_per_step'] / 1e3:.0f}k / {samunet['faults_per_step'] / 1e3:.0f}k",
                     f"{reference['kernel_share']:.0%} / {samunet['kernel_share']:.0%}",
                     f"{reference['peak_gb']:.1f} / {samunet['peak_gb']:.1f}"])
        print(format_table(["trainer", "glibc s/step", "samunet s/step", "speed-up", "page faults/step",
                            "kernel CPU", "peak GB"], rows[-1:]), flush=True)
    print(f"\n{args.size} px, {args.batch} slices per step, {args.steps} steps after one warm-up, "
          f"{reference['threads']} threads; reference first, then samunet's setting")
    print(format_table(["trainer", "glibc s/step", "samunet s/step", "speed-up", "page faults/step",
                        "kernel CPU", "peak GB"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
