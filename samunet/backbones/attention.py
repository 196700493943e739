"""Scaled dot-product attention with the faster kernel for the input's device and precision.

``torch.nn.functional.scaled_dot_product_attention`` is the right call on CUDA (flash and
memory-efficient kernels) and in float32 on the CPU. In bfloat16 or float16 on the CPU its fused
kernel is slower than the three explicit operations (logits, softmax, product with v), forward
and above all backward, at the short key lengths of windowed attention and of 256 px global
attention. Measured on the 2-core AMD EPYC (native bfloat16) of docs/evidence.md (torch 2.13, bfloat16, ms,
forward / forward + backward; ``benchmarks/bench_attention_kernels.py``):

    attention at 256 px, batch of 6 images   fused SDPA       explicit
    TinyViT stage 2, (2166, 4, 49, 32)       49.3 / 550.4     35.8 / 101.8
    TinyViT stage 3, (150, 5, 196, 32)       33.6 / 152.9     19.6 / 71.7
    TinyViT stage 4, (600, 10, 49, 32)       33.3 / 373.2     20.2 / 55.7
    ViT-B window, (24, 12, 196, 64)          21.2 / 81.6      9.3 / 29.6
    ViT-B global, (6, 12, 256, 64)           8.1 / 28.1       3.3 / 10.3

torch's own math backend (``SDPBackend.MATH``) was slower than the explicit form at every one of these shapes
(a separate timing on the same machine). At 4096 keys (ViT-B's global attention at 1024 px) fused and explicit
were within 20% of each other, the fused one ahead, and the explicit form holds the (tokens x tokens) logits,
so above :data:`EXPLICIT_MAX_KEYS` keys the fused kernel is kept.

In float32 the fused kernel stays: with the explicit form, LiteMedSAM's TinyViT at 256 px (batch 4, a rank-4 LoRA
on every qkv, forward + backward, released weights) took 1.67 s per image against 1.69 s with SDPA (median of 4
interleaved runs, 2026-12-02, a 2-core AMD EPYC with an fp32 matmul peak of 131 GFLOP/s), a difference within the
runs' spread (5.8-8.0 s per step), and the fused kernel holds no logits.

The explicit form is the computation of segment-anything's and TinyViT's reference attention
(``(q * scale) @ k^T``, an additive bias, softmax, ``@ v``); under autocast its matrix products run
in the autocast dtype, as they do in those references.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Longest key sequence for which the explicit form is used on the CPU in reduced precision (see above).
EXPLICIT_MAX_KEYS = 1024
REDUCED_PRECISION = (torch.bfloat16, torch.float16)


def uses_explicit_attention(query: torch.Tensor, key: torch.Tensor) -> bool:
    """True where :func:`dot_product_attention` computes the three operations itself: a CPU tensor
    in bfloat16 or float16 with at most :data:`EXPLICIT_MAX_KEYS` keys."""
    return (query.device.type == "cpu" and query.dtype in REDUCED_PRECISION
            and key.shape[-2] <= EXPLICIT_MAX_KEYS)


def dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attn_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """``softmax(query @ key^T * scale + attn_mask) @ value``, as
    ``torch.nn.functional.scaled_dot_product_attention`` (no dropout, no causal mask).

    query (..., L, E), key (..., S, E), value (..., S, Ev), attn_mask a float mask broadcastable to
    (..., L, S) or None; scale defaults to E ** -0.5. Returns (..., L, Ev) in the inputs' dtype.
    """
    if not uses_explicit_attention(query, key):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scale)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    logits = (query * scale) @ key.transpose(-2, -1)
    if attn_mask is not None:
        logits = logits + attn_mask
    return logits.softmax(dim=-1).to(value.dtype) @ value
