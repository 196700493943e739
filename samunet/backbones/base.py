"""The contract every SAM image encoder in samunet fulfils.

An encoder maps images (B, 3, S, S) to SAM's image embedding (B, P, S/stride, S/stride), with
P the prompt/decoder width (256 for every released checkpoint), and also returns feature maps
from several depths (the global-attention blocks of a ViT, the stages of TinyViT), because
every method samunet implements needs more than the final embedding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple, Sequence

import torch
from torch import nn


class EncoderOutput(NamedTuple):
    """embedding: (B, P, h, w) after the neck; features: list of (B, C_i, h_i, w_i), shallow to deep;
    prompts: when prompt tokens were given, each prompt level's tokens (B, c_j, D_j) after the
    level's last block (None for a level given None), else None; intermediates: the outputs
    (B, C, h_i, w_i) of the transformer blocks asked for with ``intermediates=`` (feature taps),
    in the order asked."""

    embedding: torch.Tensor
    features: list[torch.Tensor]
    prompts: list[torch.Tensor | None] | None = None
    intermediates: Sequence[torch.Tensor] = ()


class QKVProjection(NamedTuple):
    """Where q and v sit in one attention layer's fused ``qkv`` linear.

    ``owner.qkv`` is an ``nn.Linear`` and ``owner.adapters`` the layer's :class:`AttentionAdapters`;
    ``q_channels`` / ``v_channels`` are the indices of the linear's output channels that form the
    query and the value (layouts differ between ViT and TinyViT).
    """

    owner: nn.Module
    q_channels: torch.Tensor
    v_channels: torch.Tensor


class BlockAdapters(NamedTuple):
    """Trainable modules a method inserts into one transformer block of a frozen encoder.

    They belong to the network, not to the encoder (a block holds them in a plain tuple), so the
    encoder's state_dict keeps the released checkpoint's names. ``after_attention`` maps the
    block's attention output (B, H, W, C), un-windowed, before it is added to the residual
    stream; ``parallel_mlp`` maps the MLP's input to a term added to the MLP's output. Both act on
    the image tokens only: prompt tokens (``forward(x, prompt_tokens=...)``) pass the block without
    them.
    """

    after_attention: Callable[[torch.Tensor], torch.Tensor] | None = None
    parallel_mlp: Callable[[torch.Tensor], torch.Tensor] | None = None


class AttentionAdapters(NamedTuple):
    """Trainable modules a method inserts into one attention layer of a frozen encoder (held in a
    plain tuple, like :class:`BlockAdapters`, so the encoder's state_dict is unchanged).

    ``qkv`` maps (the frozen fused ``qkv`` linear, its input (..., C)) to the (..., 3C') output the
    layer uses in the linear's place; LoRA adds its low-rank update to q and v this way (and may
    merge it into the weight rather than run the linear first). It must be token-wise
    (each output token depends on its own input token only): the ViT projects the real tokens of a
    windowed block and pads the windows with the projection of one zero token.
    """

    qkv: Callable[[nn.Linear, torch.Tensor], torch.Tensor] | None = None


class EncoderAdapters(NamedTuple):
    """Trainable modules a method inserts at the encoder level (a plain tuple, see :class:`BlockAdapters`).

    ``after_patch_embed`` maps the patch-embedding output, in the encoder's own layout (channel
    axis ``SAMImageEncoder.token_channel_axis``), before anything else is added to it.
    """

    after_patch_embed: Callable[[torch.Tensor], torch.Tensor] | None = None


def check_block_indices(indices: Sequence[int], num_blocks: int) -> None:
    """Raise ValueError unless every entry of ``indices`` (feature taps) names one of ``num_blocks`` blocks."""
    invalid = [i for i in indices if not 0 <= i < num_blocks]
    if invalid:
        raise ValueError(f"intermediates {invalid} are not transformer block indices in [0, {num_blocks})")


def fill_slots(owner: nn.Module, **slots) -> None:
    """Put adapters into ``owner.adapters`` (a :class:`BlockAdapters`, :class:`AttentionAdapters` or
    :class:`EncoderAdapters`). Raises ValueError when a slot is already taken, so two methods never
    overwrite each other's adapters silently."""
    taken = [name for name in slots if getattr(owner.adapters, name) is not None]
    if taken:
        raise ValueError(f"adapter slots {taken} of {type(owner).__name__} are already filled")
    owner.adapters = owner.adapters._replace(**slots)


class SAMImageEncoder(nn.Module):
    """Base class of samunet's image encoders (see the module docstring for the shapes).

    Prompt levels: the encoder's attention blocks fall into consecutive groups, each ending
    where one entry of ``features`` is taken (``prompt_level_features`` lists those entries).
    ``forward(x, prompt_tokens)`` can let extra learned tokens take part in the attention of
    each group (HSP-SAM's Q prompts); without them the encoder is unchanged.

    Extension points, so that no method rewires the encoder with forward hooks: ``adapters``
    (:class:`EncoderAdapters`) on the encoder, ``adapters`` (:class:`BlockAdapters`) on every block of
    :meth:`transformer_blocks`, ``adapters`` (:class:`AttentionAdapters`) on the owner of every
    :meth:`qkv_projections` entry, and feature taps (``forward(x, intermediates=...)``).
    """

    img_size: int
    embedding_stride: int
    out_chans: int
    feature_channels: tuple[int, ...]
    feature_strides: tuple[int, ...]
    prompt_level_features: tuple[int, ...]
    token_channel_axis: int  # channel axis of the patch-embedding output: -1 (B, h, w, C) or 1 (B, C, h, w)
    adapters: EncoderAdapters

    @property
    def embedding_size(self) -> int:
        return self.img_size // self.embedding_stride

    @property
    def prompt_level_dims(self) -> tuple[int, ...]:
        """Token width of each prompt level (the width its prompt tokens must have)."""
        return tuple(self.feature_channels[i] for i in self.prompt_level_features)

    def forward(self, x: torch.Tensor, prompt_tokens: Sequence[torch.Tensor | None] | None = None,
                intermediates: Sequence[int] = ()) -> EncoderOutput:  # pragma: no cover
        """``intermediates``: indices into :meth:`transformer_blocks` whose outputs are returned too."""
        raise NotImplementedError

    def transformer_blocks(self) -> list[tuple[nn.Module, int]]:  # pragma: no cover - abstract
        """Every attention block with its token width; each has an ``adapters`` (:class:`BlockAdapters`)."""
        raise NotImplementedError

    def qkv_projections(self) -> list[QKVProjection]:  # pragma: no cover - abstract
        """Every attention layer's fused qkv projection, for LoRA and similar adapters."""
        raise NotImplementedError

    def adapt_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return ``state_dict`` (this encoder's own key names) with tensors that depend on the
        input size resized to this encoder's ``img_size``. Default: unchanged."""
        return dict(state_dict)


def batch_prompt_tokens(prompt_tokens: Sequence[torch.Tensor | None], batch: int,
                        dims: Sequence[int]) -> list[torch.Tensor | None]:
    """Check one prompt set (or None: no prompts at that level) per level and give each a batch
    axis: (c_j, D_j) or (B, c_j, D_j) -> (B, c_j, D_j)."""
    if len(prompt_tokens) != len(dims):
        raise ValueError(f"expected one prompt set per prompt level ({len(dims)}), got {len(prompt_tokens)}")
    batched = []
    for level, (tokens, dim) in enumerate(zip(prompt_tokens, dims)):
        if tokens is None:
            batched.append(None)
            continue
        if tokens.ndim == 2:
            tokens = tokens.unsqueeze(0).expand(batch, -1, -1)
        if tokens.ndim != 3 or tokens.shape[0] != batch or tokens.shape[2] != dim:
            raise ValueError(f"prompt tokens of level {level} must be (c, {dim}) or ({batch}, c, {dim}), "
                             f"got {tuple(tokens.shape)}")
        batched.append(tokens)
    return batched


@dataclass(frozen=True)
class BackboneSpec:
    """Everything samunet needs to know about one backbone family member.

    ``build_encoder(img_size)`` builds the image encoder; ``pixel_normalization`` says what the
    pretrained weights expect as input: ``"imagenet"`` (0-255 RGB minus SAM's pixel mean, divided
    by its std) or ``"unit"`` (intensities in [0, 1], as MedSAM and LiteMedSAM were trained).
    ``prompt_dim`` is the width of the prompt encoder / mask decoder; ``decoder_mlp_dim`` the MLP
    width of the two-way transformer.
    """

    name: str
    build_encoder: Callable[[int], SAMImageEncoder]
    default_img_size: int
    allowed_img_sizes: tuple[int, ...]
    size_multiple: int
    pixel_normalization: str
    default_weights: str | None
    prompt_dim: int = 256
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    decoder_depth: int = 2
    mask_in_chans: int = 16
    family: str = "vit"
