"""HSP-SAM's hierarchical feature fusion (Hierarchical Self-Prompting SAM, eq. 6).

With neck_j(embedding_j) the 256-channel map of hierarchy level j (1 shallowest, N deepest)
and Dec_j level j's mask-decoder block fed with the level's A prompts:

    out_N = Dec_N(neck_N(emb_N), A_N)
    out_i = Dec_i(out_{i+1} + neck_i(emb_i) + out_N, A_i),   i = N-1 .. 1

``+ out_N`` is the skip connection (Table 5's ablation drops it). For the fusion, Dec_j returns
its two-way transformer's updated image embedding (B, C, h, w); only level 1's block also has
SAM's mask heads, because the masks come from level 1 alone.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from samunet.modules.decoders import decoder_tokens


class ImageSideDecoderBlock(nn.Module):
    """A mask-decoder block of levels 2..N: SAM's two-way transformer with its IoU and mask output
    tokens (state_dict names as in SAM's ``MaskDecoder``), without the unused mask heads.

    forward: image embedding (B, C, h, w), image_pe (1, C, h, w), sparse prompts (B, N, C),
    dense prompts (B or 1, C, h, w) -> the transformer's updated image embedding (B, C, h, w).
    """

    def __init__(self, *, transformer: nn.Module, num_mask_tokens: int, dim: int) -> None:
        super().__init__()
        self.transformer = transformer
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(num_mask_tokens, dim)

    def copy_from(self, mask_decoder: nn.Module) -> None:
        """Take the transformer and output tokens of a SAM ``MaskDecoder`` with as many mask tokens."""
        parts = ("transformer.", "iou_token.", "mask_tokens.")
        state = {k: v.detach().clone() for k, v in mask_decoder.state_dict().items() if k.startswith(parts)}
        self.load_state_dict(state, strict=True)

    def forward(self, image_embedding: torch.Tensor, image_pe: torch.Tensor, sparse_prompts: torch.Tensor,
                dense_prompts: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = image_embedding.shape
        _, source = self.transformer(image_embedding + dense_prompts, image_pe.expand(batch, -1, -1, -1),
                                     decoder_tokens(self, sparse_prompts))
        return source.transpose(1, 2).reshape(batch, channels, height, width)


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
