"""One fold on several devices: torch.distributed process groups, as nnU-Net sets them up, on GPUs and CPUs.

nnunetv2 trains one fold with DistributedDataParallel, one process per GPU, with NCCL only. samunet
does the same on CUDA (NCCL) and also on CPUs (gloo), and starts in either of two ways:

- ``samunet_train ... -num_gpus N``: this machine, N processes spawned here (like nnU-Net), on
  ``localhost`` with a free port unless ``MASTER_ADDR`` / ``MASTER_PORT`` are set;
- under ``torchrun`` (or SLURM's ``srun`` with the same variables): every process is started from
  outside with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in its
  environment, so several machines can train one fold.

Rank 0 (global) is the one that writes checkpoints, logs and progress.png (nnU-Net's rule); each
process uses the device of its ``LOCAL_RANK`` (``cuda:LOCAL_RANK``, or the CPU).
"""
from __future__ import annotations

import os
import socket
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from samunet.errors import ConfigurationError

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """True when this process was started by torchrun / srun (``RANK`` and ``WORLD_SIZE`` are set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def backend_for(device_type: str) -> str:
    """NCCL for CUDA devices (nnU-Net's), gloo for CPUs."""
    if device_type == "cuda":
        return "nccl"
    if device_type == "cpu":
        return "gloo"
    raise ConfigurationError(f"distributed training runs on cuda or cpu devices, not {device_type}")


def process_device(device_type: str) -> torch.device:
    """The device of this process in a distributed run: ``cuda:LOCAL_RANK`` or the CPU."""
    if device_type != "cuda":
        return torch.device(device_type)
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", dist.get_rank() if dist.is_initialized() else 0)))


def free_port() -> int:
    """A free TCP port on this machine (for the process group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def init_process_group(device_type: str) -> None:
    """Join the process group described by the environment (``env://``: RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT); on CUDA, make ``cuda:LOCAL_RANK`` this process's device."""
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ and name != "LOCAL_RANK"]
    if missing:
        raise ConfigurationError(f"distributed training needs the environment variables {missing}; start it with "
                                 f"torchrun, or with -num_gpus N on one machine")
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigurationError("distributed training on cuda was asked for but torch sees no CUDA GPU")
        torch.cuda.set_device(process_device("cuda"))
    dist.init_process_group(backend=backend_for(device_type), init_method="env://")


def destroy_process_group() -> None:
    """Leave the process group (if this process is in one)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def run_distributed(function: Callable[..., Any], args: tuple, *, world_size: int, device_type: str) -> None:
    """Run ``function(*args)`` in ``world_size`` processes spawned on this machine, each in the process group
    (rank = local rank = its index). ``MASTER_ADDR`` / ``MASTER_PORT`` default to localhost and a free port."""
    if world_size < 2:
        raise ConfigurationError(f"-num_gpus must be at least 2 for distributed training, got {world_size}")
    if device_type == "cuda" and torch.cuda.device_count() < world_size:
        raise ConfigurationError(f"-num_gpus {world_size} asks for more GPUs than torch sees "
                                 f"({torch.cuda.device_count()}); use -num_gpus {torch.cuda.device_count()}")
    os.environ.setdefault("MASTER_ADDR", "localhost")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    mp.spawn(_spawned_process, args=(function, args, world_size, device_type), nprocs=world_size, join=True)


def _spawned_process(rank: int, function: Callable[..., Any], args: tuple, world_size: int, device_type: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size)})
    init_process_group(device_type)
    try:
        function(*args)
    finally:
        destroy_process_group()
