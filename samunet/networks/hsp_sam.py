"""HSP-SAM: Hierarchical Self-Prompting SAM, prompt-free (Q&A prompt pairs, hierarchical fusion).

Frozen image encoder with rank-32 LoRA on q and v of every attention layer. Per hierarchy level
j (the blocks up to each global-attention block of a ViT; each attention stage of TinyViT):
c learnable Q prompts (c = the number of foreground classes by default) that take part in the
level's attention, A_j = MLP_j(f_j(Q_j)) as the
level's decoder prompts (``modules/qa_prompts.py``), a neck to the decoder width and a
mask-decoder block, fused top-down by eq. 6 (``modules/hierarchical_fusion.py``). The masks
(one mask token per class, background included) come from level 1's decoder, upsampled to the
input size. Flags switch off the Q&A pairs, the hierarchy and the skip connections (Table 5).
See docs/methods/hsp_sam.md for every choice the paper leaves open.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from samunet.backbones.neck import sam_neck
from samunet.errors import ConfigurationError
from samunet.modules.decoders import decode_masks, default_dense_prompt, empty_sparse_prompts, freeze_iou_head
from samunet.modules.hierarchical_fusion import ImageSideDecoderBlock, top_down_fusion
from samunet.modules.lora import add_qv_lora
from samunet.modules.qa_prompts import QAPrompts
from samunet.networks.base import SAMNetworkConfig, SAMSegmentationNetwork


class HSPSAMNetwork(SAMSegmentationNetwork):
    """(B, C, S, S) -> class logits (B, K, S, S).

    ``num_prompts`` (c) defaults to the number of segmentation targets, the foreground classes
    K - 1 (the paper sets the quantity "to match the number of segmentation targets c"), and can be
    set independently of it.
    ``hierarchical=False`` keeps only level N (the encoder's own neck and embedding, SAM's
    decoder); ``skip_connections`` (the ``+ out_N`` term) needs the hierarchy.
    """

    def __init__(self, config: SAMNetworkConfig, *, lora_rank: int = 32, num_prompts: int | None = None,
                 qa_prompts: bool = True, hierarchical: bool = True, skip_connections: bool = True) -> None:
        super().__init__(config, num_mask_tokens=config.num_classes)
        if skip_connections and not hierarchical:
            raise ConfigurationError("skip connections join hierarchy levels: they need hierarchical=True")
        encoder = self.image_encoder
        level_dims = encoder.prompt_level_dims
        # indexes into the encoder's prompt levels, shallowest first; the last one is level N
        self.levels = tuple(range(len(level_dims))) if hierarchical else (len(level_dims) - 1,)
        self.skip_connections = skip_connections
        decoder_dim = self.mask_decoder.transformer_dim
        self.lora = add_qv_lora(encoder.qkv_projections(), rank=lora_rank)
        self.qa_prompts: nn.ModuleList | None = None
        if qa_prompts:
            count = num_prompts if num_prompts is not None else max(config.num_classes - 1, 1)
            self.qa_prompts = nn.ModuleList(
                QAPrompts(num_prompts=count, encoder_dim=level_dims[j], decoder_dim=decoder_dim)
                for j in self.levels)
        # neck_N is the encoder's own (frozen) neck; levels 1..N-1 get new ones
        self.level_necks = nn.ModuleList(sam_neck(level_dims[j], decoder_dim) for j in self.levels[:-1])
        # Dec_1 is SAM's mask decoder (``mask_decoder``); levels 2..N have image-side blocks
        self.level_decoders = nn.ModuleList(
            ImageSideDecoderBlock(transformer=self.mask_decoder.transformer, num_mask_tokens=config.num_classes,
                                  dim=decoder_dim)
            for _ in self.levels[1:])
        self._copy_pretrained_into_levels()
        self.set_trainable()

    def set_trainable(self) -> None:
        self.train_only(self.lora, self.qa_prompts, self.level_necks, self.level_decoders, self.mask_decoder,
                        self.prompt_encoder.no_mask_embed)
        freeze_iou_head(self.mask_decoder)

    def load_pretrained(self, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Load the released checkpoint, then start every level's decoder block and neck from it."""
        super().load_pretrained(state_dict, source)
        self._copy_pretrained_into_levels()

    @torch.no_grad()
    def _copy_pretrained_into_levels(self) -> None:
        """Decoder blocks of levels 2..N copy level 1's transformer and tokens; each new neck copies
        the encoder neck's tensors of the same shape (all of them for a ViT, whose levels share
        its width)."""
        for block in self.level_decoders:
            block.copy_from(self.mask_decoder)
        source = self.image_encoder.neck.state_dict()
        for neck in self.level_necks:
            fitting = {k: v for k, v in source.items() if neck.state_dict()[k].shape == v.shape}
            neck.load_state_dict(fitting, strict=False)

    def answer_prompts(self, batch: int) -> list[torch.Tensor]:
        """Per used level, the decoder's sparse prompts (B, c, 256): A_j, or none without Q&A."""
        if self.qa_prompts is None:
            return [empty_sparse_prompts(self.prompt_encoder, batch) for _ in self.levels]
        return [qa.answers().unsqueeze(0).expand(batch, -1, -1) for qa in self.qa_prompts]

    def query_prompts(self) -> list[torch.Tensor | None] | None:
        """The encoder's ``prompt_tokens``: Q_j at used levels, None elsewhere; None without Q&A."""
        if self.qa_prompts is None:
            return None
        queries: list[torch.Tensor | None] = [None] * len(self.image_encoder.prompt_level_dims)
        for j, qa in zip(self.levels, self.qa_prompts):
            queries[j] = qa.queries
        return queries

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        encoded = self.image_encoder(self.input_stage(x), prompt_tokens=self.query_prompts())
        grid = encoded.embedding.shape[-2:]
        projected = []
        for j, neck in zip(self.levels, self.level_necks):
            feature = encoded.features[self.image_encoder.prompt_level_features[j]]
            if feature.shape[-2:] != grid:  # TinyViT's finer stages: average-pool to the embedding grid
                feature = F.adaptive_avg_pool2d(feature, grid)
            projected.append(neck(feature))
        projected.append(encoded.embedding)  # neck_N(emb_N)
        answers = self.answer_prompts(x.shape[0])
        image_pe = self.prompt_encoder.get_dense_pe()
        dense = default_dense_prompt(self.prompt_encoder)
        level_one_input = top_down_fusion(
            projected, lambda level, fused: self.level_decoders[level - 1](fused, image_pe, answers[level], dense),
            skip_connections=self.skip_connections)
        logits = decode_masks(self.mask_decoder, level_one_input, image_pe, answers[0], dense).masks
        if logits.shape[-2:] != x.shape[-2:]:
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits
