"""Self-Prompt-SAM (Xie et al.): SAM that prompts itself, on stacks of D adjacent slices.

Input (B, C, D, S, S), one stack per sample; SAM sees the N = B * D slices as a batch with
volume b's slices at rows b * D ... b * D + D - 1, and every depth-aware module groups those
rows back into stacks. Path of one stack (see docs/methods/self_prompt_sam.md):

1. input stage (window to [0, 1]) + :class:`~samunet.modules.channel_adapters.MAdapter` -> RGB;
2. frozen image encoder with a depth positional embedding added after the patch embedding (the
   encoder's ``after_patch_embed`` slot) and a :class:`~samunet.modules.depth_adapters.DepthAdapter`
   in every transformer block (its ``adapters`` slot), after the attention (serial, with its skip)
   and in parallel to the MLP;
3. a prompt generator (MSPGenerator, or the stacked-CNN ablation) on 5 encoder maps (feature taps)
   -> auxiliary K-class logits at every level (deep supervision);
4. per class, the background included: box, distance-transform point and mask prompt from the
   finest auxiliary logits, encoded by SAM's frozen prompt encoder;
5. SAM's frozen mask decoder, once per class, with a depth positional embedding on the image
   positional encoding and depth adapters in its two-way blocks (passed to the decoder run, see
   :mod:`samunet.modules.two_way_transformer`) -> one binary logit map per class;
6. :class:`~samunet.modules.channel_adapters.MCAdapter` (or the plain softmax of the K logits) ->
   K-class logits.

``forward`` returns (B, K, D, S, S) logits, or with deep supervision the list [final output,
generator outputs finest to coarsest], each (B, K, D, S/s, S/s).

Training phases (Appendix D): in phase 1 only the generator's loss trains, so the modules after the
prompts (decoder depth embedding and adapters, MC-Adapter) cannot learn and are frozen
(``set_trainable(train_decoder=False)``); phase 2 trains them too.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from samunet.backbones.base import EncoderOutput, fill_slots
from samunet.backbones.catalog import get_backbone_spec
from samunet.errors import ConfigurationError
from samunet.modules.channel_adapters import MAdapter, MCAdapter
from samunet.modules.decoders import decode_masks
from samunet.modules.depth_adapters import ADAPTER_MODES, DepthAdapter, DepthPositionalEmbedding
from samunet.modules.prompt_generators import MSPGenerator, StackedCNNPromptGenerator
from samunet.modules.self_prompts import PROMPT_KINDS, encode_class_prompts, prompts_from_auxiliary_logits
from samunet.modules.two_way_transformer import TwoWayLayerAdapters
from samunet.networks.base import SAMNetworkConfig, SAMSegmentationNetwork

PROMPT_GENERATORS = {"msp": MSPGenerator, "stacked_cnn": StackedCNNPromptGenerator}


class SelfPromptSAMNetwork(SAMSegmentationNetwork):
    """(B, C, D, S, S) -> (B, K, D, S, S) logits; the options select the ablations of Table 4.

    ``prompt_generator``: "msp" or "stacked_cnn"; ``adapter``: None or one of
    :data:`~samunet.modules.depth_adapters.ADAPTER_MODES`; ``depth_pos_embed``, ``madapter``,
    ``mc_adapter``: on/off; ``prompts``: the prompt kinds used (Fig. 1). D is ``config.depth``.
    """

    def __init__(self, config: SAMNetworkConfig, *, prompt_generator: str = "msp", adapter: str | None = "dfused",
                 depth_pos_embed: bool = True, madapter: bool = True, mc_adapter: bool = True,
                 prompts: Sequence[str] = PROMPT_KINDS, generator_widths: Sequence[int] | None = None) -> None:
        depth = config.depth
        if config.num_classes < 2:
            raise ConfigurationError("Self-Prompt-SAM needs at least one foreground class")
        if depth < 1:
            raise ConfigurationError(f"the slice-stack depth must be >= 1, got {depth}")
        if prompt_generator not in PROMPT_GENERATORS:
            raise ConfigurationError(f"prompt_generator must be one of {sorted(PROMPT_GENERATORS)}")
        if adapter is not None and adapter not in ADAPTER_MODES:
            raise ConfigurationError(f"adapter must be None or one of {ADAPTER_MODES}, not {adapter!r}")
        unknown = sorted(set(prompts) - set(PROMPT_KINDS))
        if unknown or not prompts:
            raise ConfigurationError(f"prompts must be a non-empty subset of {PROMPT_KINDS}, got {list(prompts)}")
        super().__init__(config)
        spec = get_backbone_spec(config.backbone)
        encoder = self.image_encoder
        self.stack_depth = depth
        self.prompt_kinds = tuple(kind for kind in PROMPT_KINDS if kind in prompts)
        self.madapter = MAdapter(config.input_channels) if madapter else None
        self.mc_adapter = MCAdapter(config.num_classes) if mc_adapter else None

        blocks = encoder.transformer_blocks()
        self.encoder_adapters = nn.ModuleList()
        self.decoder_adapters = nn.ModuleList()
        if adapter is not None:
            for block, dim in blocks:
                serial, parallel = (DepthAdapter(dim=dim, depth=depth, mode=adapter) for _ in range(2))
                fill_slots(block, after_attention=serial, parallel_mlp=parallel.delta)
                self.encoder_adapters.extend([serial, parallel])
            for _ in self.mask_decoder.transformer.layers:
                # (image side, serial after the image-to-token attention; token side, parallel to the MLP);
                # both outputs go straight into the block's LayerNorm (norm4, norm3)
                self.decoder_adapters.extend(DepthAdapter(dim=spec.prompt_dim, depth=depth, mode=adapter,
                                                          normalized_output=True) for _ in range(2))

        self.encoder_depth_embedding = self.decoder_depth_embedding = None
        if depth_pos_embed:
            self.encoder_depth_embedding = DepthPositionalEmbedding(
                depth=depth, dim=encoder.feature_channels[0], channel_axis=encoder.token_channel_axis)
            fill_slots(encoder, after_patch_embed=self.encoder_depth_embedding)
            self.decoder_depth_embedding = DepthPositionalEmbedding(depth=depth, dim=spec.prompt_dim, channel_axis=1)

        # The generator's 5 maps: TinyViT's 4 stage outputs, or a plain ViT's outputs of the blocks
        # at quarter depths (for the released ViTs exactly the global-attention blocks), tapped
        # through the encoder's ``intermediates``; then the neck's image embedding.
        if spec.family == "tinyvit":
            self.generator_taps: tuple[int, ...] = ()
            channels = (*encoder.feature_channels, encoder.out_chans)
            strides = (*encoder.feature_strides, encoder.embedding_stride)
        else:
            self.generator_taps = tuple((i + 1) * len(blocks) // 4 - 1 for i in range(4))
            channels = tuple(blocks[i][1] for i in self.generator_taps) + (encoder.out_chans,)
            strides = (encoder.embedding_stride,) * 5
        self.prompt_generator = PROMPT_GENERATORS[prompt_generator](
            in_channels=channels, in_strides=strides, num_classes=config.num_classes, widths=generator_widths)
        self.set_trainable()

    def set_trainable(self, train_decoder: bool = True) -> None:
        """Everything of SAM frozen; the added modules train (the paper's "only add blocks"). Without
        ``train_decoder`` (phase 1) the modules after the prompts stay frozen too."""
        decoder_side = ((self.mc_adapter, self.decoder_adapters, self.decoder_depth_embedding) if train_decoder
                        else ())
        self.train_only(self.madapter, self.encoder_adapters, self.encoder_depth_embedding, self.prompt_generator,
                        *decoder_side)

    def deep_supervision_scales(self) -> list[list[float]]:
        """Final output at full size, then the generator's levels (depth is never downsampled)."""
        return [[1.0, 1.0, 1.0]] + [[1.0, 1.0 / s, 1.0 / s] for s in self.prompt_generator.level_strides]

    def encoder_input(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, S, S) nnU-Net-normalised -> the encoder's (N, 3, S, S) input."""
        unit = self.input_stage.window(images)
        rgb = self.input_stage.to_rgb(unit)
        if self.madapter is not None:
            rgb = rgb + self.madapter(unit)
        return self.input_stage.normalize_pixels(rgb)

    def generator_features(self, encoded: EncoderOutput) -> list[torch.Tensor]:
        """The prompt generator's 5 maps, shallow to deep, each (N, C_i, h_i, w_i)."""
        maps = encoded.intermediates if self.generator_taps else encoded.features
        return [*maps, encoded.embedding]

    def decoder_layer_adapters(self) -> list[TwoWayLayerAdapters] | None:
        """The depth adapters of each two-way block of the decoder, or None without adapters."""
        if not len(self.decoder_adapters):
            return None
        pairs = zip(self.decoder_adapters[0::2], self.decoder_adapters[1::2])
        return [TwoWayLayerAdapters(after_image_attention=image_side, parallel_mlp=token_side.delta)
                for image_side, token_side in pairs]

    def decode_classes(self, embedding: torch.Tensor, auxiliary: torch.Tensor) -> torch.Tensor:
        """Image embedding (N, C, h, w) and finest auxiliary logits (N, K, H, W) -> per-class binary
        logits (N, K, S, S), one decoder pass per class (background included)."""
        encoder = self.prompt_encoder
        prompts = prompts_from_auxiliary_logits(auxiliary, image_size=self.img_size,
                                                mask_size=tuple(encoder.mask_input_size))
        sparse, dense = encode_class_prompts(encoder, prompts, use_box="box" in self.prompt_kinds,
                                             use_point="point" in self.prompt_kinds,
                                             use_mask="mask" in self.prompt_kinds)
        classes, images = self.num_classes, embedding.shape[0]
        image_pe = encoder.get_dense_pe()  # (1, C, h, w)
        if self.decoder_depth_embedding is not None:  # one per slice: (N, C, h, w), then per class
            image_pe = self.decoder_depth_embedding(image_pe.expand(images, -1, -1, -1)).repeat(classes, 1, 1, 1)
        # class-major rows m = k * N + n, as encode_class_prompts orders them
        decoded = decode_masks(self.mask_decoder, embedding.repeat(classes, 1, 1, 1), image_pe, sparse, dense,
                               adapters=self.decoder_layer_adapters())
        logits = decoded.masks[:, 0].reshape(classes, images, *decoded.masks.shape[-2:]).transpose(0, 1)
        if logits.shape[-1] != self.img_size:
            logits = F.interpolate(logits, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        return logits

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        batch, channels, depth = x.shape[:3]
        if x.ndim != 5 or depth != self.stack_depth or x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected stacks (B, C, {self.stack_depth}, {self.img_size}, {self.img_size}), "
                             f"got {tuple(x.shape)}")
        images = x.transpose(1, 2).reshape(batch * depth, channels, *x.shape[-2:])
        encoded = self.image_encoder(self.encoder_input(images), intermediates=self.generator_taps)
        auxiliary = self.prompt_generator(self.generator_features(encoded))
        class_logits = self.decode_classes(encoded.embedding, auxiliary[0])
        output = self.mc_adapter(class_logits) if self.mc_adapter is not None else class_logits
        if not self.deep_supervision:
            return _to_stacks(output, batch)
        return [_to_stacks(output, batch)] + [_to_stacks(level, batch) for level in auxiliary]


def _to_stacks(logits: torch.Tensor, batch: int) -> torch.Tensor:
    """(B * D, K, H, W) -> (B, K, D, H, W)."""
    return logits.reshape(batch, -1, *logits.shape[1:]).transpose(1, 2)
