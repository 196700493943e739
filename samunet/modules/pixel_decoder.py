"""Pixel decoders of H-SAM: SAM's upscaling read level by level, and the hierarchical pixel decoder.

SAM's pixel decoder (``MaskDecoder.output_upscaling``) takes the transformer's image tokens
(B, C, h, w) through two x2 transposed convolutions to (B, C/8, 4h, 4w). H-SAM's stage-2 pixel
decoder (Sec. 3.4) is U-shaped: it takes skip features from stage 1's pixel decoder and
upsamples further, to the full input resolution.

samunet's hierarchical pixel decoder (see docs/methods/h_sam.md):
- stage 2 keeps a SAM-shaped upscaling (initialised from stage 1's); at 2h its features get
  stage 1's 2h features added (additive skip, so the SAM shapes stay loadable), at 4h they are
  concatenated with stage 1's 4h features and fused by a 3x3 convolution (C/4 -> C/8);
- then ``num_upsamplings`` x2 transposed convolutions (C/8 -> C/16, then C/16) reach the full
  input resolution: 2 for a ViT (embedding stride 16), 0 for LiteMedSAM's TinyViT (stride 4,
  whose decoder output is already at full resolution).
"""
from __future__ import annotations

import torch
from torch import nn

from samunet.sam_import import sam_modeling


def sam_upscaling_levels(upscaling: nn.Sequential, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run SAM's ``output_upscaling`` (ConvT, LayerNorm2d, act, ConvT, act) on (B, C, h, w).

    Returns its 2h feature (B, C/4, 2h, 2w) and its output (B, C/8, 4h, 4w).
    """
    if len(upscaling) != 5:
        raise ValueError(f"expected SAM's 5-layer output_upscaling, got {len(upscaling)} layers")
    half = upscaling[2](upscaling[1](upscaling[0](source)))
    return half, upscaling[4](upscaling[3](half))


def _up_step(in_channels: int, out_channels: int) -> nn.Sequential:
    layer_norm = sam_modeling().common.LayerNorm2d
    return nn.Sequential(nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2),
                         layer_norm(out_channels), nn.GELU())


class HierarchicalPixelDecoder(nn.Module):
    """(stage-2 image tokens (B, C, h, w), stage-1 levels [(B, C/4, 2h, 2w), (B, C/8, 4h, 4w)])
    -> (B, out_channels, 4h * 2**num_upsamplings, 4w * 2**num_upsamplings).

    ``output_upscaling`` is SAM-shaped, so it can start from stage 1's weights.
    """

    def __init__(self, *, output_upscaling: nn.Sequential, dim: int, num_upsamplings: int) -> None:
        super().__init__()
        if num_upsamplings < 0:
            raise ValueError(f"num_upsamplings must be >= 0, got {num_upsamplings}")
        layer_norm = sam_modeling().common.LayerNorm2d
        self.output_upscaling = output_upscaling
        self.fuse = nn.Sequential(nn.Conv2d(dim // 4, dim // 8, kernel_size=3, padding=1),
                                  layer_norm(dim // 8), nn.GELU())
        channels = [dim // 8] + [max(dim // 16, 1)] * num_upsamplings
        self.upsampling = nn.Sequential(*(_up_step(a, b) for a, b in zip(channels[:-1], channels[1:])))
        self.out_channels = channels[-1]

    def forward(self, source: torch.Tensor, stage1_levels: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        up = self.output_upscaling
        half = up[2](up[1](up[0](source))) + stage1_levels[0]
        quarter = up[4](up[3](half))
        return self.upsampling(self.fuse(torch.cat([quarter, stage1_levels[1]], dim=1)))
