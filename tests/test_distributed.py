"""One fold on several processes: DistributedDataParallel over gloo on the CPU, as ``-num_gpus`` runs it.

Two spawned processes each build the trainer inside the process group (so nnU-Net's trainer sees a
distributed run: batch size per rank, DDP-aware Dice) and take optimiser steps on their half of a
global batch. After every step both ranks must hold the same parameters, equal to those of one
process stepping on the whole global batch: that is what data-parallel training promises.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from samunet.trainers.distributed import free_port, init_process_group
from trainer_harness import build_trainer, make_batch, nnunet_environment

# Deterministic in training (no dropout, no sampled noise), and with SGD: Adam's normalised step turns the
# last-bit differences of a reduced gradient into visible ones wherever a gradient is near zero.
TRAINER = "SelfPromptSAMTrainer_sgd"
GLOBAL_BATCH = 4
STEPS = 2


def _trainable_state(trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.network_module.named_parameters() if p.requires_grad}


def _global_batch(trainer) -> dict:
    return make_batch(trainer, batch_size=GLOBAL_BATCH, seed=3)


def _half(batch: dict, rank: int, world_size: int) -> dict:
    per_rank = GLOBAL_BATCH // world_size
    part = slice(rank * per_rank, (rank + 1) * per_rank)
    target = batch["target"]
    return {"data": batch["data"][part],
            "target": [t[part] for t in target] if isinstance(target, list) else target[part]}


def _rank_process(rank: int, world_size: int, root: str) -> None:
    torch.set_num_threads(1)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size)})
    init_process_group("cpu")
    try:
        with nnunet_environment(Path(root) / f"rank{rank}"):
            trainer = build_trainer(TRAINER, backbone="vit_test", num_classes=3, img_size=32, depth=1)
            assert trainer.is_ddp and isinstance(trainer.network, torch.nn.parallel.DistributedDataParallel)
            assert trainer.device.type == "cpu" and trainer.grad_scaler is None
            batch = _half(_global_batch(trainer), rank, world_size)
            trainer.on_train_epoch_start()
            states = []
            for _ in range(STEPS):
                trainer.train_step(batch)
                states.append(_trainable_state(trainer))
            torch.save({"states": states, "batch_size": trainer.batch_size}, Path(root) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_step_like_one_process_on_the_union_of_their_batches(tmp_path):
    world_size = 2
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(free_port())
    mp.spawn(_rank_process, args=(world_size, str(tmp_path)), nprocs=world_size, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
    assert [r["batch_size"] for r in ranks] == [1, 1]  # the planned global batch of 2, split over the ranks

    with nnunet_environment(tmp_path / "single"):
        reference = build_trainer(TRAINER, backbone="vit_test", num_classes=3, img_size=32, depth=1)
        batch = _global_batch(reference)
        reference.on_train_epoch_start()
        for step in range(STEPS):
            reference.train_step(batch)
            expected = _trainable_state(reference)
            for name, value in expected.items():
                first, second = ranks[0]["states"][step][name], ranks[1]["states"][step][name]
                assert torch.equal(first, second), f"step {step}: ranks differ in {name}"
                assert torch.allclose(first, value, atol=1e-5, rtol=0), (
                    f"step {step}: {name} differs from one process on the whole batch by "
                    f"{(first - value).abs().max():.2e}")


def test_samunet_train_with_num_gpus_2_on_the_cpu_trains_validates_and_continues(planned_tiny_dataset):
    """``samunet_train ... -device cpu -num_gpus 2``: two gloo processes train one fold; only rank 0 writes
    the log, checkpoints and progress.png; the final validation (split over the ranks) is summarised;
    ``--c`` continues the distributed run from the stored epoch."""
    from samunet.cli.train import main as train_main

    model = planned_tiny_dataset["nnUNet_results"] / "Dataset991_PhantomTiny" / "SAMedTrainer__samunetPlans__2d"
    fold = model / "fold_3"  # a fold no other test trains
    common = ["991", "2d", "3", "-tr", "SAMedTrainer", "-device", "cpu", "-num_gpus", "2", "--iters-per-epoch", "2",
              "--val-iters", "1", "--batch-size", "2"]
    assert train_main([*common, "--num-epochs", "1"]) == 0
    for name in ("checkpoint_final.pth", "progress.png", "validation/summary.json"):
        assert (fold / name).is_file(), name
    assert len(list(fold.glob("training_log_*.txt"))) == 1  # rank 0 only
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    assert checkpoint["current_epoch"] == 1
    assert train_main([*common, "--num-epochs", "2", "--c"]) == 0
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    assert checkpoint["current_epoch"] == 2
