"""H-SAM (Cheng et al., CVPR 2024): prompt-free SAM with two-stage hierarchical decoding.

- Image encoder frozen, LoRA (rank 4) on q and v of every attention layer; the prompt encoder's
  'no mask' embedding is the trainable default prompt (as in SAMed, :mod:`samunet.networks.samed`).
- Stage 1: SAM's mask decoder with one mask token per class (background included) -> prior logits
  at the decoder's native resolution, 4x the embedding grid (1/4 of the input for a ViT, the full
  input for LiteMedSAM's TinyViT). It also yields the mask feature (class tokens times the
  decoder's image tokens, before upsampling) and its pixel decoder's features.
- Stage 2: a second SAM-shaped decoder, initialised from stage 1's weights after pretrained
  loading, with CMAttn on its input embedding (:mod:`samunet.modules.cmattn`), mask-guided
  token-to-image attention driven by stage 1's probabilities (:mod:`samunet.modules.mask_attention`)
  and the hierarchical pixel decoder to full resolution (:mod:`samunet.modules.pixel_decoder`).
- Output: the log of the mean of both stages' softmax probabilities (stage 1 upsampled), so
  nnU-Net's softmax/argmax gives the averaged decision (Sec. 3.5); with ``deep_supervision`` the
  list [that average, stage-2 logits (full), stage-1 logits (native)]: nnU-Net validates and ranks
  checkpoints on the first entry, so it rates what is deployed, and the loss uses the other two.
- In training the forward takes the label map too: CMAttn's noise (Eq. 1) is drawn by each pixel's
  ground-truth class.

Each of the three stage-2 parts can be switched off for the paper's Tables 4 and 5.
"""
from __future__ import annotations

import copy
import logging
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from samunet.errors import ConfigurationError
from samunet.modules.cmattn import ClassBalancedMaskAttention
from samunet.modules.decoders import (decoder_tokens, default_dense_prompt, empty_sparse_prompts, freeze_iou_head,
                                      hypernetwork_masks)
from samunet.modules.lora import add_qv_lora
from samunet.modules.mask_attention import MASK_ATTENTION_MODES
from samunet.modules.pixel_decoder import HierarchicalPixelDecoder, sam_upscaling_levels
from samunet.modules.two_way_transformer import image_tokens_to_grid, run_two_way_transformer
from samunet.networks.base import SAMNetworkConfig, SAMSegmentationNetwork
from samunet.sam_import import sam_modeling

logger = logging.getLogger(__name__)


class StageOneOutput(NamedTuple):
    """logits: (B, K, 4h, 4w); mask_feature: (B, K, h, w); levels: pixel-decoder features
    ((B, C/4, 2h, 2w), (B, C/8, 4h, 4w))."""

    logits: torch.Tensor
    mask_feature: torch.Tensor
    levels: tuple[torch.Tensor, torch.Tensor]


def decode_stage_one(decoder: nn.Module, image_embedding: torch.Tensor, image_pe: torch.Tensor,
                     sparse_prompts: torch.Tensor, dense_prompt: torch.Tensor) -> StageOneOutput:
    """SAM's mask decoder with every mask token read out, plus what stage 2 needs from it.

    image_embedding: (B, C, h, w); image_pe, dense_prompt: (1, C, h, w); sparse_prompts: (B, N, C).
    """
    batch, _, height, width = image_embedding.shape
    hidden, image_tokens = run_two_way_transformer(decoder.transformer, image_embedding + dense_prompt,
                                                   image_pe.expand(batch, -1, -1, -1),
                                                   decoder_tokens(decoder, sparse_prompts))
    class_tokens = hidden[:, 1:1 + decoder.num_mask_tokens]
    mask_feature = (class_tokens @ image_tokens.transpose(1, 2)).view(batch, -1, height, width)
    grid = image_tokens_to_grid(image_tokens, height, width)
    levels = sam_upscaling_levels(decoder.output_upscaling, grid)
    logits = hypernetwork_masks(decoder.output_hypernetworks_mlps, class_tokens, levels[1])
    return StageOneOutput(logits=logits, mask_feature=mask_feature, levels=levels)


class HSAMStageTwoDecoder(nn.Module):
    """Stage 2: SAM-shaped decoder guided by stage 1 -> (B, K, H2, W2) logits.

    H2 = 4h * 2**num_upsamplings with the hierarchical pixel decoder, 4h without. Tensors named as
    in SAM's ``MaskDecoder`` (transformer, iou_token, mask_tokens, output_upscaling,
    output_hypernetworks_mlps) start from stage 1's in :meth:`initialise_from`.
    """

    def __init__(self, *, stage_one: nn.Module, num_classes: int, mask_attention: str,
                 hierarchical_pixel_decoder: bool, cmattn: bool, num_upsamplings: int,
                 max_noise_std: float = 0.1) -> None:
        super().__init__()
        if mask_attention not in MASK_ATTENTION_MODES:
            raise ConfigurationError(f"mask_attention must be one of {MASK_ATTENTION_MODES}, got {mask_attention!r}")
        dim = stage_one.transformer_dim
        self.mask_attention = mask_attention
        self.num_mask_tokens = stage_one.num_mask_tokens
        self.transformer = copy.deepcopy(stage_one.transformer)
        self.iou_token = copy.deepcopy(stage_one.iou_token)
        self.mask_tokens = copy.deepcopy(stage_one.mask_tokens)
        self.cmattn = (ClassBalancedMaskAttention(num_classes=num_classes, max_noise_std=max_noise_std)
                       if cmattn else None)
        if hierarchical_pixel_decoder:
            self.pixel_decoder = HierarchicalPixelDecoder(output_upscaling=copy.deepcopy(stage_one.output_upscaling),
                                                          dim=dim, num_upsamplings=num_upsamplings)
            mlp = sam_modeling().mask_decoder.MLP
            self.output_hypernetworks_mlps = nn.ModuleList(
                mlp(dim, dim, self.pixel_decoder.out_channels, 3) for _ in range(self.num_mask_tokens))
        else:
            self.pixel_decoder = None
            self.output_upscaling = copy.deepcopy(stage_one.output_upscaling)
            self.output_hypernetworks_mlps = copy.deepcopy(stage_one.output_hypernetworks_mlps)

    def initialise_from(self, stage_one: nn.Module) -> None:
        """Copy every stage-1 tensor whose name and shape stage 2 shares (the SAM-shaped parts; with the
        hierarchical pixel decoder its upscaling, and the hypernetwork MLPs' hidden layers)."""
        prefix = "pixel_decoder." if self.pixel_decoder is not None else ""
        renamed = {(prefix + k if k.startswith("output_upscaling.") else k): v
                   for k, v in stage_one.state_dict().items()}
        own = self.state_dict()
        shared = {k: v for k, v in renamed.items() if k in own and own[k].shape == v.shape}
        self.load_state_dict(shared, strict=False)
        logger.info("stage-2 decoder: %d of %d tensors initialised from stage 1", len(shared), len(own))

    def forward(self, image_embedding: torch.Tensor, image_pe: torch.Tensor, sparse_prompts: torch.Tensor,
                dense_prompt: torch.Tensor, stage_one: StageOneOutput,
                ground_truth: torch.Tensor | None = None) -> torch.Tensor:
        """ground_truth: the label map (B, 1, H, W) for CMAttn's training noise (None in eval)."""
        batch, _, height, width = image_embedding.shape
        if self.cmattn is not None:
            image_embedding = self.cmattn(image_embedding, stage_one.mask_feature, ground_truth)
        tokens = decoder_tokens(self, sparse_prompts)
        token_masks = (None if self.mask_attention == "none"
                       else self.token_masks(stage_one.logits, (height, width), tokens.shape[1]))
        hidden, image_tokens = run_two_way_transformer(
            self.transformer, image_embedding + dense_prompt, image_pe.expand(batch, -1, -1, -1), tokens,
            token_masks=token_masks, mask_mode=self.mask_attention)
        class_tokens = hidden[:, 1:1 + self.num_mask_tokens]
        grid = image_tokens_to_grid(image_tokens, height, width)
        if self.pixel_decoder is not None:
            features = self.pixel_decoder(grid, stage_one.levels)
        else:
            features = sam_upscaling_levels(self.output_upscaling, grid)[1]
        return hypernetwork_masks(self.output_hypernetworks_mlps, class_tokens, features)

    def token_masks(self, stage_one_logits: torch.Tensor, grid: tuple[int, int], num_tokens: int) -> torch.Tensor:
        """(B, K, 4h, 4w) stage-1 logits -> M (B, num_tokens, h*w): mask token i gets class i's
        probability resized (area average) to the key grid; the IoU token and prompts get ones."""
        probabilities = F.interpolate(stage_one_logits.softmax(dim=1), size=grid, mode="area").flatten(2)
        ones = probabilities.new_ones(probabilities.shape[0], 1, probabilities.shape[-1])
        rest = probabilities.new_ones(probabilities.shape[0], num_tokens - 1 - self.num_mask_tokens,
                                      probabilities.shape[-1])
        return torch.cat([ones, probabilities, rest], dim=1)


class HSAMNetwork(SAMSegmentationNetwork):
    """(B, C, S, S) -> log of the two stages' mean probabilities (B, K, S, S); with deep supervision
    [that, stage-2 logits (B, K, S, S), stage-1 logits (B, K, 4h, 4w)]."""

    def __init__(self, config: SAMNetworkConfig, *, lora_rank: int = 4, mask_attention: str = "learnable",
                 hierarchical_pixel_decoder: bool = True, cmattn: bool = True,
                 class_frequencies: list[float] | None = None, max_noise_std: float = 0.1) -> None:
        super().__init__(config, num_mask_tokens=config.num_classes)
        stride = self.image_encoder.embedding_stride
        num_upsamplings = round(math.log2(stride / 4)) if stride >= 4 else -1
        if num_upsamplings < 0 or 4 * 2 ** num_upsamplings != stride:
            raise ConfigurationError(f"H-SAM needs an embedding stride of 4 * 2**n, backbone {config.backbone} "
                                     f"has {stride}")
        self.stage_one_scale = 4 / stride
        self.lora = add_qv_lora(self.image_encoder.qkv_projections(), rank=lora_rank)
        self.stage2_decoder = HSAMStageTwoDecoder(
            stage_one=self.mask_decoder, num_classes=config.num_classes, mask_attention=mask_attention,
            hierarchical_pixel_decoder=hierarchical_pixel_decoder, cmattn=cmattn, num_upsamplings=num_upsamplings,
            max_noise_std=max_noise_std)
        if class_frequencies is not None:
            self.set_class_frequencies(class_frequencies)
        self.set_trainable()

    def deep_supervision_scales(self) -> list[list[float]]:
        """The deployed average and stage 2 at full resolution, stage 1 at the decoder's native scale
        (1/4 for a ViT)."""
        return [[1.0, 1.0], [1.0, 1.0], [self.stage_one_scale, self.stage_one_scale]]

    def set_class_frequencies(self, frequencies: torch.Tensor | list[float]) -> None:
        """Class frequencies of the training data for CMAttn's class-balanced noise (kept in the state_dict)."""
        if self.stage2_decoder.cmattn is None:
            logger.info("CMAttn is off: class frequencies are not used")
            return
        self.stage2_decoder.cmattn.set_class_frequencies(frequencies)

    def set_trainable(self) -> None:
        self.train_only(self.lora, self.mask_decoder, self.stage2_decoder, self.prompt_encoder.no_mask_embed)
        freeze_iou_head(self.mask_decoder)

    def load_pretrained(self, state_dict, source: str = "checkpoint") -> None:
        """Load the released SAM parts, then start stage 2 from the loaded stage-1 decoder."""
        super().load_pretrained(state_dict, source)
        self.stage2_decoder.initialise_from(self.mask_decoder)

    @staticmethod
    def average_stages(stage_two_logits: torch.Tensor, stage_one_logits: torch.Tensor) -> torch.Tensor:
        """log((softmax(stage 2) + softmax(stage 1 upsampled)) / 2), (B, K, S, S), in float32."""
        stage_one = F.interpolate(stage_one_logits.float(), size=stage_two_logits.shape[-2:], mode="bilinear",
                                  align_corners=False)
        mean = (stage_two_logits.float().softmax(dim=1) + stage_one.softmax(dim=1)) / 2
        return mean.clamp_min(1e-12).log()

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor | list[torch.Tensor]:
        """x: (B, C, S, S); target: the label map (B, 1, S, S), needed in training by CMAttn (Eq. 1)."""
        embedding = self.image_encoder(self.input_stage(x)).embedding
        image_pe = self.prompt_encoder.get_dense_pe()
        sparse = empty_sparse_prompts(self.prompt_encoder, x.shape[0])
        dense = default_dense_prompt(self.prompt_encoder)
        stage_one = decode_stage_one(self.mask_decoder, embedding, image_pe, sparse, dense)
        stage_two = self.stage2_decoder(embedding, image_pe, sparse, dense, stage_one, target)
        if stage_two.shape[-2:] != x.shape[-2:]:
            stage_two = F.interpolate(stage_two, size=x.shape[-2:], mode="bilinear", align_corners=False)
        deployed = self.average_stages(stage_two, stage_one.logits)
        if self.deep_supervision:
            return [deployed, stage_two, stage_one.logits]
        return deployed
