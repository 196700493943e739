"""HSAMTrainer: H-SAM (Cheng et al., CVPR 2024) through nnU-Net's training loop.

Network: ``samunet.networks.h_sam.HSAMNetwork`` (LoRA rank 4, learnable mask cross-attention,
hierarchical pixel decoder, CMAttn). What the trainer adds (see docs/methods/h_sam.md):

- Loss: per stage 0.1 CE + 0.9 Dice (the authors' Table 8, nnU-Net's ``DC_and_CE_loss``);
  total ``lw * L_stage1 + (1 - lw) * L_stage2`` with ``lw = 0.8 * exp(-0.005 * epoch)`` (Sec. 3,
  "Training Loss") over the paper's 300 epochs, updated at every epoch start; a run of another length
  (``--num-epochs``, or the epochs a ``--max-minutes`` budget fits) follows the same curve stretched over its
  own epochs (:func:`published_epoch`), so that stage 2 takes over by its end as it does in the paper.
  The network's deep-supervision outputs are [deployed average, stage 2, stage 1]; nnU-Net's targets
  give the first two the full-resolution label and stage 1 the label at the network's stage-1 scale.
  nnU-Net's online pseudo-Dice and ``checkpoint_best.pth`` therefore rate the averaged output that
  prediction uses.
- The training forward gets the label map too (CMAttn's noise is drawn by each pixel's class, Eq. 1).
- Class frequencies for CMAttn's class-balanced noise: voxel counts per class over the training
  cases of the fold, measured in ``initialize()`` and kept in the network's state_dict (so in
  every checkpoint).
- Optimiser: AdamW (0.9, 0.999), weight decay 0.1, lr 0.0025 at the published batch of 32; per-iteration
  linear warm-up over 250 iterations, then poly 0.9 (the authors' code). A smaller batch gets the linearly
  scaled lr (:func:`linear_scaled_lr`; batch 6: 0.00047) unless ``--lr`` is given: on real MRI at batch 6
  the published lr collapsed every class to background, and so did the square-root scaled 0.00108 in a
  30-minute run (docs/methods/h_sam.md).
- Ablation trainers for Tables 4 and 5 (``HSAMTrainer_<mask attention>_<hpd|nohpd>_<cm|nocm>``).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import _LRScheduler

from samunet.errors import ConfigurationError
from samunet.registry import TRAINERS
from samunet.trainers.base import SAMTrainerBase, register_variants

STAGE_ONE_WEIGHT_START = 0.8
STAGE_ONE_WEIGHT_DECAY = 0.005
PUBLISHED_EPOCHS = 300  # the run over which lw decays (supplement: "in 300 training epochs")
WARMUP_ITERATIONS = 250
PUBLISHED_LR = 0.0025  # ViT-B at 512 px (the authors' code; ViT-L at 224 px: 0.0026)
PUBLISHED_BATCH_SIZE = 32
SHORT_RUN_WARMUP_FRACTION = 0.1


def linear_scaled_lr(lr: float, batch_size: int, reference_batch_size: int) -> float:
    """The lr for ``batch_size`` of a recipe published as ``lr`` at ``reference_batch_size``:
    ``lr * batch_size / reference_batch_size`` for a smaller batch, ``lr`` otherwise.

    Source: the linear scaling rule (Goyal et al., "Accurate, Large Minibatch SGD", 2017). For Adam the
    square-root rule (Malladi et al., NeurIPS 2022) is the one theory gives, and samunet used it until
    2026-11-30; at batch 6 its 0.00108 left H-SAM collapsed to background in one of two runs on real MRI,
    where 5e-4, next to the linear rule's 0.00047, learned (docs/methods/h_sam.md). A larger batch keeps
    the published lr (no evidence for going above it). Raises ValueError for a batch size below 1."""
    if batch_size <= 0 or reference_batch_size <= 0:
        raise ValueError(f"batch sizes must be positive, got {batch_size} and {reference_batch_size}")
    return lr * min(batch_size, reference_batch_size) / reference_batch_size


def stage_one_weight(epoch: float, start: float = STAGE_ONE_WEIGHT_START, decay: float = STAGE_ONE_WEIGHT_DECAY) -> float:
    """H-SAM's lw at (published) ``epoch``: ``start * exp(-decay * epoch)`` (Sec. 3, "Training Loss")."""
    return start * math.exp(-decay * epoch)


def published_epoch(epoch: int, num_epochs: int, published_epochs: int = PUBLISHED_EPOCHS) -> float:
    """The point of the paper's 300-epoch run that epoch ``epoch`` of a ``num_epochs``-epoch run stands at:
    ``epoch * published_epochs / num_epochs``, so that lw follows the published curve over the whole run, from
    0.8 to 0.8 exp(-1.5) = 0.18, whatever its length (as nnU-Net's poly lr stretches over any number of
    epochs). A 300-epoch run gets the published schedule unchanged. Raises ValueError for ``num_epochs`` < 1."""
    if num_epochs < 1:
        raise ValueError(f"num_epochs must be at least 1, got {num_epochs}")
    return epoch * published_epochs / num_epochs


class TwoStageLoss(nn.Module):
    """``lw * loss(stage 1) + (1 - lw) * loss(stage 2)``.

    outputs / targets: [deployed average, stage 2 at full resolution, stage 1 at its scale] (the
    network's deep-supervision order, full resolution first); the average is not trained directly.
    ``stage_one_weight`` is lw and is set by the trainer.
    """

    def __init__(self, stage_loss: nn.Module, stage_one_weight: float = STAGE_ONE_WEIGHT_START) -> None:
        super().__init__()
        self.stage_loss = stage_loss
        self.stage_one_weight = stage_one_weight

    def forward(self, outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
        stage_two = self.stage_loss(outputs[1], targets[1])
        stage_one = self.stage_loss(outputs[2], targets[2])
        return self.stage_one_weight * stage_one + (1 - self.stage_one_weight) * stage_two


class WarmupPolyLRScheduler(_LRScheduler):
    """Per-iteration lr: ``lr * (i + 1) / W`` for i < W, then ``lr * (1 - (i - W) / (T - W)) ** 0.9``.

    ``step()`` advances one iteration; ``step(epoch)`` (what nnU-Net calls at every epoch start)
    jumps to the first iteration of ``epoch``, which also resynchronises a resumed run. With
    ``max_warmup_fraction`` f, W is ``min(warmup_iterations, max(int(f * T), 1))``: a run shorter than
    the published one warms up over its first fraction f, also when :meth:`set_max_iterations` shortens
    it later (``--max-minutes``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, initial_lr: float, warmup_iterations: int,
                 max_iterations: int, iterations_per_epoch: int, exponent: float = 0.9,
                 max_warmup_fraction: float | None = None) -> None:
        self.initial_lr = initial_lr
        self.published_warmup_iterations = warmup_iterations
        self.max_warmup_fraction = max_warmup_fraction
        self.iterations_per_epoch = iterations_per_epoch
        self.exponent = exponent
        self.iteration = -1
        self.set_max_iterations(max_iterations)
        super().__init__(optimizer, -1)

    def set_max_iterations(self, max_iterations: int) -> None:
        """End the schedule after ``max_iterations`` (T); the warm-up W follows ``max_warmup_fraction``."""
        self.max_iterations = max_iterations
        self.warmup_iterations = self.published_warmup_iterations
        if self.max_warmup_fraction is not None:
            self.warmup_iterations = min(self.warmup_iterations,
                                         max(int(self.max_warmup_fraction * max_iterations), 1))

    def lr_at(self, iteration: int) -> float:
        if iteration < self.warmup_iterations:
            return self.initial_lr * (iteration + 1) / self.warmup_iterations
        progress = (iteration - self.warmup_iterations) / max(self.max_iterations - self.warmup_iterations, 1)
        return self.initial_lr * max(1.0 - progress, 0.0) ** self.exponent

    def step(self, epoch: int | None = None) -> None:
        self.iteration = self.iteration + 1 if epoch is None else epoch * self.iterations_per_epoch
        lr = self.lr_at(self.iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        return self._last_lr


@TRAINERS.register()
class HSAMTrainer(SAMTrainerBase):
    network_class = "samunet.networks.h_sam.HSAMNetwork"
    network_kwargs = {"lora_rank": 4, "mask_attention": "learnable", "hierarchical_pixel_decoder": True,
                      "cmattn": True}
    uses_deep_supervision = True
    optimizer_name = "adamw"
    default_hyperparameters = {"weight_decay": 0.1, "num_epochs": 300}  # the lr follows the batch size

    def set_hyperparameters(self, overrides: dict) -> None:
        """nnU-Net's and samunet's hyper-parameters; without ``initial_lr`` (``--lr``), the published lr
        scaled to the global batch size (:func:`linear_scaled_lr`). The derived lr is not recorded as a
        hyper-parameter, so ``--batch-size`` re-derives it and ``--c`` derives the same one again."""
        super().set_hyperparameters(overrides)
        if "initial_lr" not in self.hyperparameters:
            batch_size = int(self.hyperparameters.get("batch_size", self.configuration_manager.batch_size))
            self.initial_lr = linear_scaled_lr(PUBLISHED_LR, batch_size, PUBLISHED_BATCH_SIZE)

    def initialize(self):
        super().initialize()
        if "initial_lr" not in self.hyperparameters:
            self.print_to_log_file(f"lr {self.initial_lr:.3g}: the published {PUBLISHED_LR} at batch "
                                   f"{PUBLISHED_BATCH_SIZE}, linearly scaled to batch "
                                   f"{self.configuration_manager.batch_size} (--lr sets it)")
        frequencies = self.training_class_frequencies()
        self.network_module.set_class_frequencies(frequencies)
        self.print_to_log_file(f"class frequencies of the training cases: {np.round(frequencies, 6).tolist()}")

    def training_class_frequencies(self) -> np.ndarray:
        """(K,) fraction of labelled voxels per class over this fold's preprocessed training cases."""
        num_classes = self.label_manager.num_segmentation_heads
        dataset_tr, _ = self.get_tr_and_val_datasets()
        counts = np.zeros(num_classes, dtype=np.float64)
        for identifier in dataset_tr.identifiers:
            segmentation = np.asarray(dataset_tr.load_case(identifier)[1][:])
            labels = segmentation[(segmentation >= 0) & (segmentation < num_classes)].astype(np.int64)
            counts += np.bincount(labels.ravel(), minlength=num_classes)[:num_classes]
        if counts.sum() == 0:
            raise ConfigurationError("the training cases hold no labelled voxels; cannot measure class frequencies")
        return counts / counts.sum()

    def _build_loss(self):
        if self.label_manager.has_regions:
            raise ConfigurationError("H-SAM predicts mutually exclusive classes (softmax); region labels are "
                                     "not supported")
        stage_loss = self.dice_and_ce_loss(weight_ce=0.1, weight_dice=0.9)
        if not self.enable_deep_supervision:
            return stage_loss
        return TwoStageLoss(stage_loss, self.current_stage_one_weight())

    def current_stage_one_weight(self) -> float:
        """lw for the current epoch, on the published curve stretched over this run's ``num_epochs`` (which a
        ``--max-minutes`` budget re-plans at every epoch end)."""
        return stage_one_weight(published_epoch(self.current_epoch, self.num_epochs))

    def configure_optimizers(self):
        parameters = list(self.network_module.trainable_parameters())
        optimizer = torch.optim.AdamW(parameters, lr=self.initial_lr, betas=(0.9, 0.999),
                                      weight_decay=self.weight_decay)
        # 250 iterations as published; a shortened run (under 2,500 iterations) warms up over its first 10%.
        return optimizer, WarmupPolyLRScheduler(
            optimizer, initial_lr=self.initial_lr, warmup_iterations=WARMUP_ITERATIONS,
            max_warmup_fraction=SHORT_RUN_WARMUP_FRACTION,
            max_iterations=self.num_epochs * self.num_iterations_per_epoch,
            iterations_per_epoch=self.num_iterations_per_epoch)

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        if isinstance(self.loss, TwoStageLoss):
            self.loss.stage_one_weight = self.current_stage_one_weight()
            self.print_to_log_file(f"stage-1 loss weight lw: {self.loss.stage_one_weight:.4f}")

    def forward_and_loss(self, data: torch.Tensor, target: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """The label map goes into the forward as well: CMAttn draws its noise by each pixel's class."""
        label_map = target[0] if isinstance(target, list) else target
        return self.loss(self.network(data, label_map), target)

    def train_step(self, batch: dict) -> dict:
        result = super().train_step(batch)
        self.lr_scheduler.step()
        return result


# Table 4 (learnable mask attention / hierarchical pixel decoder / CMAttn on or off; all on is HSAMTrainer)
# and Table 5 (Mask2Former's binary mask attention): HSAMTrainer_<mask attention>_<hpd|nohpd>_<cm|nocm>.
_NO_HPD = {"hierarchical_pixel_decoder": False}
register_variants(HSAMTrainer, {
    "HSAMTrainer_learnable_hpd_nocm": ("Table 4: without CMAttn", {"cmattn": False}),
    "HSAMTrainer_learnable_nohpd_cm": ("Table 4: without the hierarchical pixel decoder", _NO_HPD),
    "HSAMTrainer_learnable_nohpd_nocm": ("Table 4: learnable mask attention alone", {**_NO_HPD, "cmattn": False}),
    "HSAMTrainer_none_hpd_cm": ("Table 4: plain cross-attention", {"mask_attention": "none"}),
    "HSAMTrainer_none_hpd_nocm": ("Table 4: hierarchical pixel decoder alone", {"mask_attention": "none",
                                                                               "cmattn": False}),
    "HSAMTrainer_none_nohpd_cm": ("Table 4: CMAttn alone", {**_NO_HPD, "mask_attention": "none"}),
    "HSAMTrainer_none_nohpd_nocm": ("Table 4: two stages, none of the three parts",
                                    {**_NO_HPD, "mask_attention": "none", "cmattn": False}),
    "HSAMTrainer_binary_nohpd_nocm": ("Table 5: Mask2Former's binary mask attention",
                                      {**_NO_HPD, "mask_attention": "binary", "cmattn": False}),
}, globals())
