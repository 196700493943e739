"""SAM's two-way transformer and mask decoder run by samunet, against segment-anything's own code.

``run_two_way_transformer`` / ``two_way_block`` run segment-anything's ``TwoWayTransformer`` on its own
weights with two extension points per block (``TwoWayLayerAdapters``) and mask-guided token-to-image
attention; ``decode_masks`` runs ``MaskDecoder`` for B (image, prompt set) pairs and reads every mask
token. Without adapters or masks they compute what segment-anything computes.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from samunet.modules.decoders import decode_masks
from samunet.modules.mask_attention import token_to_image_message
from samunet.modules.two_way_transformer import (TwoWayLayerAdapters, grid_to_tokens, image_tokens_to_grid,
                                                positional_tokens, run_two_way_transformer, two_way_block)
from samunet.sam_import import sam_modeling
from random_weights import randomize_

DIM, HEADS, MLP_DIM, H, W = 32, 2, 64, 4, 6  # a non-square grid, so h and w cannot be swapped silently


def sam_transformer() -> nn.Module:
    return randomize_(sam_modeling().TwoWayTransformer(depth=2, embedding_dim=DIM, mlp_dim=MLP_DIM,
                                                       num_heads=HEADS), scale=0.3).eval()


def sam_decoder(num_mask_tokens: int = 4) -> nn.Module:
    modeling = sam_modeling()
    transformer = modeling.TwoWayTransformer(depth=2, embedding_dim=DIM, mlp_dim=MLP_DIM, num_heads=HEADS)
    return randomize_(modeling.MaskDecoder(transformer_dim=DIM, transformer=transformer,
                                           num_multimask_outputs=num_mask_tokens - 1, iou_head_depth=3,
                                           iou_head_hidden_dim=DIM), scale=0.3).eval()


def inputs(batch: int = 2, tokens: int = 5, seed: int = 1):
    """image embedding (B, C, h, w), image pe (B, C, h, w), tokens (B, T, C)."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, DIM, H, W, generator=generator), torch.randn(batch, DIM, H, W, generator=generator),
            torch.randn(batch, tokens, DIM, generator=generator))


def block_inputs(batch: int = 2, tokens: int = 5):
    """queries (B, T, C), keys (B, h*w, C), query_pe, key_pe as TwoWayTransformer hands them to a block."""
    embedding, pe, queries = inputs(batch, tokens)
    keys = embedding.flatten(2).transpose(1, 2)
    return queries, keys, queries, pe.flatten(2).transpose(1, 2)


def capture(module: nn.Module, store: dict, name: str):
    """Record ``module``'s last input and output under ``name`` (test instrumentation only)."""
    def hook(mod, args, kwargs, out):
        store[name] = (args, kwargs, out)
    return module.register_forward_hook(hook, with_kwargs=True)


# ---- without extension points: exactly segment-anything -------------------------------------------

def test_run_without_adapters_or_masks_equals_segment_anythings_forward():
    transformer = sam_transformer()
    embedding, pe, tokens = inputs()
    with torch.no_grad():
        expected_queries, expected_keys = transformer(embedding, pe, tokens)
        queries, keys = run_two_way_transformer(transformer, embedding, pe, tokens)
    assert queries.shape == expected_queries.shape and keys.shape == expected_keys.shape == (2, H * W, DIM)
    assert (queries - expected_queries).abs().max() < 1e-6
    assert (keys - expected_keys).abs().max() < 1e-6


@pytest.mark.parametrize("layer", [0, 1], ids=["first_block_skips_query_pe", "later_block"])
def test_two_way_block_equals_segment_anythings_block(layer):
    block = sam_transformer().layers[layer]
    assert block.skip_first_layer_pe == (layer == 0)
    queries, keys, query_pe, key_pe = block_inputs()
    with torch.no_grad():
        expected = block(queries=queries, keys=keys, query_pe=query_pe, key_pe=key_pe)
        output = two_way_block(block, queries, keys, query_pe, key_pe)
    for a, b in zip(output, expected):
        assert (a - b).abs().max() < 1e-6


# ---- TwoWayLayerAdapters act where documented ----------------------------------------------------

@pytest.mark.parametrize("layer", [0, 1])
def test_zero_delta_adapters_leave_the_block_unchanged(layer):
    """``after_image_attention`` is serial (carries its own skip): its zero-delta form is the identity;
    ``parallel_mlp`` adds a term: its zero-delta form returns zeros."""
    block = sam_transformer().layers[layer]
    args = block_inputs()
    calls = []
    adapters = TwoWayLayerAdapters(after_image_attention=lambda u: calls.append("image") or u,
                                   parallel_mlp=lambda h: calls.append("mlp") or torch.zeros_like(h))
    with torch.no_grad():
        expected = two_way_block(block, *args)
        output = two_way_block(block, *args, adapters=adapters)
    assert sorted(calls) == ["image", "mlp"]
    assert all(torch.equal(a, b) for a, b in zip(output, expected))


@pytest.mark.parametrize("layer", [0, 1])
def test_after_image_attention_maps_the_image_to_token_message_before_the_residual(layer):
    """keys' = norm4(keys + f(image-to-token attention)); the queries are not touched."""
    block = sam_transformer().layers[layer]
    queries, keys, query_pe, key_pe = block_inputs()
    weight = torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(5)) * 0.3

    def adapter(message):
        return message @ weight + 0.5

    store = {}
    handle = capture(block.cross_attn_image_to_token, store, "image_to_token")
    with torch.no_grad():
        expected_queries, _ = block(queries=queries, keys=keys, query_pe=query_pe, key_pe=key_pe)
        message = store["image_to_token"][2]  # SAM's image-to-token message, (B, h*w, C)
        out_queries, out_keys = two_way_block(block, queries, keys, query_pe, key_pe,
                                              adapters=TwoWayLayerAdapters(after_image_attention=adapter))
    handle.remove()
    assert message.shape == (2, H * W, DIM)
    assert torch.equal(out_queries, expected_queries)
    assert torch.allclose(out_keys, block.norm4(keys + adapter(message)), atol=1e-6)
    assert not torch.allclose(out_keys, block.norm4(keys + message), atol=1e-3)


@pytest.mark.parametrize("layer", [0, 1])
def test_parallel_mlp_adds_its_map_of_the_mlp_input_to_the_mlp_output(layer):
    """queries' = norm3(h + mlp(h) + g(h)) with h the MLP's input (after norm2); the image tokens then
    attend to the adapted queries."""
    block = sam_transformer().layers[layer]
    queries, keys, query_pe, key_pe = block_inputs()
    weight = torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(6)) * 0.3

    def adapter(hidden):
        return torch.tanh(hidden @ weight)

    store = {}
    handle = capture(block.mlp, store, "mlp")
    with torch.no_grad():
        block(queries=queries, keys=keys, query_pe=query_pe, key_pe=key_pe)
        (hidden,), _, mlp_out = store["mlp"]
        out_queries, out_keys = two_way_block(block, queries, keys, query_pe, key_pe,
                                              adapters=TwoWayLayerAdapters(parallel_mlp=adapter))
        expected_queries = block.norm3(hidden + mlp_out + adapter(hidden))
        expected_keys = block.norm4(keys + block.cross_attn_image_to_token(
            q=keys + key_pe, k=expected_queries + query_pe, v=expected_queries))
    handle.remove()
    assert torch.allclose(out_queries, expected_queries, atol=1e-6)
    assert torch.allclose(out_keys, expected_keys, atol=1e-6)
    assert not torch.allclose(out_queries, block.norm3(hidden + mlp_out), atol=1e-3)


def test_run_gives_each_block_its_own_adapters_and_then_sams_final_attention():
    transformer = sam_transformer()
    embedding, pe, tokens = inputs()
    seen = {}

    def scaled(message, index):
        seen.setdefault(index, message)  # the first call's input (from run_two_way_transformer)
        return message * (1.5 + index)

    adapters = [TwoWayLayerAdapters(after_image_attention=lambda u, i=i: scaled(u, i),
                                    parallel_mlp=lambda h, i=i: 0.1 * (i + 1) * h)
                for i in range(len(transformer.layers))]
    store = {}
    handles = [capture(layer.cross_attn_image_to_token, store, index) for index, layer in enumerate(transformer.layers)]
    with torch.no_grad():
        queries, keys = run_two_way_transformer(transformer, embedding, pe, tokens, adapters=adapters)
        for handle in handles:
            handle.remove()
        # the same blocks chained by hand (each block's adapters checked above), then SAM's final attention
        q, k = tokens, embedding.flatten(2).transpose(1, 2)
        key_pe = pe.flatten(2).transpose(1, 2)
        for layer, layer_adapters in zip(transformer.layers, adapters):
            q, k = two_way_block(layer, q, k, tokens, key_pe, adapters=layer_adapters)
        final = transformer.final_attn_token_to_image(q=q + tokens, k=k + key_pe, v=k)
        expected_queries = transformer.norm_final_attn(q + final)
    assert sorted(seen) == [0, 1]
    assert all(seen[i] is store[i][2] for i in seen)  # block i's adapter got block i's message
    assert torch.allclose(queries, expected_queries, atol=1e-6) and torch.allclose(keys, k, atol=1e-6)


def test_one_adapter_set_per_block_is_required():
    transformer = sam_transformer()
    with pytest.raises(ValueError, match="one adapter set per two-way block"):
        run_two_way_transformer(transformer, *inputs(), adapters=[TwoWayLayerAdapters()])


# ---- token-to-image attention and token masks ------------------------------------------------------

def test_token_to_image_message_in_mode_none_is_sams_attention_and_ignores_the_mask():
    attention = sam_transformer().layers[1].cross_attn_token_to_image
    queries, keys, _, key_pe = block_inputs()
    garbage = torch.rand(2, queries.shape[1], H * W)
    with torch.no_grad():
        expected = attention(q=queries, k=keys + key_pe, v=keys)
        assert torch.equal(token_to_image_message(attention, queries, keys + key_pe, keys, None, "none"), expected)
        assert torch.equal(token_to_image_message(attention, queries, keys + key_pe, keys, garbage, "none"), expected)
    with pytest.raises(ValueError, match="mode"):
        token_to_image_message(attention, queries, keys, keys, None, "soft")


def test_token_masks_guide_every_token_to_image_attention_of_the_run():
    """All-ones masks give SAM's run back (learnable and binary modes); all-zero learnable masks silence
    the token-to-image message of both blocks and of the final attention."""
    transformer = sam_transformer()
    embedding, pe, tokens = inputs()
    ones = torch.ones(2, tokens.shape[1], H * W)
    silenced = copy.deepcopy(transformer)
    for attention in [*(layer.cross_attn_token_to_image for layer in silenced.layers),
                      silenced.final_attn_token_to_image]:
        nn.init.zeros_(attention.out_proj.weight)  # this attention's message is now exactly 0
        nn.init.zeros_(attention.out_proj.bias)
    with torch.no_grad():
        plain = transformer(embedding, pe, tokens)
        for mode in ("learnable", "binary"):
            guided = run_two_way_transformer(transformer, embedding, pe, tokens, token_masks=ones, mask_mode=mode)
            assert all((a - b).abs().max() < 1e-5 for a, b in zip(guided, plain)), mode
        zero = run_two_way_transformer(transformer, embedding, pe, tokens, token_masks=torch.zeros_like(ones),
                                       mask_mode="learnable")
        expected = silenced(embedding, pe, tokens)
    assert all((a - b).abs().max() < 1e-5 for a, b in zip(zero, expected))
    assert not torch.allclose(zero[0], plain[0], atol=1e-3)


# ---- decode_masks against MaskDecoder.predict_masks --------------------------------------------------

@pytest.mark.parametrize("num_prompts", [0, 2])
def test_decode_masks_reads_every_mask_token_as_predict_masks_does_for_one_image(num_prompts):
    """segment-anything's ``predict_masks`` repeats one image per prompt set; with one image and one prompt
    set it returns every mask token's mask (``forward`` then slices them), which ``decode_masks`` returns."""
    decoder = sam_decoder(num_mask_tokens=5)
    generator = torch.Generator().manual_seed(7)
    embedding = torch.randn(1, DIM, H, W, generator=generator)
    pe = torch.randn(1, DIM, H, W, generator=generator)
    sparse = torch.randn(1, num_prompts, DIM, generator=generator)
    dense = torch.randn(1, DIM, H, W, generator=generator)
    with torch.no_grad():
        expected, _ = decoder.predict_masks(image_embeddings=embedding, image_pe=pe,
                                            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense)
        decoded = decode_masks(decoder, embedding, pe, sparse, dense)
    assert decoded.masks.shape == expected.shape == (1, 5, 4 * H, 4 * W)
    assert (decoded.masks - expected).abs().max() < 1e-5
    assert decoded.mask_features.shape == (1, DIM // 8, 4 * H, 4 * W)


def test_decode_masks_pairs_image_b_with_prompt_set_b():
    decoder = sam_decoder()
    generator = torch.Generator().manual_seed(8)
    embedding = torch.randn(3, DIM, H, W, generator=generator)
    pe = torch.randn(1, DIM, H, W, generator=generator)
    sparse = torch.randn(3, 2, DIM, generator=generator)
    dense = torch.randn(1, DIM, H, W, generator=generator)
    with torch.no_grad():
        decoded = decode_masks(decoder, embedding, pe, sparse, dense).masks
        for b in range(3):
            expected, _ = decoder.predict_masks(image_embeddings=embedding[b:b + 1], image_pe=pe,
                                                sparse_prompt_embeddings=sparse[b:b + 1], dense_prompt_embeddings=dense)
            assert (decoded[b:b + 1] - expected).abs().max() < 1e-5


class Refuses(nn.Module):
    def forward(self, *args, **kwargs):
        raise AssertionError("the IoU head was run")


def test_decode_masks_does_not_run_the_iou_head_and_forwards_its_adapters():
    decoder = sam_decoder()
    decoder.iou_prediction_head = Refuses()
    embedding, pe, _ = inputs()
    sparse = torch.zeros(2, 0, DIM)
    calls = []
    adapters = [TwoWayLayerAdapters(after_image_attention=lambda u, i=i: calls.append(i) or 2 * u)
                for i in range(len(decoder.transformer.layers))]
    with torch.no_grad():
        plain = decode_masks(decoder, embedding, pe, sparse, pe).masks
        adapted = decode_masks(decoder, embedding, pe, sparse, pe, adapters=adapters).masks
    assert calls == [0, 1]
    assert not torch.allclose(adapted, plain, atol=1e-3)


# ---- the layout the pixel decoder runs in ----------------------------------------------------------

def test_image_tokens_to_grid_is_the_contiguous_grid_of_the_tokens():
    tokens = torch.randn(2, H * W, DIM)
    grid = image_tokens_to_grid(tokens, H, W)
    assert grid.shape == (2, DIM, H, W) and grid.is_contiguous()
    assert torch.equal(grid[1, :, 2, 3], tokens[1, 2 * W + 3])


def test_decode_masks_runs_the_pixel_decoder_in_the_contiguous_layout():
    """A channels-last grid would carry through SAM's transposed convolutions while the gradient of the mask
    product comes back contiguous: a mixed-layout GELU backward, several times slower on a CPU."""
    decoder = sam_decoder()
    embedding, pe, _ = inputs()
    decoded = decode_masks(decoder, embedding, pe, torch.zeros(2, 0, DIM), pe)
    assert decoded.mask_features.is_contiguous()


def test_grid_tokens_have_their_channels_innermost_and_a_broadcast_grid_is_copied_once():
    grid = torch.randn(2, DIM, H, W)
    expected = grid.flatten(2).transpose(1, 2)
    for layout in (grid, grid.contiguous(memory_format=torch.channels_last)):
        tokens = grid_to_tokens(layout)
        assert torch.equal(tokens, expected) and tokens.stride(-1) == 1
    channels_last = grid.contiguous(memory_format=torch.channels_last)
    assert grid_to_tokens(channels_last).data_ptr() == channels_last.data_ptr()  # a view, no copy
    broadcast = grid_to_tokens(grid[:1].expand(3, -1, -1, -1))
    assert broadcast.shape == (3, H * W, DIM) and broadcast.stride()[0] == 0 and broadcast.stride(-1) == 1
    assert torch.equal(broadcast[2], expected[0])


def test_positional_tokens_take_the_dtype_the_sum_with_the_keys_promotes_to():
    """Under autocast the encoding is bfloat16 and the keys float32: the encoding's tokens are cast once,
    so ``keys + key_pe`` adds two float32 tensors and gives the same sums as the mixed addition."""
    image_pe = torch.randn(1, DIM, H, W).to(torch.bfloat16).expand(2, -1, -1, -1)
    keys = torch.randn(2, H * W, DIM)
    key_pe = positional_tokens(image_pe, keys.dtype)
    assert key_pe.dtype == torch.float32 and key_pe.stride()[0] == 0
    assert torch.equal(keys + key_pe, keys + image_pe.flatten(2).transpose(1, 2))
    assert positional_tokens(image_pe, torch.bfloat16).dtype == torch.bfloat16
