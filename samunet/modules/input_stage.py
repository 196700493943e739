"""From nnU-Net-normalised channels to the image a pretrained SAM encoder expects.

nnunetv2 only finds intensity normalisers inside itself, so its default preprocessing (CT:
clip to the foreground 0.5-99.5 percentiles then z-score; MR: per-image z-score) stays, and the
SAM-specific mapping happens here, at the network's input: each channel is mapped linearly from
its planned intensity range to [0, 1] (the windowed, min-max scaled image MedSAM and LiteMedSAM
were trained on), brought to 3 channels, and for SAM's own weights scaled to 0-255 and
normalised with SAM's pixel mean and std.
"""
from __future__ import annotations

import torch
from torch import nn

# segment-anything's Sam.pixel_mean / pixel_std (RGB, 0-255)
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
PIXEL_NORMALIZATIONS = ("imagenet", "unit")


class SAMInputStage(nn.Module):
    """(B, C, H, W) nnU-Net-normalised -> (B, 3, H, W) in the encoder's pixel convention.

    ``intensity_ranges``: per channel (low, high) in nnU-Net-normalised units, mapped to 0 and 1.
    One channel is repeated to three; three pass through; any other count goes through a
    trainable 1x1 convolution initialised to the channel mean.
    """

    def __init__(self, *, num_input_channels: int, intensity_ranges: list[list[float]],
                 pixel_normalization: str) -> None:
        super().__init__()
        if len(intensity_ranges) != num_input_channels:
            raise ValueError(f"{len(intensity_ranges)} intensity ranges for {num_input_channels} input channels")
        if pixel_normalization not in PIXEL_NORMALIZATIONS:
            raise ValueError(f"pixel_normalization must be one of {PIXEL_NORMALIZATIONS}, not {pixel_normalization!r}")
        low = torch.tensor([float(r[0]) for r in intensity_ranges])
        high = torch.tensor([float(r[1]) for r in intensity_ranges])
        if torch.any(high <= low):
            raise ValueError(f"every intensity range needs low < high, got {intensity_ranges}")
        self.register_buffer("low", low.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("width", (high - low).view(1, -1, 1, 1), persistent=False)
        self.channel_mixer: nn.Module | None = None
        if num_input_channels not in (1, 3):
            self.channel_mixer = nn.Conv2d(num_input_channels, 3, kernel_size=1)
            nn.init.constant_(self.channel_mixer.weight, 1.0 / num_input_channels)
            nn.init.zeros_(self.channel_mixer.bias)
        self.imagenet = pixel_normalization == "imagenet"
        self.register_buffer("pixel_mean", torch.tensor(SAM_PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(SAM_PIXEL_STD).view(1, 3, 1, 1), persistent=False)

    def window(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> each channel mapped from its intensity range to [0, 1]."""
        return ((x - self.low) / self.width).clamp(0.0, 1.0)

    def to_rgb(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, 3, H, W)."""
        if self.channel_mixer is not None:
            return self.channel_mixer(x)
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    def normalize_pixels(self, rgb: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> the encoder's pixel convention."""
        return (rgb * 255.0 - self.pixel_mean) / self.pixel_std if self.imagenet else rgb

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize_pixels(self.to_rgb(self.window(x)))
