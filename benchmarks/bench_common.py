"""What every samunet benchmark measures the same way: the matmul roof, FLOPs, peak memory, the table.

* :func:`matmul_peak_gflops`: the best fp32 GFLOP/s of a large square matmul on the device, the roof
  an encoder's achieved GFLOP/s is read against ("% of peak"). Measure it in the same run as the
  models: on a shared machine both move together.
* :func:`count_flops`: FLOPs of one call, counted by ``torch.utils.flop_counter.FlopCounterMode``
  (matmuls, convolutions and attention kernels; element-wise work counts nothing), so a rewrite that
  saves memory traffic shows as more GFLOP/s, and one that adds products shows as more FLOPs.
* :func:`peak_memory_mib` / :func:`memory_baseline_mib`: peak RSS (CPU) or peak allocated (CUDA)
  above a baseline, for one model per process.
* :func:`working_memory_mib`: peak bytes of the tensors one call allocates and keeps alive at once
  (any device, in-process; the weights and inputs made before the call do not count).
* :func:`median_seconds`: the median time of repeated calls after a warm-up call.
* :func:`format_table`: one fixed-width table for the log.
"""
from __future__ import annotations

import resource
import statistics
import time
import weakref
from typing import Callable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode


def synchronize(device: str | torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_gflops(device: str | torch.device = "cpu", *, size: int = 2048, repeats: int = 5,
                       dtype: torch.dtype = torch.float32) -> float:
    """Best-of-``repeats`` GFLOP/s of a (size x size) @ (size x size) matmul in ``dtype`` on ``device``."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    torch.matmul(a, b)
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


def count_flops(call: Callable[[], object]) -> int:
    """FLOPs of one ``call()`` (forward, or forward and backward if the call runs both)."""
    with FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops()


def memory_baseline_mib(device: str | torch.device) -> float:
    """Memory in use now (CUDA: allocated, after resetting the peak; CPU: peak RSS so far), in MiB."""
    if torch.device(device).type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def peak_memory_mib(device: str | torch.device, baseline: float) -> float:
    """Peak memory since :func:`memory_baseline_mib` returned ``baseline``, above it, in MiB. On CPU this
    is the process's peak RSS, so measure one model per process."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20 - baseline
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storage allocated by the operators run inside the mode and still
    alive (weights and other tensors made before it do not count): the working memory of one
    call, measured in-process, so that two models can be compared in the same run. Observes
    only; slows the call, so time it separately."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self.seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.seen:
                    self.seen.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._release, key, storage.nbytes())
        return out


def median_seconds(call: Callable[[], object], repeats: int) -> float:
    """Median wall-clock seconds of ``repeats`` calls of ``call()``, after one untimed warm-up call (CPU work;
    a CUDA caller synchronises inside ``call``)."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def working_memory_mib(function: Callable[[], object]) -> float:
    """Peak working memory of ``function()`` in MiB (see :class:`PeakTensorMemory`)."""
    with PeakTensorMemory() as tracker:
        function()
    return tracker.peak / 2 ** 20


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Right-aligned columns; floats with 3 significant decimals unless already strings."""
    def cell(value: object) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)
    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    lines = [" | ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
