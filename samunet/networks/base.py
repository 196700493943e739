"""What every samunet network shares: SAM's parts, the input stage, freezing and loading.

Constructor arguments follow nnunetv2's ``get_network_from_plans`` convention
(``input_channels``, ``num_classes``, the plans' ``arch_kwargs``, ``deep_supervision``), so the
plans alone can rebuild any samunet network.
"""
from __future__ import annotations

from typing import Iterator, Mapping

import torch
from torch import nn

from samunet.backbones.catalog import get_backbone_spec
from samunet.backbones.sam import SAMParts, build_sam_parts, load_released_checkpoint
from samunet.modules.input_stage import SAMInputStage


class SAMSegmentationNetwork(nn.Module):
    """Base: ``input_stage``, ``image_encoder`` (frozen), ``prompt_encoder``, ``mask_decoder``.

    Subclasses build their extra modules, choose what trains in :meth:`set_trainable`, and
    implement ``forward`` (B, C, S, S) -> logits (B, K, S, S), or a list of logits from full to
    coarse resolution when ``deep_supervision`` is on (see :meth:`deep_supervision_scales`).
    """

    def __init__(self, *, input_channels: int, num_classes: int, backbone: str, img_size: int,
                 intensity_ranges: list[list[float]], pixel_normalization: str | None = None,
                 num_mask_tokens: int = 4, deep_supervision: bool = False) -> None:
        super().__init__()
        spec = get_backbone_spec(backbone)
        parts = build_sam_parts(spec, img_size, num_mask_tokens)
        self.backbone = backbone
        self.img_size = img_size
        self.num_classes = num_classes
        self.deep_supervision = deep_supervision
        self.input_stage = SAMInputStage(num_input_channels=input_channels, intensity_ranges=intensity_ranges,
                                         pixel_normalization=pixel_normalization or spec.pixel_normalization)
        self.image_encoder = parts.image_encoder
        self.prompt_encoder = parts.prompt_encoder
        self.mask_decoder = parts.mask_decoder

    def deep_supervision_scales(self) -> list[list[float]] | None:
        """Scales of the outputs when ``deep_supervision`` is on (full first); None: single output."""
        return None

    def set_trainable(self) -> None:
        """Freeze what the method keeps frozen; subclasses call it at the end of ``__init__``."""
        raise NotImplementedError

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    def load_pretrained(self, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Load a released SAM / MedSAM / LiteMedSAM checkpoint into the SAM parts (strict)."""
        view = SAMParts(image_encoder=self.image_encoder, prompt_encoder=self.prompt_encoder,
                        mask_decoder=self.mask_decoder, backbone=self.backbone)
        load_released_checkpoint(view, state_dict, source)
