"""Self-Prompt-SAM's adapters that let a frozen 2D SAM see D adjacent slices (paper Sec. 2.1, Table 4).

A stack of D slices travels through SAM as D consecutive images of the batch: a tensor of
N = B * D images holds volume b's slices at rows b * D ... b * D + D - 1. Every module here
reshapes (N, ..., C) to (N / D, D, ..., C) and mixes only along D, so token t of slice d meets
token t of the other slices of the same stack and nothing else. They must see un-windowed
tokens: the caller applies them after a window-attention layer has put its windows back.

- ``DepthAdapter(mode="dfused")``: the DFusedAdapter,
  ``DFused(X) = X + (s(X W_dn) + s(s(X W_dn) W_Dup) W_Ddn) W_up`` with W_dn: C -> C/4,
  W_up: C/4 -> C on channels and W_Dup: D -> 4D, W_Ddn: 4D -> D on the depth axis, s = GELU.
- ``mode="vanilla"``: Houlsby's adapter ``X + s(X W_dn) W_up`` (Table 4, S3).
- ``mode="depth_before"`` / ``"depth_after"``: the vanilla adapter with a depth MLP
  ``Y + s(Y^T W_Dup) W_Ddn`` (on all C channels, with a skip) before or after it (S4, S5).

W_up starts at zero, so every adapter starts as the identity and the network starts as SAM.
"""
from __future__ import annotations

import torch
from torch import nn

ADAPTER_MODES = ("vanilla", "depth_before", "depth_after", "dfused")


def check_whole_stacks(x: torch.Tensor, depth: int) -> None:
    """Raise ValueError unless the N images of x (N, ...) form whole stacks of ``depth`` slices."""
    if x.shape[0] % depth:
        raise ValueError(f"{x.shape[0]} images are not whole stacks of {depth} slices")


class DepthMLP(nn.Module):
    """Inverted bottleneck over the depth axis, no skip: (N, ..., C) -> same, N = stacks * D.

    ``zero_output`` starts its last layer at zero (used where the MLP is outside W_up and the
    adapter must still start as the identity). ``output_bias=False`` leaves out the last layer's bias,
    which adds one constant to every channel of a slice: where a LayerNorm over the channels follows,
    that constant is removed and the bias could never learn (its gradient is exactly zero).
    """

    def __init__(self, depth: int, *, expansion: int = 4, zero_output: bool = False,
                 output_bias: bool = True) -> None:
        super().__init__()
        self.depth = depth
        self.up = nn.Linear(depth, expansion * depth)
        self.act = nn.GELU()
        self.down = nn.Linear(expansion * depth, depth, bias=output_bias)
        if zero_output:
            nn.init.zeros_(self.down.weight)
            if output_bias:
                nn.init.zeros_(self.down.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Each stack is a (D, rest) matrix and each layer one (D_out, D_in) @ (D_in, rest) product, batched
        # over the stacks: the rest stays contiguous. Moving D last instead makes a linear layer with 3-12
        # input features over every token and channel, plus two transposing copies: on a 2-core AMD EPYC
        # (2026-12-02; 6 stacks of 3 slices, 128 x 128 tokens, 32 channels) 78 ms (fp32) and 125 ms (bf16)
        # per MLP against 46 and 33 ms here; at D = 9, 105 / 55 ms against 113 / 50 ms.
        check_whole_stacks(x, self.depth)
        stacks = x.reshape(x.shape[0] // self.depth, self.depth, -1)
        count = len(stacks)
        hidden = self.act(torch.baddbmm(self.up.bias[:, None], self.up.weight.expand(count, -1, -1), stacks))
        weight = self.down.weight.expand(count, -1, -1)
        if self.down.bias is None:
            mixed = torch.bmm(weight, hidden)
        else:
            mixed = torch.baddbmm(self.down.bias[:, None], weight, hidden)
        return mixed.reshape(x.shape)


class DepthAdapter(nn.Module):
    """One adapter of Table 4 (``mode`` in :data:`ADAPTER_MODES`): (N, ..., C) -> (N, ..., C).

    ``forward(x) = x + delta(x)``; :meth:`delta` alone is what an adapter placed in parallel to
    an MLP adds (the block already carries the skip). ``normalized_output``: a LayerNorm over the
    channels is all that reads the adapter's output (as in SAM's two-way decoder blocks); the depth
    MLP of ``"depth_after"``, added to the output as it is, then has no output bias (see
    :class:`DepthMLP`). The other modes pass the depth MLP's output through W_dn or W_up first, where
    its bias still acts.
    """

    def __init__(self, *, dim: int, depth: int, mode: str = "dfused", reduction: int = 4,
                 normalized_output: bool = False) -> None:
        super().__init__()
        if mode not in ADAPTER_MODES:
            raise ValueError(f"adapter mode must be one of {ADAPTER_MODES}, not {mode!r}")
        self.mode = mode
        self.depth = depth
        hidden = max(dim // reduction, 1)
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.depth_mlp = None if mode == "vanilla" else DepthMLP(
            depth, zero_output=mode != "dfused", output_bias=not (normalized_output and mode == "depth_after"))

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """s(X W_dn): (N, ..., C) -> (N, ..., C/4)."""
        return self.act(self.down(x))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ..., C) -> what the adapter adds to x."""
        shift = self.depth_mlp(x) if self.mode == "depth_before" else 0
        hidden = self.bottleneck(x + shift)
        if self.mode == "dfused":
            hidden = hidden + self.depth_mlp(hidden)  # s(s(X W_dn) W_Dup) W_Ddn
        out = self.up(hidden) + shift
        if self.mode == "depth_after":
            out = out + self.depth_mlp(x + out)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.delta(x)


class DepthPositionalEmbedding(nn.Module):
    """One learned vector per slice index 0..D-1, added to every token of that slice.

    (N, ..., C) with channels last (``channel_axis=-1``), or e.g. (N, C, H, W) with ``channel_axis=1``;
    N = stacks * D. Starts at zero (the network starts as SAM).
    """

    def __init__(self, *, depth: int, dim: int, channel_axis: int = -1) -> None:
        super().__init__()
        self.depth = depth
        self.channel_axis = channel_axis
        self.embedding = nn.Parameter(torch.zeros(depth, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_whole_stacks(x, self.depth)
        per_image = self.embedding.repeat(x.shape[0] // self.depth, 1).to(x.dtype)  # (N, C)
        shape = [x.shape[0]] + [1] * (x.ndim - 1)
        shape[self.channel_axis] = per_image.shape[1]
        return x + per_image.reshape(shape)
