"""Running SAM's mask decoder the way segmentation networks need it.

segment-anything's ``MaskDecoder.predict_masks`` repeats the image embedding once per prompt
(it assumes one image and many prompts) and returns either the single-mask token or the three
multimask tokens. samunet's networks decode a batch of B images with B prompt sets, and use
every mask token (one per class for SAMed-style multi-class output), so this module runs the
decoder's own submodules (two-way transformer, upscaling, hypernetwork MLPs) with that pairing.
The decoder's weights and state_dict names are untouched.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import nn

from samunet.modules.two_way_transformer import TwoWayLayerAdapters, image_tokens_to_grid, run_two_way_transformer


class DecoderOutput(NamedTuple):
    """masks: (B, T, 4h, 4w) logits, one per mask token; mask_features: (B, C/8, 4h, 4w)."""

    masks: torch.Tensor
    mask_features: torch.Tensor


def decoder_tokens(decoder: nn.Module, sparse_prompts: torch.Tensor) -> torch.Tensor:
    """(B, 1 + T + N, C): the decoder's IoU token and T mask tokens, then the N sparse prompts (B, N, C)."""
    tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    return torch.cat([tokens.unsqueeze(0).expand(sparse_prompts.shape[0], -1, -1), sparse_prompts], dim=1)


def hypernetwork_masks(mlps: nn.ModuleList, mask_tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Mask token i's MLP output dotted with every pixel's features.

    mask_tokens: (B, T, C); features: (B, c, H, W) -> mask logits (B, T, H, W).
    """
    weights = torch.stack([mlp(mask_tokens[:, i]) for i, mlp in enumerate(mlps)], dim=1)
    return (weights @ features.flatten(2)).view(features.shape[0], -1, *features.shape[-2:])


def decode_masks(decoder: nn.Module, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                 sparse_prompts: torch.Tensor, dense_prompts: torch.Tensor,
                 adapters: Sequence[TwoWayLayerAdapters] | None = None) -> DecoderOutput:
    """Decode every mask token of SAM's ``decoder`` for B (image, prompt) pairs.

    image_embeddings: (B, C, h, w); image_pe: (1 or B, C, h, w); sparse_prompts: (B, N, C), N may be 0;
    dense_prompts: (B, C, h, w) or (1, C, h, w); adapters: one :class:`TwoWayLayerAdapters` per block
    of the decoder's two-way transformer, or None. SAM's IoU head is not run: no samunet loss
    supervises it, and networks keep it frozen.
    """
    batch, _, height, width = image_embeddings.shape
    hidden, source = run_two_way_transformer(decoder.transformer, image_embeddings + dense_prompts,
                                             image_pe.expand(batch, -1, -1, -1),
                                             decoder_tokens(decoder, sparse_prompts), adapters=adapters)
    mask_tokens = hidden[:, 1:1 + decoder.num_mask_tokens]
    mask_features = decoder.output_upscaling(image_tokens_to_grid(source, height, width))
    return DecoderOutput(masks=hypernetwork_masks(decoder.output_hypernetworks_mlps, mask_tokens, mask_features),
                         mask_features=mask_features)


def freeze_iou_head(decoder: nn.Module) -> None:
    """Keep SAM's IoU-prediction head out of training: it scores mask quality, which no samunet loss
    supervises, so its parameters would never receive a gradient (and DDP refuses unused parameters)."""
    decoder.iou_prediction_head.requires_grad_(False)


def empty_sparse_prompts(prompt_encoder: nn.Module, batch: int) -> torch.Tensor:
    """(B, 0, C): no point or box prompts (prompt-free decoding)."""
    weight = prompt_encoder.no_mask_embed.weight
    return weight.new_zeros(batch, 0, weight.shape[1])


def default_dense_prompt(prompt_encoder: nn.Module) -> torch.Tensor:
    """(1, C, h, w): the learned 'no mask' embedding broadcast over the embedding grid."""
    height, width = prompt_encoder.image_embedding_size
    return prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, height, width)
