"""How fast Self-Prompt-SAM's MSPGenerator learns each class on frozen SAM features, at several learning rates.

A probe of learning speed, not of time or memory: it isolates the one part of Self-Prompt-SAM that starts from
random weights. The generator is a convolutional decoder over the image encoder's maps; the adapters, depth
embeddings and MAdapter start as the identity, so at the start of training the generator sees the frozen SAM
features. The probe

1. builds ``SelfPromptSAMNetwork`` from a preprocessed data set's plans (its 2d configuration, the planned stack
   depth D) with the released weights loaded (``--weights``, default ``litemedsam``);
2. draws ``--pool`` D-slice stacks from the preprocessed training cases with nnU-Net's own training loader
   (``nnUNetDataLoader``, a batch of one, probabilistic oversampling: a third forced to contain a foreground
   class; no augmentation) and keeps the encoder's five generator maps (bfloat16, about 19 MB per 256 px slice
   for LiteMedSAM);
3. for each ``--lrs`` value trains the same freshly initialised generator alone for ``--steps`` steps of one stack
   (AdamW, weight decay 0.01, nnU-Net's poly schedule over the steps, the trainer's deep-supervision CE + Dice),
   and prints the argmax Dice of every foreground class over the pool (the stacks it trains on: the speed at which
   it fits them) halfway and at the end.

No augmentation, no adapter training and no output loss: it compares learning rates of the generator alone, it
does not predict a trained model's Dice. Measured with this procedure on real brain MRI (docs/evidence.md, round
16; 64 stacks, 150 steps): the generator at 1e-3 (the trainer's lr) had found only the brain stem (0.14), at 3e-3
the brain stem (0.65), at 1e-2 the lateral ventricles (0.59) and the brain stem (0.71); the two small structures
at none of them.

Example (the real-MRI development set of docs/evidence.md, the weights of ``samunet_weights fetch litemedsam``;
about 12 minutes on a 2-core CPU)::

    .venv/bin/python benchmarks/probe_generator_lr.py $nnUNet_preprocessed/Dataset950_BrainDevMRI \\
        --lrs 1e-3 3e-3 1e-2 --steps 150 --pool 64
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from bench_common import format_table
from samunet.modules.prompt_generators import deep_supervision_weights
from samunet.registry import TRAINERS
from samunet.weights import load_state_dict, resolve_checkpoint

logger = logging.getLogger("probe_generator_lr")
OVERSAMPLE_FOREGROUND_PERCENT = 0.33  # nnU-Net's default, drawn per sample (probabilistic oversampling)


def build_network(preprocessed: Path, plans_identifier: str, weights: str):
    """SelfPromptSAMNetwork (deep supervision on) from the data set's plans, with released weights loaded, and
    the data set's label manager."""
    plans = PlansManager(json.loads((preprocessed / f"{plans_identifier}.json").read_text()))
    dataset_json = json.loads((preprocessed / "dataset.json").read_text())
    trainer = TRAINERS.get("SelfPromptSAMTrainer")
    configuration = trainer.inference_configuration(plans.get_configuration("2d"))
    label_manager = plans.get_label_manager(dataset_json)
    network = trainer.build_network_architecture(
        plans, configuration, determine_num_input_channels(plans, configuration, dataset_json),
        label_manager.num_segmentation_heads, enable_deep_supervision=True)
    network.load_pretrained(load_state_dict(resolve_checkpoint(weights), map_location="cpu"), source=weights)
    return network.eval(), label_manager


def stack_loader(folder: Path, network, label_manager) -> nnUNetDataLoader:
    """nnU-Net's own training loader over the preprocessed cases, without augmentation: one (D, S, S) stack per
    batch, probabilistic foreground oversampling, in-plane padding as in training."""
    if not any(folder.glob("*.b2nd")) and not any(folder.glob("*.np[yz]")):
        raise SystemExit(f"no preprocessed cases in {folder}: run samunet_plan_and_preprocess -c 2d first")
    dataset = infer_dataset_class(str(folder))(str(folder))
    patch = (network.stack_depth, network.img_size, network.img_size)
    return nnUNetDataLoader(dataset, 1, patch, patch, label_manager,
                            oversample_foreground_percent=OVERSAMPLE_FOREGROUND_PERCENT,
                            probabilistic_oversampling=True)


def argmax_dice(generator, maps, targets, num_classes: int) -> list[float]:
    """Dice of the finest level's argmax per foreground class, summed over every stack of the pool."""
    counts = np.zeros((num_classes, 3))
    with torch.no_grad():
        for stack_maps, target in zip(maps, targets):
            prediction = generator([m.float() for m in stack_maps])[0].argmax(1)
            for k in range(1, num_classes):
                counts[k] += [((prediction == k) & (target == k)).sum(), (prediction == k).sum(), (target == k).sum()]
    return [2 * c[0] / max(1.0, c[1] + c[2]) for c in counts[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("preprocessed", type=Path, help="$nnUNet_preprocessed/DatasetXXX_NAME")
    parser.add_argument("--plans", default="samunetPlans", help="plans identifier (default samunetPlans)")
    parser.add_argument("--weights", default="litemedsam", help="released weights (samunet_weights list)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    parser.add_argument("--steps", type=int, default=150, help="training steps (one stack each) per lr")
    parser.add_argument("--pool", type=int, default=64, help="stacks drawn and cached")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    network, label_manager = build_network(args.preprocessed, args.plans, args.weights)
    size, num_classes = network.img_size, network.num_classes
    np.random.seed(args.seed)  # nnU-Net's loader draws with numpy's global generator
    loader = stack_loader(args.preprocessed / f"{args.plans}_2d", network, label_manager)
    started = time.perf_counter()
    maps, targets = [], []
    with torch.no_grad():
        for _ in range(args.pool):
            batch = loader.generate_train_batch()
            slices = batch["data"][0].transpose(0, 1)  # (C, D, S, S) -> (D, C, S, S)
            encoded = network.image_encoder(network.encoder_input(slices), intermediates=network.generator_taps)
            maps.append([m.to(torch.bfloat16) for m in network.generator_features(encoded)])
            targets.append(batch["target"][0, 0].long().clamp(min=0))  # nnU-Net's -1 (padding) as background
    logger.info("%d stacks of %d slices encoded in %.0f s", args.pool, network.stack_depth,
                time.perf_counter() - started)

    generator = network.prompt_generator
    initial_state = {name: value.clone() for name, value in generator.state_dict().items()}
    level_weights = deep_supervision_weights(generator.level_strides)
    loss = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss)
    rows = []
    for lr in args.lrs:
        generator.load_state_dict(initial_state)
        generator.train()
        optimizer = torch.optim.AdamW(generator.parameters(), lr=lr, weight_decay=0.01)
        scheduler = PolyLRScheduler(optimizer, lr, args.steps)
        order = np.random.default_rng(args.seed + 1).integers(0, len(maps), args.steps)
        started = time.perf_counter()
        for step, index in enumerate(order):
            scheduler.step(step)
            outputs = generator([m.float() for m in maps[index]])
            target = targets[index]
            total = sum(w * loss(o, target[:, None, ::size // o.shape[-1], ::size // o.shape[-1]])
                        for w, o in zip(level_weights, outputs))
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            if step + 1 in (args.steps // 2, args.steps):
                generator.eval()
                rows.append([f"{lr:g}", step + 1, *(f"{d:.3f}" for d in argmax_dice(generator, maps, targets,
                                                                                      num_classes)),
                             f"{time.perf_counter() - started:.0f}"])
                generator.train()
                logger.info("lr %g, step %d done", lr, step + 1)
    print(format_table(["lr", "steps", *(f"class {k}" for k in range(1, num_classes)), "s"], rows))


if __name__ == "__main__":
    main()
