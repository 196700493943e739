"""Self-Prompt-SAM (Xie et al.): what its paper fixes, each checked on the real modules.

The generic trainer checks (shapes, finite losses, gradient ownership, frozen weights bitwise,
determinism, round trips, DDP) are in tests/test_trainer_contract.py; the prompts themselves are in
tests/test_self_prompts.py and the prompt generators in tests/test_prompt_generators.py. Here:

- the adapters' equations (DFusedAdapter, the vanilla adapter and the S4 / S5 variants of Table 4),
  MAdapter and MC-Adapter, each against a hand-written reference with non-zero weights, and the
  depth mixing (only the same token of the slices of one stack);
- the wiring of the network: depth embeddings (encoder tokens, decoder image positional
  encoding), adapters in the encoder and decoder paths, MAdapter at the input, prompts from the
  generator's finest level, one decoder pass per class (the background included) into that class's
  channel, MC-Adapter (or nothing, S1-S8) on the K binary logits;
- the trainer (built by tests/trainer_harness.py): the recipe of Appendix D, the two phases, the
  ablation trainers of Table 4 and the prompt combinations of Fig. 1;
- slice stacks: the (D, S, S) configuration, the depth sliding window, and an end-to-end run.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

import samunet.networks.self_prompt_sam as self_prompt_module
from samunet.modules.channel_adapters import MAdapter, MCAdapter
from samunet.modules.decoders import decode_masks
from samunet.modules.depth_adapters import ADAPTER_MODES, DepthAdapter, DepthMLP, DepthPositionalEmbedding
from samunet.modules.prompt_generators import MSPGenerator, StackedCNNPromptGenerator
from samunet.modules.self_prompts import ClassPrompts, encode_class_prompts, prompts_from_auxiliary_logits
from samunet.modules.two_way_transformer import TwoWayLayerAdapters
from samunet.networks.base import SAMNetworkConfig
from samunet.networks.self_prompt_sam import SelfPromptSAMNetwork
from samunet.registry import TRAINERS
from samunet.trainers.self_prompt_sam import SelfPromptLoss, SelfPromptSAMTrainer, stacked_configuration
from trainer_harness import build_trainer, make_batch, trainer_workdir

RANGES = [[-2.0, 2.0]]
COMPILE_BACKEND = "eager"  # Dynamo's capture alone: AOTAutograd doubles the test's time, Inductor takes minutes
HARNESS_SIZE = 32  # the smallest input of the tiny backbones
TABLE_4 = [f"SelfPromptSAMTrainer_S{row}" for row in range(1, 9)] + ["SelfPromptSAMTrainer"]
FIG_1 = {"SelfPromptSAMTrainer_box": ["box"], "SelfPromptSAMTrainer_point": ["point"],
         "SelfPromptSAMTrainer_mask": ["mask"], "SelfPromptSAMTrainer_box_point": ["box", "point"],
         "SelfPromptSAMTrainer_box_mask": ["box", "mask"], "SelfPromptSAMTrainer_point_mask": ["point", "mask"],
         "SelfPromptSAMTrainer": ["box", "point", "mask"]}


def network(backbone: str = "vit_test", depth: int = 2, num_classes: int = 3, img_size: int = 64,
            deep_supervision: bool = False, **options) -> SelfPromptSAMNetwork:
    torch.manual_seed(0)
    config = SAMNetworkConfig(input_channels=1, num_classes=num_classes, backbone=backbone, img_size=img_size,
                              intensity_ranges=RANGES, depth=depth, deep_supervision=deep_supervision)
    return SelfPromptSAMNetwork(config, **options).eval()


def randomise(*modules: torch.nn.Module | None, std: float = 0.2) -> None:
    """Give the (zero-initialised) weights of ``modules`` random values, as after training."""
    with torch.no_grad():
        for module in modules:
            for parameter in module.parameters():
                parameter.normal_(0, std)


def to_images(stacks: torch.Tensor) -> torch.Tensor:
    """(B, K, D, H, W) -> (B * D, K, H, W), the network's slices-as-a-batch layout."""
    return stacks.transpose(1, 2).flatten(0, 1)


def depth_mixing_reference(mlp: torch.nn.Module, x: torch.Tensor, depth: int) -> torch.Tensor:
    """The paper's depth MLP written out: for every stack, token and channel, the D slice values go
    through D -> 4D (GELU) -> D. x (N, ..., C), N = stacks * D."""
    stacks = x.reshape(-1, depth, *x.shape[1:])
    trailing = [1] * (stacks.ndim - 2)
    hidden = F.gelu(torch.einsum("ed,sd...->se...", mlp.up.weight, stacks) + mlp.up.bias.view(1, -1, *trailing))
    out = torch.einsum("de,se...->sd...", mlp.down.weight, hidden) + mlp.down.bias.view(1, -1, *trailing)
    return out.reshape(x.shape)


def houlsby_delta(adapter: DepthAdapter, x: torch.Tensor) -> torch.Tensor:
    """s(X W_dn) W_up."""
    return F.gelu(x @ adapter.down.weight.T + adapter.down.bias) @ adapter.up.weight.T + adapter.up.bias


def adapter_reference(adapter: DepthAdapter, x: torch.Tensor, depth: int) -> torch.Tensor:
    """Table 4's adapters, as the paper writes them (M: the depth MLP, with a skip where the paper has one)."""
    mlp = adapter.depth_mlp
    if adapter.mode == "vanilla":  # S3, Houlsby: X + s(X W_dn) W_up
        return x + houlsby_delta(adapter, x)
    if adapter.mode == "depth_before":  # S4: the depth MLP with its skip, then the vanilla adapter
        before = x + depth_mixing_reference(mlp, x, depth)
        return before + houlsby_delta(adapter, before)
    if adapter.mode == "depth_after":  # S5: the vanilla adapter, then the depth MLP with its skip
        after = x + houlsby_delta(adapter, x)
        return after + depth_mixing_reference(mlp, after, depth)
    # S6, DFused(X) = X + (s(X W_dn) + s(s(X W_dn) W_Dup) W_Ddn) W_up
    hidden = F.gelu(x @ adapter.down.weight.T + adapter.down.bias)
    return x + (hidden + depth_mixing_reference(mlp, hidden, depth)) @ adapter.up.weight.T + adapter.up.bias


# ---- adapters: equations and depth mixing ------------------------------------------------------
@pytest.mark.parametrize("mode", ADAPTER_MODES)
def test_each_adapter_of_table_4_computes_its_equation(mode):
    """vanilla (S3), depth MLP before (S4) / after (S5) the adapter, DFused (S6) with trained (non-zero)
    weights, on two stacks of three slices; W_dn: C -> C/4 and W_Dup: D -> 4D."""
    torch.manual_seed(0)
    adapter = DepthAdapter(dim=16, depth=3, mode=mode)
    randomise(adapter)
    assert adapter.down.in_features == 16 and adapter.down.out_features == 4
    if mode != "vanilla":
        assert (adapter.depth_mlp.up.in_features, adapter.depth_mlp.up.out_features) == (3, 12)
    x = torch.randn(2 * 3, 5, 5, 16)  # two stacks of three slices, 5 x 5 tokens
    assert torch.allclose(adapter(x), adapter_reference(adapter, x, depth=3), atol=1e-5)
    assert torch.allclose(adapter.delta(x), adapter_reference(adapter, x, depth=3) - x, atol=1e-5)


@pytest.mark.parametrize("mode", ADAPTER_MODES)
def test_every_adapter_starts_as_the_identity(mode):
    adapter = DepthAdapter(dim=8, depth=2, mode=mode)
    x = torch.randn(4, 7, 8)
    assert torch.equal(adapter(x), x) and not adapter.delta(x).any()


@pytest.mark.parametrize("mode", ADAPTER_MODES)
def test_every_parameter_of_a_decoder_adapter_moves_the_layernorm_that_reads_its_output(mode):
    """In SAM's two-way blocks a LayerNorm over the channels is all that reads a decoder adapter's output
    (norm3, norm4), and it removes whatever one constant the adapter adds to every channel of a token.
    Every parameter of an adapter built for that place must still move the normalised output, or its
    gradient is exactly zero and it never learns (S5's depth-MLP output bias did: a contract-test failure
    on an AMD CPU, where the float noise that had hidden it was exactly zero)."""
    torch.manual_seed(0)
    adapter = DepthAdapter(dim=8, depth=3, mode=mode, normalized_output=True)
    randomise(adapter)
    x = torch.randn(6, 5, 8)  # two stacks of three slices, 5 tokens

    def normalised() -> torch.Tensor:
        return F.layer_norm(x + adapter.delta(x), (8,))

    with torch.no_grad():
        before = normalised()
        inert = []
        for name, parameter in adapter.named_parameters():
            saved = parameter.clone()
            parameter.add_(0.5 * torch.randn_like(parameter))
            if (normalised() - before).abs().max() < 1e-4:
                inert.append(name)
            parameter.copy_(saved)
    assert not inert, f"parameters with no effect after the LayerNorm: {inert}"


@pytest.mark.parametrize("output_bias", [True, False])
def test_depth_mlp_is_the_two_layer_mlp_over_the_slices_of_each_stack(output_bias):
    """s(X^T W_Dup) W_Ddn over the depth axis: per stack, token and channel, slice d' gets
    W_Ddn[d', :] . GELU(W_Dup x + b_Dup) (+ b_Ddn) of that position's D slices."""
    torch.manual_seed(0)
    mlp = DepthMLP(3, output_bias=output_bias)
    randomise(mlp)
    x = torch.randn(6, 4, 5, 8)  # two stacks of three slices
    stacks = x.reshape(2, 3, 4, 5, 8)
    hidden = F.gelu(torch.einsum("ed,sdhwc->sehwc", mlp.up.weight, stacks) + mlp.up.bias.view(1, -1, 1, 1, 1))
    expected = torch.einsum("de,sehwc->sdhwc", mlp.down.weight, hidden)
    if output_bias:
        expected = expected + mlp.down.bias.view(1, -1, 1, 1, 1)
    assert torch.allclose(mlp(x), expected.reshape(x.shape), atol=1e-6)


@pytest.mark.parametrize("mode", ADAPTER_MODES)
def test_depth_mixing_reaches_only_the_same_token_of_the_slices_of_one_stack(mode):
    """A change of one token of slice 1 of stack 0 reaches that token in the other slices of stack 0
    (not at all for the vanilla adapter), no other token and nothing of stack 1."""
    torch.manual_seed(0)
    adapter = DepthAdapter(dim=8, depth=3, mode=mode)
    randomise(adapter)
    x = torch.randn(6, 4, 4, 8)
    changed = x.clone()
    changed[1, 2, 3] += 1.0
    difference = (adapter(changed) - adapter(x)).abs().sum(-1)
    reached = difference[:3, 2, 3] > 0
    assert reached.tolist() == ([False, True, False] if mode == "vanilla" else [True, True, True])
    difference[:3, 2, 3] = 0
    assert not difference.any()


@pytest.mark.parametrize("backbone", ["vit_test", "tinyvit_test"])
def test_changing_one_slice_changes_the_other_slices_only_at_the_same_positions_in_the_first_depth_path(backbone):
    """The depth mixing acts on un-windowed tokens: a change inside one attention window of slice 0
    reaches the other slices only at that window's positions (MaskSAM's reshape after window
    partitioning would move it to other windows)."""
    size = 128 if backbone == "vit_test" else 64  # several attention windows in the first block
    net = network(backbone, depth=3, img_size=size)
    randomise(net.encoder_adapters)
    block = net.image_encoder.transformer_blocks()[0][0]
    assert not block.is_global if backbone == "vit_test" else True
    adapter = block.adapters.after_attention
    seen = []  # the test observes the depth MLP's output; the network itself has no hooks
    handle = adapter.depth_mlp.register_forward_hook(lambda module, inputs, output: seen.append(output.detach()))
    x = torch.randn(1, 1, 3, size, size)
    changed = x.clone()
    changed[0, 0, 0, 2:6, 3:7] += 3.0  # a few pixels of slice 0, in the first window's area
    with torch.no_grad():
        net.image_encoder(net.encoder_input(x[0].transpose(0, 1)))
        net.image_encoder(net.encoder_input(changed[0].transpose(0, 1)))
    handle.remove()
    before, after = seen[0], seen[1]  # (3, H, W, C/4) for slices 0, 1, 2
    moved = (after - before).abs().sum(-1) > 0  # a token the change does not reach is bitwise the same
    source = moved[0]
    assert source.any() and not source.all()  # the change stays inside slice 0's window(s)
    for other in (1, 2):
        assert moved[other].any()
        assert not (moved[other] & ~source).any()  # only where slice 0 changed


def test_depth_positional_embedding_is_one_vector_per_slice_index_on_its_channel_axis():
    last = DepthPositionalEmbedding(depth=3, dim=4)
    first = DepthPositionalEmbedding(depth=3, dim=4, channel_axis=1)
    with torch.no_grad():
        last.embedding.copy_(torch.arange(12.0).view(3, 4))
        first.embedding.copy_(last.embedding)
    out_last, out_first = last(torch.zeros(6, 2, 2, 4)), first(torch.zeros(6, 4, 2, 2))
    for n in range(6):
        assert torch.equal(out_last[n, 1, 1], last.embedding[n % 3])
        assert torch.equal(out_first[n, :, 0, 1], last.embedding[n % 3])


# ---- MAdapter and MC-Adapter -------------------------------------------------------------------
def test_madapter_is_its_inverted_bottleneck_added_to_the_rgb_mapping_in_the_input_path():
    """MAdapter(unit) = conv1x1(LeakyReLU(InstanceNorm(conv3x3(unit)))), C -> 4 max(C, 3) -> 3, added to
    the fixed one-channel-to-RGB mapping before SAM's pixel normalisation; the encoder reads it."""
    net = network(depth=1)
    images = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        untrained = net(images[:, :, None])
        randomise(net.madapter)
        stage, layers = net.input_stage, net.madapter.layers
        unit = stage.window(images)
        hidden = F.conv2d(unit, layers[0].weight, layers[0].bias, padding=1)
        assert hidden.shape[1] == 12
        mean, var = hidden.mean((2, 3), keepdim=True), hidden.var((2, 3), unbiased=False, keepdim=True)
        normed = (hidden - mean) / torch.sqrt(var + 1e-5) * layers[1].weight.view(1, -1, 1, 1) \
            + layers[1].bias.view(1, -1, 1, 1)
        correction = F.conv2d(F.leaky_relu(normed, 0.01), layers[3].weight, layers[3].bias)
        expected = stage.normalize_pixels(stage.to_rgb(unit) + correction)
        assert torch.allclose(net.encoder_input(images), expected, atol=1e-5)
        assert not torch.allclose(net(images[:, :, None]), untrained)  # the forward reads it
    assert not MAdapter(2)(torch.rand(1, 2, 8, 8)).any()  # starts at zero: the network starts as SAM


def test_mc_adapter_is_a_residual_inverted_bottleneck_from_k_to_k_logits_without_a_norm():
    """MC(x) = x + conv1x1(LeakyReLU(conv3x3(x))), K -> 4K -> K, no normalisation (it would remove the
    logits' level); it starts as the identity (last convolution at zero)."""
    adapter = MCAdapter(3)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(adapter(x), x)
    assert not any(isinstance(m, (torch.nn.InstanceNorm2d, torch.nn.BatchNorm2d)) for m in adapter.modules())
    randomise(adapter)
    first, last = adapter.layers[0], adapter.layers[2]
    assert (first.in_channels, first.out_channels, first.kernel_size) == (3, 12, (3, 3))
    assert (last.in_channels, last.out_channels, last.kernel_size) == (12, 3, (1, 1))
    hidden = F.leaky_relu(F.conv2d(x, first.weight, first.bias, padding=1), 0.01)
    assert torch.allclose(adapter(x), x + F.conv2d(hidden, last.weight, last.bias), atol=1e-5)


# ---- the network's wiring ----------------------------------------------------------------------
@pytest.mark.parametrize("backbone", ["vit_test", "tinyvit_test"])
def test_the_full_model_starts_exactly_as_s2(backbone):
    """Adapters' up-projections, depth embeddings, the MAdapter's and the MC-Adapter's last layers start
    at zero, so the full model (S9) starts as S2 (SAM + generator, plain softmax) with the same weights."""
    full = network(backbone, depth=2)
    plain = network(backbone, depth=2, adapter=None, depth_pos_embed=False, madapter=False, mc_adapter=False)
    plain.load_state_dict(full.state_dict(), strict=False)
    x = torch.randn(1, 1, 2, 64, 64)
    with torch.no_grad():
        assert torch.allclose(full(x), plain(x), atol=1e-5)


@pytest.mark.parametrize("backbone", ["vit_test", "tinyvit_test"])
def test_encoder_depth_embedding_is_added_to_the_patch_tokens_of_its_slice(backbone):
    """The encoder's after-patch-embedding slot holds the depth embedding: the encoder equals a plain
    encoder whose patch tokens get E[d] (d = the slice index) added on the channel axis, and a change of
    E[1] changes slice 1 only (no adapters here, so slices do not mix)."""
    net = network(backbone, depth=3, adapter=None, madapter=False)
    plain = network(backbone, depth=3, adapter=None, madapter=False, depth_pos_embed=False)
    plain.load_state_dict(net.state_dict(), strict=False)
    assert net.image_encoder.adapters.after_patch_embed is net.encoder_depth_embedding
    table = torch.randn(3, net.encoder_depth_embedding.embedding.shape[1])
    axis = net.image_encoder.token_channel_axis

    def add_slice_vectors(tokens: torch.Tensor) -> torch.Tensor:
        shape = [tokens.shape[0]] + [1] * (tokens.ndim - 1)
        shape[axis] = table.shape[1]
        return tokens + table.repeat(tokens.shape[0] // 3, 1).view(shape)

    plain.image_encoder.adapters = plain.image_encoder.adapters._replace(after_patch_embed=add_slice_vectors)
    images = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        untrained = net.image_encoder(net.encoder_input(images)).embedding
        net.encoder_depth_embedding.embedding[1] = table[1]
        only_slice_one = net.image_encoder(net.encoder_input(images)).embedding
        net.encoder_depth_embedding.embedding.copy_(table)
        embedded = net.image_encoder(net.encoder_input(images)).embedding
        reference = plain.image_encoder(plain.encoder_input(images)).embedding
    assert torch.allclose(embedded, reference, atol=1e-5)
    assert torch.equal(only_slice_one[[0, 2]], untrained[[0, 2]])
    assert not torch.allclose(only_slice_one[1], untrained[1])


@pytest.mark.parametrize("backbone", ["vit_test", "tinyvit_test"])
@pytest.mark.parametrize("position", ["after_attention", "parallel_mlp"])
def test_every_encoder_block_runs_its_adapter_after_the_attention_and_in_parallel_to_the_mlp(backbone, position):
    """Each block's slot holds the network's adapter (serial: the adapter; parallel: its delta), and a
    non-zero up-projection of any one of them changes the image embedding."""
    net = network(backbone, depth=2, madapter=False, depth_pos_embed=False)
    blocks = net.image_encoder.transformer_blocks()
    assert len(net.encoder_adapters) == 2 * len(blocks)
    images = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        base = net.image_encoder(net.encoder_input(images)).embedding
        for index, (block, _) in enumerate(blocks):
            serial, parallel = net.encoder_adapters[2 * index], net.encoder_adapters[2 * index + 1]
            adapter = serial if position == "after_attention" else parallel
            assert getattr(block.adapters, position) == (serial if position == "after_attention" else parallel.delta)
            adapter.up.weight.normal_(0, 0.2)
            moved = net.image_encoder(net.encoder_input(images)).embedding
            adapter.up.weight.zero_()
            assert not torch.allclose(moved, base), f"block {index}'s {position} adapter is not in the path"


def test_generator_maps_are_the_quarter_depth_blocks_of_a_plain_vit_and_the_stages_of_tinyvit():
    vit = network("vit_test")
    blocks = len(vit.image_encoder.transformer_blocks())
    assert vit.generator_taps == tuple((i + 1) * blocks // 4 - 1 for i in range(4))
    images = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        encoded = vit.image_encoder(vit.encoder_input(images), intermediates=vit.generator_taps)
        maps = vit.generator_features(encoded)
        assert len(maps) == 5 and maps[-1] is encoded.embedding
        assert all(a is b for a, b in zip(maps[:4], encoded.intermediates))
        tiny = network("tinyvit_test")
        encoded = tiny.image_encoder(tiny.encoder_input(images), intermediates=tiny.generator_taps)
        maps = tiny.generator_features(encoded)
    assert tiny.generator_taps == () and len(maps) == 5 and maps[-1] is encoded.embedding
    assert all(a is b for a, b in zip(maps[:4], encoded.features))


def test_prompts_come_from_the_generators_finest_level(monkeypatch):
    net = network("vit_test", depth=2, deep_supervision=True)
    seen = []
    original = prompts_from_auxiliary_logits

    def recording(logits, **kwargs):
        seen.append(logits.detach().clone())
        return original(logits, **kwargs)

    monkeypatch.setattr(self_prompt_module, "prompts_from_auxiliary_logits", recording)
    with torch.no_grad():
        outputs = net(torch.randn(1, 1, 2, 64, 64))
    levels = [to_images(level) for level in outputs[1:]]
    assert len(seen) == 1 and len({level.shape[-1] for level in levels}) == len(levels)
    assert torch.equal(seen[0], levels[0])


def decoder_inputs(net: SelfPromptSAMNetwork, images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An image embedding (N, C, h, w) and finest auxiliary logits (N, K, S, S) for ``decode_classes``."""
    generator = torch.Generator().manual_seed(3)
    size = net.prompt_encoder.image_embedding_size
    embedding = torch.randn(images, net.prompt_encoder.embed_dim, *size, generator=generator)
    auxiliary = torch.randn(images, net.num_classes, net.img_size, net.img_size, generator=generator)
    return embedding, auxiliary


def test_decoder_depth_embedding_is_added_to_the_image_positional_encoding_of_every_class_pass(monkeypatch):
    """K passes (the background included) of N = 2 stacks x 2 slices, class-major: pass row k * N + n gets
    SAM's dense positional encoding plus E[n mod D]."""
    net = network(depth=2, num_classes=3)
    randomise(net.decoder_depth_embedding)
    seen = []
    monkeypatch.setattr(self_prompt_module, "decode_masks",
                        lambda decoder, embeddings, image_pe, *args, **kwargs:
                        seen.append((embeddings, image_pe)) or decode_masks(decoder, embeddings, image_pe,
                                                                            *args, **kwargs))
    embedding, auxiliary = decoder_inputs(net, images=4)
    with torch.no_grad():
        net.decode_classes(embedding, auxiliary)
        (embeddings, image_pe), = seen
        dense_pe = net.prompt_encoder.get_dense_pe()[0]
        table = net.decoder_depth_embedding.embedding
        assert embeddings.shape[0] == image_pe.shape[0] == 3 * 4
        for k in range(3):
            for n in range(4):
                assert torch.equal(embeddings[k * 4 + n], embedding[n])
                assert torch.allclose(image_pe[k * 4 + n], dense_pe + table[n % 2].view(-1, 1, 1), atol=1e-6)


def test_each_class_is_one_decoder_pass_prompted_with_its_own_prompts_into_its_own_channel():
    """Channel k of the per-class logits (k = 0, the background, included) is SAM's decoder prompted
    with class k's box, point and mask prompt, with the decoder depth embedding on the positional
    encoding and, in each two-way block, the image-side adapter after the image-to-token attention and
    the token-side adapter in parallel to the MLP; single-mask token, upsampled to S."""
    net = network(depth=2, num_classes=3)
    randomise(net.decoder_adapters, net.decoder_depth_embedding)
    embedding, auxiliary = decoder_inputs(net, images=4)
    with torch.no_grad():
        logits = net.decode_classes(embedding, auxiliary)
        assert logits.shape == (4, 3, 64, 64)
        prompts = prompts_from_auxiliary_logits(auxiliary, image_size=64,
                                                mask_size=tuple(net.prompt_encoder.mask_input_size))
        image_pe = (net.prompt_encoder.get_dense_pe()
                    + net.decoder_depth_embedding.embedding.repeat(2, 1)[:, :, None, None])
        adapters = [TwoWayLayerAdapters(after_image_attention=net.decoder_adapters[2 * i],
                                        parallel_mlp=net.decoder_adapters[2 * i + 1].delta)
                    for i in range(len(net.mask_decoder.transformer.layers))]
        for k in range(3):
            alone = ClassPrompts(*(field[:, k:k + 1] for field in prompts))
            sparse, dense = encode_class_prompts(net.prompt_encoder, alone)
            masks = decode_masks(net.mask_decoder, embedding, image_pe, sparse, dense, adapters=adapters).masks
            expected = F.interpolate(masks[:, :1], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
            assert torch.allclose(logits[:, k], expected, atol=1e-5), f"channel {k} is not class {k}'s decoding"


@pytest.mark.parametrize("index", range(4))
def test_every_decoder_adapter_is_in_the_path_and_mixes_only_the_slices_of_one_stack(index):
    """Decoder adapter ``index`` (blocks x (image side, token side)) with trained weights: a change of
    slice 0's image embedding then reaches slice 1 (same stack) but not stack 1; with that adapter's
    up-projection at zero the slices are decoded independently."""
    net = network(depth=2, num_classes=3)
    assert len(net.decoder_adapters) == 2 * len(net.mask_decoder.transformer.layers) == 4
    adapter = net.decoder_adapters[index]
    randomise(adapter)
    embedding, auxiliary = decoder_inputs(net, images=4)
    changed = embedding.clone()
    changed[0] += torch.randn_like(changed[0])
    with torch.no_grad():
        base, moved = net.decode_classes(embedding, auxiliary), net.decode_classes(changed, auxiliary)
        assert not torch.allclose(moved[1], base[1], atol=1e-6)
        assert torch.equal(moved[2:], base[2:])
        adapter.up.weight.zero_()
        adapter.up.bias.zero_()
        if adapter.mode != "dfused":
            adapter.depth_mlp.down.weight.zero_()
        base, moved = net.decode_classes(embedding, auxiliary), net.decode_classes(changed, auxiliary)
    assert torch.allclose(moved[1:], base[1:], atol=1e-6)


@pytest.mark.parametrize("mc_adapter", [True, False], ids=["MC-Adapter", "plain-softmax"])
def test_output_is_the_mc_adapter_of_all_k_binary_logits_or_those_logits_background_first(mc_adapter):
    """The decoder runs once per class, the background included, so the K binary logit maps (channel 0:
    the background's) are the MC-Adapter's input (S9) or, without it (S1-S8, "plain softmax"), the
    output; the deep-supervision outputs after it are the generator's levels, finest first."""
    net = network(depth=2, num_classes=3, mc_adapter=mc_adapter, deep_supervision=True)
    if mc_adapter:
        randomise(net.mc_adapter)
    x = torch.randn(1, 1, 2, 64, 64)
    with torch.no_grad():
        outputs = net(x)
        encoded = net.image_encoder(net.encoder_input(x.transpose(1, 2).flatten(0, 1)),
                                    intermediates=net.generator_taps)
        auxiliary = net.prompt_generator(net.generator_features(encoded))
        class_logits = net.decode_classes(encoded.embedding, auxiliary[0])
        assert class_logits.shape[1] == 3
        expected = net.mc_adapter(class_logits) if mc_adapter else class_logits
    assert torch.allclose(to_images(outputs[0]), expected, atol=1e-5)
    if not mc_adapter:
        assert torch.allclose(to_images(outputs[0])[:, 0], class_logits[:, 0], atol=1e-5)
    assert len(outputs) == 1 + len(auxiliary)
    for output, level in zip(outputs[1:], auxiliary):
        assert torch.allclose(to_images(output), level, atol=1e-5)
    assert net.deep_supervision_scales() == [[1.0, 1.0, 1.0]] + [
        [1.0, 1.0 / s, 1.0 / s] for s in net.prompt_generator.level_strides]  # depth never downsampled


@pytest.mark.parametrize("trainer, kinds", FIG_1.items(), ids=list(FIG_1))
def test_the_prompt_kinds_of_fig_1_select_what_the_decoder_is_prompted_with(trainer, kinds, monkeypatch):
    """box: 2 corner tokens; point: 1 token (+ SAM's padding token without a box); mask: the dense prompt
    (else SAM's no-mask embedding)."""
    options = TRAINERS.get(trainer).network_kwargs
    assert options["prompts"] == kinds
    net = network("vit_test", depth=1, **options)
    seen = []
    monkeypatch.setattr(self_prompt_module, "decode_masks",
                        lambda decoder, embeddings, image_pe, sparse, dense, **kwargs:
                        seen.append((sparse, dense)) or decode_masks(decoder, embeddings, image_pe, sparse, dense,
                                                                     **kwargs))
    with torch.no_grad():
        net(torch.randn(1, 1, 1, 64, 64))
    (sparse, dense), = seen
    use_box, use_point, use_mask = ("box" in kinds), ("point" in kinds), ("mask" in kinds)
    assert sparse.shape[1] == 2 * use_box + use_point + (use_point and not use_box)
    no_mask = net.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand_as(dense)
    assert torch.equal(dense, no_mask) != use_mask


def test_training_forward_compiles_without_graph_breaks_and_matches_eager():
    """The prompts are torch on the logits' device (no SciPy, no host read), so torch.compile captures
    the whole training forward in one graph (``fullgraph=True`` raises on any graph break) and the
    trainer compiles as nnU-Net decides (no override). Backend ``eager``: Dynamo's capture, the graph run
    as it was traced (``aot_eager`` passes too but takes twice as long, Inductor's code generation
    minutes on this CPU); outputs and gradients equal eager's to 1e-5."""
    assert "_do_i_compile" not in vars(SelfPromptSAMTrainer)
    net = network(backbone="tinyvit_test", img_size=HARNESS_SIZE, deep_supervision=True).train()
    randomise(net.mc_adapter)
    x = torch.randn(2, 1, 2, HARNESS_SIZE, HARNESS_SIZE, generator=torch.Generator().manual_seed(0))
    trainable = [p for p in net.parameters() if p.requires_grad]

    def run(module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        outputs = module(x)
        gradients = torch.autograd.grad(sum(o.square().mean() for o in outputs), trainable)
        return [o.detach() for o in outputs], list(gradients)

    eager_outputs, eager_gradients = run(net)
    torch._dynamo.reset()
    compiled_outputs, compiled_gradients = run(torch.compile(net, backend=COMPILE_BACKEND, fullgraph=True))
    torch._dynamo.reset()
    for compiled, eager in zip(compiled_outputs + compiled_gradients, eager_outputs + eager_gradients):
        assert torch.allclose(compiled, eager, atol=1e-5, rtol=1e-5)


def test_litemedsam_weights_load_into_the_self_prompt_network(litemedsam_checkpoint):
    from samunet.weights import load_state_dict
    net = network("litemedsam", depth=2, img_size=64)
    net.load_pretrained(load_state_dict(litemedsam_checkpoint, map_location="cpu"))
    with torch.no_grad():
        assert net(torch.randn(1, 1, 2, 64, 64)).shape == (1, 3, 2, 64, 64)


# ---- the trainer, built as nnunetv2 builds it ------------------------------------------------------
@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """Build trainers from ``TRAINERS`` with nnU-Net's folders set and one intra-op thread."""
    with trainer_workdir(tmp_path_factory.mktemp("self_prompt_trainers")):
        yield lambda name, **kwargs: build_trainer(name, **{"backbone": "vit_test", "num_classes": 3,
                                                            "img_size": HARNESS_SIZE, "depth": 2, **kwargs})


def enter_epoch(trainer, epoch: int) -> None:
    """What nnU-Net's loop does at the start of an epoch (phase switch included); epochs must ascend
    (nnU-Net's logger records one entry per epoch)."""
    if trainer._epoch_progress is not None:
        trainer._epoch_progress.close()
    trainer.current_epoch = epoch
    trainer.on_train_epoch_start()


def test_the_papers_recipe_on_the_real_trainer(harness):
    """Appendix D: SGD lr 0.01, momentum 0.99, nesterov, weight decay 3e-5, poly LR (exponent 0.9) over
    the epochs; CE + Dice on the generator's levels with weights halving per halving of resolution and
    summing to 1, plus CE + Dice on the output in phase 2 (from epoch ceil(0.2 * epochs))."""
    trainer = harness("SelfPromptSAMTrainer_sgd")
    optimizer, scheduler = trainer.optimizer, trainer.lr_scheduler
    assert type(optimizer) is torch.optim.SGD and len(optimizer.param_groups) == 1
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.01, 0.99, True, 3e-5)
    assert {id(p) for p in group["params"]} == {id(p) for p in trainer.network_module.trainable_parameters()}
    assert isinstance(scheduler, PolyLRScheduler) and scheduler.exponent == 0.9
    assert scheduler.max_steps == trainer.num_epochs == 1000

    assert trainer.training_phase_starts() == (0, 200)
    for epochs, start in ((10, 2), (3, 1), (7, 2)):
        trainer.num_epochs = epochs
        assert trainer.training_phase_starts() == (0, math.ceil(0.2 * epochs)) == (0, start)

    loss = trainer.loss
    assert isinstance(loss, SelfPromptLoss) and isinstance(loss.loss, DC_and_CE_loss)
    assert (loss.loss.weight_ce, loss.loss.weight_dice) == (1, 1)
    strides = trainer.network_module.prompt_generator.level_strides
    assert strides == (1, 2, 4, 8, 16)
    weights = loss.generator_weights
    assert sum(weights) == pytest.approx(1.0)
    for (fine, coarse), (w_fine, w_coarse) in zip(zip(strides, strides[1:]), zip(weights, weights[1:])):
        assert w_coarse / w_fine == pytest.approx(fine / coarse)

    batch = make_batch(trainer, batch_size=1)
    criterion = trainer.dice_and_ce_loss(weight_ce=1, weight_dice=1)
    trainer.network.train()
    with torch.no_grad():
        outputs = trainer.network(batch["data"])
        targets = batch["target"]
        generator_loss = sum(w * criterion(o, t) for w, o, t in zip(weights, outputs[1:], targets[1:]))
        loss.include_output = False
        assert loss(outputs, targets).item() == pytest.approx(generator_loss.item(), rel=1e-5)
        loss.include_output = True
        assert loss(outputs, targets).item() == pytest.approx(
            (generator_loss + criterion(outputs[0], targets[0])).item(), rel=1e-5)


def test_the_default_differs_from_the_papers_recipe_only_in_the_optimiser(harness):
    trainer = harness("SelfPromptSAMTrainer")
    assert type(trainer.optimizer) is torch.optim.AdamW
    group = trainer.optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (1e-3, 0.01)
    assert isinstance(trainer.lr_scheduler, PolyLRScheduler) and trainer.lr_scheduler.exponent == 0.9
    paper = TRAINERS.get("SelfPromptSAMTrainer_sgd")
    assert paper.network_kwargs == SelfPromptSAMTrainer.network_kwargs and paper.__bases__ == (SelfPromptSAMTrainer,)
    assert trainer.training_phase_starts() == (0, 200)


def test_phase_one_freezes_exactly_the_decoder_side_and_phase_two_trains_it(harness):
    """Phase 1 (epochs before ceil(0.2 * epochs)) trains only with the generator's loss, which cannot
    reach the MC-Adapter, the decoder's adapters and its depth embedding: exactly those are frozen and
    untouched by a train step; phase 2 adds the output loss and trains them (they are in the optimiser
    from the start)."""
    trainer = harness("SelfPromptSAMTrainer")
    trainer.num_epochs = 10
    net = trainer.network_module
    decoder_side = {name for name, _ in net.named_parameters()
                    if name.startswith(("mc_adapter.", "decoder_adapters.", "decoder_depth_embedding."))}
    assert {name.split(".")[0] for name in decoder_side} == {"mc_adapter", "decoder_adapters",
                                                             "decoder_depth_embedding"}
    all_trainable = {name for name, p in net.named_parameters() if p.requires_grad}
    assert decoder_side < all_trainable
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in optimised for name, p in net.named_parameters() if name in decoder_side)
    batch = make_batch(trainer, batch_size=1)

    def snapshot() -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in net.named_parameters()}

    def check_phase(epoch: int, phase_two: bool) -> None:
        enter_epoch(trainer, epoch)
        trainable = {name for name, p in net.named_parameters() if p.requires_grad}
        assert trainable == (all_trainable if phase_two else all_trainable - decoder_side), f"epoch {epoch}"
        assert trainer.loss.include_output == phase_two

    check_phase(0, phase_two=False)
    check_phase(1, phase_two=False)
    before = snapshot()
    trainer.train_step(batch)
    after = snapshot()
    assert all(torch.equal(after[name], before[name]) for name in decoder_side)
    assert any(not torch.equal(after[name], before[name]) for name in all_trainable - decoder_side)

    check_phase(2, phase_two=True)
    trainer.train_step(batch)
    trained = snapshot()
    for module in ("mc_adapter.layers.2.weight", "decoder_depth_embedding.embedding"):
        assert not torch.equal(trained[module], after[module]), f"{module} did not train in phase 2"
    assert all(net.get_parameter(name).grad is not None for name in decoder_side)
    assert any(not torch.equal(trained[name], after[name]) for name in decoder_side
               if name.startswith("decoder_adapters.") and ".up." in name)
    check_phase(9, phase_two=True)
    trainer._epoch_progress.close()


@pytest.mark.parametrize("name", [f"SelfPromptSAMTrainer_S{row}" for row in range(1, 7)])
def test_ablations_without_decoder_depth_embedding_run_several_slices_of_several_classes(harness, name):
    """Regression: S1-S6 (no decoder depth embedding) gave the decoder one positional encoding per class
    but K x N embeddings, and crashed ("The expanded size of the tensor ... must match") as soon as
    K >= 3 classes met more than one slice per batch."""
    trainer = harness(name, num_classes=3, depth=2)
    assert trainer.network_module.decoder_depth_embedding is None
    enter_epoch(trainer, trainer.training_phase_starts()[1])
    batch = make_batch(trainer, batch_size=1)
    loss = trainer.forward_and_loss(batch["data"], batch["target"])
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    trainer._epoch_progress.close()


def test_table_4_rows_add_one_block_each():
    """S1 stacked CNN; S2 MSPGenerator; S3-S6 adapters vanilla / depth before / depth after / DFused;
    S7 + depth embeddings; S8 + MAdapter; S9 (SelfPromptSAMTrainer) + MC-Adapter; box + point + mask."""
    expected = {
        "SelfPromptSAMTrainer_S1": dict(prompt_generator="stacked_cnn", adapter=None, depth_pos_embed=False,
                                        madapter=False, mc_adapter=False),
        "SelfPromptSAMTrainer_S2": dict(prompt_generator="msp", adapter=None, depth_pos_embed=False, madapter=False,
                                        mc_adapter=False),
        "SelfPromptSAMTrainer_S3": dict(adapter="vanilla"), "SelfPromptSAMTrainer_S4": dict(adapter="depth_before"),
        "SelfPromptSAMTrainer_S5": dict(adapter="depth_after"), "SelfPromptSAMTrainer_S6": dict(adapter="dfused"),
        "SelfPromptSAMTrainer_S7": dict(adapter="dfused", depth_pos_embed=True),
        "SelfPromptSAMTrainer_S8": dict(adapter="dfused", depth_pos_embed=True, madapter=True),
        "SelfPromptSAMTrainer": dict(adapter="dfused", depth_pos_embed=True, madapter=True, mc_adapter=True),
    }
    options = dict(expected["SelfPromptSAMTrainer_S2"], prompts=["box", "point", "mask"])
    for name in TABLE_4:
        kwargs = TRAINERS.get(name).network_kwargs
        assert kwargs == dict(options, **expected[name]), name
        assert issubclass(TRAINERS.get(name), SelfPromptSAMTrainer)
    s1 = network(depth=2, **TRAINERS.get("SelfPromptSAMTrainer_S1").network_kwargs)
    assert isinstance(s1.prompt_generator, StackedCNNPromptGenerator) and s1.mc_adapter is None
    assert len(s1.encoder_adapters) == len(s1.decoder_adapters) == 0 and s1.madapter is None
    assert s1.encoder_depth_embedding is None and s1.decoder_depth_embedding is None
    full = network(depth=2, **SelfPromptSAMTrainer.network_kwargs)
    assert isinstance(full.prompt_generator, MSPGenerator) and isinstance(full.mc_adapter, MCAdapter)
    assert {adapter.mode for adapter in [*full.encoder_adapters, *full.decoder_adapters]} == {"dfused"}


# ---- slice stacks ------------------------------------------------------------------------------
def test_stacks_come_from_the_2d_configuration_with_patch_d_s_s_and_batch_per_stack():
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
    configuration = {"patch_size": [96, 96], "batch_size": 12, "spacing": [1.0, 1.0],
                     "architecture": {"network_class_name": "x", "arch_kwargs": {"depth": 5},
                                      "_kw_requires_import": []}}
    stacked = stacked_configuration(ConfigurationManager(configuration))
    assert stacked.patch_size == [5, 96, 96] and stacked.batch_size == 2 and stacked.spacing == [1.0, 1.0]
    assert configuration["patch_size"] == [96, 96]  # the plans are not changed
    with pytest.raises(Exception, match="2d"):
        stacked_configuration(stacked)


def test_the_planned_stacks_per_batch_win_over_the_2d_batch_divided_by_depth():
    """The planner sizes Self-Prompt-SAM's batch with its own training memory (2.6x SAMed's per image on
    LiteMedSAM): 12 planned 2D images are 2 stacks of 5 by division, but the plan says 1."""
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
    configuration = {"patch_size": [96, 96], "batch_size": 12, "slice_stack_batch_size": 1,
                     "architecture": {"network_class_name": "x", "arch_kwargs": {"depth": 5},
                                      "_kw_requires_import": []}}
    assert stacked_configuration(ConfigurationManager(configuration)).batch_size == 1


def test_the_gaussian_blur_of_a_stack_stays_in_plane_and_takes_stacks_of_one_to_three_slices():
    """nnU-Net's blur runs over every axis: a stack of 3 slices fails at sigma 1 (padding 3 of a 3-slice
    axis; the first 15-minute run on real MRI at D = 3 died in its first epoch) and thicker stacks mix
    their slices. The trainer's blur has the same sigmas but leaves the slice axis alone, and blurs every
    slice of a channel alike."""
    from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform

    from samunet.trainers.slice_stack_augmentation import InPlaneGaussianBlurTransform
    transforms = SelfPromptSAMTrainer.get_training_transforms((3, 32, 32), (-math.pi, math.pi), None, (1, 2), True,
                                                              [False], False, [1, 2, 3], None, None)
    blurs = [step.transform for step in transforms.transforms if isinstance(getattr(step, "transform", None),
                                                                            GaussianBlurTransform)]
    assert [type(blur) for blur in blurs] == [InPlaneGaussianBlurTransform]
    assert (blurs[0].blur_sigma, blurs[0].p_per_channel) == ((0.5, 1.0), 0.5)  # nnU-Net's settings
    with pytest.raises(RuntimeError, match="Padding size"):
        GaussianBlurTransform(blur_sigma=1.0)(image=torch.rand(1, 3, 32, 32))
    for depth in (1, 2, 3, 9):
        image = torch.zeros(1, depth, 32, 32)
        image[:, :, 16, 16] = 1.0   # the same impulse on every slice ...
        image[:, 0] += 5.0          # ... and slice 0 brighter: a blur across slices would spread it
        blurred = InPlaneGaussianBlurTransform(blur_sigma=1.0)(image=image.clone())["image"]
        levels = torch.zeros(depth, 1, 1)
        levels[0] = 5.0
        impulse = blurred[0] - levels  # what the blur made of each slice's impulse
        assert torch.allclose(impulse, impulse[:1].expand_as(impulse), atol=1e-5)  # every slice alike
        assert impulse[0, 16, 16] < 0.2 and impulse[0].sum() == pytest.approx(1.0, abs=1e-4)  # spread in-plane
        assert blurred[0, 0].mean() == pytest.approx(5.0 + 1 / 32 ** 2, abs=1e-5)  # slice 0 kept its own level


def test_depth_applies_only_to_slice_stack_trainers():
    from samunet.cli.train import apply_depth_override
    from samunet.errors import ConfigurationError
    plans = {"configurations": {"2d": {"architecture": {"arch_kwargs": {"depth": 4}}}}}
    apply_depth_override(plans, "2d", 2, SelfPromptSAMTrainer)
    assert plans["configurations"]["2d"]["architecture"]["arch_kwargs"]["depth"] == 2
    with pytest.raises(ConfigurationError, match="slice-stack"):
        apply_depth_override(copy.deepcopy(plans), "2d", 2, TRAINERS.get("SAMedTrainer"))


def test_sliding_over_depth_gives_every_slice_both_sides_and_returns_the_volumes_depth():
    """Edge slices are repeated D // 2 times, so the outermost slices are the centre of a (D, S, S)
    window (context on both sides); the logits come back aligned with the input's slices."""
    from types import SimpleNamespace

    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    from samunet.inference.slice_stack_predictor import SliceStackPredictor, depth_padding

    class EchoNetwork(torch.nn.Module):
        """(B, 1, D, S, S) -> (B, 2, D, S, S): the input as class-1 logit; records window centres."""

        def __init__(self):
            super().__init__()
            self.centres = []

        def forward(self, x):
            self.centres.extend(x[:, 0, x.shape[2] // 2, 0, 0].tolist())
            return torch.cat([torch.zeros_like(x), x], dim=1)

    assert SelfPromptSAMTrainer.predictor_class() is SliceStackPredictor
    predictor = SliceStackPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                    perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.network = EchoNetwork()
    predictor.configuration_manager = ConfigurationManager({"patch_size": [3, 8, 8], "architecture": {
        "network_class_name": "EchoNetwork", "arch_kwargs": {}, "_kw_requires_import": []}})
    predictor.label_manager = SimpleNamespace(num_segmentation_heads=2)
    predictor.allowed_mirroring_axes = None
    volume = torch.arange(7.0).view(1, 7, 1, 1).expand(1, 7, 8, 8).contiguous()  # slice z holds the value z
    logits = predictor.predict_sliding_window_return_logits(volume)
    assert depth_padding(3) == 1 and logits.shape == (2, 7, 8, 8)
    assert torch.allclose(torch.as_tensor(logits[1]).float(), volume[0], atol=1e-2)  # nnU-Net returns fp16
    assert {0.0, 6.0} <= set(predictor.network.centres)  # the outermost slices sit mid-window


@pytest.mark.slow
def test_trains_on_stacks_and_predicts_a_volume_end_to_end(planned_tiny_dataset, tmp_path):
    import SimpleITK as sitk

    from samunet.cli.predict import main as predict_main
    from samunet.cli.train import train
    trainer = train(991, "2d", 0, "SelfPromptSAMTrainer", device="cpu", depth=3,
                    hyperparameters={"num_epochs": 2, "num_iterations_per_epoch": 2,
                                     "num_val_iterations_per_epoch": 1, "batch_size": 2})
    folder = Path(trainer.output_folder)
    assert trainer.configuration_manager.patch_size == [3, 64, 64]
    assert trainer.inference_allowed_mirroring_axes == (1, 2)
    log = next(folder.glob("training_log_*.txt")).read_text()
    assert "until epoch 1 of 2" in log and "phase 2" in log
    checkpoint = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    assert checkpoint["samunet"]["stack_depth"] == 3
    assert (folder / "validation" / "summary.json").is_file()
    raw = planned_tiny_dataset["nnUNet_raw"] / "Dataset991_PhantomTiny"
    assert predict_main(["-i", str(raw / "imagesTs"), "-o", str(tmp_path / "pred"), "-d", "991",
                         "-tr", "SelfPromptSAMTrainer", "-f", "0", "-device", "cpu"]) == 0
    for image in sorted((raw / "imagesTs").glob("*_0000.nii.gz")):
        predicted = sitk.ReadImage(str(tmp_path / "pred" / image.name.replace("_0000", "")))
        assert predicted.GetSize() == sitk.ReadImage(str(image)).GetSize()  # 8 slices, D = 3: every slice
