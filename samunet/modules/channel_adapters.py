"""Self-Prompt-SAM's two convolutional adapters (paper Sec. 2.2 and 2.5), both inverted bottlenecks.

- :class:`MAdapter` at the very input: the C modality channels (windowed to [0, 1] by
  :class:`samunet.modules.input_stage.SAMInputStage`) -> a learned correction of the 3-channel
  image SAM expects. Its last convolution starts at zero, so the network starts with the
  input stage's fixed mapping (one channel repeated to RGB).
- :class:`MCAdapter` at the output: the K per-class binary mask logits of SAM's decoder (one
  decoder pass per class, the background included, as the paper's Fig. 1(c) shows) -> K
  multi-class logits (softmax is applied by the loss and by nnU-Net's predictor). Without it
  (Table 4, S1-S8: "plain softmax") the K binary logits are the multi-class logits as they are.
"""
from __future__ import annotations

import torch
from torch import nn


class MAdapter(nn.Module):
    """(N, C, H, W) intensities in [0, 1] -> (N, 3, H, W) residual for the 3-channel image: 3x3 conv
    (expand) + InstanceNorm + LeakyReLU, then a 1x1 conv (project)."""

    def __init__(self, in_channels: int, *, expansion: int = 4) -> None:
        super().__init__()
        hidden = expansion * max(in_channels, 3)
        self.layers = nn.Sequential(nn.Conv2d(in_channels, hidden, 3, padding=1), nn.InstanceNorm2d(hidden, affine=True),
                                    nn.LeakyReLU(0.01, inplace=True), nn.Conv2d(hidden, 3, 1))
        nn.init.zeros_(self.layers[-1].weight)
        nn.init.zeros_(self.layers[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MCAdapter(nn.Module):
    """(N, K, H, W) per-class binary logits -> (N, K, H, W) multi-class logits.

    Two convolutions, 3x3 (K -> 4K) + LeakyReLU and 1x1 (4K -> K), an inverted bottleneck as the
    paper describes it. No normalisation layer: a per-image norm would remove the logits' absolute
    level, which is what says whether a class is present at all. The output is added to the binary
    logits (a residual) and the last convolution starts at zero, so the adapter starts as the plain
    mapping and learns the correction the paper's Fig. 1(c) motivates.
    """

    def __init__(self, num_classes: int, *, expansion: int = 4) -> None:
        super().__init__()
        hidden = expansion * num_classes
        self.layers = nn.Sequential(nn.Conv2d(num_classes, hidden, 3, padding=1), nn.LeakyReLU(0.01, inplace=True),
                                    nn.Conv2d(hidden, num_classes, 1))
        nn.init.zeros_(self.layers[-1].weight)
        nn.init.zeros_(self.layers[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x)
