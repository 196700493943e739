"""LiteMedSAM's TinyViT image encoder, with per-stage features and any input size.

Same architecture and state-dict layout as the TinyViT that LiteMedSAM ships (so
``lite_medsam.pth``'s ``image_encoder.*`` tensors load with ``strict=True``): a stride-1 patch
embedding of two 1x1 conv+BN with a GELU between them, one convolutional stage of MBConv blocks,
three stages of window-attention blocks (attention with learned per-offset biases, a depthwise
3x3 conv, an MLP), conv patch merging between stages, and SAM's 1x1 conv -> LayerNorm2d -> 3x3
conv -> LayerNorm2d neck. Stage resolutions are S, S/2, S/4, S/4 for an (S, S) input; unlike the
reference (which hard-codes a 256 input) every resolution is derived from the input itself.

Everything runs in channels-last memory: tokens of the attention stages live as (B, H, W, C)
tensors and travel between modules as (B, C, H, W) views of those, so neither the convolutions
nor the returned embedding and features need a copy (they are ``torch.channels_last`` tensors).
BatchNorms in eval mode are folded into their convolutions, GELUs run in place where autograd
does not need their input, and BatchNorms whose parameters are all frozen stay in eval mode in
``train()`` (see :meth:`TinyViTEncoder.train`).

Where autograd needs nothing (inference, and the frozen stages before the first trainable
parameter, e.g. under LoRA) and the BatchNorms are in eval mode, the convolutions run as fused
oneDNN primitives (convolution + bias + GELU, or + residual) and the full-resolution stage
(MBConv blocks and the first patch merging) runs one image and one band of rows at a time.
Large intermediates are avoided throughout: glibc maps every allocation above 32 MiB afresh,
and first-touch page faults were a quarter of the encoder's CPU time at 256 px. So bands of
rows stay below :data:`BAND_BYTES`, MLPs run in chunks of tokens, and a batch runs in groups of
images (:data:`PASS_BYTES`) wherever images cannot influence each other (all BatchNorms in eval
mode, no encoder or block adapters; the ``qkv`` adapter slot acts per token). Windowed
attention pads and reorders the (3x narrower) tokens rather than their qkv, and projects each
window's output before one copy puts it back on the grid. Every path gives the plain path's
outputs and gradients (tests/test_tiny_vit.py).

Optional prompt tokens (HSP-SAM's Q prompts): each attention stage (1, 2, 3) is one prompt
level. Its c_j tokens join every window of every block of the stage as extra queries, keys and
values (the learned offset biases cover image tokens only; pairs with a prompt get 0), the
prompts' updates from all windows of an image are averaged, and the prompts pass the block's
MLP but not its depthwise convolution (they have no place on the grid). Stage 0 is
convolutional and has no prompt level.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from samunet.backbones.attention import dot_product_attention
from samunet.backbones.base import (AttentionAdapters, BlockAdapters, EncoderAdapters, EncoderOutput, QKVProjection,
                                    SAMImageEncoder, batch_prompt_tokens, check_block_indices)
from samunet.backbones.neck import sam_neck


@dataclass(frozen=True)
class TinyViTConfig:
    """Architecture numbers of one TinyViT variant.

    ``embed_dims`` / ``depths`` cover all four stages (stage 0 is convolutional); ``num_heads``
    and ``window_sizes`` the three attention stages. ``merge_strides`` are the strides of the
    patch merging after stages 0, 1 and 2.
    """

    embed_dims: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    num_heads: tuple[int, int, int]
    window_sizes: tuple[int, int, int]
    merge_strides: tuple[int, int, int] = (2, 2, 1)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3
    out_chans: int = 256


TINYVIT_CONFIGS: dict[str, TinyViTConfig] = {
    "litemedsam": TinyViTConfig(embed_dims=(64, 128, 160, 320), depths=(2, 2, 6, 2),
                                num_heads=(4, 5, 10), window_sizes=(7, 14, 7)),
    # tiny random encoder for tests; no checkpoint exists for it
    "tinyvit_test": TinyViTConfig(embed_dims=(16, 32, 40, 64), depths=(1, 1, 1, 1),
                                  num_heads=(2, 2, 4), window_sizes=(7, 7, 7), out_chans=32),
}

SIZE_MULTIPLE = 16


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact GELU; in place when autograd does not need ``x``, which must be a fresh
    intermediate (reusing its buffer saves the page faults of a new large allocation).

    A channels-last (B, C, H, W) tensor is dense but not contiguous, and torch's CPU GELU runs at
    half speed on it: 9.3 ms against 4.3 ms on the same memory viewed flat (256 channels at 256 x
    256, bf16 or fp32, 2-core AMD EPYC, 2026-12-02). In place, it runs on the flat view."""
    if x.requires_grad:
        return F.gelu(x)
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        torch.ops.aten.gelu_(x.permute(0, 2, 3, 1).view(-1))
        return x
    return torch.ops.aten.gelu_(x)


MKLDNN_AVAILABLE = torch.backends.mkldnn.is_available()


def onednn_ready(x: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """Whether oneDNN's fused convolutions (which have no autograd formula and are not on
    autocast's lists) may run: eager fp32 on the CPU (under torch.compile, Inductor fuses by
    itself; torch.jit.trace cannot record them), no autocast, and autograd needs nothing here."""
    return (not torch.compiler.is_compiling() and not torch.jit.is_tracing() and MKLDNN_AVAILABLE
            and x.device.type == "cpu"
            and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, *tensors))))


class ConvBN(nn.Module):
    """Bias-free Conv2d then BatchNorm2d (``c``, ``bn``); (B, C_in, H, W) -> (B, C_out, H', W').

    ``forward(x, activation=True)`` applies a GELU after the BatchNorm.
    """

    def __init__(self, *, in_chans: int, out_chans: int, kernel_size: int = 1, stride: int = 1,
                 groups: int = 1, bn_weight: float = 1.0) -> None:
        super().__init__()
        self.c = nn.Conv2d(in_chans, out_chans, kernel_size, stride, kernel_size // 2,
                           groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chans)
        nn.init.constant_(self.bn.weight, bn_weight)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The eval-mode BatchNorm folded into the convolution: (weight, bias). Recomputed at
        every call, so it always reflects the current tensors and gradients reach both modules."""
        scale = self.bn.weight * torch.rsqrt(self.bn.running_var + self.bn.eps)
        return self.c.weight * scale[:, None, None, None], self.bn.bias - self.bn.running_mean * scale

    def forward(self, x: torch.Tensor, activation: bool = False,
                padding: tuple[int, int] | None = None) -> torch.Tensor:
        """``padding`` overrides the convolution's own (for bands of rows, see :func:`conv_rows`)."""
        if self.bn.training:
            y = self.bn(self.c(x))
            return gelu(y) if activation else y
        weight, bias = self.folded()
        padding = self.c.padding if padding is None else padding
        if onednn_ready(x, weight, bias):
            # one oneDNN primitive for convolution, bias and GELU (exact erf form)
            return torch.ops.mkldnn._convolution_pointwise(
                x, weight, bias, list(padding), list(self.c.stride), list(self.c.dilation),
                self.c.groups, "gelu" if activation else "none", [], "none")
        if self.c.kernel_size == (1, 1) and self.c.groups == 1 and x.is_contiguous(memory_format=torch.channels_last):
            # a 1x1 convolution of channels-last pixels is a linear map of (B, H, W, C) tokens
            # (the same GEMM; torch's own conv takes a slow path for it under autograd)
            y = F.linear(x.permute(0, 2, 3, 1), weight.flatten(1), bias).permute(0, 3, 1, 2)
        else:
            y = F.conv2d(x, weight, bias, self.c.stride, padding, self.c.dilation, self.c.groups)
        return gelu(y) if activation else y

    def fused_residual(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``forward(x) + residual`` in one oneDNN primitive (only where :func:`onednn_ready`)."""
        weight, bias = self.folded()
        return torch.ops.mkldnn._convolution_pointwise(
            x, residual, weight, bias, list(self.c.padding), list(self.c.stride),
            list(self.c.dilation), self.c.groups, "add", 1.0, None, [], None)


# Larger allocations get fresh memory from the OS at every call (glibc maps anything above
# 32 MiB), and the first touch of each page then costs a page fault: on a 2-core CPU that was
# a quarter of the encoder's time at 256 px. Bands of rows, chunks of tokens and groups of
# images stay below these sizes; bands are not smaller, because every operator call is a
# parallel region whose threads wait for each other (costly on a shared CPU).
BAND_BYTES = 24 << 20  # the widest intermediate of one band of rows or chunk of tokens
PASS_BYTES = 24 << 20  # the widest tensor of one group of images


def row_bands(out_rows: int, row_bytes: int) -> list[tuple[int, int]]:
    """[start, stop) output rows of consecutive bands whose widest intermediate (``row_bytes`` per
    row) stays near :data:`BAND_BYTES`."""
    step = max(1, BAND_BYTES // max(1, row_bytes))
    return [(start, min(out_rows, start + step)) for start in range(0, out_rows, step)]


def conv_rows(conv: ConvBN, band: torch.Tensor, offset: int, height: int, first: int, stop: int, *,
              activation: bool) -> torch.Tensor:
    """Output rows ``first:stop`` of a 3x3 ``conv`` (stride s, padding 1) over an input of
    ``height`` rows, of which ``band`` (B, C, rows, W) holds rows ``offset`` onwards, at least
    input rows ``s * first - 1`` to ``s * (stop - 1) + 1`` where they exist."""
    stride = conv.c.stride[0]
    top, bottom = stride * first - 1, stride * (stop - 1) + 2  # input rows needed, [top, bottom)
    band = band[:, :, max(0, top) - offset:min(height, bottom) - offset]
    pad_top, pad_bottom = max(0, -top), max(0, bottom - height)
    if pad_top or pad_bottom:  # the image's own border: zero rows, as the convolution's padding
        band = F.pad(band, (0, 0, pad_top, pad_bottom)).contiguous(memory_format=torch.channels_last)
    return conv(band, activation=activation, padding=(0, conv.c.padding[1]))


class PatchEmbed(nn.Module):
    """1x1 conv+BN, GELU, 1x1 conv+BN (stride 1); (B, in_chans, S, S) -> (B, embed_dim, S, S)."""

    def __init__(self, *, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(ConvBN(in_chans=in_chans, out_chans=embed_dim // 2), nn.GELU(),
                                 ConvBN(in_chans=embed_dim // 2, out_chans=embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq[2](self.seq[0](x, activation=True))


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, 3x3 depthwise, 1x1 project, residual, GELU.

    (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, *, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = ConvBN(in_chans=dim, out_chans=hidden)
        self.conv2 = ConvBN(in_chans=hidden, out_chans=hidden, kernel_size=3, groups=hidden)
        # zero-initialised last BN: a freshly built block is the identity (before its GELU)
        self.conv3 = ConvBN(in_chans=hidden, out_chans=dim, bn_weight=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv1.bn.training or not onednn_ready(x, *self.conv1.folded(), *self.conv2.folded(),
                                                      *self.conv3.folded()):
            y = self.conv3(self.conv2(self.conv1(x, activation=True), activation=True))
            y += x
            return gelu(y)
        # no autograd, eval BatchNorms: fused convolutions, one image and one band of rows at a
        # time, so that no allocation of the 4x wider hidden tensor is so large that the C
        # library maps fresh (page-faulting) memory for it (see BAND_BYTES)
        width, hidden = x.shape[3], self.conv1.c.out_channels
        out = torch.empty_like(x)
        for index, image in enumerate(x.split(1)):
            for first, stop in row_bands(x.shape[2], 4 * width * hidden):
                top = max(0, first - 1)
                expanded = self.conv1(image[:, :, top:stop + 1], activation=True)
                mixed = conv_rows(self.conv2, expanded, top, x.shape[2], first, stop, activation=True)
                summed = self.conv3.fused_residual(mixed, image[:, :, first:stop])
                torch.ops.aten.gelu.out(summed, out=out[index:index + 1, :, first:stop])
        return out


class PatchMerging(nn.Module):
    """1x1 conv, GELU, stride-s depthwise 3x3 conv, GELU, 1x1 conv (each with BN).

    (B, dim, H, W) -> (B, out_dim, ceil(H/s), ceil(W/s)).
    """

    def __init__(self, *, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(in_chans=dim, out_chans=out_dim)
        self.conv2 = ConvBN(in_chans=out_dim, out_chans=out_dim, kernel_size=3, stride=stride,
                            groups=out_dim)
        self.conv3 = ConvBN(in_chans=out_dim, out_chans=out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[2:]
        hidden_row_bytes = 4 * width * self.conv1.c.out_channels
        if (self.conv1.bn.training or height * hidden_row_bytes <= BAND_BYTES
                or not onednn_ready(x, *self.conv1.folded(), *self.conv2.folded())):
            return self.conv3(self.conv2(self.conv1(x, activation=True), activation=True))
        # no autograd, eval BatchNorms, a wide first convolution: one image and one band of
        # output rows at a time (as in MBConv.forward)
        stride = self.conv2.c.stride[0]
        out_rows = -(-height // stride)
        images = []
        for image in x.split(1):
            bands = []
            for first, stop in row_bands(out_rows, stride * hidden_row_bytes):
                top, bottom = max(0, stride * first - 1), min(height, stride * (stop - 1) + 2)
                expanded = self.conv1(image[:, :, top:bottom], activation=True)
                bands.append(conv_rows(self.conv2, expanded, top, height, first, stop, activation=True))
            images.append(torch.cat(bands, dim=2))
        return self.conv3(torch.cat(images) if len(images) > 1 else images[0])


def offset_index(window: int) -> torch.Tensor:
    """(window^2, window^2) index of each (query, key) pair's offset |dy|, |dx| in TinyViT's
    bias table, whose columns list the offsets row-major: column = |dy| * window + |dx|."""
    rows = torch.arange(window).repeat_interleave(window)
    cols = torch.arange(window).repeat(window)
    return (rows[:, None] - rows[None, :]).abs() * window + (cols[:, None] - cols[None, :]).abs()


class WindowAttention(nn.Module):
    """LayerNorm then multi-head attention within non-overlapping windows, with a learned bias
    per head and (|dy|, |dx|) offset; (B, H, W, dim) -> (B, H, W, dim).

    ``qkv`` outputs, per token, ``num_heads`` chunks of [q | k | v] (``head_dim`` each). The grid is
    padded at the bottom and right to whole windows with tokens that are zero before the
    LayerNorm, and those tokens take part in the attention, as in the reference implementation.
    """

    def __init__(self, *, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = window_size
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window_size * window_size))
        self.register_buffer("attention_bias_idxs", offset_index(window_size), persistent=False)
        self.adapters = AttentionAdapters()

    def project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """LayerNorm then the fused qkv projection, (..., dim) -> (..., 3 * dim), through the ``qkv`` adapter slot."""
        normed = self.norm(x)
        return self.qkv(normed) if self.adapters.qkv is None else self.adapters.qkv(self.qkv, normed)

    def qkv_channels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices of the q and of the v channels in ``qkv``'s output (each heads * head_dim)."""
        head = torch.arange(self.num_heads)[:, None] * 3 * self.head_dim
        within = torch.arange(self.head_dim)[None, :]
        return (head + within).flatten(), (head + 2 * self.head_dim + within).flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, dim = x.shape
        window, head_dim = self.window_size, self.head_dim
        qkv, rows, cols = self._window_qkv(x)
        q, k, v = qkv.split(head_dim, dim=-1)
        # a 4-d float mask lets SDPA use its fused kernel in float32; the gather runs every forward
        bias = self.attention_biases[:, self.attention_bias_idxs].unsqueeze(0).to(q.dtype)
        out = dot_product_attention(q, k, v, attn_mask=bias, scale=head_dim ** -0.5)
        # the projection runs per window (its input is a free view of SDPA's output); one copy
        # puts the windows back on the grid
        out = self.proj(out.transpose(1, 2).reshape(-1, window * window, dim))
        out = out.view(batch, rows, cols, window, window, dim).transpose(2, 3)
        return out.reshape(batch, rows * window, cols * window, dim)[:, :height, :width]

    def forward_with_prompts(self, x: torch.Tensor,
                             prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, H, W, dim), prompts: (B, c, dim) -> their attention updates, same shapes.

        Every window attends over its tokens plus its own copy of the prompts; the prompts'
        updates are averaged over the windows of each image.
        """
        batch, height, width, dim = x.shape
        window, heads, head_dim = self.window_size, self.num_heads, self.head_dim
        num_prompts = prompts.shape[1]
        qkv, rows, cols = self._window_qkv(x)
        prompt_qkv = self.project_qkv(prompts).reshape(batch, num_prompts, heads, 3 * head_dim)
        prompt_qkv = prompt_qkv.transpose(1, 2).repeat_interleave(rows * cols, dim=0)
        q, k, v = torch.cat([qkv, prompt_qkv], dim=2).split(head_dim, dim=-1)
        bias = self.attention_biases[:, self.attention_bias_idxs]
        bias = F.pad(bias, (0, num_prompts, 0, num_prompts)).unsqueeze(0).to(q.dtype)
        out = dot_product_attention(q, k, v, attn_mask=bias, scale=head_dim ** -0.5)
        image = out[:, :, :window * window].reshape(batch, rows, cols, heads, window, window, head_dim)
        image = image.permute(0, 1, 4, 2, 5, 3, 6).reshape(batch, rows * window, cols * window, dim)
        extra = out[:, :, window * window:].reshape(batch, rows * cols, heads, num_prompts, head_dim)
        extra = extra.mean(dim=1).transpose(1, 2).reshape(batch, num_prompts, dim)
        return self.proj(image[:, :height, :width]), self.proj(extra)

    def _window_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """(B, H, W, dim) -> qkv per window (B * windows, heads, window^2, 3 * head_dim), a view
        whose memory is (B * windows, window^2, heads, 3 * head_dim); and the number of window
        rows and columns.

        The tokens (not the 3x wider qkv) are padded with zeros and put in window order, so the
        padding tokens pass the LayerNorm and projection like the reference's.
        """
        batch, height, width, dim = x.shape
        window, heads, head_dim = self.window_size, self.num_heads, self.head_dim
        pad_h, pad_w = -height % window, -width % window
        rows, cols = (height + pad_h) // window, (width + pad_w) // window
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        # (B, rows, window, cols, window, dim) -> (B * windows, window^2, dim): one copy
        x = x.view(batch, rows, window, cols, window, dim).transpose(2, 3)
        qkv = self.project_qkv(x.reshape(-1, window * window, dim))
        return qkv.view(-1, window * window, heads, 3 * head_dim).transpose(1, 2), rows, cols


class MLP(nn.Module):
    """LayerNorm, linear, GELU, linear; (..., dim) -> (..., dim)."""

    def __init__(self, *, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden_bytes = x.numel() // x.shape[-1] * self.fc1.out_features * x.element_size()
        # the hidden tensor is 4x wider than the tokens: run it in chunks of tokens below the C
        # library's threshold for fresh memory (see BAND_BYTES); with autograd every chunk
        # costs a concatenation forward and backward, so only where it is well above it
        limit = PASS_BYTES if torch.is_grad_enabled() and x.requires_grad else BAND_BYTES
        if hidden_bytes <= 2 * limit or torch.compiler.is_compiling():
            return self.fc2(gelu(self.fc1(self.norm(x))))
        flat = x.reshape(-1, x.shape[-1])
        step = -(-len(flat) // -(-hidden_bytes // limit))
        return torch.cat([self.fc2(gelu(self.fc1(self.norm(chunk)))) for chunk in flat.split(step)]).view(x.shape)


class TinyViTBlock(nn.Module):
    """Window attention (residual), depthwise conv+BN, MLP (residual).

    (B, dim, H, W) -> (B, dim, H, W), returned as a channels-last view of (B, H, W, dim) tokens.
    """

    def __init__(self, *, dim: int, num_heads: int, window_size: int, mlp_ratio: float,
                 local_conv_size: int) -> None:
        super().__init__()
        self.attn = WindowAttention(dim=dim, num_heads=num_heads, window_size=window_size)
        self.local_conv = ConvBN(in_chans=dim, out_chans=dim, kernel_size=local_conv_size,
                                 groups=dim)
        self.mlp = MLP(dim=dim, hidden_dim=int(dim * mlp_ratio))
        self.adapters = BlockAdapters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.permute(0, 2, 3, 1).contiguous()  # no copy for a channels-last input
        return self._conv_then_mlp(self._add_attention(tokens, self.attn(tokens)))

    def _add_attention(self, tokens: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Residual add of the (un-windowed) attention output (B, H, W, dim), through the block's adapter."""
        if self.adapters.after_attention is not None:
            attended = self.adapters.after_attention(attended.contiguous())
        return tokens + attended

    def _conv_then_mlp(self, tokens: torch.Tensor) -> torch.Tensor:
        """Depthwise conv, then the residual MLP (with the block's parallel adapter): (B, H, W, dim) ->
        (B, dim, H, W) channels-last."""
        tokens = self.local_conv(tokens.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        out = self.mlp(tokens)
        if self.adapters.parallel_mlp is not None:
            out = out + self.adapters.parallel_mlp(tokens)
        return (tokens + out).permute(0, 3, 1, 2)

    def forward_with_prompts(self, x: torch.Tensor,
                             prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, dim, H, W) channels-last, prompts: (B, c, dim) -> both updated; the prompts
        skip the depthwise convolution."""
        tokens = x.permute(0, 2, 3, 1).contiguous()
        image, extra = self.attn.forward_with_prompts(tokens, prompts)
        prompts = prompts + extra
        return self._conv_then_mlp(self._add_attention(tokens, image)), prompts + self.mlp(prompts)


class Stage(nn.Module):
    """``blocks`` then an optional ``downsample``; returns (blocks' output, downsampled)."""

    def __init__(self, *, blocks: list[nn.Module], downsample: PatchMerging | None) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.downsample = downsample

    def forward(self, x: torch.Tensor,
                taps: dict[nn.Module, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``taps``: blocks whose outputs are wanted, mapped to None; they are filled in place."""
        feature = x
        for block in self.blocks:
            feature = block(feature)
            if taps is not None and block in taps:
                taps[block] = feature
        return feature, (feature if self.downsample is None else self.downsample(feature))

    def forward_with_prompts(self, x: torch.Tensor, prompts: torch.Tensor,
                             taps: dict[nn.Module, torch.Tensor] | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Like ``forward`` with prompts (B, c, dim) through every (attention) block; also
        returns the updated prompts."""
        feature = x
        for block in self.blocks:
            feature, prompts = block.forward_with_prompts(feature, prompts)
            if taps is not None and block in taps:
                taps[block] = feature
        return feature, (feature if self.downsample is None else self.downsample(feature)), prompts


class TinyViTEncoder(SAMImageEncoder):
    """TinyViT image encoder: (B, 3, S, S) -> embedding (B, out_chans, S/4, S/4) and the four
    stages' outputs before their patch merging, (B, embed_dims[i], S/s_i, S/s_i) with s_i in
    ``feature_strides`` (1, 2, 4, 4 for LiteMedSAM), all channels-last in memory.
    """

    def __init__(self, *, config: TinyViTConfig, img_size: int) -> None:
        super().__init__()
        dims = config.embed_dims
        self.img_size = img_size
        self.out_chans = config.out_chans
        self.feature_channels = tuple(dims)
        strides = [1]
        for stride in config.merge_strides:
            strides.append(strides[-1] * stride)
        self.feature_strides = tuple(strides)
        self.embedding_stride = strides[-1]
        self.prompt_level_features = tuple(range(1, len(dims)))  # the attention stages
        self.token_channel_axis = 1
        self.adapters = EncoderAdapters()

        self.patch_embed = PatchEmbed(in_chans=3, embed_dim=dims[0])
        self.layers = nn.ModuleList()
        for index, (dim, depth) in enumerate(zip(dims, config.depths)):
            if index == 0:
                blocks = [MBConv(dim=dim, expand_ratio=config.mbconv_expand_ratio)
                          for _ in range(depth)]
            else:
                blocks = [TinyViTBlock(dim=dim, num_heads=config.num_heads[index - 1],
                                       window_size=config.window_sizes[index - 1],
                                       mlp_ratio=config.mlp_ratio,
                                       local_conv_size=config.local_conv_size)
                          for _ in range(depth)]
            downsample = (PatchMerging(dim=dim, out_dim=dims[index + 1],
                                       stride=config.merge_strides[index])
                          if index + 1 < len(dims) else None)
            self.layers.append(Stage(blocks=blocks, downsample=downsample))
        self.neck = sam_neck(dims[-1], config.out_chans)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor, prompt_tokens: Sequence[torch.Tensor | None] | None = None,
                intermediates: Sequence[int] = ()) -> EncoderOutput:
        """x: (B, 3, S, S); prompt_tokens: None, or per attention stage j = 1, 2, 3 tokens
        (c_j, embed_dims[j]) or (B, c_j, embed_dims[j]) that take part in its attention (None:
        none there); intermediates: indices into :meth:`transformer_blocks` whose outputs
        (B, dim, h, w) are returned too.

        Where no image can influence another (every BatchNorm in eval mode, no encoder or block
        adapters), the batch runs in groups of images whose largest intermediate stays below
        :data:`PASS_BYTES`; the outputs are the same.
        """
        blocks = [block for block, _ in self.transformer_blocks()]
        check_block_indices(intermediates, len(blocks))
        levels = (None if prompt_tokens is None else
                  batch_prompt_tokens(prompt_tokens, x.shape[0], self.prompt_level_dims))
        step = self._images_per_pass(x)
        if step >= len(x):
            return self._forward(x, levels, intermediates)
        passes = [self._forward(x[start:start + step],
                                None if levels is None else
                                [None if t is None else t[start:start + step] for t in levels],
                                intermediates)
                  for start in range(0, len(x), step)]
        return EncoderOutput(
            embedding=torch.cat([p.embedding for p in passes]),
            features=[torch.cat(f) for f in zip(*(p.features for p in passes))],
            prompts=None if levels is None else [None if any(t is None for t in level) else torch.cat(level)
                                                 for level in zip(*(p.prompts for p in passes))],
            intermediates=[torch.cat(f) for f in zip(*(p.intermediates for p in passes))])

    def _images_per_pass(self, x: torch.Tensor) -> int:
        """How many images of ``x`` one pass takes (``len(x)``: all, where images can influence
        each other through a BatchNorm in training mode or an adapter)."""
        coupled = (self.adapters.after_patch_embed is not None
                   or any(any(slot is not None for slot in block.adapters) for block, _ in self.transformer_blocks())
                   or any(m.training for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)))
        if coupled or len(x) == 1 or torch.compiler.is_compiling():
            return len(x)
        # the widest tensor left whole: an attention stage's qkv on its window-padded grid
        widest = 0
        for stage, stride in zip(self.layers[1:], self.feature_strides[1:]):
            attention = stage.blocks[0].attn
            side = -(-x.shape[-1] // stride // attention.window_size) * attention.window_size
            widest = max(widest, side * side * 3 * attention.num_heads * attention.head_dim * x.element_size())
        passes = -(-len(x) // max(1, PASS_BYTES // max(1, widest)))
        return -(-len(x) // passes)

    def _forward(self, x: torch.Tensor, levels: list[torch.Tensor | None] | None,
                 intermediates: Sequence[int]) -> EncoderOutput:
        """:meth:`forward` of one group of images, prompt tokens already batched per level."""
        x = self.patch_embed(x.contiguous(memory_format=torch.channels_last))
        if self.adapters.after_patch_embed is not None:
            x = self.adapters.after_patch_embed(x)
        blocks = [block for block, _ in self.transformer_blocks()]
        taps = {blocks[i]: None for i in intermediates} if intermediates else None
        levels = None if levels is None else dict(zip(self.prompt_level_features, levels))
        features = []
        for index, stage in enumerate(self.layers):
            if levels is not None and levels.get(index) is not None:
                feature, x, levels[index] = stage.forward_with_prompts(x, levels[index], taps)
            else:
                feature, x = stage(x, taps)
            features.append(feature)
        prompts = None if levels is None else [levels[index] for index in self.prompt_level_features]
        return EncoderOutput(embedding=self.neck(x), features=features, prompts=prompts,
                             intermediates=[taps[blocks[i]] for i in intermediates] if taps else [])

    def transformer_blocks(self) -> list[tuple[nn.Module, int]]:
        return [(block, block.attn.num_heads * block.attn.head_dim) for block in self.modules()
                if isinstance(block, TinyViTBlock)]

    def qkv_projections(self) -> list[QKVProjection]:
        projections = []
        for module in self.modules():
            if isinstance(module, WindowAttention):
                q_channels, v_channels = module.qkv_channels()
                projections.append(QKVProjection(owner=module, q_channels=q_channels,
                                                 v_channels=v_channels))
        return projections

    def train(self, mode: bool = True) -> TinyViTEncoder:
        """Set train/eval mode, but keep every BatchNorm whose parameters are all frozen in eval
        mode: it then normalises with its running statistics and never updates them."""
        super().train(mode)
        if mode:
            for module in self.modules():
                if (isinstance(module, nn.modules.batchnorm._BatchNorm)
                        and not any(p.requires_grad for p in module.parameters())):
                    module.eval()
        return self


def build_tinyvit_encoder(variant: str, img_size: int) -> TinyViTEncoder:
    """TinyViT encoder of a known ``variant`` (randomly initialised) for (img_size, img_size)."""
    if variant not in TINYVIT_CONFIGS:
        raise ValueError(f"unknown TinyViT variant {variant!r}; "
                         f"known: {', '.join(TINYVIT_CONFIGS)}")
    if img_size <= 0 or img_size % SIZE_MULTIPLE:
        raise ValueError(f"img_size {img_size} is not a positive multiple of {SIZE_MULTIPLE}")
    return TinyViTEncoder(config=TINYVIT_CONFIGS[variant], img_size=img_size)
