"""Attention with decomposed relative position and no (N, N) bias, against segment-anything's formula."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from samunet.backbones import rel_pos_attention
from samunet.backbones.rel_pos_attention import STRATEGIES, attention_with_rel_pos
from samunet.backbones.sam_vit import SAMViTEncoder, window_partition
from samunet.sam_import import sam_modeling
from tests.test_sam_vit import randomize_, reference_encoder

HEADS, HEAD_DIM = 2, 8


def reference_attention(q, k, v, rel_pos_h, rel_pos_w, grid):
    """segment-anything's attention: softmax(q k^T * scale + add_decomposed_rel_pos) v, with the bias on
    grid-token pairs only (extra tokens after the grid get none, as HSP-SAM's prompts)."""
    batch, heads, tokens, head_dim = q.shape
    count = grid[0] * grid[1]
    scores = q @ k.transpose(-1, -2) * head_dim ** -0.5
    grid_scores = scores[:, :, :count, :count].reshape(batch * heads, count, count)
    biased = sam_modeling().image_encoder.add_decomposed_rel_pos(
        grid_scores, q[:, :, :count].reshape(batch * heads, count, head_dim), rel_pos_h, rel_pos_w, grid, grid)
    scores = torch.cat([torch.cat([biased.reshape(batch, heads, count, count), scores[:, :, :count, count:]], -1),
                        scores[:, :, count:]], dim=2)
    return scores.softmax(-1) @ v


def random_inputs(grid, extra, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens = grid[0] * grid[1] + extra
    q, k, v = (torch.randn(2, HEADS, tokens, HEAD_DIM, generator=generator, requires_grad=True) for _ in range(3))
    tables = [(0.5 * torch.randn(2 * size - 1, HEAD_DIM, generator=generator)).requires_grad_() for size in grid]
    return q, k, v, *tables


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("grid, extra", [((4, 4), 0), ((3, 5), 0), ((5, 3), 2)])
def test_each_strategy_equals_segment_anything_with_gradients(strategy, grid, extra, monkeypatch):
    monkeypatch.setattr(rel_pos_attention, "CHUNK_ELEMENTS", 7 * HEADS * 2 * 17)  # uneven chunks of 7 queries
    inputs = random_inputs(grid, extra)
    ours = attention_with_rel_pos(*inputs, grid, strategy=strategy)
    expected = reference_attention(*inputs, grid)
    assert (ours - expected).abs().max() < 1e-5
    upstream = torch.randn_like(ours)
    our_grads = torch.autograd.grad(ours, inputs, upstream)
    expected_grads = torch.autograd.grad(expected, inputs, upstream)
    for name, mine, theirs in zip(("q", "k", "v", "rel_pos_h", "rel_pos_w"), our_grads, expected_grads):
        assert (mine - theirs).abs().max() < 1e-4, name


@pytest.mark.parametrize("grid, extra", [((3, 5), 0), ((5, 3), 2)])
def test_the_chunked_inference_path_reusing_its_buffers_equals_segment_anything(grid, extra, monkeypatch):
    monkeypatch.setattr(rel_pos_attention, "CHUNK_ELEMENTS", 7 * HEADS * 2 * 17)  # a partial last chunk
    inputs = [t.detach() for t in random_inputs(grid, extra)]
    with torch.no_grad():
        ours = attention_with_rel_pos(*inputs, grid, strategy="chunked")
    assert (ours - reference_attention(*inputs, grid)).abs().max() < 1e-5


def test_unknown_strategy_is_named():
    with pytest.raises(ValueError, match="unknown strategy 'dense'; known: chunked, augmented"):
        attention_with_rel_pos(*random_inputs((2, 2), 0), (2, 2), strategy="dense")


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_no_tensor_holds_every_query_key_pair(strategy, monkeypatch):
    """The point of the rewrite: a global block over N tokens never builds (heads, N, N)."""
    monkeypatch.setattr(rel_pos_attention, "CHUNK_ELEMENTS", 1 << 14)
    grid = (16, 16)
    count = grid[0] * grid[1]
    q, k, v, rel_h, rel_w = (t.detach() for t in random_inputs(grid, 0))
    with torch.no_grad(), LargestTensor() as mode:
        attention_with_rel_pos(q[:1], k[:1], v[:1], rel_h, rel_w, grid, strategy=strategy)
    assert mode.largest < HEADS * count * count / 2


def test_encoder_with_window_padding_equals_segment_anything_with_gradients():
    """Windowed blocks project only real tokens and pad with a zero token's projection; global blocks
    use the chunked attention: forward and every parameter's gradient equal segment-anything's."""
    config = dict(embed_dim=32, depth=3, num_heads=2, global_attn_indexes=(1,), window_size=3, out_chans=16)
    img_size = 80  # a 5x5 grid: windows of 3 need padding to 6x6
    reference = randomize_(reference_encoder(img_size, **config))
    ours = SAMViTEncoder(img_size=img_size, **config)
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, img_size, img_size)
    expected, output = reference(x), ours(x).embedding
    assert (output - expected).abs().max() < 1e-4
    upstream = torch.randn_like(expected)
    expected.backward(upstream)
    output.backward(upstream)
    theirs = dict(reference.named_parameters())
    for name, param in ours.named_parameters():
        assert (param.grad - theirs[name].grad).abs().max() < 1e-3 * max(1.0, theirs[name].grad.abs().max()), name


def test_padding_gets_the_qkv_adapters_projection_of_a_zero_token():
    """With a qkv adapter that maps a zero token to something non-zero, padded windows still equal SAM's
    pad-then-project order."""
    encoder = SAMViTEncoder(img_size=80, embed_dim=32, depth=1, num_heads=2, global_attn_indexes=(),
                            window_size=3, out_chans=16)
    randomize_(encoder)
    block = encoder.blocks[0]
    shift = torch.randn(96)
    block.attn.adapters = block.attn.adapters._replace(
        qkv=lambda linear, x: linear(x) + torch.tanh(x).sum(-1, True) + shift)
    y = block.norm1(torch.randn(1, 5, 5, 32))
    windows, padded = window_partition(y, 3)  # SAM: zero-pad the normed tokens, then project everything
    by_hand = block.attn(windows).reshape(1, 2, 2, 3, 3, 32).transpose(2, 3).reshape(1, 6, 6, 32)[:, :5, :5]
    ours, _ = block._windowed_attention(y)
    assert (ours - by_hand).abs().max() < 1e-5
