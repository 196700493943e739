"""The contract every SAM image encoder in samunet fulfils.

An encoder maps images (B, 3, S, S) to SAM's image embedding (B, P, S/stride, S/stride), with
P the prompt/decoder width (256 for every released checkpoint), and also returns feature maps
from several depths (the global-attention blocks of a ViT, the stages of TinyViT), because
every method samunet implements needs more than the final embedding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple

import torch
from torch import nn


class EncoderOutput(NamedTuple):
    """embedding: (B, P, h, w) after the neck; features: list of (B, C_i, h_i, w_i), shallow to deep."""

    embedding: torch.Tensor
    features: list[torch.Tensor]


class QKVProjection(NamedTuple):
    """Where q and v sit in one attention layer's fused ``qkv`` linear.

    ``owner.qkv`` is an ``nn.Linear``; ``q_channels`` / ``v_channels`` are the indices of its
    output channels that form the query and the value (layouts differ between ViT and TinyViT).
    """

    owner: nn.Module
    q_channels: torch.Tensor
    v_channels: torch.Tensor


class SAMImageEncoder(nn.Module):
    """Base class of samunet's image encoders (see the module docstring for the shapes)."""

    img_size: int
    embedding_stride: int
    out_chans: int
    feature_channels: tuple[int, ...]
    feature_strides: tuple[int, ...]

    @property
    def embedding_size(self) -> int:
        return self.img_size // self.embedding_stride

    def forward(self, x: torch.Tensor) -> EncoderOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def qkv_projections(self) -> list[QKVProjection]:  # pragma: no cover - abstract
        """Every attention layer's fused qkv projection, for LoRA and similar adapters."""
        raise NotImplementedError

    def adapt_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return ``state_dict`` (this encoder's own key names) with tensors that depend on the
        input size resized to this encoder's ``img_size``. Default: unchanged."""
        return dict(state_dict)


@dataclass(frozen=True)
class BackboneSpec:
    """Everything samunet needs to know about one backbone family member.

    ``build_encoder(img_size)`` builds the image encoder; ``pixel_normalization`` says what the
    pretrained weights expect as input: ``"imagenet"`` (0-255 RGB minus SAM's pixel mean, divided
    by its std) or ``"unit"`` (intensities in [0, 1], as MedSAM and LiteMedSAM were trained).
    ``prompt_dim`` is the width of the prompt encoder / mask decoder; ``decoder_mlp_dim`` the MLP
    width of the two-way transformer.
    """

    name: str
    build_encoder: Callable[[int], SAMImageEncoder]
    default_img_size: int
    allowed_img_sizes: tuple[int, ...]
    size_multiple: int
    pixel_normalization: str
    default_weights: str | None
    prompt_dim: int = 256
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    decoder_depth: int = 2
    mask_in_chans: int = 16
    family: str = "vit"
