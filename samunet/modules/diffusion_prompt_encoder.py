"""AutoMedSAM's diffusion-based class-prompt encoder: (image embedding, class index) -> SAM prompts.

- Forward conditional diffusion: ``x_t = E + P(k) + eps_t`` with ``P`` a linear projection of the
  one-hot class prompt reshaped to E's shape and ``eps_t ~ N(0, (sigma_t * std(E))^2)``.
  ``sigma_t = max_noise_scale * (1 - t / T)`` decreases with t; training draws t uniformly from
  {0, ..., T-1} per sample, inference uses t = T, where the noise is exactly absent.
- Encoder: three levels of (3x3 conv + ReLU) x 2, the last two downsampling by 2 (stride-2 conv).
- Bottleneck: the class prompt, projected linearly to the bottleneck's shape, joins by channel
  concatenation.
- Dense branch: element-wise attention ``sigmoid(conv1x1(F)) * F``, skip decoder -> dense prompt
  embedding (B, C, h, w).
- Sparse branch: channel attention ``sigmoid(MLP(GAP(F)))`` applied per channel, skip decoder,
  then attention pooling (one spatial softmax map per token) -> sparse prompt tokens (B, n, C).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def noise_scale(timesteps: torch.Tensor, *, num_timesteps: int, max_noise_scale: float) -> torch.Tensor:
    """sigma_t = max_noise_scale * (1 - t / T) for integer t in [0, T]: (B,) -> (B,), 0 at t = T."""
    return max_noise_scale * (1.0 - timesteps.float() / num_timesteps)


def _conv_block(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True))


class SkipDecoder(nn.Module):
    """Bottleneck (B, c_in, h/4, w/4) + skips [(B, s_1, h/2, w/2), (B, s_0, h, w)] -> (B, out_channels, h, w).

    Each stage upsamples bilinearly to the skip's size, concatenates the skip and convolves.
    """

    def __init__(self, *, in_channels: int, skip_channels: tuple[int, ...], out_channels: int) -> None:
        super().__init__()
        stages = []
        channels = in_channels
        for skip in skip_channels:
            stages.append(_conv_block(channels + skip, skip))
            channels = skip
        self.stages = nn.ModuleList(stages)
        self.head = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for stage, skip in zip(self.stages, skips):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = stage(torch.cat([x, skip], dim=1))
        return self.head(x)


class DenseBranch(nn.Module):
    """Element-wise attention then skip decoding: (B, c, h/4, w/4) -> dense prompt (B, C, h, w)."""

    def __init__(self, *, channels: int, skip_channels: tuple[int, ...], embed_dim: int) -> None:
        super().__init__()
        self.attention = nn.Conv2d(channels, channels, 1)
        self.decoder = SkipDecoder(in_channels=channels, skip_channels=skip_channels, out_channels=embed_dim)

    def forward(self, bottleneck: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        return self.decoder(torch.sigmoid(self.attention(bottleneck)) * bottleneck, skips)


class SparseBranch(nn.Module):
    """Channel attention after global pooling, skip decoding, attention pooling to tokens:
    (B, c, h/4, w/4) -> sparse prompt tokens (B, n, C)."""

    def __init__(self, *, channels: int, skip_channels: tuple[int, ...], embed_dim: int, num_tokens: int,
                 reduction: int = 4) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.channel_attention = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True),
                                               nn.Linear(hidden, channels))
        self.decoder = SkipDecoder(in_channels=channels, skip_channels=skip_channels, out_channels=embed_dim)
        self.token_maps = nn.Conv2d(embed_dim, num_tokens, 1)

    def forward(self, bottleneck: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        weights = torch.sigmoid(self.channel_attention(bottleneck.mean(dim=(2, 3))))
        features = self.decoder(bottleneck * weights[:, :, None, None], skips)  # (B, C, h, w)
        maps = self.token_maps(features).flatten(2).softmax(dim=-1)  # (B, n, h*w)
        return maps @ features.flatten(2).transpose(1, 2)  # (B, n, C)


class DiffusionClassPromptEncoder(nn.Module):
    """(image embedding E (B, C, h, w), class index (B,) in [0, num_classes)) -> (sparse (B, n, C), dense (B, C, h, w)).

    ``num_classes`` counts the promptable (foreground) classes; ``base_channels`` w gives encoder
    widths (w, 2w, 4w), default C / 4.
    """

    def __init__(self, *, num_classes: int, embed_dim: int, embedding_size: tuple[int, int],
                 num_sparse_tokens: int = 2, base_channels: int | None = None, num_timesteps: int = 1000,
                 max_noise_scale: float = 1.0) -> None:
        super().__init__()
        width = base_channels or max(embed_dim // 4, 4)
        widths = (width, 2 * width, 4 * width)
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.embedding_size = tuple(embedding_size)
        self.num_timesteps = num_timesteps
        self.max_noise_scale = max_noise_scale
        height, width_px = self.embedding_size
        self.class_to_embedding = nn.Linear(num_classes, embed_dim * height * width_px)
        self.encoder = nn.ModuleList([_conv_block(embed_dim, widths[0]), _conv_block(widths[0], widths[1], stride=2),
                                      _conv_block(widths[1], widths[2], stride=2)])
        self.bottleneck_size = (_halved(_halved(height)), _halved(_halved(width_px)))
        self.class_to_bottleneck = nn.Linear(num_classes, widths[2] * self.bottleneck_size[0] * self.bottleneck_size[1])
        skip_channels = (widths[1], widths[0])
        self.dense_branch = DenseBranch(channels=2 * widths[2], skip_channels=skip_channels, embed_dim=embed_dim)
        self.sparse_branch = SparseBranch(channels=2 * widths[2], skip_channels=skip_channels, embed_dim=embed_dim,
                                          num_tokens=num_sparse_tokens)
        # Both branches start at zero output: a randomly initialised branch gives prompts far from anything
        # SAM's decoder has seen, which drives every mask logit to about -20 at the first step, where the
        # sigmoid's gradient vanishes (measured on the demo phantom). The network adds the original prompt
        # encoder's 'no mask' embedding to the dense output, so training starts from SAM's prompt-free state.
        for head in (self.dense_branch.decoder.head, self.sparse_branch.decoder.head):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def sample_timesteps(self, batch: int, device: torch.device) -> torch.Tensor:
        """Training: one t per sample, uniform over {0, ..., T-1} (every training sample is noised)."""
        return torch.randint(0, self.num_timesteps, (batch,), device=device)

    def diffuse(self, image_embedding: torch.Tensor, class_index: torch.Tensor,
                timesteps: torch.Tensor | None) -> torch.Tensor:
        """x_t = E + P(k) + eps_t, eps_t ~ N(0, (sigma_t * std(E))^2) per sample: (B, C, h, w).

        ``timesteps`` None is inference's t = T for every sample, where sigma_T = 0: x_T = E + P(k), and no
        noise is drawn (drawing it took 16% of AutoMedSAM's prediction time on a CPU, to be multiplied by 0).
        """
        one_hot = F.one_hot(class_index, self.num_classes).to(image_embedding.dtype)
        x = image_embedding + self.class_to_embedding(one_hot).view_as(image_embedding)
        if timesteps is None:
            return x
        scale = noise_scale(timesteps, num_timesteps=self.num_timesteps, max_noise_scale=self.max_noise_scale)
        # sigma_T = 0 adds exact zeros: no branch on a device value, which would make the host wait every step
        spread = image_embedding.detach().flatten(1).std(dim=1)
        return x + (scale * spread).view(-1, 1, 1, 1).to(x.dtype) * torch.randn_like(x)

    def forward(self, image_embedding: torch.Tensor, class_index: torch.Tensor,
                timesteps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(image embedding (B, C, h, w), class index (B,)) -> (sparse prompts (B, n, C), dense prompt (B, C, h, w)).
        ``timesteps`` (B,) or None: drawn per sample in training, t = T (noise-free) in eval mode."""
        batch = image_embedding.shape[0]
        if timesteps is None and self.training:
            timesteps = self.sample_timesteps(batch, image_embedding.device)
        x = self.diffuse(image_embedding, class_index, timesteps)
        skips = []
        for level in self.encoder:
            x = level(x)
            skips.append(x)
        one_hot = F.one_hot(class_index, self.num_classes).to(x.dtype)
        class_map = self.class_to_bottleneck(one_hot).view(batch, -1, *self.bottleneck_size)
        bottleneck = torch.cat([skips[-1], class_map], dim=1)
        decoder_skips = skips[-2::-1]
        return self.sparse_branch(bottleneck, decoder_skips), self.dense_branch(bottleneck, decoder_skips)


def _halved(size: int) -> int:
    """Output size of a 3x3, stride-2, padding-1 convolution."""
    return (size - 1) // 2 + 1
