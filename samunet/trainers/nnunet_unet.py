"""``nnUNetTrainerSamunetPlans``: nnU-Net's default trainer and 2d U-Net on samunet's plans, for comparisons.

``samunet_train DATASET 2d FOLD -tr nnUNetTrainerSamunetPlans [--max-minutes M]`` trains what
``nnUNetv2_train DATASET 2d FOLD`` trains (nnunetv2's ``nnUNetTrainer``: SGD with Nesterov momentum 0.99,
lr 1e-2 with the poly schedule, weight decay 3e-5, Dice + CE with deep supervision, nnU-Net's 2d augmentation,
1000 epochs of 250 iterations), with nnU-Net's 2d U-Net (:mod:`samunet.networks.nnunet_unet`), on the data,
patch and batch size samunet planned for the SAM trainers, so both see the same inputs. Through samunet's
trainer base it gets what every samunet trainer has: ``--max-minutes`` (:mod:`samunet.trainers.time_budget`),
``--precision``, atomic checkpoints with the run's identity, ``--c``, and ``samunet_predict``.
"""
from __future__ import annotations

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from samunet.errors import ConfigurationError
from samunet.networks.nnunet_unet import unet_configuration
from samunet.registry import TRAINERS
from samunet.trainers.base import SAMTrainerBase


@TRAINERS.register()
class nnUNetTrainerSamunetPlans(SAMTrainerBase):
    """nnU-Net's ``nnUNetTrainer`` (its hyper-parameters, loss, optimiser, schedule and augmentation) with
    nnU-Net's 2d U-Net built for samunet's ``2d`` configuration. Starts from nnU-Net's He initialisation."""

    network_class = "samunet.networks.nnunet_unet.PlainConvUNetForSamunet"  # built by nnU-Net's builder below
    uses_deep_supervision = True
    optimizer_name = "sgd"  # nnU-Net's: momentum 0.99, Nesterov
    uses_sam_backbone = False  # --backbone / --weights are refused (samunet.cli.train.check_sam_options)

    @classmethod
    def inference_configuration(cls, configuration_manager: ConfigurationManager) -> ConfigurationManager:
        return unet_configuration(configuration_manager)

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        """nnU-Net's builder on the U-Net configuration (:func:`unet_configuration`). With deep supervision, the
        head of the coarsest output is frozen: nnU-Net's loss weighs that output 0 (1e-6 under DDP), so it never
        learns in nnU-Net either, and frozen it is not handed to the optimiser or to DDP as a parameter that
        trains."""
        network = nnUNetTrainer.build_network_architecture(plans_manager, unet_configuration(configuration_manager),
                                                           num_input_channels, num_output_channels,
                                                           enable_deep_supervision)
        if enable_deep_supervision:
            network.decoder.seg_layers[0].requires_grad_(False)
        return network

    def _get_deep_supervision_scales(self):
        return nnUNetTrainer._get_deep_supervision_scales(self)

    def load_pretrained_backbone(self) -> None:
        """None: nnU-Net's U-Net trains from scratch. SAM backbone weights (``--weights``) are refused."""
        if self.pretrained_weights not in (None, "none", "random"):
            raise ConfigurationError(f"{type(self).__name__} trains nnU-Net's U-Net from scratch; --weights "
                                     f"{self.pretrained_weights} names SAM backbone weights: leave it out")
        self.print_to_log_file("nnU-Net's 2d U-Net starts from nnU-Net's He initialisation")
