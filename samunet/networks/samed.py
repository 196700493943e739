"""Prompt-free SAM with LoRA (SAMed, Zhang & Liu 2023): samunet's baseline network.

Frozen image encoder with rank-r LoRA on q and v of every attention layer, the prompt
encoder's learned 'no mask' embedding as a trainable default prompt, and SAM's mask decoder
with one mask token per output class (background included), trained in full.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from samunet.modules.decoders import decode_masks, default_dense_prompt, empty_sparse_prompts, freeze_iou_head
from samunet.modules.lora import add_qv_lora
from samunet.networks.base import SAMNetworkConfig, SAMSegmentationNetwork


class SAMedNetwork(SAMSegmentationNetwork):
    """(B, C, S, S) -> class logits (B, K, S, S)."""

    def __init__(self, config: SAMNetworkConfig, *, lora_rank: int = 4) -> None:
        super().__init__(config, num_mask_tokens=config.num_classes)
        self.lora = add_qv_lora(self.image_encoder.qkv_projections(), rank=lora_rank)
        self.set_trainable()

    def set_trainable(self) -> None:
        self.train_only(self.lora, self.mask_decoder, self.prompt_encoder.no_mask_embed)
        freeze_iou_head(self.mask_decoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        embedding = self.image_encoder(self.input_stage(x)).embedding
        decoded = decode_masks(self.mask_decoder, embedding, self.prompt_encoder.get_dense_pe(),
                               empty_sparse_prompts(self.prompt_encoder, x.shape[0]),
                               default_dense_prompt(self.prompt_encoder))
        logits = decoded.masks
        if logits.shape[-2:] != x.shape[-2:]:
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits
