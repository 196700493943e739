"""Attention with MViTv2's decomposed relative position, without an (N, N) bias tensor.

SAM's ViT blocks add to each attention logit ``q_i . k_j / sqrt(d)`` the decomposed relative
position term ``q_i . R_h[h_i - h_j] + q_i . R_w[w_i - w_j]`` (MViTv2, Li et al., CVPR 2022,
eq. 4; segment-anything's ``add_decomposed_rel_pos``), with the unscaled query. Written out as an
additive mask that bias is (B, heads, N, N): 805 MB for one 1024 px ViT-B image, and producing it
costs more than the attention itself (measured: ``benchmarks/bench_vit_encoder.py``); a float mask
also keeps CUDA's flash kernel off. Both terms are separable, so two exact rewrites avoid it:

* ``"augmented"``: the logit is the dot product of the augmented query
  ``[q_i / sqrt(d), bh_i, bw_i]`` with the augmented key ``[k_j, onehot(h_j), onehot(w_j)]``, where
  ``bh_i = (q_i . R_h[h_i - r])_r`` over the H key rows and ``bw_i`` likewise over the W columns.
  ``scaled_dot_product_attention`` then needs no mask and runs its fused kernels (flash needs one
  head width for q, k and v, so v is zero-padded and the padding cropped from the output).
* ``"chunked"``: the queries are taken in chunks; each chunk's logits (B, heads, C, H, W) get
  ``bh`` and ``bw`` broadcast-added in place, then softmax and the product with v. Memory per chunk
  is O(C N) and stays in cache. On CPU this is the faster one (the augmented form triples the
  widths of the fused kernel's products; the bias mask is memory-bound).

:func:`attention_with_rel_pos` picks ``"chunked"`` on CPU and ``"augmented"`` elsewhere. Tokens
after the N grid tokens (HSP-SAM's prompt tokens) take part without a position term, as in
:class:`samunet.backbones.sam_vit.Attention`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

STRATEGIES = ("chunked", "augmented")

# Logit elements one chunk of the "chunked" strategy holds (4 Mi: 16 MiB in float32). Measured on
# the 2-core AVX-512 CPU of this project (benchmarks/bench_vit_encoder.py): chunks of 2-4 Mi
# elements run 1024 px global attention in 0.28-0.33 s against 0.75-0.80 s with 64 Mi.
CHUNK_ELEMENTS = 1 << 22


def relative_table(table: torch.Tensor, size: int) -> torch.Tensor:
    """Rows of ``table`` (2*size-1, head_dim) for every (query, key) offset: (size, size, head_dim)."""
    if table.shape[0] != 2 * size - 1:
        raise ValueError(f"relative position table has {table.shape[0]} rows, expected "
                         f"{2 * size - 1} for {size} positions; resize it with adapt_state_dict")
    positions = torch.arange(size, device=table.device)
    return table[positions[:, None] - positions[None, :] + (size - 1)]


def relative_position_terms(q_grid: torch.Tensor, rel_pos_h: torch.Tensor,
                            rel_pos_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two factors of the decomposed relative position bias, from the unscaled query.

    q_grid: (B, heads, H, W, head_dim); rel_pos_h: (2H-1, head_dim); rel_pos_w: (2W-1, head_dim).
    Returns bias_h (B, heads, H*W, H) and bias_w (B, heads, H*W, W): the bias between query i and
    key j = (r, c) is ``bias_h[..., i, r] + bias_w[..., i, c]``.
    Raises ValueError when a table's length does not fit the grid.
    """
    batch, heads, height, width, _ = q_grid.shape
    bias_h = torch.einsum("bnhwc,hkc->bnhwk", q_grid, relative_table(rel_pos_h, height).to(q_grid.dtype))
    bias_w = torch.einsum("bnhwc,wkc->bnhwk", q_grid, relative_table(rel_pos_w, width).to(q_grid.dtype))
    return (bias_h.reshape(batch, heads, height * width, height),
            bias_w.reshape(batch, heads, height * width, width))


def attention_with_rel_pos(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_pos_h: torch.Tensor,
                           rel_pos_w: torch.Tensor, grid: tuple[int, int], *,
                           strategy: str | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim) + decomposed relative position bias) v, without the bias tensor.

    q, k, v: (B, heads, N + c, head_dim): the N = H * W tokens of ``grid`` (H, W), row-major, then
    c >= 0 extra tokens (prompts) that get no position term. Tables as in
    :func:`relative_position_terms`. ``strategy``: one of :data:`STRATEGIES`, default "chunked" on
    CPU and "augmented" on other devices. Returns (B, heads, N + c, head_dim).
    Raises ValueError for an unknown strategy or tables that do not fit the grid.
    """
    height, width = grid
    count = height * width
    batch, heads, tokens, head_dim = q.shape
    if strategy is None:
        strategy = "chunked" if q.device.type == "cpu" else "augmented"
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    q_grid = q[:, :, :count].reshape(batch, heads, height, width, head_dim)
    bias_h, bias_w = relative_position_terms(q_grid, rel_pos_h, rel_pos_w)
    if tokens > count:  # extra tokens' queries get no position term
        bias_h = F.pad(bias_h, (0, 0, 0, tokens - count))
        bias_w = F.pad(bias_w, (0, 0, 0, tokens - count))
    if strategy == "augmented":
        return _augmented_attention(q, k, v, bias_h, bias_w, count)
    return _chunked_attention(q, k, v, bias_h, bias_w, grid)


def _augmented_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_h: torch.Tensor,
                         bias_w: torch.Tensor, count: int) -> torch.Tensor:
    """Fused SDPA on [q/sqrt(d), bias_h, bias_w] . [k, onehot(row), onehot(column)] (module docstring)."""
    batch, heads, tokens, head_dim = q.shape
    height, width = bias_h.shape[-1], bias_w.shape[-1]
    rows = torch.arange(count, device=q.device) // width
    columns = torch.arange(count, device=q.device) % width
    key_positions = torch.cat([F.one_hot(rows, height), F.one_hot(columns, width)], dim=-1).to(k.dtype)
    key_positions = F.pad(key_positions, (0, 0, 0, tokens - count))  # extra tokens: no position
    augmented_q = torch.cat([q * head_dim ** -0.5, bias_h, bias_w], dim=-1)
    augmented_k = torch.cat([k, key_positions.expand(batch, heads, tokens, height + width)], dim=-1)
    width_all = -(-augmented_q.shape[-1] // 8) * 8  # fused kernels want head widths in multiples of 8
    augmented_q = F.pad(augmented_q, (0, width_all - augmented_q.shape[-1]))
    augmented_k = F.pad(augmented_k, (0, width_all - augmented_k.shape[-1]))
    padded_v = F.pad(v, (0, width_all - head_dim))
    out = F.scaled_dot_product_attention(augmented_q, augmented_k, padded_v, scale=1.0)
    return out[..., :head_dim]


def _chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_h: torch.Tensor,
                       bias_w: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Softmax attention over query chunks with the separable bias added in place (module docstring).

    Without autograd every chunk reuses one logits buffer and one output buffer: allocating them
    afresh for each chunk made glibc return and re-fault the memory, and the products and the
    softmax ran 3-5x slower inside the encoder than alone (measured at 1024 px)."""
    batch, heads, tokens, head_dim = q.shape
    count = grid[0] * grid[1]
    # q, k, v are strided views of the fused qkv: contiguous copies (N x head_dim each) for BLAS
    q, v = q.contiguous(), v.contiguous()
    keys_t = (k * head_dim ** -0.5).contiguous().transpose(-2, -1)
    chunk = max(1, CHUNK_ELEMENTS // (batch * heads * tokens))
    reuse = not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, bias_h, bias_w)))
    if reuse:
        logits_buffer = q.new_empty(batch * heads * min(chunk, tokens) * tokens)
        out_buffer = q.new_empty(batch * heads * min(chunk, tokens) * head_dim)
        result = q.new_empty(batch, heads, tokens, head_dim)
    outputs = []
    for start in range(0, tokens, chunk):
        stop = min(start + chunk, tokens)
        if reuse:
            size = (batch, heads, stop - start)  # contiguous views of the buffers' first elements
            logits = torch.matmul(q[:, :, start:stop], keys_t,
                                  out=logits_buffer[:batch * heads * (stop - start) * tokens].view(*size, tokens))
        else:
            logits = torch.matmul(q[:, :, start:stop], keys_t)  # (B, heads, C, N + c)
        grid_logits = logits[..., :count].unflatten(-1, grid)  # a view: the bias is added in place
        grid_logits.add_(bias_h[:, :, start:stop, :, None]).add_(bias_w[:, :, start:stop, None, :])
        if reuse:
            torch.softmax(logits, dim=-1, out=logits)
            result[:, :, start:stop] = torch.matmul(
                logits, v, out=out_buffer[:batch * heads * (stop - start) * head_dim].view(*size, head_dim))
        else:
            outputs.append(torch.matmul(torch.softmax(logits, dim=-1), v))
    if reuse:
        return result
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
