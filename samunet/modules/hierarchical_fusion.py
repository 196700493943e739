"""HSP-SAM's hierarchical feature fusion (Hierarchical Self-Prompting SAM, eq. 6).

With neck_j(embedding_j) the 256-channel map of hierarchy level j (1 shallowest, N deepest)
and Dec_j level j's mask-decoder block fed with the level's A prompts:

    out_N = Dec_N(neck_N(emb_N), A_N)
    out_i = Dec_i(out_{i+1} + neck_i(emb_i) + out_N, A_i),   i = N-1 .. 1

``+ out_N`` is the skip connection (Table 5's ablation drops it). For the fusion, Dec_j returns
its two-way blocks' updated image embedding (B, C, h, w); only level 1's block also has SAM's
mask heads, because the masks come from level 1 alone.
"""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from torch import nn

from samunet.modules.decoders import decoder_tokens
from samunet.modules.two_way_transformer import (grid_to_tokens, image_tokens_to_grid, positional_tokens,
                                                     two_way_block)


class ImageSideDecoderBlock(nn.Module):
    """A mask-decoder block of levels 2..N: the two-way attention blocks of SAM's transformer with SAM's
    IoU and mask output tokens (names ``layers``, ``iou_token``, ``mask_tokens``).

    Only the updated image embedding leaves the block, so it holds neither the mask heads nor the
    transformer's final token-to-image attention, which changes the tokens alone: every parameter it
    holds shapes its output.

    forward: image embedding (B, C, h, w), image_pe (1, C, h, w), sparse prompts (B, N, C), dense
    prompts (B or 1, C, h, w) -> the transformer's updated image embedding (B, C, h, w).
    """

    def __init__(self, *, transformer: nn.Module, num_mask_tokens: int, dim: int) -> None:
        super().__init__()
        self.layers = copy.deepcopy(transformer.layers)
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(num_mask_tokens, dim)

    def copy_from(self, mask_decoder: nn.Module) -> None:
        """Take the two-way blocks and output tokens of a SAM ``MaskDecoder`` with as many mask tokens."""
        renamed = {"transformer.layers.": "layers.", "iou_token.": "iou_token.", "mask_tokens.": "mask_tokens."}
        state = {}
        for key, value in mask_decoder.state_dict().items():
            for prefix, own in renamed.items():
                if key.startswith(prefix):
                    state[own + key[len(prefix):]] = value.detach().clone()
        self.load_state_dict(state, strict=True)

    def forward(self, image_embedding: torch.Tensor, image_pe: torch.Tensor, sparse_prompts: torch.Tensor,
                dense_prompts: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = image_embedding.shape
        tokens = decoder_tokens(self, sparse_prompts)
        keys = grid_to_tokens(image_embedding + dense_prompts)
        key_pe = positional_tokens(image_pe.expand(batch, -1, -1, -1), keys.dtype)
        queries = tokens
        for block in self.layers:
            queries, keys = two_way_block(block, queries, keys, tokens, key_pe)
        return image_tokens_to_grid(keys, height, width)


def top_down_fusion(projected: Sequence[torch.Tensor], decode: Callable[[int, torch.Tensor], torch.Tensor], *,
                    skip_connections: bool) -> torch.Tensor:
    """Run eq. 6 from level N down to level 2 and return the input of Dec_1.

    projected: neck_j(emb_j) for the N levels, shallowest first, each (B, C, h, w);
    decode(j, x): Dec_j's image-side output for 0-based level j (called for j = N-1 .. 1).
    Returns ``out_2 + neck_1(emb_1) + out_N`` (without skip connections ``out_2 + neck_1(emb_1)``;
    with one level ``neck_1(emb_1)``). The formula is taken literally: for i = N-1, out_{i+1} is
    out_N, so Dec_{N-1} sees out_N twice when the skip connections are on.
    """
    deepest = len(projected) - 1
    if deepest == 0:
        return projected[0]
    out_deepest = decode(deepest, projected[deepest])

    def decoder_input(level: int, out_above: torch.Tensor) -> torch.Tensor:
        fused = out_above + projected[level]
        return fused + out_deepest if skip_connections else fused

    out = out_deepest
    for level in range(deepest - 1, 0, -1):
        out = decode(level, decoder_input(level, out))
    return decoder_input(0, out)
