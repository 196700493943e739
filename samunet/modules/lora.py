"""LoRA on the query and value projections of frozen attention layers (Hu et al., 2021).

SAMed, H-SAM and HSP-SAM fine-tune SAM's encoder this way: the fused ``qkv`` linear stays
frozen and each of q and v gets a trainable low-rank update ``B A x`` (A: dim -> r, B: r -> dim,
B zero-initialised so the encoder is unchanged at the start).

The update goes into each attention layer's ``qkv`` adapter slot
(:class:`samunet.backbones.base.AttentionAdapters`) instead of wrapping the linear, so the
encoder's state_dict keeps the released checkpoint's tensor names (strict loading keeps
working) and the LoRA tensors live in their own module (``network.lora.*``).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from samunet.backbones.base import QKVProjection, fill_slots


class QVLoRA(nn.Module):
    """Low-rank updates of the q and v output channels of one fused qkv linear.

    Input of the linear: (..., dim); its output (..., 3*dim') gets ``scale * B_q A_q x`` added at
    ``q_channels`` and ``scale * B_v A_v x`` at ``v_channels``.
    """

    def __init__(self, projection: QKVProjection, *, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        linear = projection.owner.qkv
        self.rank = rank
        self.scale = (alpha / rank) if alpha is not None else 1.0
        self.q_down = nn.Linear(linear.in_features, rank, bias=False)
        self.q_up = nn.Linear(rank, len(projection.q_channels), bias=False)
        self.v_down = nn.Linear(linear.in_features, rank, bias=False)
        self.v_up = nn.Linear(rank, len(projection.v_channels), bias=False)
        for down in (self.q_down, self.v_down):
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        for up in (self.q_up, self.v_up):
            nn.init.zeros_(up.weight)
        self.register_buffer("q_channels", projection.q_channels.clone().long(), persistent=False)
        self.register_buffer("v_channels", projection.v_channels.clone().long(), persistent=False)
        fill_slots(projection.owner, qkv=self)

    def forward(self, x: torch.Tensor, qkv: torch.Tensor) -> torch.Tensor:
        """The linear's input x (..., dim) and output qkv (..., 3*dim') -> qkv with the q and v updates added."""
        qkv = qkv.index_add(-1, self.q_channels, self.q_up(self.q_down(x)), alpha=self.scale)
        return qkv.index_add(-1, self.v_channels, self.v_up(self.v_down(x)), alpha=self.scale)


def add_qv_lora(projections: list[QKVProjection], *, rank: int, alpha: float | None = None) -> nn.ModuleList:
    """One :class:`QVLoRA` per attention layer; keep the returned list as a submodule."""
    return nn.ModuleList(QVLoRA(p, rank=rank, alpha=alpha) for p in projections)
