"""Class-balanced mask-guided self-attention (CMAttn): H-SAM's stage-2 image-embedding enhancement.

H-SAM (Cheng et al., CVPR 2024, Sec. 3.2 and Fig. 3) takes the stage-1 *mask feature* (every
class token of the stage-1 decoder multiplied with the decoder's image embedding, before any
upsampling), normalises it to per-class probabilities P, and in training perturbs class i with
Gaussian noise whose variance is inversely proportional to the class's frequency (Eq. 1), so the
rare (tail) classes see more variation. Self-attention over the embedding grid follows, a linear
layer compresses the channels, and the result multiplies the image embedding (Hadamard product)
on a residual path.

samunet's reading of the parts the paper leaves open (see docs/methods/h_sam.md):
- P = softmax over the classes of the mask feature. Eq. 1, ``P(gt = i) + N(0, var(i))``: at every
  pixel whose ground-truth class (the label map resized to the mask feature's grid, nearest) is
  i, P gets Gaussian noise of variance ``var(i) = max_noise_std**2 * f_min / f_i``, so the rarest
  class gets ``max_noise_std`` and the variance is inversely proportional to the frequency;
  labels outside 0..K-1 (an ignore label) get none. Dropout (p = 0.1, as in the authors' code)
  follows the noise; neither acts in eval mode, where no label map is needed.
- The attention runs over the h*w grid positions (the tokens), each position described by its K
  class probabilities lifted to ``width`` channels, so the module works at any input size.
- The compressing linear (``width`` -> 1) starts at zero: CMAttn starts as the identity, and the
  stage-2 decoder, initialised from stage 1, starts from stage 1's image embedding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from samunet.backbones.attention import dot_product_attention


def class_balanced_noise_std(frequencies: torch.Tensor, max_noise_std: float) -> torch.Tensor:
    """(K,) class frequencies (any non-negative scale) -> (K,) float32 noise standard deviations, on the
    frequencies' device.

    ``var_i = max_noise_std**2 * f_min / f_i`` (f_min: the smallest non-zero frequency). A class
    never seen in the training data is treated as the rarest one (``max_noise_std``); so is every class
    when none was seen. Masked arithmetic, no read of device values by the host.
    """
    frequencies = frequencies.detach().float().clamp_min(0)
    present = frequencies > 0
    rarest = torch.where(present, frequencies, torch.full_like(frequencies, float("inf"))).amin()
    ratio = torch.where(present, rarest / frequencies.clamp_min(torch.finfo(torch.float32).tiny),
                        torch.ones_like(frequencies))
    return max_noise_std * ratio.sqrt()


class ClassBalancedMaskAttention(nn.Module):
    """(image embedding (B, C, h, w), stage-1 mask feature (B, K, h, w)) -> enhanced embedding (B, C, h, w).

    ``class_frequencies`` (K,) is a buffer, so the values computed from the training data travel
    with the checkpoint; until they are set every class counts as equally frequent.
    """

    def __init__(self, *, num_classes: int, width: int = 32, num_heads: int = 4, max_noise_std: float = 0.1,
                 dropout: float = 0.1) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} must be a multiple of num_heads {num_heads}")
        self.num_classes = num_classes
        self.num_heads = num_heads
        self.max_noise_std = max_noise_std
        self.lift = nn.Linear(num_classes, width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.compress = nn.Linear(width, 1)
        nn.init.zeros_(self.compress.weight)
        nn.init.zeros_(self.compress.bias)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("class_frequencies", torch.full((num_classes,), 1.0 / num_classes))

    def set_class_frequencies(self, frequencies: torch.Tensor | list[float]) -> None:
        """Store the (K,) class frequencies measured on the training data (normalised to sum 1)."""
        values = torch.as_tensor(frequencies, dtype=torch.float32).flatten()
        if values.numel() != self.num_classes or bool((values < 0).any()) or float(values.sum()) <= 0:
            raise ValueError(f"need {self.num_classes} non-negative class frequencies with a positive sum, "
                             f"got {values.tolist()}")
        self.class_frequencies.copy_((values / values.sum()).to(self.class_frequencies.device))

    def noise_std(self) -> torch.Tensor:
        """(K,) standard deviation of the training noise of each class."""
        return class_balanced_noise_std(self.class_frequencies, self.max_noise_std)

    def add_class_noise(self, probabilities: torch.Tensor, ground_truth: torch.Tensor | None) -> torch.Tensor:
        """(B, K, h, w) -> the same plus Eq. 1's noise in training; unchanged in eval.

        ground_truth: label map (B, 1, H, W) of any size (resized here, nearest). Raises ValueError when
        it is missing in training: the noise of a pixel is drawn by its ground-truth class.
        """
        if not self.training:
            return probabilities
        if ground_truth is None:
            raise ValueError("CMAttn's class-balanced noise (H-SAM Eq. 1) is drawn by each pixel's ground-truth "
                             "class: pass the label map to the network's forward in training")
        labels = F.interpolate(ground_truth.float(), size=probabilities.shape[-2:], mode="nearest")[:, 0].long()
        valid = (labels >= 0) & (labels < self.num_classes)
        std = self.noise_std().to(probabilities.dtype)[labels.clamp(0, self.num_classes - 1)]
        pixel_std = torch.where(valid, std, torch.zeros_like(std))  # (B, h, w)
        return probabilities + torch.randn_like(probabilities) * pixel_std.unsqueeze(1)

    def forward(self, image_embedding: torch.Tensor, mask_feature: torch.Tensor,
                ground_truth: torch.Tensor | None = None) -> torch.Tensor:
        """ground_truth: the label map (B, 1, H, W), needed in training only (Eq. 1)."""
        batch, _, height, width = mask_feature.shape
        probabilities = self.dropout(self.add_class_noise(mask_feature.softmax(dim=1), ground_truth))
        tokens = self.lift(probabilities.flatten(2).transpose(1, 2))  # (B, hw, width)
        head_dim = tokens.shape[-1] // self.num_heads
        q, k, v = self.qkv(tokens).view(batch, -1, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        attended = dot_product_attention(q, k, v).transpose(1, 2).reshape(tokens.shape)
        tokens = self.norm(tokens + self.proj(attended))
        gate = self.compress(tokens).transpose(1, 2).reshape(batch, 1, height, width)
        return image_embedding + image_embedding * gate
