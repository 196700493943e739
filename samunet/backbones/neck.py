"""SAM's encoder neck, shared by the ViT and TinyViT encoders: 1x1 conv -> LayerNorm2d -> 3x3 conv -> LayerNorm2d."""
from __future__ import annotations

import torch
from torch import nn

NECK_EPS = 1e-6  # every released SAM / LiteMedSAM neck uses eps 1e-6


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map (parameters ``weight``, ``bias``)."""

    def __init__(self, *, num_channels: int, eps: float = NECK_EPS) -> None:
        super().__init__(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def sam_neck(in_chans: int, out_chans: int) -> nn.Sequential:
    """(B, in_chans, h, w) -> (B, out_chans, h, w); state_dict keys neck.0 ... neck.3 as in SAM."""
    return nn.Sequential(
        nn.Conv2d(in_chans, out_chans, kernel_size=1, bias=False),
        LayerNorm2d(num_channels=out_chans),
        nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
        LayerNorm2d(num_channels=out_chans),
    )
