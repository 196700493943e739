"""SAM image encoders (ViT, LiteMedSAM's TinyViT), their catalog and the prompt/mask parts."""
from samunet.backbones.base import BackboneSpec, EncoderOutput, QKVProjection, SAMImageEncoder
from samunet.backbones.catalog import get_backbone_spec

__all__ = ["BackboneSpec", "EncoderOutput", "QKVProjection", "SAMImageEncoder", "get_backbone_spec"]
