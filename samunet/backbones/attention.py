"""Scaled dot-product attention with the faster kernel for the input's device and precision.

``torch.nn.functional.scaled_dot_product_attention`` is the right call on CUDA (flash and
memory-efficient kernels) and in float32 on the CPU. In bfloat16 or float16 on the CPU its fused
kernel is slower than the three explicit operations (logits, softmax, product with v), forward
and above all backward, at the short key lengths of windowed attention and of 256 px global
attention. Measured on this project's 2-core AVX-512 CPU (torch 2.13, bfloat16, milliseconds,
forward / forward + backward; ``benchmarks/bench_attention_kernels.py``):

    shape (batch, heads, tokens, head dim)   fused SDPA      explicit
    TinyViT stage 2, (150, 4, 49, 32)        3.4 / 36.7      2.2 / 5.8
    TinyViT stage 3, (12, 5, 196, 32)        2.8 / 13.8      1.9 / 4.5
    TinyViT stage 4, (27, 10, 49, 32)        1.4 / 17.3      1.0 / 2.6
    ViT-B window, (24, 12, 196, 96)          30.8 / 115.6    12.2 / 40.9

torch's own math backend (``SDPBackend.MATH``) computes in float32 there and was slower than both.
At 4096 keys (ViT-B's global attention at 1024 px) the two were within 10% of each other and the
explicit form holds the (tokens x tokens) logits, so the fused kernel is kept from
:data:`EXPLICIT_MAX_KEYS` keys on.

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
