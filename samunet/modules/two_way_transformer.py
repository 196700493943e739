"""SAM's two-way transformer run with explicit extension points, on its own weights.

segment-anything's ``TwoWayTransformer.forward`` has no place for anything a method adds. This
module runs the same submodules (state_dict names untouched) in the same order, and lets a
network pass, per call:

- ``adapters``: one :class:`TwoWayLayerAdapters` per two-way block (Self-Prompt-SAM's depth
  adapters in the decoder), instead of forward hooks on segment-anything's modules;
- ``token_masks`` with a ``mask_mode``: the token-to-image attention guided by a mask
  (H-SAM's learnable mask cross-attention and its binary ablation,
  :mod:`samunet.modules.mask_attention`).

:func:`two_way_block` runs one block, for decoders that use only the blocks (HSP-SAM's image-side
decoder blocks).

With none of them it computes exactly what ``TwoWayTransformer.forward`` computes (tested).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
from torch import nn

from samunet.modules.mask_attention import token_to_image_message


class TwoWayLayerAdapters(NamedTuple):
    """Trainable modules inserted into one ``TwoWayAttentionBlock``.

    ``after_image_attention`` maps the image-to-token attention output (N, h*w, C) before it is
    added to the image tokens (serial, the adapter carries its own skip); ``parallel_mlp`` maps
    the token MLP's input (N, T, C) to a term added to the MLP's output.
    """

    after_image_attention: Callable[[torch.Tensor], torch.Tensor] | None = None
    parallel_mlp: Callable[[torch.Tensor], torch.Tensor] | None = None


def grid_to_tokens(grid: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A (B, C, h, w) grid -> its (B, h*w, C) tokens (in ``dtype``, default the grid's), laid out with the
    channels innermost in memory.

    A channels-last grid of that dtype is only viewed. Any other is copied once, and a grid broadcast over
    the batch (stride 0, as the positional encoding ``image_pe.expand(B, ...)``) once for all images.
    Tokens taken as a transposed view of a contiguous grid stride over h*w elements per channel, and every
    element-wise operation with them (``keys + key_pe``, five times per decoder call) reads them across
    cache lines: an addition of 8 x 4096 x 256 tokens to such a view took 17 ms against 8 ms to tokens of
    the same layout (2-core AMD EPYC, 2026-12-02), so one copy pays for itself.
    """
    dtype = grid.dtype if dtype is None else dtype
    tokens = grid.flatten(2).transpose(1, 2)
    if tokens.stride(-1) == 1 and dtype == grid.dtype:
        return tokens
    if grid.shape[0] > 1 and grid.stride(0) == 0:
        return grid_to_tokens(grid[:1], dtype).expand(grid.shape[0], -1, -1)
    return tokens.contiguous().to(dtype)


def positional_tokens(image_pe: torch.Tensor, keys_dtype: torch.dtype) -> torch.Tensor:
    """:func:`grid_to_tokens` of the positional encoding (B, C, h, w), in the dtype that ``keys + key_pe``
    promotes to (the same sums). Under autocast the encoding comes out of a matmul in bfloat16 while the
    image tokens leave a LayerNorm in float32, and torch's CPU addition of two dtypes takes a slow
    casting path: 57 ms per addition of 8 x 4096 x 256 tokens against a few ms (2-core AMD EPYC,
    2026-12-02)."""
    return grid_to_tokens(image_pe, torch.promote_types(image_pe.dtype, keys_dtype))


def image_tokens_to_grid(image_tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The transformer's image tokens (B, h*w, C) -> a contiguous (B, C, h, w) grid.

    Reshaping the transposed tokens without a copy gives a channels-last-strided grid. The convolutions
    of SAM's pixel decoder keep that layout, while the gradient that comes back from the mask product
    is contiguous, and torch's CPU GELU backward with operands in two layouts is several times slower
    than with one (measured on 2026-12-01: LiteMedSAM's decoder, 6 images at 256 px, fp32 forward +
    backward 0.91 -> 0.80 s; 18 rows in bf16 1.92 -> 1.74 s). One copy of the (B, C, h, w) grid here
    keeps every later layer in the contiguous layout.
    """
    batch, _, channels = image_tokens.shape
    return image_tokens.transpose(1, 2).reshape(batch, channels, height, width).contiguous()


def two_way_block(block: nn.Module, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor,
                  key_pe: torch.Tensor, *, adapters: TwoWayLayerAdapters | None = None,
                  token_masks: torch.Tensor | None = None,
                  mask_mode: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """One segment-anything ``TwoWayAttentionBlock``: queries (N, T, C), keys (N, h*w, C) -> both updated."""
    adapters = adapters or TwoWayLayerAdapters()
    if block.skip_first_layer_pe:
        queries = block.self_attn(q=queries, k=queries, v=queries)
    else:
        q = queries + query_pe
        queries = queries + block.self_attn(q=q, k=q, v=queries)
    queries = block.norm1(queries)
    message = token_to_image_message(block.cross_attn_token_to_image, queries + query_pe, keys + key_pe, keys,
                                     token_masks, mask_mode)
    queries = block.norm2(queries + message)
    mlp_out = block.mlp(queries)
    if adapters.parallel_mlp is not None:
        mlp_out = mlp_out + adapters.parallel_mlp(queries)
    queries = block.norm3(queries + mlp_out)
    q, k = queries + query_pe, keys + key_pe
    image_update = block.cross_attn_image_to_token(q=k, k=q, v=queries)
    if adapters.after_image_attention is not None:
        image_update = adapters.after_image_attention(image_update)
    return queries, block.norm4(keys + image_update)


def run_two_way_transformer(transformer: nn.Module, image_embedding: torch.Tensor, image_pe: torch.Tensor,
                            tokens: torch.Tensor, *, adapters: Sequence[TwoWayLayerAdapters] | None = None,
                            token_masks: torch.Tensor | None = None,
                            mask_mode: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """Run SAM's ``TwoWayTransformer`` ``transformer`` with the extension points of the module docstring.

    image_embedding, image_pe: (N, C, h, w); tokens: (N, T, C); token_masks: (N, T, h*w) in [0, 1] or
    None; adapters: one per block or None. Returns (tokens (N, T, C), image tokens (N, h*w, C)) as
    ``TwoWayTransformer.forward`` does.
    """
    layers = transformer.layers
    if adapters is not None and len(adapters) != len(layers):
        raise ValueError(f"expected one adapter set per two-way block ({len(layers)}), got {len(adapters)}")
    keys, key_pe = grid_to_tokens(image_embedding), positional_tokens(image_pe, image_embedding.dtype)
    queries = tokens
    for index, block in enumerate(layers):
        queries, keys = two_way_block(block, queries, keys, tokens, key_pe,
                                      adapters=adapters[index] if adapters is not None else None,
                                      token_masks=token_masks, mask_mode=mask_mode)
    message = token_to_image_message(transformer.final_attn_token_to_image, queries + tokens, keys + key_pe, keys,
                                     token_masks, mask_mode)
    return transformer.norm_final_attn(queries + message), keys
