"""SelfPromptSAMTrainer: Self-Prompt-SAM (Xie et al.) through nnU-Net's training loop, on D-slice stacks.

Network: ``samunet.networks.self_prompt_sam.SelfPromptSAMNetwork``. What the trainer adds (see
docs/methods/self_prompt_sam.md):

- D-slice stacks inside the ``2d`` configuration: the trainer's configuration has patch size
  (D, S, S), D from the plans' ``arch_kwargs.depth`` (``samunet_train --depth`` overrides it), so
  nnU-Net's data loader samples D adjacent slices of the 2d-preprocessed volumes, its
  augmentation runs in-plane only (the same 2D transform on every slice: nnU-Net's "dummy 2D"
  mode, mirroring in-plane only, the Gaussian blur in-plane: :mod:`slice_stack_augmentation`) and
  nnU-Net's predictor slides (D, S, S) windows over the whole volume with overlap and Gaussian
  weighting, after repeating the edge slices D // 2 times at each end
  (:class:`~samunet.inference.slice_stack_predictor.SliceStackPredictor`), so the outermost
  slices also get context on both sides. The batch size is the planned number of stacks
  (``slice_stack_batch_size``, sized by the planner with this method's measured training memory).
- Loss: nnU-Net's CE + Dice on the MSPGenerator's levels, weights halving with each halving of
  resolution and summing to 1; phase 1 (the first 20% of epochs) trains only that, and the modules
  after the prompts (decoder depth embedding and adapters, MC-Adapter), which that loss cannot
  reach, stay frozen; phase 2 adds CE + Dice on the MC-Adapter's output and trains them too.
- Optimiser: AdamW (lr 1e-3, weight decay 0.01) with poly LR 0.9, samunet's default for the short
  schedules of its users: with the paper's SGD the freshly initialised MSPGenerator predicts only
  background for the first few hundred iterations (measured on the demo phantom), which the paper's
  250,000 iterations absorb but a CPU run or a time budget does not. ``SelfPromptSAMTrainer_sgd`` is
  the paper's recipe (Appendix D): nnU-Net's SGD (lr 0.01, momentum 0.99, nesterov), weight decay
  3e-5, poly LR 0.9.
- Ablation trainers S1-S8 of the paper's Table 4 (S9 is this trainer) and the prompt
  combinations of its Fig. 1, with this trainer's optimiser.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
from torch import nn

from samunet.errors import ConfigurationError
from samunet.inference.slice_stack_predictor import SliceStackPredictor
from samunet.modules.prompt_generators import deep_supervision_weights
from samunet.registry import TRAINERS
from samunet.trainers.base import SAMTrainerBase, register_variants
from samunet.trainers.slice_stack_augmentation import in_plane_training_transforms

PHASE_ONE_FRACTION = 0.2


def stacked_configuration(configuration_manager: ConfigurationManager) -> ConfigurationManager:
    """The 2d configuration with patch size (D, S, S), D from ``arch_kwargs.depth``, and the planned
    ``slice_stack_batch_size`` stacks per batch (sized with Self-Prompt-SAM's own training memory,
    :func:`samunet.planners.sam_planner.stack_slices_that_fit`); plans written before 2026-11-30 lack
    it and get max(1, planned 2D batch / D). A 2d configuration is required."""
    configuration = copy.deepcopy(configuration_manager.configuration)
    patch_size = list(configuration["patch_size"])
    if len(patch_size) != 2:
        raise ConfigurationError(f"slice stacks are built inside a 2d configuration; this one has patch size "
                                 f"{patch_size}. Use -c 2d")
    depth = int(configuration["architecture"]["arch_kwargs"].get("depth", 1))
    configuration["patch_size"] = [depth, *patch_size]
    configuration["batch_size"] = int(configuration.get("slice_stack_batch_size")
                                      or max(1, round(configuration["batch_size"] / depth)))
    return ConfigurationManager(configuration)


def phase_two_start_epoch(num_epochs: int, fraction: float = PHASE_ONE_FRACTION) -> int:
    """First epoch of phase 2: epochs 0 .. ceil(fraction * num_epochs) - 1 train the generator only."""
    return math.ceil(fraction * num_epochs)


class SelfPromptLoss(nn.Module):
    """outputs / targets: [final output, generator levels finest first] (nnU-Net's deep-supervision
    order). ``sum_i w_i loss(level_i)`` plus, in phase 2 (``include_output``), ``loss(final)``."""

    def __init__(self, loss: nn.Module, generator_weights: list[float]) -> None:
        super().__init__()
        self.loss = loss
        self.generator_weights = list(generator_weights)
        self.include_output = False

    def forward(self, outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
        if len(outputs) != len(self.generator_weights) + 1:
            raise ValueError(f"expected the final output and {len(self.generator_weights)} generator levels, "
                             f"got {len(outputs)} outputs")
        total = sum(w * self.loss(o, t) for w, o, t in zip(self.generator_weights, outputs[1:], targets[1:]))
        if self.include_output:
            total = total + self.loss(outputs[0], targets[0])
        return total


@TRAINERS.register()
class SelfPromptSAMTrainer(SAMTrainerBase):
    """The full model (Table 4, S9): MSPGenerator, DFusedAdapters, depth positional embeddings,
    MAdapter, MC-Adapter, box + point + mask prompts."""

    network_class = "samunet.networks.self_prompt_sam.SelfPromptSAMNetwork"
    network_kwargs = {"prompt_generator": "msp", "adapter": "dfused", "depth_pos_embed": True, "madapter": True,
                      "mc_adapter": True, "prompts": ["box", "point", "mask"]}
    uses_deep_supervision = True
    uses_slice_stacks = True
    optimizer_name = "adamw"
    default_hyperparameters = {"initial_lr": 1e-3, "weight_decay": 0.01}

    @classmethod
    def inference_configuration(cls, configuration_manager: ConfigurationManager) -> ConfigurationManager:
        return stacked_configuration(configuration_manager)

    @classmethod
    def predictor_class(cls) -> type:
        return SliceStackPredictor

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        """In-plane augmentation only: nnU-Net's dummy-2D mode applies one 2D spatial transform to all
        D slices; rotation as nnU-Net's 2d configuration; mirroring in-plane (axes 1, 2)."""
        depth, *plane = self.configuration_manager.patch_size
        if max(plane) / min(plane) > 1.5:
            rotation = (-15. / 360 * 2. * np.pi, 15. / 360 * 2. * np.pi)
        else:
            rotation = (-np.pi, np.pi)
        initial = get_patch_size(plane, rotation, rotation, rotation, (0.85, 1.25))
        mirror_axes = (1, 2)
        self.inference_allowed_mirroring_axes = mirror_axes
        self.print_to_log_file(f"slice stacks of {depth}: in-plane augmentation, mirroring axes {mirror_axes}")
        return rotation, True, [depth, *initial], mirror_axes

    @staticmethod
    def get_training_transforms(*args, **kwargs):
        """nnU-Net's training transforms with the Gaussian blur in-plane only (a blur across a stack of 3
        slices or fewer fails, and across thicker stacks mixes slices): :mod:`slice_stack_augmentation`."""
        return in_plane_training_transforms(SAMTrainerBase.get_training_transforms(*args, **kwargs))

    def _build_loss(self):
        weights = deep_supervision_weights(self.network_module.prompt_generator.level_strides)
        return SelfPromptLoss(self.dice_and_ce_loss(weight_ce=1, weight_dice=1), weights)

    @property
    def phase_two_start(self) -> int:
        return phase_two_start_epoch(self.num_epochs)

    def training_phase_starts(self) -> tuple[int, ...]:
        """Phase 1 (generator loss only) from epoch 0, phase 2 from ``phase_two_start``."""
        return (0, self.phase_two_start)

    def enter_training_phase(self, phase: int) -> None:
        phase_two = phase == 1
        self.print_to_log_file("phase 2: generator + MC-Adapter output loss" if phase_two else
                               f"phase 1 (the first {PHASE_ONE_FRACTION:.0%} of the epochs: until epoch "
                               f"{self.phase_two_start} of {self.num_epochs}, sooner when --max-minutes fits "
                               f"fewer): generator loss only")
        self.loss.include_output = phase_two
        self.network_module.set_trainable(train_decoder=phase_two)


@TRAINERS.register()
class SelfPromptSAMTrainer_sgd(SelfPromptSAMTrainer):
    """The paper's recipe (Appendix D): the full model with nnU-Net's SGD (lr 0.01, momentum 0.99, nesterov),
    weight decay 3e-5 and poly LR, for the paper's long schedules (250,000 iterations)."""

    optimizer_name = "sgd"
    default_hyperparameters = {"initial_lr": 0.01, "weight_decay": 3e-5}


# Table 4: each row adds one block to the previous (S9 is SelfPromptSAMTrainer), and Fig. 1: the prompt
# kinds on or off (box + point + mask is SelfPromptSAMTrainer).
_S2 = {"adapter": None, "depth_pos_embed": False, "madapter": False, "mc_adapter": False}
_S7 = {**_S2, "adapter": "dfused", "depth_pos_embed": True}
register_variants(SelfPromptSAMTrainer, {
    "SelfPromptSAMTrainer_S1": ("Table 4, S1: stacked-CNN prompt generator, no adapters, no depth embeddings, "
                                "no MAdapter, plain softmax", {**_S2, "prompt_generator": "stacked_cnn"}),
    "SelfPromptSAMTrainer_S2": ("Table 4, S2: S1 with the MSPGenerator", _S2),
    "SelfPromptSAMTrainer_S3": ("Table 4, S3: S2 + vanilla adapters", {**_S2, "adapter": "vanilla"}),
    "SelfPromptSAMTrainer_S4": ("Table 4, S4: S2 + adapters after a depth MLP", {**_S2, "adapter": "depth_before"}),
    "SelfPromptSAMTrainer_S5": ("Table 4, S5: S2 + adapters before a depth MLP", {**_S2, "adapter": "depth_after"}),
    "SelfPromptSAMTrainer_S6": ("Table 4, S6: S2 + DFusedAdapters", {**_S2, "adapter": "dfused"}),
    "SelfPromptSAMTrainer_S7": ("Table 4, S7: S6 + depth positional embeddings", _S7),
    "SelfPromptSAMTrainer_S8": ("Table 4, S8: S7 + MAdapter", {**_S7, "madapter": True}),
    "SelfPromptSAMTrainer_box": ("Fig. 1: box prompts only", {"prompts": ["box"]}),
    "SelfPromptSAMTrainer_point": ("Fig. 1: point prompts only", {"prompts": ["point"]}),
    "SelfPromptSAMTrainer_mask": ("Fig. 1: mask prompts only", {"prompts": ["mask"]}),
    "SelfPromptSAMTrainer_box_point": ("Fig. 1: box + point prompts", {"prompts": ["box", "point"]}),
    "SelfPromptSAMTrainer_box_mask": ("Fig. 1: box + mask prompts", {"prompts": ["box", "mask"]}),
    "SelfPromptSAMTrainer_point_mask": ("Fig. 1: point + mask prompts", {"prompts": ["point", "mask"]}),
}, globals())
