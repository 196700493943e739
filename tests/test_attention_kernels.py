"""samunet's attention kernel choice (``samunet.backbones.attention``).

In bfloat16 / float16 on the CPU, with short key sequences, attention is computed explicitly (logits, softmax,
product with v) because torch's fused SDPA kernel is slower there (benchmarks/bench_attention_kernels.py);
everywhere else it is torch's SDPA. Both must give SDPA's result, and the encoders must take the explicit path
under CPU autocast.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from samunet.backbones import attention
from samunet.backbones.sam_vit import build_vit_encoder
from samunet.backbones.tiny_vit import build_tinyvit_encoder
from samunet.modules.cmattn import ClassBalancedMaskAttention

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def qkv(batch=3, heads=2, queries=49, keys=49, head_dim=16, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, queries, head_dim, generator=generator).to(dtype),
            torch.randn(batch, heads, keys, head_dim, generator=generator).to(dtype),
            torch.randn(batch, heads, keys, head_dim, generator=generator).to(dtype))


class SDPACounter:
    """Counts calls of ``torch.nn.functional.scaled_dot_product_attention`` while installed."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = F.scaled_dot_product_attention

        def counting(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)
        monkeypatch.setattr(F, "scaled_dot_product_attention", counting)


@pytest.mark.parametrize("with_mask", [False, True], ids=["no_mask", "float_mask"])
@pytest.mark.parametrize("scale", [None, 0.1])
def test_the_explicit_form_equals_sdpa(with_mask, scale):
    q, k, v = qkv(queries=49, keys=53)
    mask = torch.randn(1, 2, 49, 53, generator=torch.Generator().manual_seed(1)) if with_mask else None
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    lowered = [t.to(torch.bfloat16) for t in (q, k, v)]
    mask_bf16 = None if mask is None else mask.to(torch.bfloat16)
    assert attention.uses_explicit_attention(lowered[0], lowered[1])
    got = attention.dot_product_attention(*lowered, attn_mask=mask_bf16, scale=scale)
    fused = F.scaled_dot_product_attention(*lowered, attn_mask=mask_bf16, scale=scale)
    assert got.dtype == torch.bfloat16 and got.shape == expected.shape
    # bf16 rounding: the explicit form rounds its logits and probabilities to bf16, the fused kernel accumulates in
    # float32, so its largest error is up to ~4x the fused one's (200 seeds); on average it is as close (<= 1.7x).
    error, fused_error = (got.float() - expected).abs(), (fused.float() - expected).abs()
    assert error.max() < 0.05 and error.mean() <= 2 * fused_error.mean()


def test_float32_and_long_key_sequences_keep_torch_sdpa(monkeypatch):
    counter = SDPACounter(monkeypatch)
    q, k, v = qkv()
    assert torch.equal(attention.dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    long_q, long_k, long_v = qkv(batch=1, heads=1, queries=8, keys=attention.EXPLICIT_MAX_KEYS + 1,
                                 dtype=torch.bfloat16)
    assert not attention.uses_explicit_attention(long_q, long_k)
    attention.dot_product_attention(long_q, long_k, long_v)
    assert counter.calls == 3  # the two references above and the long sequence; float32 went to SDPA too


def test_reduced_precision_on_the_cpu_computes_explicitly(monkeypatch):
    counter = SDPACounter(monkeypatch)
    for dtype in (torch.bfloat16, torch.float16):
        q, k, v = qkv(dtype=dtype)
        out = attention.dot_product_attention(q, k, v)
        assert out.dtype == dtype and torch.isfinite(out).all()
    assert counter.calls == 0


def test_gradients_of_the_explicit_form_match_sdpa():
    q, k, v = (t.to(torch.bfloat16).requires_grad_() for t in qkv())
    reference = [t.detach().float().requires_grad_() for t in (q, k, v)]
    attention.dot_product_attention(q, k, v).float().square().sum().backward()
    F.scaled_dot_product_attention(*reference).square().sum().backward()
    for got, expected in zip((q, k, v), reference):
        relative = (got.grad.float() - expected.grad).norm() / expected.grad.norm()
        assert relative < 0.05


def cmattn_call():
    module = ClassBalancedMaskAttention(num_classes=3, width=16, num_heads=2).train()
    embedding, mask_feature = torch.randn(2, 8, 6, 6), torch.randn(2, 3, 6, 6)
    labels = torch.randint(0, 3, (2, 1, 24, 24))
    return lambda: module(embedding, mask_feature, labels)


def encoder_call(build, name):
    encoder = build(name, 64).train()
    image = torch.randn(2, 3, 64, 64)
    return lambda: encoder(image).embedding


@pytest.mark.parametrize("make_call", [
    lambda: encoder_call(build_tinyvit_encoder, "tinyvit_test"),
    lambda: encoder_call(build_vit_encoder, "vit_test"),
    cmattn_call,
], ids=["tinyvit", "vit", "cmattn"])
def test_modules_under_cpu_bf16_autocast_take_the_explicit_path(make_call, monkeypatch):
    call = make_call()
    counter = SDPACounter(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = call()
    out.float().sum().backward()
    assert torch.isfinite(out.float()).all()
    assert counter.calls == 0, "a module under CPU bf16 autocast called the fused SDPA kernel"
