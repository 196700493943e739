"""SAM's three parts built to match each other, and loading of released checkpoints into them.

``SAMParts`` holds ``image_encoder``, ``prompt_encoder`` and ``mask_decoder`` under exactly the
names of segment-anything's ``Sam`` and of LiteMedSAM, so a released checkpoint maps onto it
key for key. The prompt encoder and mask decoder are segment-anything's own classes.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from samunet.backbones.base import BackboneSpec, SAMImageEncoder
from samunet.backbones.catalog import check_img_size
from samunet.sam_import import sam_modeling
from samunet.weights import WeightsError

# SAM's released mask decoders have 3 multimask outputs + 1 single-mask token.
RELEASED_NUM_MASK_TOKENS = 4


class SAMParts(nn.Module):
    """image encoder (B,3,S,S) -> (B,P,h,w); prompt encoder; mask decoder with ``num_mask_tokens``."""

    def __init__(self, *, image_encoder: SAMImageEncoder, prompt_encoder: nn.Module, mask_decoder: nn.Module,
                 backbone: str) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.backbone = backbone


def build_sam_parts(spec: BackboneSpec, img_size: int, num_mask_tokens: int = RELEASED_NUM_MASK_TOKENS) -> SAMParts:
    """Build encoder, prompt encoder and mask decoder for ``spec`` at input size ``img_size``."""
    check_img_size(spec, img_size)
    if num_mask_tokens < 2:
        raise ValueError(f"the mask decoder needs at least 2 mask tokens, got {num_mask_tokens}")
    modeling = sam_modeling()
    encoder = spec.build_encoder(img_size)
    embedding_size = encoder.embedding_size
    prompt_encoder = modeling.PromptEncoder(
        embed_dim=spec.prompt_dim, image_embedding_size=(embedding_size, embedding_size),
        input_image_size=(img_size, img_size), mask_in_chans=spec.mask_in_chans)
    mask_decoder = modeling.MaskDecoder(
        transformer_dim=spec.prompt_dim,
        transformer=modeling.TwoWayTransformer(depth=spec.decoder_depth, embedding_dim=spec.prompt_dim,
                                               mlp_dim=spec.decoder_mlp_dim, num_heads=spec.decoder_heads),
        num_multimask_outputs=num_mask_tokens - 1, iou_head_depth=3, iou_head_hidden_dim=spec.prompt_dim)
    return SAMParts(image_encoder=encoder, prompt_encoder=prompt_encoder, mask_decoder=mask_decoder,
                    backbone=spec.name)


# The decoder tensors whose shape follows the number of mask tokens.
CLASS_HEAD_PREFIXES = ("mask_decoder.mask_tokens.", "mask_decoder.output_hypernetworks_mlps.",
                       "mask_decoder.iou_prediction_head.")


def _keep_fresh_class_heads(state: dict[str, torch.Tensor], parts: SAMParts) -> None:
    """Where the decoder's token count differs from the release, keep its own initialisation, in place.

    SAMed (Zhang & Liu, 2023; ``load_from`` in its ``build_sam.py``) loads a released checkpoint
    without ``mask_tokens``, ``output_hypernetworks_mlps`` and ``iou_prediction_head`` whenever the
    class count makes their shapes differ, so each class's token and hypernetwork MLP start from
    PyTorch's default initialisation. Copying released heads instead starts every class from a
    mask SAM drew over most of the image: on real MRI (docs/evidence.md) that sent the first AdamW
    steps to predicting background everywhere, with the softmax saturated (80 steps did not
    recover; with SAMed's initialisation the same 80 steps found two structures). A decoder
    with the released count (3 classes and background) loads them, as SAMed's strict load does.
    """
    released = state["mask_decoder.mask_tokens.weight"].shape[0]
    if released == parts.mask_decoder.num_mask_tokens:
        return
    for key in [k for k in state if k.startswith(CLASS_HEAD_PREFIXES)]:
        del state[key]
    own = parts.mask_decoder.state_dict(prefix="mask_decoder.")
    state.update({k: v.clone() for k, v in own.items() if k.startswith(CLASS_HEAD_PREFIXES)})


def load_released_checkpoint(parts: SAMParts, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load a released SAM / MedSAM / LiteMedSAM state_dict into ``parts`` with ``strict=True``.

    Input-size dependent encoder tensors are resized first; a decoder with another number of mask
    tokens than the release keeps its own class heads (:func:`_keep_fresh_class_heads`). A
    checkpoint of another backbone raises :class:`WeightsError` naming the mismatching tensors.
    """
    state = {k: v for k, v in state_dict.items()}
    prefix = "image_encoder."
    encoder_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not encoder_state:
        raise WeightsError(f"{source} has no 'image_encoder.*' tensors: it is not a SAM-style checkpoint")
    expected = parts.state_dict()
    missing_encoder = sorted(set(parts.image_encoder.state_dict()) - set(encoder_state))
    if missing_encoder:
        raise WeightsError(f"{source} does not fit backbone {parts.backbone!r}: it lacks "
                           f"{len(missing_encoder)} encoder tensors (e.g. {missing_encoder[:3]}); "
                           f"was it made for another backbone? Pass the matching --backbone")
    try:
        adapted = parts.image_encoder.adapt_state_dict(encoder_state)
    except (RuntimeError, ValueError) as error:
        raise WeightsError(f"{source} does not fit backbone {parts.backbone!r}: {error}") from error
    state.update({prefix + k: v for k, v in adapted.items()})
    _keep_fresh_class_heads(state, parts)
    wrong_shape = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                   if k in state and state[k].shape != v.shape]
    if wrong_shape:
        raise WeightsError(f"{source} does not fit backbone {parts.backbone!r}: {len(wrong_shape)} tensors have "
                           f"other shapes (e.g. {wrong_shape[:3]}); was it made for another backbone?")
    try:
        parts.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise WeightsError(f"{source} does not fit backbone {parts.backbone!r}: {error}") from error
