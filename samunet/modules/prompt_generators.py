"""Prompt generators of Self-Prompt-SAM: auxiliary multi-class masks from the image encoder's maps.

The MSPGenerator (Sec. 2.3) takes 5 feature maps from different encoder depths, starts from the
deepest, upsamples it x2 with transposed convolutions, concatenates it with the next shallower
map and convolves, until the finest level; every level has a 1x1 logit head for deep
supervision. A plain ViT gives all 5 maps at the embedding stride, so (as in UNETR) shallower
maps are first brought to finer strides by x2 transposed-convolution steps; a hierarchical
encoder (TinyViT) keeps its native strides. The stacked-CNN generator is ablation S1 of
Table 4: the deepest map alone, upsampled to full resolution by convolutions.
Conv parts use nnU-Net's blocks (3x3 conv, InstanceNorm, LeakyReLU).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_WIDTHS = (16, 32, 64, 128, 128)


def generator_level_strides(feature_strides: Sequence[int]) -> tuple[int, ...]:
    """Strides (relative to the S x S input) at which the generator uses each of its 5 maps, shallow to deep.

    All maps at one stride e (plain ViT): a UNETR-like pyramid e/16, e/8, e/4, e/2, e (each at
    least 1), i.e. (1, 2, 4, 8, 16) for e = 16. Otherwise (hierarchical encoder, e.g. TinyViT's
    (1, 2, 4, 4, 4)) the native strides are kept. Raises ValueError unless there are exactly 5
    positive strides, non-decreasing shallow -> deep, and consecutive target strides differ by a
    factor 1 or 2.
    """
    strides = tuple(int(s) for s in feature_strides)
    if len(strides) != 5:
        raise ValueError(f"expected 5 feature maps, got {len(strides)} strides")
    if min(strides) < 1 or any(b < a for a, b in zip(strides[:-1], strides[1:])):
        raise ValueError(f"strides must be positive and non-decreasing shallow -> deep, got {strides}")
    if len(set(strides)) == 1:
        strides = tuple(max(strides[0] // 2 ** k, 1) for k in (4, 3, 2, 1, 0))
    if any(b not in (a, 2 * a) for a, b in zip(strides[:-1], strides[1:])):
        raise ValueError(f"consecutive level strides must differ by a factor 1 or 2, got {strides}")
    return strides


def deep_supervision_weights(level_strides: Sequence[int]) -> list[float]:
    """Loss weight per output (same order as level_strides), proportional to min_stride / stride_i.

    Weights halve with each halving of resolution and sum to 1 (nnU-Net's convention, no output dropped).
    """
    if not level_strides:
        raise ValueError("level_strides must not be empty")
    raw = [min(level_strides) / s for s in level_strides]
    return [w / sum(raw) for w in raw]


def _num_doublings(stride: int, target: int) -> int:
    """k such that stride == target * 2**k (k >= 0), else ValueError."""
    ratio = stride // target
    if stride % target or ratio & (ratio - 1):
        raise ValueError(f"stride {stride} is not a power-of-two multiple of {target}")
    return ratio.bit_length() - 1


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """(N, in, H, W) -> (N, out, H, W): (3x3 conv, InstanceNorm2d(affine), LeakyReLU(0.01)) x 2."""
    layers: list[nn.Module] = []
    for channels in (in_channels, out_channels):
        layers += [nn.Conv2d(channels, out_channels, kernel_size=3, padding=1),
                   nn.InstanceNorm2d(out_channels, affine=True), nn.LeakyReLU(0.01, inplace=True)]
    return nn.Sequential(*layers)


def _up_steps(channels: int, steps: int) -> list[nn.Module]:
    """``steps`` x (ConvTranspose2d k=2 s=2 + conv block) at constant width: (N, c, h, w) -> (N, c, 2^s h, 2^s w)."""
    layers: list[nn.Module] = []
    for _ in range(steps):
        layers += [nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2), conv_block(channels, channels)]
    return layers


def _check_args(in_channels: Sequence[int], in_strides: Sequence[int], num_classes: int,
                widths: Sequence[int] | None) -> tuple[int, ...]:
    if len(in_channels) != len(in_strides) or not in_channels:
        raise ValueError(f"need one channel count per stride, got {len(in_channels)} and {len(in_strides)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    widths = tuple(DEFAULT_WIDTHS if widths is None else widths)
    if len(widths) != 5 or min(widths) < 1:
        raise ValueError(f"expected 5 positive widths (shallow -> deep), got {widths}")
    return widths


def _match_size(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Guard against rounding: resize x (nearest) to like's spatial size if they differ."""
    return x if x.shape[-2:] == like.shape[-2:] else F.interpolate(x, size=like.shape[-2:], mode="nearest")


class MSPGenerator(nn.Module):
    """Multi-scale prompt generator (Self-Prompt-SAM Sec. 2.3).

    5 maps (N, C_i, S/in_stride_i, S/in_stride_i), shallow -> deep -> logits per level, finest
    first: [(N, K, S/level_stride_i, S/level_stride_i) for i in 0..4]; the first is the auxiliary
    mask used for the prompts. ``level_strides`` lists the output strides in that order.
    """

    def __init__(self, *, in_channels: Sequence[int], in_strides: Sequence[int], num_classes: int,
                 widths: Sequence[int] | None = None) -> None:
        super().__init__()
        widths = _check_args(in_channels, in_strides, num_classes, widths)
        self.level_strides = generator_level_strides(in_strides)
        self.projections = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, w, kernel_size=1), *_up_steps(w, _num_doublings(s, t)))
            for c, w, s, t in zip(in_channels, widths, in_strides, self.level_strides))
        self.upsamplers = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], kernel_size=2, stride=2)
            if self.level_strides[i + 1] == 2 * self.level_strides[i]
            else nn.Conv2d(widths[i + 1], widths[i], kernel_size=1) for i in range(4))
        self.blocks = nn.ModuleList(conv_block(2 * widths[i], widths[i]) for i in range(4))
        self.heads = nn.ModuleList(nn.Conv2d(w, num_classes, kernel_size=1) for w in widths)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(features) != 5:
            raise ValueError(f"expected 5 feature maps, got {len(features)}")
        skips = [project(x) for project, x in zip(self.projections, features)]
        y = skips[4]
        logits = [self.heads[4](y)]
        for i in range(3, -1, -1):
            y = self.blocks[i](torch.cat([_match_size(self.upsamplers[i](y), skips[i]), skips[i]], dim=1))
            logits.append(self.heads[i](y))
        return logits[::-1]


class StackedCNNPromptGenerator(nn.Module):
    """Ablation S1 of Table 4: stacked CNNs on the image embedding alone (the deepest map).

    (N, C, S/e, S/e) -> 1x1 projection and conv block, then x2 ConvTranspose2d + conv block steps
    down to stride 1 (width widths[j] at stride 2**j, clamped to the deepest width), one 1x1 head:
    returns [(N, K, S, S)]. The other maps are accepted and ignored; ``level_strides`` is (1,).
    """

    def __init__(self, *, in_channels: Sequence[int], in_strides: Sequence[int], num_classes: int,
                 widths: Sequence[int] | None = None) -> None:
        super().__init__()
        widths = _check_args(in_channels, in_strides, num_classes, widths)
        self.level_strides = (1,)
        steps = _num_doublings(int(in_strides[-1]), 1)
        stage_widths = [widths[min(j, 4)] for j in range(steps, -1, -1)]
        layers: list[nn.Module] = [nn.Conv2d(in_channels[-1], stage_widths[0], kernel_size=1),
                                   conv_block(stage_widths[0], stage_widths[0])]
        for a, b in zip(stage_widths[:-1], stage_widths[1:]):
            layers += [nn.ConvTranspose2d(a, b, kernel_size=2, stride=2), conv_block(b, b)]
        self.layers = nn.Sequential(*layers)
        self.head = nn.Conv2d(stage_widths[-1], num_classes, kernel_size=1)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [self.head(self.layers(features[-1]))]
