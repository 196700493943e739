"""The backbones samunet knows, registered by name in ``samunet.registry.BACKBONES``.

Architecture numbers live in the builders of ``sam_vit`` and ``tiny_vit``; this table adds what
planning and loading need: input sizes, the pixel normalisation of the default weights, and the
width of the prompt encoder / mask decoder.
"""
from __future__ import annotations

from functools import partial

from samunet.backbones.base import BackboneSpec, SAMImageEncoder
from samunet.errors import ConfigurationError
from samunet.registry import BACKBONES


def _vit(variant: str, img_size: int) -> SAMImageEncoder:
    from samunet.backbones.sam_vit import build_vit_encoder
    return build_vit_encoder(variant, img_size)


def _tinyvit(variant: str, img_size: int) -> SAMImageEncoder:
    from samunet.backbones.tiny_vit import build_tinyvit_encoder
    return build_tinyvit_encoder(variant, img_size)


_SPECS = (
    BackboneSpec("litemedsam", partial(_tinyvit, "litemedsam"), default_img_size=256,
                 allowed_img_sizes=(), size_multiple=16, pixel_normalization="unit",
                 default_weights="litemedsam", family="tinyvit"),
    BackboneSpec("vit_b", partial(_vit, "vit_b"), default_img_size=256, allowed_img_sizes=(224, 256, 512, 1024),
                 size_multiple=16, pixel_normalization="imagenet", default_weights="sam_vit_b"),
    BackboneSpec("vit_l", partial(_vit, "vit_l"), default_img_size=256, allowed_img_sizes=(224, 256, 512, 1024),
                 size_multiple=16, pixel_normalization="imagenet", default_weights="sam_vit_l"),
    BackboneSpec("vit_h", partial(_vit, "vit_h"), default_img_size=256, allowed_img_sizes=(224, 256, 512, 1024),
                 size_multiple=16, pixel_normalization="imagenet", default_weights="sam_vit_h"),
    # tiny random configurations for tests: no pretrained weights exist for them. mask_in_chans stays SAM's 16:
    # the mask prompt's first layer has mask_in_chans // 4 channels and a LayerNorm over them, so with 4 (one
    # channel) every mask prompt would encode to the same embedding.
    BackboneSpec("vit_test", partial(_vit, "vit_test"), default_img_size=64, allowed_img_sizes=(),
                 size_multiple=16, pixel_normalization="imagenet", default_weights=None,
                 prompt_dim=32, decoder_mlp_dim=64, decoder_heads=2, mask_in_chans=16),
    BackboneSpec("tinyvit_test", partial(_tinyvit, "tinyvit_test"), default_img_size=64, allowed_img_sizes=(),
                 size_multiple=16, pixel_normalization="unit", default_weights=None, family="tinyvit",
                 prompt_dim=32, decoder_mlp_dim=64, decoder_heads=2, mask_in_chans=16),
)
for _spec in _SPECS:
    BACKBONES.register(_spec.name)(_spec)


def get_backbone_spec(name: str) -> BackboneSpec:
    """The spec of backbone ``name``; an unknown name raises KeyError listing the known ones."""
    return BACKBONES.get(name)


def check_img_size(spec: BackboneSpec, img_size: int) -> None:
    """Raise ConfigurationError when ``img_size`` is not an input size backbone ``spec`` supports."""
    if spec.allowed_img_sizes and img_size not in spec.allowed_img_sizes:
        raise ConfigurationError(f"backbone {spec.name} runs at input sizes {spec.allowed_img_sizes}, not {img_size}; "
                         f"choose one with --image-size")
    if img_size % spec.size_multiple:
        raise ConfigurationError(f"backbone {spec.name} needs an input size that is a multiple of "
                         f"{spec.size_multiple}, not {img_size}; choose one with --image-size")
