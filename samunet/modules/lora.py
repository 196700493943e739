"""LoRA on the query and value projections of frozen attention layers (Hu et al., 2021).

SAMed, H-SAM and HSP-SAM fine-tune SAM's encoder this way: the fused ``qkv`` linear stays
frozen and each of q and v gets a trainable low-rank update ``B A x`` (A: dim -> r, B: r -> dim,
B zero-initialised so the encoder is unchanged at the start).

The update goes into each attention layer's ``qkv`` adapter slot
(:class:`samunet.backbones.base.AttentionAdapters`) instead of wrapping the linear, so the
encoder's state_dict keeps the released checkpoint's tensor names (strict loading keeps
working) and the LoRA tensors live in their own module (``network.lora.*``).

How the update is computed (the same product either way, equal to rounding):

- without autograd (prediction, validation) the linear runs once with the merged weight
  ``W + scale * B A`` (Hu et al.'s "no additional inference latency"), built per call from the
  current parameters (a (3C', C) matrix, negligible next to the tokens' product);
- with autograd, the frozen linear's output gets ``scale * (A x) U^T`` added by one ``addmm``,
  where ``A`` stacks A_q and A_v (2r, C) and ``U`` (3C', 2r) holds B_q at the q rows and B_v at the
  v rows. The merged weight would need the (3C', C) weight gradient, a full product over the
  tokens, which costs more than these rank-2r products at ViT-B's width.

Both replace two ``index_add`` scatters over the last axis of the (tokens, 3C') output: measured
on a 2-core AMD EPYC (avx512_bf16, 2026-12-02) on TinyViT's first attention stage (70,756 tokens
of 128 channels), forward 0.34 s (fp32) / 0.19 s (bf16) before, 0.10 / 0.05 s merged, 0.16 /
0.08 s with ``addmm``; forward + backward 0.65 / 0.40 s before, 0.37 / 0.19 s with ``addmm``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
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

    def forward(self, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """The frozen fused ``linear`` applied to x (..., dim) with the q and v updates: (..., 3*dim')."""
        if not torch.is_grad_enabled():
            return F.linear(x, self.merged_weight(linear.weight), linear.bias)
        qkv = linear(x)
        down = torch.cat([self.q_down.weight, self.v_down.weight])
        update = torch.addmm(qkv.reshape(-1, qkv.shape[-1]), F.linear(x, down).reshape(-1, 2 * self.rank),
                             self.scattered_up(qkv.shape[-1]).T, alpha=self.scale)
        return update.view(qkv.shape)

    def scattered_up(self, out_features: int) -> torch.Tensor:
        """U (out_features, 2r): B_q's rows at the q channels (columns :r), B_v's at the v channels (r:), 0 elsewhere."""
        rank = self.rank
        up = self.q_up.weight.new_zeros(out_features, 2 * rank)
        up = up.index_copy(0, self.q_channels, F.pad(self.q_up.weight, (0, rank)))
        return up.index_copy(0, self.v_channels, F.pad(self.v_up.weight, (rank, 0)))

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (3*dim', dim) + scale * B A at the q and v rows, in the parameters' precision (the
        small products stay out of autocast; the linear that uses the result runs under it)."""
        with torch.autocast(weight.device.type, enabled=False):
            merged = weight.index_add(0, self.q_channels, self.q_up.weight @ self.q_down.weight, alpha=self.scale)
            return merged.index_add(0, self.v_channels, self.v_up.weight @ self.v_down.weight, alpha=self.scale)


def add_qv_lora(projections: list[QKVProjection], *, rank: int, alpha: float | None = None) -> nn.ModuleList:
    """One :class:`QVLoRA` per attention layer; keep the returned list as a submodule."""
    return nn.ModuleList(QVLoRA(p, rank=rank, alpha=alpha) for p in projections)
