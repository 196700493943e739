"""The extension points of samunet's image encoders: feature taps and adapter slots.

Methods never rewire a frozen encoder with hooks; they ask for block outputs with
``encoder(x, intermediates=[...])`` and put trainable modules into slots: ``EncoderAdapters.after_patch_embed``
on the encoder, ``BlockAdapters`` (``after_attention``, ``parallel_mlp``) on every transformer block and
``AttentionAdapters.qkv`` on every attention layer (LoRA, see test_lora.py). Each slot is checked here against
the block or encoder run by hand, for both tiny encoders (ViT: (B, h, w, C) tokens, windowed and global
blocks; TinyViT: (B, C, H, W) channels-last stages).
"""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from samunet.backbones.base import BlockAdapters, EncoderAdapters, fill_slots
from samunet.backbones.catalog import get_backbone_spec
from samunet.backbones.sam_vit import window_partition, window_unpartition
from samunet.backbones.tiny_vit import TinyViTBlock
from samunet.modules.lora import add_qv_lora
from random_weights import randomize_

TINY_BACKBONES = ("vit_test", "tinyvit_test")
# ViT: 6x6 tokens in windows of 4; TinyViT: 32x32 and 16x16 grids in windows of 7: both pad their windows
IMG = {"vit_test": 96, "tinyvit_test": 64}


def tiny_encoder(backbone: str) -> nn.Module:
    return randomize_(get_backbone_spec(backbone).build_encoder(IMG[backbone])).eval()


def image(encoder: nn.Module, batch: int = 2, seed: int = 1) -> torch.Tensor:
    size = encoder.img_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def prompts_for(encoder: nn.Module, batch: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return [torch.randn(batch, 3, dim, generator=generator) for dim in encoder.prompt_level_dims]


def block_outputs_by_hand(encoder: nn.Module, x: torch.Tensor, after_patch_embed=None) -> tuple[list, torch.Tensor]:
    """Every transformer block's output (B, C, h, w), in block order, and the embedding, from the encoder's
    own submodules run one after the other (optionally with ``after_patch_embed`` applied by hand)."""
    patch_embed = after_patch_embed or (lambda t: t)
    outputs = []
    if hasattr(encoder, "blocks"):  # ViT
        tokens = patch_embed(encoder.patch_embed(x)) + encoder.pos_embed
        for block in encoder.blocks:
            tokens = block(tokens)
            outputs.append(tokens.permute(0, 3, 1, 2))
        return outputs, encoder.neck(tokens.permute(0, 3, 1, 2))
    x = patch_embed(encoder.patch_embed(x.contiguous(memory_format=torch.channels_last)))
    for stage in encoder.layers:
        for block in stage.blocks:
            x = block(x)
            if isinstance(block, TinyViTBlock):
                outputs.append(x)
        if stage.downsample is not None:
            x = stage.downsample(x)
    return outputs, encoder.neck(x)


# ---- feature taps -------------------------------------------------------------------------------

@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_intermediates_are_the_asked_blocks_outputs_in_the_asked_order(backbone):
    encoder = tiny_encoder(backbone)
    x = image(encoder)
    count = len(encoder.transformer_blocks())
    asked = [count - 1, 0, 1]  # deepest first: the order asked, not the block order
    with torch.no_grad():
        by_hand, embedding = block_outputs_by_hand(encoder, x)
        plain = encoder(x)
        tapped = encoder(x, intermediates=asked)
    assert len(by_hand) == count
    assert len(tapped.intermediates) == len(asked)
    for index, output in zip(asked, tapped.intermediates):
        assert torch.allclose(output, by_hand[index], atol=1e-5), index
    assert torch.allclose(plain.embedding, embedding, atol=1e-5)
    # the taps change nothing else
    assert torch.equal(tapped.embedding, plain.embedding)
    assert all(torch.equal(a, b) for a, b in zip(tapped.features, plain.features))
    assert len(plain.intermediates) == 0


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
@pytest.mark.parametrize("index", [-1, 99])
def test_a_tap_that_names_no_block_is_refused_in_both_encoders(backbone, index):
    encoder = tiny_encoder(backbone)
    with pytest.raises(ValueError, match="not transformer block indices"):
        encoder(image(encoder), intermediates=[0, index])


def test_vit_intermediates_of_the_global_blocks_are_its_features():
    encoder = tiny_encoder("vit_test")
    output = encoder(image(encoder), intermediates=list(encoder.global_attn_indexes))
    assert len(output.features) == len(output.intermediates) == 2
    assert all(torch.equal(a, b) for a, b in zip(output.intermediates, output.features))


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_intermediates_are_tapped_with_prompt_tokens_too(backbone):
    """With HSP-SAM's prompt tokens the blocks run another path; the taps still give their outputs
    (ViT: the global blocks' outputs are the features; tinyvit_test: one block per attention stage, so a
    block's output is its stage's feature)."""
    encoder = tiny_encoder(backbone)
    if backbone == "vit_test":
        asked, expected = list(encoder.global_attn_indexes), lambda out: out.features
    else:
        asked, expected = [0, 1, 2], lambda out: out.features[1:]
    prompts = prompts_for(encoder)
    with torch.no_grad():
        output = encoder(image(encoder), prompt_tokens=prompts, intermediates=asked)
        without_prompts = encoder(image(encoder), intermediates=asked)
    assert all(torch.equal(a, b) for a, b in zip(output.intermediates, expected(output)))
    assert not torch.allclose(output.intermediates[-1], without_prompts.intermediates[-1], atol=1e-3)


# ---- after_patch_embed -----------------------------------------------------------------------------

class ChannelAffine(nn.Module):
    """x * scale + shift along channel axis ``axis`` of (B, ., ., .) tokens; records every input."""

    def __init__(self, channels: int, axis: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(4)
        shape = [1, 1, 1, 1]
        shape[axis] = channels
        self.scale = nn.Parameter(1 + torch.randn(shape, generator=generator))
        self.shift = nn.Parameter(torch.randn(shape, generator=generator))
        self.inputs = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x)
        return x * self.scale + self.shift


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_after_patch_embed_maps_the_patch_embedding_once_before_anything_is_added(backbone):
    """ViT: applied to the patch embedding before the position embedding is added; TinyViT: before the
    first stage. Its input has the patch embedding's channels on ``token_channel_axis``."""
    encoder = tiny_encoder(backbone)
    axis, channels = encoder.token_channel_axis, encoder.feature_channels[0]
    adapter = ChannelAffine(channels, axis)
    fill_slots(encoder, after_patch_embed=adapter)
    x = image(encoder)
    with torch.no_grad():
        output = encoder(x)
        assert len(adapter.inputs) == 1
        seen = adapter.inputs[0]
        encoder.adapters = EncoderAdapters()
        plain_patches = encoder.patch_embed(x.contiguous(memory_format=torch.channels_last))
        _, expected = block_outputs_by_hand(encoder, x, after_patch_embed=lambda t: t * adapter.scale + adapter.shift)
        plain = encoder(x).embedding
    assert seen.shape[axis] == channels and seen.shape[0] == 2
    assert seen.shape[1:].count(channels) == 1  # the channel axis cannot be mistaken for a spatial one
    # the bare patch embedding, no position embedding yet; not bit-equal, because the encoder may run its
    # convolution on another memory layout, whose kernel rounds differently on some CPUs (AVX2 AMD EPYC)
    assert torch.allclose(seen, plain_patches, rtol=0, atol=1e-5)
    assert torch.allclose(output.embedding, expected, atol=1e-5)
    assert not torch.allclose(output.embedding, plain, atol=1e-3)


# ---- BlockAdapters ----------------------------------------------------------------------------------

def vit_block_by_hand(block, x, prompts, after_attention, parallel_mlp):
    """SAM ViT block: x1 = x + f(attention(norm1(x))) (un-windowed), out = x1 + mlp(h) + g(h), h = norm2(x1)."""
    y = block.norm1(x)
    windows, padded = (y, None) if block.is_global else window_partition(y, block.window_size)
    if prompts is not None:  # every window attends with its own copy of the prompts
        per_image = windows.shape[0] // x.shape[0]
        attended, _ = block.attn.forward_with_prompts(windows, block.norm1(prompts).repeat_interleave(per_image, 0))
    else:
        attended = block.attn(windows)
    if not block.is_global:
        attended = window_unpartition(attended, block.window_size, padded, x.shape[1:3])
    x1 = x + after_attention(attended)
    hidden = block.norm2(x1)
    return x1 + block.mlp(hidden) + parallel_mlp(hidden)


def tinyvit_block_by_hand(block, x, prompts, after_attention, parallel_mlp):
    """TinyViT block: t1 = tokens + f(window attention(tokens)); t = local conv(t1); out = t + mlp(t) + g(t)
    (the MLP normalises its input itself, so g sees the same tokens the MLP gets)."""
    tokens = x.permute(0, 2, 3, 1)
    attended = block.attn(tokens) if prompts is None else block.attn.forward_with_prompts(tokens, prompts)[0]
    t1 = tokens + after_attention(attended)
    t = block.local_conv(t1.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    return (t + block.mlp(t) + parallel_mlp(t)).permute(0, 3, 1, 2)


BLOCKS = {  # backbone, index into transformer_blocks()
    "vit_windowed_block": ("vit_test", 0),
    "vit_global_block": ("vit_test", 1),
    "tinyvit_block": ("tinyvit_test", 0),
}


@pytest.mark.parametrize("with_prompts", [False, True], ids=["plain", "with_prompt_tokens"])
@pytest.mark.parametrize("which", BLOCKS)
def test_block_adapters_act_after_the_attention_and_parallel_to_the_mlp(which, with_prompts):
    backbone, index = BLOCKS[which]
    encoder = tiny_encoder(backbone)
    block, dim = encoder.transformer_blocks()[index]
    generator = torch.Generator().manual_seed(5)
    grid = 6 if backbone == "vit_test" else 9  # both padded in their windows (4 and 7)
    x = torch.randn(2, grid, grid, dim, generator=generator)
    if backbone == "tinyvit_test":
        x = x.permute(0, 3, 1, 2)  # (B, C, H, W) channels-last, as the stages pass it
    prompts = torch.randn(2, 3, dim, generator=generator) if with_prompts else None
    after, parallel = nn.Linear(dim, dim), nn.Linear(dim, dim)
    randomize_(after, 6)
    randomize_(parallel, 7)
    attention_inputs = []

    def after_attention(attended):
        attention_inputs.append(attended.shape)
        return after(attended)

    fill_slots(block, after_attention=after_attention, parallel_mlp=parallel)
    by_hand = vit_block_by_hand if backbone == "vit_test" else tinyvit_block_by_hand
    with torch.no_grad():
        output = block(x) if prompts is None else block.forward_with_prompts(x, prompts)[0]
        expected = by_hand(block, x, prompts, after_attention, parallel)
        plain_expected = by_hand(block, x, prompts, lambda a: a, torch.zeros_like)
        block.adapters = BlockAdapters()
        plain = block(x) if prompts is None else block.forward_with_prompts(x, prompts)[0]
    tokens_shape = (2, grid, grid, dim)
    assert attention_inputs[0] == tokens_shape  # the whole un-windowed grid, channels last
    assert torch.allclose(plain, plain_expected, atol=1e-5)  # the hand-run block is the block
    assert torch.allclose(output, expected, atol=1e-5)
    assert not torch.allclose(output, plain, atol=1e-3)


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_every_transformer_block_has_its_own_slots(backbone):
    encoder = tiny_encoder(backbone)
    blocks = encoder.transformer_blocks()
    calls = []
    for index, (block, _) in enumerate(blocks):
        fill_slots(block, after_attention=lambda a, index=index: calls.append(("attention", index)) or a)
        fill_slots(block, parallel_mlp=lambda h, index=index: calls.append(("mlp", index)) or torch.zeros_like(h))
    encoder(image(encoder))
    assert calls == [(kind, i) for i in range(len(blocks)) for kind in ("attention", "mlp")]


def test_a_filled_slot_is_refused_and_nothing_is_filled_by_the_refused_call():
    encoder = tiny_encoder("vit_test")
    block = encoder.blocks[0]
    first, second = nn.Identity(), nn.Identity()
    fill_slots(block, after_attention=first)
    with pytest.raises(ValueError, match=r"\['after_attention'\].*already filled"):
        fill_slots(block, after_attention=second, parallel_mlp=second)
    assert block.adapters == BlockAdapters(after_attention=first)
    fill_slots(encoder, after_patch_embed=first)
    with pytest.raises(ValueError, match="already filled"):
        fill_slots(encoder, after_patch_embed=second)
    assert encoder.adapters.after_patch_embed is first


# ---- copies of an encoder with filled slots ---------------------------------------------------------

class Parallel(nn.Module):
    """An adapter whose bound method ``delta`` fills a slot, as Self-Prompt-SAM's depth adapters do."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = randomize_(nn.Linear(dim, dim), 8)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def adapted_network(backbone: str) -> nn.Module:
    """A frozen encoder with every kind of slot filled; the adapters are the holder's submodules."""
    holder = nn.Module()
    holder.encoder = encoder = tiny_encoder(backbone)
    holder.lora = randomize_(add_qv_lora(encoder.qkv_projections(), rank=2), 9)
    holder.serial, holder.parallel = nn.ModuleList(), nn.ModuleList()
    for block, dim in encoder.transformer_blocks():
        serial, parallel = randomize_(nn.Linear(dim, dim), 10), Parallel(dim)
        fill_slots(block, after_attention=serial, parallel_mlp=parallel.delta)
        holder.serial.append(serial)
        holder.parallel.append(parallel)
    holder.patch = ChannelAffine(encoder.feature_channels[0], encoder.token_channel_axis)
    fill_slots(encoder, after_patch_embed=holder.patch)
    return holder


def slot_contents(encoder: nn.Module) -> list:
    """What every slot of ``encoder`` holds (a bound method stands for its module)."""
    items = [encoder.adapters.after_patch_embed]
    items += [p.owner.adapters.qkv for p in encoder.qkv_projections()]
    for block, _ in encoder.transformer_blocks():
        items += [block.adapters.after_attention, block.adapters.parallel_mlp.__self__]
    return items


def holder_modules(holder: nn.Module) -> list:
    return [holder.patch, *holder.lora, *(m for pair in zip(holder.serial, holder.parallel) for m in pair)]


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_filled_slots_stay_out_of_the_encoders_state_dict(backbone):
    holder = adapted_network(backbone)
    released = get_backbone_spec(backbone).build_encoder(IMG[backbone])
    assert list(holder.encoder.state_dict()) == list(released.state_dict())
    assert not {id(p) for m in holder_modules(holder) for p in m.parameters()} & {
        id(p) for p in holder.encoder.parameters()}


@pytest.mark.parametrize("copy_kind", ["deepcopy", "pickle"])
@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_a_copy_of_an_adapted_network_uses_its_own_adapters(backbone, copy_kind):
    holder = adapted_network(backbone)
    clone = copy.deepcopy(holder) if copy_kind == "deepcopy" else pickle.loads(pickle.dumps(holder))
    # the copy's slots hold the copy's adapters (the ones its optimiser and state_dict see)
    assert all(a is b for a, b in zip(slot_contents(clone.encoder), holder_modules(clone)))
    assert not {id(m) for m in slot_contents(clone.encoder)} & {id(m) for m in holder_modules(holder)}
    x = image(holder.encoder)
    with torch.no_grad():
        expected = holder.encoder(x).embedding
        assert torch.equal(clone.encoder(x).embedding, expected)
        for module in holder_modules(clone):  # training the copy's adapters...
            for param in module.parameters():
                param.add_(0.5)
        assert torch.equal(holder.encoder(x).embedding, expected)  # ...leaves the original as it was
        assert not torch.allclose(clone.encoder(x).embedding, expected, atol=1e-3)


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_a_deepcopy_of_the_encoder_alone_gets_independent_adapters(backbone):
    holder = adapted_network(backbone)
    encoder = copy.deepcopy(holder.encoder)
    assert not {id(m) for m in slot_contents(encoder)} & {id(m) for m in holder_modules(holder)}
    x = image(encoder)
    with torch.no_grad():
        expected = holder.encoder(x).embedding
        assert torch.equal(encoder(x).embedding, expected)
        for param in holder.patch.parameters():
            param.add_(0.5)
        assert torch.equal(encoder(x).embedding, expected)
