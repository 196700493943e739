"""nnU-Net's own 2d U-Net for a samunet ``2d`` configuration, the baseline SAM methods are compared with.

samunet's plans describe a SAM network (backbone, input size S); nnU-Net's planner would describe a U-Net
for the same data. :func:`unet_configuration` gives the configuration the U-Net trains and predicts with: the
same preprocessed data, spacing, patch (S x S) and batch size, with the ``architecture`` nnunetv2's default
``ExperimentPlanner`` chooses for that patch and spacing: its topology function ``get_pool_and_conv_props``
(pooling down to 4-voxel feature maps, 3x3 convolutions) and its U-Net defaults (PlainConvUNet, 32 base
features doubling to at most 512, two convolutions per stage in encoder and decoder, instance norm, leaky
ReLU). :class:`PlainConvUNetForSamunet` is dynamic_network_architectures' ``PlainConvUNet`` unchanged (same
layers, same state_dict names, nnU-Net's He initialisation) with what samunet's trainers ask of a network.
"""
from __future__ import annotations

import copy
from typing import Iterator

from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
from torch import nn

from samunet.errors import ConfigurationError

NETWORK_NAME = "nnunet_plainconvunet"  # stands in for a backbone name in logs and checkpoints
# nnunetv2 2.8's ExperimentPlanner defaults for a 2d U-Net (set in its __init__, which reads the raw data set)
BASE_FEATURES = 32
MAX_FEATURES_2D = 512
FEATUREMAP_MIN_EDGE_LENGTH = 4
CONVS_PER_STAGE = 2


class PlainConvUNetForSamunet(PlainConvUNet):
    """nnU-Net's ``PlainConvUNet`` with ``backbone`` (:data:`NETWORK_NAME`), ``img_size`` (the patch edge,
    checked when a checkpoint is loaded), ``trainable_parameters()`` and a ``deep_supervision`` switch."""

    backbone = NETWORK_NAME

    def __init__(self, *args, img_size: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.img_size = int(img_size)

    @property
    def deep_supervision(self) -> bool:
        return self.decoder.deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, enabled: bool) -> None:
        self.decoder.deep_supervision = bool(enabled)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (parameter for parameter in self.parameters() if parameter.requires_grad)


def unet_configuration(configuration_manager: ConfigurationManager) -> ConfigurationManager:
    """``configuration_manager`` (samunet's ``2d`` configuration) with nnU-Net's 2d U-Net as its architecture
    (unchanged when it already has it). Raises ConfigurationError for a configuration that is not 2d."""
    configuration = copy.deepcopy(configuration_manager.configuration)
    architecture = configuration.get("architecture") or {}
    network_class = f"{PlainConvUNetForSamunet.__module__}.{PlainConvUNetForSamunet.__name__}"
    if architecture.get("network_class_name") == network_class:
        return configuration_manager
    patch_size, spacing = list(configuration["patch_size"]), list(configuration["spacing"])
    if len(patch_size) != 2 or len(spacing) != 2:
        raise ConfigurationError(f"nnU-Net's 2d U-Net needs a 2d configuration; this one has patch size "
                                 f"{patch_size} and spacing {spacing}. Train with configuration 2d")
    _, strides, kernel_sizes, patch_size, _ = get_pool_and_conv_props(spacing, patch_size,
                                                                      FEATUREMAP_MIN_EDGE_LENGTH, 999999)
    stages = len(strides)
    configuration["patch_size"] = [int(n) for n in patch_size]
    configuration["architecture"] = {
        "network_class_name": network_class,
        "arch_kwargs": {
            "n_stages": stages,
            "features_per_stage": [min(MAX_FEATURES_2D, BASE_FEATURES * 2 ** i) for i in range(stages)],
            "conv_op": "torch.nn.modules.conv.Conv2d",
            "kernel_sizes": [list(k) for k in kernel_sizes],
            "strides": [list(s) for s in strides],
            "n_conv_per_stage": [CONVS_PER_STAGE] * stages,
            "n_conv_per_stage_decoder": [CONVS_PER_STAGE] * (stages - 1),
            "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
            "norm_op_kwargs": {"eps": 1e-5, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
            "img_size": int(max(patch_size)),
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    return ConfigurationManager(configuration)
