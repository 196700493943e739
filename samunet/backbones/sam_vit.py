"""SAM's ViT image encoder (ViT-B/L/H), with multi-depth features and input-size adaptation.

Same architecture and state-dict layout as segment-anything's ``ImageEncoderViT`` (so official
checkpoints load with ``strict=True``): a 16x16 patch embedding, an absolute position embedding
on the (S/16, S/16) token grid, transformer blocks that attend within 14x14 windows except for a
few global-attention blocks, decomposed relative position biases (MViTv2), and a
1x1 conv -> LayerNorm2d -> 3x3 conv -> LayerNorm2d neck. The relative position bias is never
built as an (N, N) mask (:mod:`samunet.backbones.rel_pos_attention`), and windowed blocks project
only the real tokens, not the padding (:meth:`Block._windowed_attention`); both are equal to
segment-anything's encoder to float rounding.

Optional prompt tokens (HSP-SAM's Q prompts): prompt level j is the run of blocks that ends with
the j-th global-attention block. Its c_j tokens join every attention call of those blocks as
extra queries, keys and values: in a windowed block each window attends over its own tokens plus
the prompts, and the prompts' updates from all windows of an image are averaged; in a global
block they join the whole token grid. The relative position bias covers image tokens only (0 for
every pair with a prompt token). The prompts then pass the block's MLP like any token.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from samunet.backbones.attention import dot_product_attention
from samunet.backbones.base import (AttentionAdapters, BlockAdapters, EncoderAdapters, EncoderOutput, QKVProjection,
                                    SAMImageEncoder, batch_prompt_tokens, check_block_indices)
from samunet.backbones.neck import sam_neck
from samunet.backbones.rel_pos_attention import attention_with_rel_pos

logger = logging.getLogger(__name__)

_NORM_EPS = 1e-6  # every released SAM encoder uses LayerNorm(eps=1e-6)


@dataclass(frozen=True)
class ViTConfig:
    """Architecture numbers of one ViT variant."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int = 14
    out_chans: int = 256


VIT_CONFIGS: dict[str, ViTConfig] = {
    "vit_b": ViTConfig(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": ViTConfig(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": ViTConfig(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
    # tiny random encoder for tests; no checkpoint exists for it
    "vit_test": ViTConfig(embed_dim=32, depth=4, num_heads=2, global_attn_indexes=(1, 3),
                          window_size=4, out_chans=32),
}


class PatchEmbed(nn.Module):
    """(B, in_chans, S, S) -> (B, S/p, S/p, embed_dim) tokens by a stride-p convolution."""

    def __init__(self, *, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class MLP(nn.Module):
    """Two linear layers with a GELU between them; (..., dim) -> (..., dim)."""

    def __init__(self, *, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.lin2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class Attention(nn.Module):
    """Multi-head self-attention over a (B, H, W, dim) token grid with decomposed rel-pos bias.

    ``qkv`` outputs [q | k | v], each ``dim`` wide with the heads side by side. ``rel_pos_h`` /
    ``rel_pos_w`` have 2 * grid_size - 1 rows, where grid_size is the side the layer attends over.
    The bias is never built as an (N, N) tensor (:mod:`samunet.backbones.rel_pos_attention`).
    """

    def __init__(self, *, dim: int, num_heads: int, qkv_bias: bool, use_rel_pos: bool,
                 grid_size: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * grid_size - 1, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * grid_size - 1, self.head_dim))
        self.adapters = AttentionAdapters()

    def project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> the fused (..., 3 * dim) q, k, v, through the layer's ``qkv`` adapter slot."""
        return self.qkv(x) if self.adapters.qkv is None else self.adapters.qkv(self.qkv, x)

    def attend(self, qkv: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """qkv: (B, H*W + c, 3 * dim) from :meth:`project_qkv`, the grid's tokens row-major, then c
        tokens without a position (prompts) -> the heads' outputs (B, H*W + c, dim), before ``proj``.

        SDPA's and the chunked path's scale is head_dim ** -0.5, the same as SAM's.
        """
        batch, tokens, _ = qkv.shape
        q, k, v = qkv.reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.use_rel_pos:
            out = attention_with_rel_pos(q, k, v, self.rel_pos_h, self.rel_pos_w, grid)
        else:
            out = dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, dim) -> (B, H, W, dim)."""
        batch, height, width, dim = x.shape
        qkv = self.project_qkv(x.reshape(batch, height * width, dim))
        return self.proj(self.attend(qkv, (height, width))).reshape(batch, height, width, dim)

    def forward_with_prompts(self, x: torch.Tensor,
                             prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, H, W, dim) and prompts (B, c, dim) attend together -> same shapes.

        The relative position bias applies between image tokens; pairs with a prompt get 0.
        """
        batch, height, width, dim = x.shape
        count = height * width
        qkv = self.project_qkv(torch.cat([x.reshape(batch, count, dim), prompts], dim=1))
        out = self.proj(self.attend(qkv, (height, width)))
        return out[:, :count].reshape(batch, height, width, dim), out[:, count:]


def window_partition(x: torch.Tensor, window: int,
                     fill: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B * nW, window, window, C), padding H and W up to multiples of ``window``
    with ``fill`` (C,) (default zeros); also returns the padded (Hp, Wp)."""
    batch, height, width, channels = x.shape
    pad_h, pad_w = -height % window, -width % window
    if fill is None:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    else:
        if pad_w:
            x = torch.cat([x, fill.expand(batch, height, pad_w, channels)], dim=2)
        if pad_h:
            x = torch.cat([x, fill.expand(batch, pad_h, width + pad_w, channels)], dim=1)
    padded_h, padded_w = height + pad_h, width + pad_w
    x = x.reshape(batch, padded_h // window, window, padded_w // window, window, channels)
    windows = x.transpose(2, 3).reshape(-1, window, window, channels)
    return windows, (padded_h, padded_w)


def window_unpartition(windows: torch.Tensor, window: int, padded_hw: tuple[int, int],
                       hw: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * nW, window, window, C) -> (B, H, W, C)."""
    padded_h, padded_w = padded_hw
    height, width = hw
    rows, cols = padded_h // window, padded_w // window
    x = windows.reshape(-1, rows, cols, window, window, windows.shape[-1])
    x = x.transpose(2, 3).reshape(-1, padded_h, padded_w, windows.shape[-1])
    return x[:, :height, :width, :]


class Block(nn.Module):
    """Pre-norm transformer block; attends within ``window_size`` windows, or globally when 0.

    (B, H, W, dim) -> (B, H, W, dim).
    """

    def __init__(self, *, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool,
                 use_rel_pos: bool, window_size: int, grid_size: int) -> None:
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=_NORM_EPS)
        self.attn = Attention(dim=dim, num_heads=num_heads, qkv_bias=qkv_bias,
                              use_rel_pos=use_rel_pos,
                              grid_size=window_size if window_size > 0 else grid_size)
        self.norm2 = nn.LayerNorm(dim, eps=_NORM_EPS)
        self.mlp = MLP(dim=dim, hidden_dim=int(dim * mlp_ratio))
        self.adapters = BlockAdapters()

    @property
    def is_global(self) -> bool:
        return self.window_size == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        y = self.attn(y) if self.is_global else self._windowed_attention(y)[0]
        return self._attention_then_mlp(x, y)

    def _windowed_attention(self, y: torch.Tensor,
                            prompts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention within windows of the normed tokens y (B, H, W, dim) -> (B, H, W, dim); with
        prompts (B, c, dim), every window attends with its own copy of them and their outputs are
        averaged over the windows -> (B, c, dim).

        SAM zero-pads the normed tokens to whole windows before the attention. Here only the real
        tokens are projected and the padding gets the projection of a zero token, which is equal
        (the ``qkv`` adapter slot is token-wise) and saves the padded tokens' projections: a third
        of them at 256 px. The output projection likewise runs on the real tokens only.
        """
        batch, height, width, dim = y.shape
        window = self.window_size
        qkv = self.attn.project_qkv(y)
        zero_token = self.attn.project_qkv(y.new_zeros(1, dim))[0]
        windows, padded_hw = window_partition(qkv, window, fill=zero_token)
        windows = windows.reshape(windows.shape[0], window * window, 3 * dim)
        per_image = windows.shape[0] // batch
        if prompts is not None:
            prompt_qkv = self.attn.project_qkv(prompts).repeat_interleave(per_image, dim=0)
            windows = torch.cat([windows, prompt_qkv], dim=1)
        out = self.attn.attend(windows, (window, window))
        grid_out = out[:, :window * window].reshape(-1, window, window, dim)
        attended = self.attn.proj(window_unpartition(grid_out, window, padded_hw, (height, width)))
        if prompts is None:
            return attended, None
        prompt_out = out[:, window * window:].reshape(batch, per_image, prompts.shape[1], dim).mean(dim=1)
        return attended, self.attn.proj(prompt_out)

    def _attention_then_mlp(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Residual add of the (un-windowed) attention output, then the MLP, with the block's adapters."""
        if self.adapters.after_attention is not None:
            attended = self.adapters.after_attention(attended)
        x = x + attended
        hidden = self.norm2(x)
        out = self.mlp(hidden)
        if self.adapters.parallel_mlp is not None:
            out = out + self.adapters.parallel_mlp(hidden)
        return x + out

    def forward_with_prompts(self, x: torch.Tensor,
                             prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, H, W, dim), prompts: (B, c, dim) -> both updated. In a windowed block every
        window attends with its own copy of the prompts; the copies' updates are averaged."""
        y, p = self.norm1(x), self.norm1(prompts)
        y, p = self.attn.forward_with_prompts(y, p) if self.is_global else self._windowed_attention(y, p)
        prompts = prompts + p
        return self._attention_then_mlp(x, y), prompts + self.mlp(self.norm2(prompts))


class SAMViTEncoder(SAMImageEncoder):
    """SAM's ViT image encoder; state-dict compatible with segment-anything's ``ImageEncoderViT``.

    forward: (B, in_chans, S, S) -> EncoderOutput(embedding (B, out_chans, S/16, S/16),
    features [(B, embed_dim, S/16, S/16) after each global-attention block, in block order]).
    Prompt level j is the run of blocks ending with the j-th global block (module docstring).
    """

    def __init__(self, *, img_size: int, patch_size: int = 16, in_chans: int = 3, embed_dim: int,
                 depth: int, num_heads: int, mlp_ratio: float = 4.0, out_chans: int = 256,
                 window_size: int = 14, global_attn_indexes: Sequence[int],
                 qkv_bias: bool = True, use_rel_pos: bool = True) -> None:
        super().__init__()
        if img_size <= 0 or img_size % patch_size:
            raise ValueError(f"img_size must be a positive multiple of the patch size {patch_size}, "
                             f"got {img_size}")
        if window_size < 0:
            raise ValueError(f"window_size must be >= 0 (0: every block global), got {window_size}")
        if window_size == 0:
            global_attn_indexes = range(depth)
        self.global_attn_indexes = tuple(sorted(set(global_attn_indexes)))
        if any(not 0 <= i < depth for i in self.global_attn_indexes):
            raise ValueError(f"global_attn_indexes {tuple(global_attn_indexes)} must lie in "
                             f"[0, {depth})")
        self.img_size = img_size
        self.embedding_stride = patch_size
        self.out_chans = out_chans
        self.feature_channels = (embed_dim,) * len(self.global_attn_indexes)
        self.feature_strides = (patch_size,) * len(self.global_attn_indexes)
        self.prompt_level_features = tuple(range(len(self.global_attn_indexes)))
        self.token_channel_axis = -1
        self.adapters = EncoderAdapters()
        grid_size = img_size // patch_size

        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid_size, grid_size, embed_dim))
        self.blocks = nn.ModuleList(
            Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                  use_rel_pos=use_rel_pos, grid_size=grid_size,
                  window_size=0 if i in self.global_attn_indexes else window_size)
            for i in range(depth))
        self.neck = sam_neck(embed_dim, out_chans)

    def forward(self, x: torch.Tensor, prompt_tokens: Sequence[torch.Tensor | None] | None = None,
                intermediates: Sequence[int] = ()) -> EncoderOutput:
        """x: (B, in_chans, S, S); prompt_tokens: None, or per prompt level (c_j, embed_dim) or
        (B, c_j, embed_dim) tokens that take part in that level's attention (None: none there);
        intermediates: indices of blocks whose outputs (B, embed_dim, S/16, S/16) are returned too."""
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected input (B, C, {self.img_size}, {self.img_size}), "
                             f"got {tuple(x.shape)}")
        check_block_indices(intermediates, len(self.blocks))
        tokens = self.patch_embed(x)
        if self.adapters.after_patch_embed is not None:
            tokens = self.adapters.after_patch_embed(tokens)
        tokens = tokens + self.pos_embed
        levels = (None if prompt_tokens is None
                  else batch_prompt_tokens(prompt_tokens, x.shape[0], self.prompt_level_dims))
        features, taps = [], {}
        for index, block in enumerate(self.blocks):
            level = len(features)  # blocks after the last global block belong to no level
            if levels is not None and level < len(levels) and levels[level] is not None:
                tokens, levels[level] = block.forward_with_prompts(tokens, levels[level])
            else:
                tokens = block(tokens)
            if block.is_global:
                features.append(tokens.permute(0, 3, 1, 2))
            if index in intermediates:
                taps[index] = tokens.permute(0, 3, 1, 2)
        return EncoderOutput(embedding=self.neck(tokens.permute(0, 3, 1, 2)), features=features, prompts=levels,
                             intermediates=[taps[i] for i in intermediates])

    def transformer_blocks(self) -> list[tuple[nn.Module, int]]:
        return [(block, block.attn.num_heads * block.attn.head_dim) for block in self.blocks]

    def qkv_projections(self) -> list[QKVProjection]:
        projections = []
        for block in self.blocks:
            dim = block.attn.num_heads * block.attn.head_dim
            projections.append(QKVProjection(owner=block.attn,
                                             q_channels=torch.arange(0, dim),
                                             v_channels=torch.arange(2 * dim, 3 * dim)))
        return projections

    def adapt_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Resize ``pos_embed`` and the global blocks' relative position tables to this encoder's
        token grid, so a checkpoint pretrained at another input size (SAM: 1024) loads here.

        Running 1024-pretrained SAM at 256 / 512 this way is the idea of SAMed (Zhang & Liu 2023),
        also used by H-SAM and MA-SAM. Windowed blocks keep their (2*window-1)-row tables, and
        tensors that already have the right shape come back unchanged.
        """
        adapted = dict(state_dict)
        grid_size = self.embedding_size
        pos_embed = adapted.get("pos_embed")
        if pos_embed is not None and pos_embed.shape[1:3] != (grid_size, grid_size):
            logger.info("resizing pos_embed from %s to %dx%d tokens",
                        tuple(pos_embed.shape[1:3]), grid_size, grid_size)
            # Bilinear, not bicubic: it is what SAMed and its successors used (so their fine-tuned
            # checkpoints see the same embedding) and it never overshoots the pretrained values.
            resized = F.interpolate(pos_embed.permute(0, 3, 1, 2).float(),
                                    size=(grid_size, grid_size), mode="bilinear",
                                    align_corners=False)
            adapted["pos_embed"] = resized.permute(0, 2, 3, 1).to(pos_embed.dtype).contiguous()
        rows = 2 * grid_size - 1
        for index, block in enumerate(self.blocks):
            if not (block.is_global and block.attn.use_rel_pos):
                continue
            for axis in ("h", "w"):
                key = f"blocks.{index}.attn.rel_pos_{axis}"
                table = adapted.get(key)
                if table is not None and table.shape[0] != rows:
                    adapted[key] = _resize_rel_pos(table, rows)
        return adapted


def _resize_rel_pos(table: torch.Tensor, rows: int) -> torch.Tensor:
    """(L, head_dim) -> (rows, head_dim) by linear interpolation along L; the same resampling
    segment-anything's ``get_rel_pos`` applies on the fly when a table's length does not fit."""
    resized = F.interpolate(table.t()[None].float(), size=rows, mode="linear", align_corners=False)
    return resized[0].t().to(table.dtype).contiguous()


def build_vit_encoder(variant: str, img_size: int) -> SAMViTEncoder:
    """SAM's image encoder ``variant`` (a key of :data:`VIT_CONFIGS`) for (S, S) = img_size inputs."""
    try:
        config = VIT_CONFIGS[variant]
    except KeyError:
        raise ValueError(f"unknown ViT variant {variant!r}; known: {', '.join(VIT_CONFIGS)}") from None
    return SAMViTEncoder(img_size=img_size, embed_dim=config.embed_dim, depth=config.depth,
                         num_heads=config.num_heads, global_attn_indexes=config.global_attn_indexes,
                         window_size=config.window_size, out_chans=config.out_chans)
