"""Freed host memory is kept for reuse when a command runs its network on the CPU (samunet.host_allocator)."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from samunet.host_allocator import user_tuned_allocator

# Allocates a 64 MiB tensor before and after select_device("cpu") and prints how much of each glibc served by
# a fresh mmap (mallinfo2's hblkhd): the memory that the kernel has to zero again on every step.
PROBE = textwrap.dedent("""
    import ctypes, torch
    from samunet.cli.common import select_device

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                         "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2

    def mmapped_mib_of_a_64_mib_tensor():
        before = libc.mallinfo2().hblkhd
        tensor = torch.empty(64 << 20, dtype=torch.uint8)
        return (libc.mallinfo2().hblkhd - before) >> 20

    print(mmapped_mib_of_a_64_mib_tensor(), end=" ")
    select_device("cpu")
    print(mmapped_mib_of_a_64_mib_tensor(), end=" ")
    if FRACTION is not None:  # a training step's check, with the machine's memory tight at this fraction
        from samunet.host_allocator import return_freed_memory_when_tight
        print(int(return_freed_memory_when_tight(FRACTION)), end=" ")
        print(mmapped_mib_of_a_64_mib_tensor(), end=" ")
""")

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt is glibc's")


def run_probe(fraction: float | None = None, **environment: str) -> list[int]:
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("MALLOC_") and name not in ("LD_PRELOAD", "GLIBC_TUNABLES",
                                                                "SAMUNET_CPU_ALLOCATOR")}
    result = subprocess.run([sys.executable, "-c", f"FRACTION = {fraction!r}\n{PROBE}"],
                            env={**env, **environment}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [int(value) for value in result.stdout.split()]


@glibc_only
def test_a_cpu_command_keeps_large_freed_blocks_in_the_heap_instead_of_a_fresh_mmap():
    assert run_probe() == [64, 0]


@glibc_only
def test_freed_memory_goes_back_to_the_system_once_the_peak_is_a_tight_share_of_the_machines_memory():
    assert run_probe(fraction=0.99) == [64, 0, 1, 0]  # plenty left: still kept for reuse
    assert run_probe(fraction=1e-6) == [64, 0, 0, 64]  # tight: glibc's default again


@glibc_only
def test_the_users_own_choice_of_allocator_stands():
    assert run_probe(SAMUNET_CPU_ALLOCATOR="system") == [64, 64]
    assert run_probe(MALLOC_MMAP_THRESHOLD_="1048576") == [64, 64]


@pytest.mark.parametrize("environment, reason", [
    ({}, None),
    ({"SAMUNET_CPU_ALLOCATOR": "System"}, "SAMUNET_CPU_ALLOCATOR=system"),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "LD_PRELOAD loads another allocator"),
    ({"LD_PRELOAD": "/opt/libfoo.so"}, None),
    ({"MALLOC_ARENA_MAX": "2"}, None),  # not a tunable's spelling: glibc's variables end with "_"
    ({"MALLOC_ARENA_MAX_": "2"}, "MALLOC_ARENA_MAX_ is set"),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1048576"}, "GLIBC_TUNABLES tunes malloc"),
    ({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2"}, None),
])
def test_which_settings_count_as_the_users_own(environment, reason):
    assert user_tuned_allocator(environment) == reason


def test_every_cpu_training_step_and_batch_of_prediction_tiles_checks_the_memory(tmp_path, monkeypatch):
    import samunet.inference.batched_predictor as batched_predictor
    import samunet.trainers.base as trainer_base
    from test_batched_prediction import build, predictor_for, volume
    from trainer_harness import build_trainer, make_batch, nnunet_environment
    checks = []
    monkeypatch.setattr(trainer_base, "return_freed_memory_when_tight", lambda: checks.append("step") or True)
    monkeypatch.setattr(batched_predictor, "return_freed_memory_when_tight", lambda: checks.append("tiles") or True)
    with nnunet_environment(tmp_path):
        trainer = build_trainer("SAMedTrainer", backbone="vit_test", num_classes=3, img_size=64)
        trainer.train_step(make_batch(trainer))
        trainer.train_step(make_batch(trainer))
    assert checks == ["step", "step"]
    *_, network = build("SAMedTrainer")
    predictor_for("SAMedTrainer", network, mirroring=False, tiles_per_batch=3).predict_sliding_window_return_logits(
        volume())
    assert checks[2:] == ["tiles"] * 4  # 10 tiles (5 slices x 2 windows) in batches of 3
