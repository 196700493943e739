"""samunet's SAM ViT encoder against segment-anything's ImageEncoderViT, and its adapters."""
from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from samunet.backbones.sam_vit import VIT_CONFIGS, SAMViTEncoder, build_vit_encoder
from samunet.sam_import import sam_modeling

SMALL = dict(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=14,
             out_chans=32)


def reference_encoder(img_size: int, **config) -> nn.Module:
    """segment-anything's encoder configured as build_sam does (LayerNorm eps 1e-6, rel pos)."""
    return sam_modeling().ImageEncoderViT(img_size=img_size, patch_size=16, mlp_ratio=4.0,
                                          norm_layer=partial(nn.LayerNorm, eps=1e-6),
                                          qkv_bias=True, use_rel_pos=True, **config)


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter (pos_embed and rel_pos too, which SAM zero-initialises) at random."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            is_norm_weight = param.ndim == 1 and name.endswith("weight")  # LayerNorm scales
            param.copy_(1 + 0.1 * noise if is_norm_weight else 0.2 * noise)
    return model


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


@pytest.mark.parametrize("img_size", [1024, 256])
def test_matches_segment_anything(img_size):
    torch.manual_seed(0)
    reference = randomize_(reference_encoder(img_size, **SMALL)).eval()
    ours = SAMViTEncoder(img_size=img_size, **SMALL).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(1, 3, img_size, img_size)
    with torch.no_grad():
        expected = reference(x)
        output = ours(x)
    assert output.embedding.shape == expected.shape == (1, 32, img_size // 16, img_size // 16)
    assert (output.embedding - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("variant", ["vit_b", "vit_l", "vit_h"])
def test_state_dict_layout_matches_official(variant):
    config = VIT_CONFIGS[variant]
    with torch.device("meta"):
        ours = build_vit_encoder(variant, 1024)
        reference = reference_encoder(1024, embed_dim=config.embed_dim, depth=config.depth,
                                      num_heads=config.num_heads, window_size=config.window_size,
                                      global_attn_indexes=list(config.global_attn_indexes),
                                      out_chans=config.out_chans)
    assert list(shapes(ours)) == list(shapes(reference))
    assert shapes(ours) == shapes(reference)


def test_features_one_per_global_block():
    encoder = build_vit_encoder("vit_test", 96)  # 6x6 tokens: windows of 4 need padding
    output = encoder(torch.randn(2, 3, 96, 96))
    assert output.embedding.shape == (2, 32, 6, 6)
    assert len(output.features) == len(encoder.global_attn_indexes) == 2
    assert all(f.shape == (2, 32, 6, 6) for f in output.features)
    assert encoder.feature_channels == (32, 32) and encoder.feature_strides == (16, 16)
    assert encoder.embedding_stride == 16 and encoder.embedding_size == 6


def test_features_are_global_block_outputs():
    encoder = randomize_(build_vit_encoder("vit_test", 64))
    x = torch.randn(1, 3, 64, 64)
    captured = {}
    for index in encoder.global_attn_indexes:
        encoder.blocks[index].register_forward_hook(
            lambda module, args, out, index=index: captured.__setitem__(index, out))
    output = encoder(x)
    for feature, index in zip(output.features, encoder.global_attn_indexes):
        assert torch.equal(feature, captured[index].permute(0, 3, 1, 2))


def test_gradients_reach_every_parameter():
    encoder = randomize_(build_vit_encoder("vit_test", 64))
    output = encoder(torch.randn(1, 3, 64, 64))
    (output.embedding.square().mean() + sum(f.mean() for f in output.features)).backward()
    assert all(p.grad is not None for p in encoder.parameters())


def test_adapt_state_dict_resizes_for_smaller_inputs():
    pretrained = randomize_(SAMViTEncoder(img_size=1024, **SMALL)).state_dict()
    small = SAMViTEncoder(img_size=256, **SMALL)
    adapted = small.adapt_state_dict(pretrained)
    small.load_state_dict(adapted, strict=True)
    head_dim = SMALL["embed_dim"] // SMALL["num_heads"]
    assert adapted["pos_embed"].shape == (1, 16, 16, 64)
    for axis in "hw":
        assert adapted[f"blocks.1.attn.rel_pos_{axis}"].shape == (31, head_dim)  # global
        assert adapted[f"blocks.0.attn.rel_pos_{axis}"] is pretrained[f"blocks.0.attn.rel_pos_{axis}"]
    assert adapted["blocks.0.attn.qkv.weight"] is pretrained["blocks.0.attn.qkv.weight"]
    small(torch.randn(1, 3, 256, 256))


def test_adapt_state_dict_is_noop_at_the_same_size():
    encoder = randomize_(SAMViTEncoder(img_size=256, **SMALL))
    state = encoder.state_dict()
    adapted = encoder.adapt_state_dict(state)
    assert adapted.keys() == state.keys()
    assert all(adapted[k] is state[k] for k in state)


def test_adapt_state_dict_keeps_a_constant_field_constant():
    pretrained = SAMViTEncoder(img_size=1024, **SMALL).state_dict()
    pretrained["pos_embed"] = torch.full_like(pretrained["pos_embed"], 0.7)
    pretrained["blocks.1.attn.rel_pos_h"] = torch.full_like(pretrained["blocks.1.attn.rel_pos_h"], -0.3)
    adapted = SAMViTEncoder(img_size=512, **SMALL).adapt_state_dict(pretrained)
    assert adapted["pos_embed"].shape == (1, 32, 32, 64)
    assert torch.allclose(adapted["pos_embed"], torch.tensor(0.7))
    assert torch.allclose(adapted["blocks.1.attn.rel_pos_h"], torch.tensor(-0.3))


def test_adapted_rel_pos_matches_segment_anything_on_the_fly_resizing():
    """SAM interpolates a too-long rel-pos table at run time; adapt_state_dict does it ahead."""
    pretrained = randomize_(SAMViTEncoder(img_size=1024, **SMALL)).state_dict()
    ours = SAMViTEncoder(img_size=256, **SMALL).eval()
    ours.load_state_dict(ours.adapt_state_dict(pretrained), strict=True)
    reference = reference_encoder(256, **SMALL).eval()
    state = dict(pretrained, pos_embed=ours.pos_embed.detach())
    for axis in "hw":  # SAM keeps the 1024-size (127-row) tables of its global block
        setattr(reference.blocks[1].attn, f"rel_pos_{axis}", nn.Parameter(state[f"blocks.1.attn.rel_pos_{axis}"]))
    reference.load_state_dict(state, strict=True)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert (ours(x).embedding - reference(x)).abs().max().item() < 1e-4


class AddToChannels(nn.Module):
    """Wraps a qkv linear like LoRA does and adds ``delta`` to some of its output channels."""

    def __init__(self, linear: nn.Linear, channels: torch.Tensor, delta: torch.Tensor) -> None:
        super().__init__()
        self.linear, self.channels, self.delta = linear, channels, delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x).clone()
        out[..., self.channels] += self.delta
        return out


def test_qkv_projections_point_at_q_and_v():
    encoder = randomize_(build_vit_encoder("vit_test", 64))
    projections = encoder.qkv_projections()
    assert len(projections) == VIT_CONFIGS["vit_test"].depth
    dim = VIT_CONFIGS["vit_test"].embed_dim
    for projection, block in zip(projections, encoder.blocks):
        assert projection.owner is block.attn and isinstance(projection.owner.qkv, nn.Linear)
        assert torch.equal(projection.q_channels, torch.arange(0, dim))
        assert torch.equal(projection.v_channels, torch.arange(2 * dim, 3 * dim))
        assert not set(projection.q_channels.tolist()) & set(projection.v_channels.tolist())

    attn = projections[1].owner  # a global block
    x = torch.randn(1, 4, 4, dim)
    delta = torch.randn(dim)
    with torch.no_grad():
        plain = attn(x)
        linear = attn.qkv
        # a constant shift of every value shifts the output by proj(shift) (softmax rows sum to 1)
        attn.qkv = AddToChannels(linear, projections[1].v_channels, delta)
        assert torch.allclose(attn(x), plain + delta @ attn.proj.weight.T, atol=1e-5)
        # a constant shift of every key leaves softmax unchanged: k sits between q and v
        attn.qkv = AddToChannels(linear, torch.arange(dim, 2 * dim), delta)
        assert torch.allclose(attn(x), plain, atol=1e-5)
        attn.qkv = AddToChannels(linear, projections[1].q_channels, delta)
        assert not torch.allclose(attn(x), plain, atol=1e-3)
        attn.qkv = linear

    output = encoder(torch.randn(1, 3, 64, 64)).embedding
    encoder.blocks[0].attn.qkv = AddToChannels(encoder.blocks[0].attn.qkv, projections[0].v_channels, delta)
    assert not torch.allclose(encoder(torch.randn(1, 3, 64, 64)).embedding, output)


@pytest.mark.parametrize("img_size", [100, 0, 1000])
def test_bad_img_size_is_rejected(img_size):
    with pytest.raises(ValueError, match="multiple"):
        build_vit_encoder("vit_test", img_size)


def test_unknown_variant_lists_the_known_ones():
    with pytest.raises(ValueError, match="vit_b.*vit_l.*vit_h"):
        build_vit_encoder("vit_x", 256)


def test_wrong_input_size_is_rejected():
    with pytest.raises(ValueError, match="expected input"):
        build_vit_encoder("vit_test", 64)(torch.zeros(1, 3, 96, 96))

