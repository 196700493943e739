"""The prepared GPU check: every main trainer's real training step on a GPU, in one table.

For each setting (backbone, input size, batch) the main trainers run in parallel processes, each
building its trainer as nnU-Net does (``tests/trainer_harness.build_trainer``: the trainer's own
``initialize()``, so torch.compile where nnU-Net compiles, and the trainer's precision, by default
fp16 autocast with the GradScaler on CUDA) on a randomly initialised backbone. Each runs
``--warmup`` steps first, where compilation happens; the warm-ups overlap, because compiling is
host work and, measured on an H200 on 2026-11-30, takes over 80 s for one LiteMedSAM training step,
so one trainer after another would not fit the check into 10 minutes. The processes then wait
for each other and time ``--steps`` calls of ``trainer.train_step`` on one synthetic batch one
process at a time, so no timed step shares the device or the host. Each row gives slices per second
(a stack of D slices counts D), seconds per step, the warm-up time (mostly compilation), the peak
device memory of that process, whether every loss was finite, and "device busy": the kernel time of
one profiled step over the time of a timed step (low means the step waits for the host: Python,
launches, synchronisations). The profiled step's top operations go to the row's log
(``--log-dir``). With two or more GPUs a last row runs SAMed's step with DistributedDataParallel on
two of them (nnU-Net's DDP: the batch split over the ranks).

    bash benchmarks/gpu_check.sh                      # CUDA; on a machine without one it says so, exit 0
    python benchmarks/gpu_check.py --device cpu --settings vit_test:64:2 --steps 1   # dry run of the code

The whole check keeps to ``--budget-minutes`` (default 9): a setting that would start after it is
listed as skipped, a process still running at the end is stopped. Not part of the test suite.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
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
DEFAULT_SETTINGS = ("litemedsam:256:8", "vit_b:1024:2", "vit_b:256:8")  # most used first
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
    with batch ``batch`` (``weights none``: speed and memory do not depend on the values, and a GPU
    machine need not hold the released checkpoints); call inside ``nnunet_environment``."""
    from tests.trainer_harness import build_trainer
    hyperparameters = {"weights": "none"} if precision is None else {"weights": "none", "precision": precision}
    return build_trainer(trainer_name, backbone=backbone, num_classes=NUM_CLASSES, img_size=size, depth=depth,
                         batch_size=batch, device=device, hyperparameters=hyperparameters)


class TimingGate:
    """What the processes of one setting share (a folder): each reports when its warm-up is done, waits
    until all ``expected`` have done so or failed, then times its steps holding an exclusive lock."""

    def __init__(self, folder: Path, expected: int) -> None:
        self.folder, self.expected = Path(folder), expected

    def arrive(self, name: str) -> None:
        (self.folder / f"ready-{name}").touch()

    def mark_failed(self, name: str) -> None:
        (self.folder / f"failed-{name}").touch()

    def wait_for_all(self, poll_seconds: float = 0.5) -> None:
        while len(list(self.folder.glob("ready-*"))) + len(list(self.folder.glob("failed-*"))) < self.expected:
            time.sleep(poll_seconds)

    @contextlib.contextmanager
    def exclusive(self):
        with open(self.folder / "lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def measure_step(trainer_name: str, backbone: str, size: int, batch: int, *, device: str, steps: int,
                 warmup: int, precision: str | None, gate: TimingGate | None = None) -> dict:
    """Build one trainer on ``device`` and time its train_step; runs in its own process."""
    from tests.trainer_harness import make_batch, nnunet_environment
    with tempfile.TemporaryDirectory() as root, nnunet_environment(Path(root)):
        depth = STACK_DEPTH if trainer_name == "SelfPromptSAMTrainer" else 1
        trainer = build_benchmark_trainer(trainer_name, backbone, size, batch, device=device, precision=precision,
                                          depth=depth)
        data = make_batch(trainer, batch_size=trainer.batch_size)
        return time_steps(trainer, data, device=device, steps=steps, warmup=warmup,
                          slices_per_step=trainer.batch_size * depth, gate=gate, name=trainer_name)


def time_steps(trainer, data: dict, *, device: str, steps: int, warmup: int, slices_per_step: int,
               gate: TimingGate | None = None, name: str = "trainer") -> dict:
    """Warm-up then timed ``trainer.train_step(data)`` calls (alone on the machine when ``gate`` is given),
    then one profiled step; seconds, slices/s, peak memory, finite losses, device busy share."""
    from bench_common import memory_baseline_mib, peak_memory_mib, synchronize
    trainer.network.train()
    baseline = memory_baseline_mib(device)
    start = time.perf_counter()
    losses = [trainer.train_step(data)["loss"] for _ in range(warmup)]
    synchronize(device)
    warmup_seconds = time.perf_counter() - start
    if gate is not None:
        gate.arrive(name)
        gate.wait_for_all()
    with gate.exclusive() if gate is not None else contextlib.nullcontext():
        start = time.perf_counter()
        losses += [trainer.train_step(data)["loss"] for _ in range(steps)]
        synchronize(device)
        seconds = (time.perf_counter() - start) / steps
        kernel_seconds = profile_step(trainer, data, device=device)
    busy = None if kernel_seconds is None else kernel_seconds / seconds
    return {"seconds_per_step": seconds, "slices_per_second": slices_per_step / seconds,
            "warmup_seconds": warmup_seconds, "peak_mib": peak_memory_mib(device, baseline),
            "finite": bool(all(math.isfinite(float(loss)) for loss in losses)), "device_busy": busy,
            "precision": trainer.precision.name, "compiled": hasattr(trainer.network, "_orig_mod")
            or hasattr(getattr(trainer.network, "module", None), "_orig_mod")}


def profile_step(trainer, data: dict, *, device: str, top: int = 12) -> float | None:
    """One ``train_step`` under ``torch.profiler``: logs the ``top`` operations by their own time (device
    time on CUDA) and returns the seconds the device ran kernels in it (None on CPU). The caller divides
    by an unprofiled step's time, since the profiler slows the host side of the profiled one."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from bench_common import synchronize
    on_cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as profiler:
        start = time.perf_counter()
        trainer.train_step(data)
        synchronize(device)
        wall_us = (time.perf_counter() - start) * 1e6
    sort_by = "self_device_time_total" if on_cuda else "self_cpu_time_total"
    logger.info("%s", profiler.key_averages().table(sort_by=sort_by, row_limit=top))
    if not on_cuda:
        return None
    kernels = [event for event in profiler.events() if event.device_type == DeviceType.CUDA]
    kernel_us = sum(event.time_range.elapsed_us() for event in kernels)
    logger.info("profiled step: %.1f ms wall (with the profiler's overhead), %d kernels, %.1f ms of kernel time",
                wall_us / 1e3, len(kernels), kernel_us / 1e3)
    return kernel_us / 1e6


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


def child_result(returncode: int, stdout: str, stderr: str) -> dict:
    """A measuring process's JSON result (its last line of output), or its last line of stderr as the error."""
    if returncode != 0:
        return {"error": (stderr.strip().splitlines() or ["no output"])[-1][:120]}
    return json.loads(stdout.strip().splitlines()[-1])


def run_one(arguments: list[str], timeout: float, log_file: Path | None = None) -> dict:
    """This script with ``arguments`` in a fresh process; its JSON result or the reason it gave none.

    With ``log_file``, the process's whole stderr is kept there (compiler warnings, tracebacks)."""
    try:
        completed = subprocess.run([sys.executable, __file__, *arguments], capture_output=True, text=True,
                                   timeout=timeout, cwd=REPOSITORY)
    except subprocess.TimeoutExpired as expired:
        if log_file is not None:
            log_file.write_text(expired.stderr.decode(errors="replace") if isinstance(expired.stderr, bytes)
                                else expired.stderr or "")
        return {"error": f"over the time left ({timeout:.0f} s)"}
    if log_file is not None:
        log_file.write_text(completed.stderr)
    return child_result(completed.returncode, completed.stdout, completed.stderr)


def run_setting(names: list[str], setting: str, common: list[str], deadline: float,
                log_files: dict[str, Path | None]) -> dict[str, dict]:
    """One process per trainer for ``setting``, all started together (:class:`TimingGate`); each
    trainer's JSON result or the reason it gave none. A process still running at ``deadline``
    (``time.monotonic()``) is stopped."""
    backbone, size, batch = parse_setting(setting)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as folder:
        gate = TimingGate(Path(folder), expected=len(names))
        running = {}
        for name in names:
            stdout = open(Path(folder) / f"{name}.out", "w+")
            stderr = open(log_files[name], "w+") if log_files[name] else open(Path(folder) / f"{name}.err", "w+")
            process = subprocess.Popen([sys.executable, __file__, "--one", name, backbone, str(size), str(batch),
                                        "--gate", folder, str(len(names)), *common],
                                       stdout=stdout, stderr=stderr, cwd=REPOSITORY)
            running[name] = (process, stdout, stderr)
        while running:
            for name, (process, stdout, stderr) in list(running.items()):
                if process.poll() is None and time.monotonic() < deadline:
                    continue
                if process.poll() is None:
                    process.kill()
                    process.wait()
                    results[name] = {"error": "over the time left"}
                else:
                    if process.returncode != 0:
                        gate.mark_failed(name)  # the others stop waiting for it
                    stdout.seek(0)
                    stderr.seek(0)
                    results[name] = child_result(process.returncode, stdout.read(), stderr.read())
                stdout.close()
                stderr.close()
                del running[name]
            time.sleep(0.5)
    return results


def row(name: str, setting: str, result: dict) -> list[object]:
    if "error" in result:
        return [name, setting, "-", "-", "-", "-", "-", "-", result["error"]]
    busy = result.get("device_busy")
    return [name, setting, f"{result['slices_per_second']:.1f}", f"{result['seconds_per_step']:.3f}",
            f"{result['warmup_seconds']:.0f}", f"{result['peak_mib']:.0f}",
            "yes" if result["finite"] else "NO", "-" if busy is None else f"{100 * busy:.0f}%",
            f"{result['precision']}{', compiled' if result['compiled'] else ''}"]


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
    parser.add_argument("--log-dir", type=Path, help="keep each measurement's stderr in this folder")
    parser.add_argument("--ddp", action="store_true", help="also the 2-process DDP row on a device without "
                                                          "two GPUs (gloo on CPU; for trying the code)")
    parser.add_argument("--one", nargs=4, metavar=("TRAINER", "BACKBONE", "SIZE", "BATCH"), help=argparse.SUPPRESS)
    parser.add_argument("--one-ddp", nargs=4, metavar=("BACKBONE", "SIZE", "BATCH", "FILE"), help=argparse.SUPPRESS)
    parser.add_argument("--gate", nargs=2, metavar=("FOLDER", "EXPECTED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # stderr: a child's stdout is its JSON
    sys.path.insert(0, str(REPOSITORY / "benchmarks"))
    options = dict(steps=args.steps, warmup=args.warmup, precision=args.precision)
    if args.one:
        name, backbone, size, batch = args.one
        gate = TimingGate(Path(args.gate[0]), int(args.gate[1])) if args.gate else None
        print(json.dumps(measure_step(name, backbone, int(size), int(batch), device=args.device, gate=gate,
                                      **options)))
        return 0
    if args.one_ddp:
        from samunet.trainers.distributed import run_distributed
        backbone, size, batch, result_file = args.one_ddp
        device_type = "cuda" if args.device.startswith("cuda") else args.device
        run_distributed(_ddp_entry, (backbone, int(size), int(batch), device_type, options, result_file),
                        world_size=2, device_type=device_type)
        print(Path(result_file).read_text())
        return 0

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
    if args.log_dir is not None:
        args.log_dir.mkdir(parents=True, exist_ok=True)

    def log_file(name: str, setting: str) -> Path | None:
        return None if args.log_dir is None else args.log_dir / f"{name}_{setting.replace(':', '_')}.log"

    for setting in args.settings:
        results = (run_setting(args.trainers, setting, common, deadline,
                               {name: log_file(name, setting) for name in args.trainers})
                   if deadline - time.monotonic() > 10 else {})
        for name in args.trainers:
            rows.append(row(name, setting, results.get(name, {"error": "skipped: time budget spent"})))
            logger.info("  %s", " | ".join(str(cell) for cell in rows[-1]))
    if gpus >= 2 or args.ddp:
        backbone, size, batch = parse_setting(args.settings[0])
        with tempfile.TemporaryDirectory() as tmp:
            left = deadline - time.monotonic()
            result = (run_one(["--one-ddp", backbone, str(size), str(batch), str(Path(tmp) / "ddp.json"), *common],
                              left, log_file("SAMedTrainer_DDP", args.settings[0])) if left > 10
                      else {"error": "skipped: time budget spent"})
        rows.append(row("SAMedTrainer DDP x2", f"{backbone}:{size}:{batch}", result))
    from bench_common import format_table
    logger.info("%s", format_table(["trainer", "backbone:size:batch", "slices/s", "s/step", "warm-up s", "peak MiB",
                                    "finite", "device busy", "precision"], rows))
    return 0


def _ddp_entry(backbone: str, size: int, batch: int, device_type: str, options: dict, result_file: str) -> None:
    sys.path.insert(0, str(REPOSITORY / "benchmarks"))
    measure_ddp(backbone, size, batch, device_type=device_type, result_file=result_file, **options)


if __name__ == "__main__":
    sys.exit(main())
