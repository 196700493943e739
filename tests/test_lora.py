"""LoRA on q and v of a frozen encoder's attention (Hu et al., 2021), as SAMed, H-SAM and HSP-SAM use it.

LoRA lives in each attention layer's ``qkv`` adapter slot: the fused qkv linear W stays frozen and its
output gets ``scale * B_q A_q x`` at the q channels and ``scale * B_v A_v x`` at the v channels, which is
the same as running the layer with the merged weight ``W + scale * B A`` at those rows. The tests below
hold both tiny encoders (ViT: [q | k | v] blocks; TinyViT: q, k, v interleaved per head) to that.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from samunet.backbones.base import AttentionAdapters
from samunet.backbones.catalog import get_backbone_spec
from samunet.modules.lora import QVLoRA, add_qv_lora
from random_weights import randomize_

TINY_BACKBONES = ("vit_test", "tinyvit_test")
RANK, ALPHA = 2, 3.0  # scale alpha / rank = 1.5, so a forgotten scale shows


def tiny_encoder(backbone: str, img_size: int = 64) -> nn.Module:
    return randomize_(get_backbone_spec(backbone).build_encoder(img_size)).eval()


def with_lora(encoder: nn.Module, *, trained: bool = True) -> nn.ModuleList:
    """LoRA in every qkv slot of ``encoder``; ``trained``: its up-projections random (they start at 0)."""
    layers = add_qv_lora(encoder.qkv_projections(), rank=RANK, alpha=ALPHA)
    if trained:
        randomize_(layers, seed=1)
    return layers


def merge_(owner: nn.Module) -> nn.Module:
    """Empty ``owner``'s qkv slot and add its LoRA update to the qkv weight rows: W + scale * B A."""
    lora = owner.adapters.qkv
    owner.adapters = AttentionAdapters()
    with torch.no_grad():
        owner.qkv.weight[lora.q_channels] += lora.scale * lora.q_up.weight @ lora.q_down.weight
        owner.qkv.weight[lora.v_channels] += lora.scale * lora.v_up.weight @ lora.v_down.weight
    return owner


def merged_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` without LoRA whose attention layers carry LoRA's update in their weights."""
    merged = copy.deepcopy(module)
    for owner in merged.modules():
        if isinstance(getattr(owner, "adapters", None), AttentionAdapters) and owner.adapters.qkv is not None:
            merge_(owner)
    return merged


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_lora_starts_as_the_identity(backbone):
    encoder = tiny_encoder(backbone)
    plain = copy.deepcopy(encoder)
    layers = with_lora(encoder, trained=False)
    assert len(layers) == len(encoder.qkv_projections())
    assert all(torch.equal(layer.q_up.weight, torch.zeros_like(layer.q_up.weight)) for layer in layers)
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected, output = plain(image), encoder(image)
    assert torch.equal(output.embedding, expected.embedding)
    assert all(torch.equal(a, b) for a, b in zip(output.features, expected.features))


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_lora_adds_its_low_rank_update_to_q_and_v_and_leaves_k_unchanged(backbone):
    """Both of LoRA's paths (merged weight without autograd, addmm on the output with it)."""
    encoder = tiny_encoder(backbone)
    layers = with_lora(encoder)
    for projection, lora in zip(encoder.qkv_projections(), layers):
        owner = projection.owner
        seen = []  # TinyViT normalises x before the linear: record the linear's input
        owner.adapters = AttentionAdapters(qkv=lambda linear, inputs: seen.append(inputs) or lora(linear, inputs))
        x = torch.randn(2, 5, owner.qkv.in_features)
        for autograd in (False, True):
            with torch.set_grad_enabled(autograd):
                adapted = owner.project_qkv(x).detach()
                linear_input = seen[-1].detach()
                owner.adapters, saved = AttentionAdapters(), owner.adapters
                plain = owner.project_qkv(x).detach()
                owner.adapters = saved
            q, v = projection.q_channels, projection.v_channels
            k = torch.tensor(sorted(set(range(owner.qkv.out_features)) - set(q.tolist()) - set(v.tolist())))
            assert len(k) == len(q) == len(v)
            delta = adapted - plain
            assert torch.equal(delta[..., k], torch.zeros_like(delta[..., k]))
            scale = ALPHA / RANK
            with torch.no_grad():
                expected_q = scale * linear_input @ lora.q_down.weight.T @ lora.q_up.weight.T
                expected_v = scale * linear_input @ lora.v_down.weight.T @ lora.v_up.weight.T
            assert torch.allclose(delta[..., q], expected_q, atol=1e-5)
            assert torch.allclose(delta[..., v], expected_v, atol=1e-5)
            assert (delta[..., q].abs().amax(dim=(0, 1)) > 0).all() and (delta[..., v].abs().amax(dim=(0, 1)) > 0).all()


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_the_channels_lora_leaves_alone_are_the_keys_the_attention_uses(backbone):
    """A constant added to every key changes no softmax row, so an attention layer's output ignores a
    constant shift of its k channels but not of its v (or q) channels: this pins q_channels/v_channels
    to what each layout (ViT [q | k | v], TinyViT interleaved per head) really uses."""
    encoder = tiny_encoder(backbone)
    generator = torch.Generator().manual_seed(3)
    for projection in encoder.qkv_projections():
        owner = projection.owner
        grid = getattr(owner, "window_size", None) or (owner.rel_pos_h.shape[0] + 1) // 2  # one window
        x = torch.randn(2, grid, grid, owner.qkv.in_features, generator=generator)
        q, v = set(projection.q_channels.tolist()), set(projection.v_channels.tolist())
        k = sorted(set(range(owner.qkv.out_features)) - q - v)

        def shifted(channels):
            shift = torch.zeros(owner.qkv.out_features)
            shift[channels] = torch.randn(len(channels), generator=generator)
            owner.adapters = AttentionAdapters(qkv=lambda linear, inputs: linear(inputs) + shift)
            with torch.no_grad():
                out = owner(x)
            owner.adapters = AttentionAdapters()
            return out

        with torch.no_grad():
            plain = owner(x)
        assert torch.allclose(shifted(k), plain, atol=1e-5)
        assert not torch.allclose(shifted(sorted(v)), plain, atol=1e-3)
        assert not torch.allclose(shifted(sorted(q)), plain, atol=1e-3)


def prompts_for(encoder: nn.Module, batch: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return [torch.randn(batch, 3, dim, generator=generator) for dim in encoder.prompt_level_dims]


CALL_PATHS = {
    # (backbone, img_size, call): each runs an attention layer through one of its qkv call paths
    "vit_global_attention": ("vit_test", 64, lambda enc, x, p: enc.blocks[1](x)),
    "vit_windowed_attention_with_padding": ("vit_test", 96, lambda enc, x, p: enc.blocks[0](x)),
    "vit_global_attention_with_prompt_tokens": ("vit_test", 64, lambda enc, x, p: enc.blocks[1].forward_with_prompts(x, p)),
    "vit_windowed_attention_with_prompt_tokens": ("vit_test", 96, lambda enc, x, p: enc.blocks[0].forward_with_prompts(x, p)),
    "tinyvit_window_attention": ("tinyvit_test", 64, lambda enc, x, p: enc.layers[1].blocks[0].attn(x[:, :7, :7])),
    "tinyvit_padding_fill_token": ("tinyvit_test", 64, lambda enc, x, p: enc.layers[1].blocks[0].attn(x[:, :9, :9])),
    "tinyvit_window_attention_with_prompt_tokens": (
        "tinyvit_test", 64, lambda enc, x, p: enc.layers[1].blocks[0].attn.forward_with_prompts(x[:, :9, :9], p)),
}


@pytest.mark.parametrize("path", CALL_PATHS)
def test_lora_acts_on_every_qkv_call_path_as_its_merged_weight(path):
    """With LoRA in the slot every call path (plain, windowed, padded windows whose fill token is
    projected once, HSP-SAM's prompt tokens) computes what the layer with W + scale * B A computes."""
    backbone, img_size, call = CALL_PATHS[path]
    encoder = tiny_encoder(backbone, img_size)
    with_lora(encoder)
    merged = merged_copy(encoder)
    dim = encoder.transformer_blocks()[0][1]
    grid = img_size // 16 if backbone == "vit_test" else 9
    x = torch.randn(2, grid, grid, dim)
    prompts = torch.randn(2, 3, dim)
    with torch.no_grad():
        out, expected = call(encoder, x, prompts), call(merged, x, prompts)
        empty = copy.deepcopy(encoder)
        for projection in empty.qkv_projections():
            projection.owner.adapters = AttentionAdapters()
        without = call(empty, x, prompts)
    out, expected, without = (t if isinstance(t, tuple) else (t,) for t in (out, expected, without))
    for a, b, c in zip(out, expected, without):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
        assert not torch.allclose(a, c, atol=1e-3)  # the update matters on this path


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_lora_computes_the_same_update_with_and_without_autograd_and_trains_every_factor(backbone):
    """Without autograd LoRA runs the linear once with the merged weight; with autograd it adds the
    update to the frozen linear's output (one addmm). Both paths give the merged layer's output, and
    the addmm path's gradients reach A and B of q and v, and equal the merged weight's."""
    encoder = tiny_encoder(backbone, 96)
    layers = with_lora(encoder)
    image = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        without_autograd = encoder(image).embedding
    with_autograd = encoder(image).embedding
    assert torch.allclose(with_autograd, without_autograd, atol=1e-4)
    with_autograd.square().mean().backward()
    grads = [p.grad.clone() for p in layers.parameters()]
    assert all(g.abs().amax() > 0 for g in grads)
    layers.zero_grad()
    for layer in layers:  # the same loss through the merged weight, with autograd
        owner = next(p.owner for p in encoder.qkv_projections() if p.owner.adapters.qkv is layer)
        owner.adapters = AttentionAdapters(qkv=lambda linear, x, lora=layer: nn.functional.linear(
            x, lora.merged_weight(linear.weight), linear.bias))
    encoder(image).embedding.square().mean().backward()
    assert all(torch.allclose(g, p.grad, rtol=1e-3, atol=1e-6) for g, p in zip(grads, layers.parameters()))


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_encoder_with_lora_and_prompt_tokens_equals_its_merged_copy(backbone):
    encoder = tiny_encoder(backbone, 96)  # ViT: 6x6 tokens in windows of 4; TinyViT: 48/24 px grids in windows of 7
    with_lora(encoder)
    merged = merged_copy(encoder)
    image = torch.randn(2, 3, 96, 96)
    prompts = prompts_for(encoder)
    with torch.no_grad():
        out, expected = encoder(image, prompt_tokens=prompts), merged(image, prompt_tokens=prompts)
    assert torch.allclose(out.embedding, expected.embedding, atol=1e-4)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(out.prompts, expected.prompts))


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_lora_lives_outside_the_encoders_state_dict_which_keeps_the_released_names(backbone):
    encoder = tiny_encoder(backbone)
    released_names = list(encoder.state_dict())
    holder = nn.Module()
    holder.image_encoder = encoder
    holder.lora = with_lora(encoder)
    state = holder.state_dict()
    assert list(encoder.state_dict()) == released_names
    assert [k for k in state if k.startswith("image_encoder.")] == [f"image_encoder.{k}" for k in released_names]
    lora_keys = [k for k in state if not k.startswith("image_encoder.")]
    assert lora_keys and all(k.startswith("lora.") for k in lora_keys)
    assert not {id(p) for p in holder.lora.parameters()} & {id(p) for p in encoder.parameters()}
    # a released (adapter-free) encoder state loads strictly into the encoder that carries LoRA
    encoder.load_state_dict(get_backbone_spec(backbone).build_encoder(64).state_dict(), strict=True)


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_a_filled_qkv_slot_is_refused_and_keeps_its_adapter(backbone):
    encoder = tiny_encoder(backbone)
    first = with_lora(encoder)
    with pytest.raises(ValueError, match="already filled"):
        QVLoRA(encoder.qkv_projections()[-1], rank=RANK)
    assert all(p.owner.adapters.qkv is layer for p, layer in zip(encoder.qkv_projections(), first))


def test_rank_below_one_is_refused():
    with pytest.raises(ValueError, match="rank"):
        add_qv_lora(tiny_encoder("vit_test").qkv_projections(), rank=0)
