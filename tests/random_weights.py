"""Random weights for wiring tests: every parameter drawn at random, so no zero or default
initialisation (SAM zero-initialises position embeddings and relative-position tables; adapters start
at zero) hides a path a test wants to see."""
from __future__ import annotations

import torch
from torch import nn


def randomize_(module: nn.Module, seed: int = 0, scale: float = 0.2) -> nn.Module:
    """Every parameter of ``module`` in place: normalisation scales (1-d ``*weight``) near 1, the rest
    ``scale`` times a standard normal draw; returns ``module``."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.1 * noise if param.ndim == 1 and name.endswith("weight") else scale * noise)
    return module
