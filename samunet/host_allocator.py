"""Keep freed host memory for reuse when the network runs on the CPU (glibc's malloc).

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and gives it
back to the kernel on ``free``. A training step on the CPU allocates and frees the same large activation
tensors every step (Self-Prompt-SAM's per-class decoder passes: 45 maps of 46 MB for a stack of 9 slices at
128 px), so each step pays the kernel to zero those pages again. Measured on this project's 2-core machine
(``benchmarks/bench_host_allocator.py``, ``docs/cpu_allocator.md``): 1.7 million minor page faults and 38%
of the CPU time in the kernel per Self-Prompt-SAM step; with freed memory kept, its step is 1.6x faster,
the other main trainers' 1.1-1.5x.

PyTorch's performance guide recommends a caching allocator (jemalloc, tcmalloc) loaded with ``LD_PRELOAD``;
that needs a system package and a wrapper around every command. glibc's own ``mallopt`` gives the same reuse
from inside the process, so samunet sets it when a command runs a network on the CPU:

- ``M_MMAP_MAX = 0``: large blocks come from the heap, whose freed space is reused;
- ``M_TRIM_THRESHOLD = 1 GiB``: free memory at the top of the heap is given back only above 1 GiB.

Peak resident memory grows (Self-Prompt-SAM at 128 px: 8.2 GB instead of 7.3 GB; at 256 px its second
training phase passed the 23 GB of this project's machine and was killed), so the setting holds only while
memory is plentiful: after every training step and every batch of prediction tiles on the CPU,
:func:`return_freed_memory_when_tight` checks the process's peak; once it has passed
:data:`TIGHT_MEMORY_FRACTION` of the machine's memory, large blocks go back to glibc's default and the heap's
free pages are returned (``malloc_trim``), said once in the log.

A user's own choice wins: nothing is changed when ``LD_PRELOAD`` loads another allocator, when glibc's malloc
is tuned through ``MALLOC_*`` variables or ``GLIBC_TUNABLES``, or when ``SAMUNET_CPU_ALLOCATOR=system``.
On other C libraries (macOS, Windows, musl) nothing is changed.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import platform

logger = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
GLIBC_DEFAULT_MMAP_MAX = 65536
TRIM_THRESHOLD_BYTES = 1 << 30
# the peak resident memory, as a fraction of the machine's, above which freed memory goes back to the system
TIGHT_MEMORY_FRACTION = 0.4
OPT_OUT_VARIABLE = "SAMUNET_CPU_ALLOCATOR"

_applied: bool | None = None
_libc = None


def user_tuned_allocator(environ=os.environ) -> str | None:
    """Why the user's own allocator setting stands (a short reason), or None when there is none."""
    if environ.get(OPT_OUT_VARIABLE, "").strip().lower() == "system":
        return f"{OPT_OUT_VARIABLE}=system"
    preload = environ.get("LD_PRELOAD", "")
    if any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return "LD_PRELOAD loads another allocator"
    tuned = sorted(name for name in environ if name.startswith("MALLOC_") and name.endswith("_"))
    if tuned:
        return f"{tuned[0]} is set"
    if "glibc.malloc" in environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES tunes malloc"
    return None


def keep_freed_memory_for_reuse() -> bool:
    """Set glibc's malloc to reuse freed large blocks (module docstring); once per process. Returns whether
    the setting is in force (False: not glibc, or the user's own setting stands). Never raises."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    reason = user_tuned_allocator()
    if reason is not None:
        logger.debug("host allocator left as it is: %s", reason)
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    global _libc
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _applied = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
        _libc = libc
    except (OSError, AttributeError) as error:  # no loadable libc, or no mallopt in it
        logger.debug("host allocator left as it is: %s", error)
    return _applied


@functools.lru_cache(maxsize=None)
def machine_memory_bytes() -> int | None:
    """The memory this process may use: physical memory, or the cgroup's limit when that is lower; None when
    unknown. Read once per process (it is checked after every training step)."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as limit_file:
            limit = limit_file.read().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total


def peak_resident_bytes() -> int:
    """This process's peak resident memory (Linux reports ``ru_maxrss`` in KiB)."""
    import resource  # POSIX only: imported where used, so importing this module works everywhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def return_freed_memory_when_tight(fraction: float = TIGHT_MEMORY_FRACTION) -> bool:
    """Called after every training step and batch of prediction tiles on the CPU: once the process's peak
    resident memory has passed ``fraction`` of the machine's (:func:`machine_memory_bytes`), give glibc back its
    default (large blocks mapped and unmapped) and return the heap's free pages, for the rest of the process;
    logged once. Returns whether freed memory is kept for reuse (still) now. Never raises."""
    global _applied
    if not _applied or _libc is None:
        return False
    total = machine_memory_bytes()
    peak = peak_resident_bytes()
    if total is None or peak <= fraction * total:
        return True
    _applied = False
    try:
        _libc.mallopt(M_MMAP_MAX, GLIBC_DEFAULT_MMAP_MAX)
        _libc.malloc_trim(0)
    except AttributeError as error:
        logger.debug("host allocator: %s", error)
    logger.info("host memory: the peak of %.1f GB passed %.0f%% of the machine's %.1f GB; freed memory goes back "
                "to the system from now on (slower steps, no out-of-memory)", peak / 1e9, 100 * fraction,
                total / 1e9)
    return False
