"""What every samunet network shares: SAM's parts, the input stage, freezing and loading.

Every network is built from one :class:`SAMNetworkConfig` (nnunetv2's channel and class counts,
the plans' ``arch_kwargs`` and the deep-supervision switch) plus its own method options as
keyword arguments, so the plans alone can rebuild any samunet network
(:meth:`samunet.trainers.base.SAMTrainerBase.build_network_architecture`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from samunet.backbones.catalog import get_backbone_spec
from samunet.backbones.sam import SAMParts, build_sam_parts, load_released_checkpoint
from samunet.modules.input_stage import SAMInputStage


@dataclass(frozen=True)
class SAMNetworkConfig:
    """The configuration every samunet network takes.

    ``input_channels`` / ``num_classes``: nnunetv2's input channel count and number of output
    channels (segmentation heads, background included); ``backbone``, ``img_size`` (S),
    ``intensity_ranges`` (per channel (low, high) in nnU-Net-normalised units),
    ``pixel_normalization`` (None: the backbone's) and ``depth`` (D, slices per stack; only the
    stacked-slice methods use it) come from the plans' ``arch_kwargs``; ``deep_supervision`` is
    the initial state of the network's deep-supervision switch.
    """

    input_channels: int
    num_classes: int
    backbone: str
    img_size: int
    intensity_ranges: tuple[tuple[float, float], ...]
    pixel_normalization: str | None = None
    depth: int = 1
    deep_supervision: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "intensity_ranges", tuple(tuple(float(v) for v in r) for r in self.intensity_ranges))

    @classmethod
    def split(cls, arguments: Mapping[str, Any]) -> tuple[SAMNetworkConfig, dict[str, Any]]:
        """Separate ``arguments`` (e.g. ``arch_kwargs`` plus counts) into the config and the method's own options."""
        names = {field.name for field in dataclasses.fields(cls)}
        return (cls(**{k: v for k, v in arguments.items() if k in names}),
                {k: v for k, v in arguments.items() if k not in names})


class SAMSegmentationNetwork(nn.Module):
    """Base: ``input_stage``, ``image_encoder`` (frozen), ``prompt_encoder``, ``mask_decoder``.

    Subclasses build their extra modules, choose what trains in :meth:`set_trainable`, and
    implement ``forward`` (B, C, S, S) -> logits (B, K, S, S), or a list of logits from full to
    coarse resolution when ``deep_supervision`` is on (see :meth:`deep_supervision_scales`); the
    list's first entry is then the output a deployed network gives (what nnU-Net validates).
    """

    def __init__(self, config: SAMNetworkConfig, *, num_mask_tokens: int = 4) -> None:
        super().__init__()
        spec = get_backbone_spec(config.backbone)
        parts = build_sam_parts(spec, config.img_size, num_mask_tokens)
        self.config = config
        self.backbone = config.backbone
        self.img_size = config.img_size
        self.num_classes = config.num_classes
        self.deep_supervision = config.deep_supervision
        self.input_stage = SAMInputStage(num_input_channels=config.input_channels,
                                         intensity_ranges=[list(r) for r in config.intensity_ranges],
                                         pixel_normalization=config.pixel_normalization or spec.pixel_normalization)
        self.image_encoder = parts.image_encoder
        self.prompt_encoder = parts.prompt_encoder
        self.mask_decoder = parts.mask_decoder

    def deep_supervision_scales(self) -> list[list[float]] | None:
        """Scales of the outputs when ``deep_supervision`` is on (full first); None: single output."""
        return None

    def set_trainable(self) -> None:
        """Freeze what the method keeps frozen; subclasses call it at the end of ``__init__``."""
        raise NotImplementedError

    def train_only(self, *modules: nn.Module | None) -> None:
        """Freeze everything, then let ``modules`` (None entries skipped) and the input stage's channel
        mixer (present for 2 or more than 3 input channels) train."""
        self.requires_grad_(False)
        for module in (*modules, self.input_stage.channel_mixer):
            if module is not None:
                module.requires_grad_(True)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    def load_pretrained(self, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Load a released SAM / MedSAM / LiteMedSAM checkpoint into the SAM parts (strict)."""
        view = SAMParts(image_encoder=self.image_encoder, prompt_encoder=self.prompt_encoder,
                        mask_decoder=self.mask_decoder, backbone=self.backbone)
        load_released_checkpoint(view, state_dict, source)
