"""Mask-guided token-to-image cross-attention in SAM's two-way transformer (H-SAM, Sec. 3.3).

Three modes, the rows of H-SAM's Table 5:

- ``"learnable"`` (H-SAM, Eq. 3): ``X = M (.) softmax(Q K^T) V + X``. M (B, N_tokens, h*w) is a
  probability map in [0, 1], used as it is (no binarisation), so gradients flow into M.
- ``"binary"`` (Mask2Former's masked attention, Eq. 2): ``X = softmax(t(M) + Q K^T) V + X`` with
  t mapping ``M > 0.5`` to 0 and the rest to -inf; M is not differentiated. A query whose mask is
  empty attends everywhere (Mask2Former's rule), which keeps the softmax defined.
- ``"none"``: SAM's plain cross-attention.

SAM's ``Attention`` ends with an output projection ``W_o x + b_o``. In the learnable mode the
whole value path (``V W_o + b_o``) is what M scales: with M = 0 the message is exactly zero and the
queries stay unchanged, with M = 1 it is exactly SAM's cross-attention (the softmax rows sum to 1,
so folding the bias into the values changes nothing there).

:func:`samunet.modules.two_way_transformer.run_two_way_transformer` uses
:func:`token_to_image_message` for every token-to-image attention of SAM's two-way transformer
(both blocks and the final one); the image-to-token attention is left as it is.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MASK_ATTENTION_MODES = ("learnable", "binary", "none")


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    batch, tokens, channels = x.shape
    return x.view(batch, tokens, num_heads, channels // num_heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


def token_to_image_message(attention: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           mask: torch.Tensor | None, mode: str) -> torch.Tensor:
    """The attention message of SAM ``Attention`` ``attention`` from queries to keys, guided by ``mask``.

    q: (B, Nq, C); k, v: (B, Nk, C); mask: (B, Nq, Nk) in [0, 1] (ignored, and may be None, in mode
    "none": SAM's plain attention). Returns (B, Nq, C), to be added to the queries by the caller.
    """
    if mode not in MASK_ATTENTION_MODES:
        raise ValueError(f"mask attention mode must be one of {MASK_ATTENTION_MODES}, got {mode!r}")
    if mode == "none":
        return attention(q=q, k=k, v=v)
    if mask is None:
        raise ValueError(f"mask attention mode {mode!r} needs a mask")
    heads = attention.num_heads
    queries = _split_heads(attention.q_proj(q), heads)
    keys = _split_heads(attention.k_proj(k), heads)
    values = _split_heads(attention.v_proj(v), heads)
    logits = queries @ keys.transpose(-2, -1) / math.sqrt(queries.shape[-1])  # (B, heads, Nq, Nk)
    if mode == "binary":
        keep = mask.detach() > 0.5
        keep = keep | ~keep.any(dim=-1, keepdim=True)
        weights = logits.masked_fill(~keep.unsqueeze(1), float("-inf")).softmax(dim=-1)
        return attention.out_proj(_merge_heads(weights @ values))
    weights = logits.softmax(dim=-1) * mask.unsqueeze(1).to(logits.dtype)
    message = F.linear(_merge_heads(weights @ values), attention.out_proj.weight)
    mass = weights.sum(dim=-1).mean(dim=1).unsqueeze(-1)  # (B, Nq, 1): 1 where M = 1, 0 where M = 0
    return message + mass * attention.out_proj.bias
