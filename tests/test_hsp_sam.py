"""HSP-SAM (Hierarchical Self-Prompting SAM): the paper's behaviour on tiny random backbones."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss

from samunet.backbones.catalog import get_backbone_spec
from samunet.modules.hierarchical_fusion import top_down_fusion
from samunet.modules.qa_prompts import QAPrompts
from samunet.networks.hsp_sam import HSPSAMNetwork

TINY_BACKBONES = ("vit_test", "tinyvit_test")
TRAINABLE_PREFIXES = ("lora.", "qa_prompts.", "level_necks.", "level_decoders.", "mask_decoder.",
                      "prompt_encoder.no_mask_embed")


def tiny_network(backbone: str, num_classes: int = 3, **kwargs) -> HSPSAMNetwork:
    torch.manual_seed(0)
    return HSPSAMNetwork(input_channels=1, num_classes=num_classes, backbone=backbone, img_size=64,
                         intensity_ranges=[[-2.0, 2.0]], **kwargs)


def tiny_encoder(backbone: str):
    torch.manual_seed(0)
    encoder = get_backbone_spec(backbone).build_encoder(64).eval()
    with torch.no_grad():  # non-zero relative-position tables / biases, so the zero-bias path is exercised
        for name, param in encoder.named_parameters():
            if "rel_pos" in name or "attention_biases" in name:
                param.normal_(0, 0.5)
    return encoder


def random_prompts(encoder, count: int = 2) -> list[torch.Tensor]:
    return [torch.randn(count, dim) for dim in encoder.prompt_level_dims]


# ---- Q prompts in the encoder ----------------------------------------------------------------
@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_q_prompts_are_attended_to_and_change_the_encoder_output(backbone):
    encoder = tiny_encoder(backbone)
    image = torch.randn(2, 3, 64, 64)
    plain = encoder(image)
    assert plain.prompts is None
    prompts = random_prompts(encoder)
    prompted = encoder(image, prompt_tokens=prompts)
    assert not torch.allclose(prompted.embedding, plain.embedding, atol=1e-4)
    # the prompts attend to the image too: their updated values depend on it
    other = encoder(torch.randn(2, 3, 64, 64), prompt_tokens=prompts)
    assert [p.shape for p in prompted.prompts] == [(2, 2, d) for d in encoder.prompt_level_dims]
    assert not torch.allclose(prompted.prompts[-1], other.prompts[-1], atol=1e-4)
    # other prompt values give another embedding (a mere rescaling would not: prompts are layer-normed)
    changed = encoder(image, prompt_tokens=random_prompts(encoder)).embedding
    assert not torch.allclose(changed, prompted.embedding, atol=1e-4)


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_without_prompts_the_encoder_is_bit_identical(backbone):
    encoder = tiny_encoder(backbone)
    image = torch.randn(1, 3, 64, 64)
    plain = encoder(image)
    none_given = encoder(image, prompt_tokens=[None] * len(encoder.prompt_level_dims))
    assert torch.equal(none_given.embedding, plain.embedding)
    assert all(torch.equal(a, b) for a, b in zip(none_given.features, plain.features))


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_prompts_of_a_level_act_from_that_level_on(backbone):
    encoder = tiny_encoder(backbone)
    image = torch.randn(1, 3, 64, 64)
    plain = encoder(image)
    levels = encoder.prompt_level_features
    prompts: list = [None] * len(levels)
    prompts[-1] = torch.randn(3, encoder.prompt_level_dims[-1])
    prompted = encoder(image, prompt_tokens=prompts)
    for index, (a, b) in enumerate(zip(prompted.features, plain.features)):
        assert torch.equal(a, b) == (index < levels[-1]), index


def test_windowed_blocks_see_the_prompts_in_every_window():
    encoder = get_backbone_spec("vit_test").build_encoder(128).eval()  # 8x8 tokens: four 4x4 windows
    block = encoder.blocks[0]
    assert not block.is_global
    tokens, prompts = torch.randn(1, 8, 8, 32), torch.randn(1, 2, 32)
    plain = block(tokens)
    with_prompts, _ = block.forward_with_prompts(tokens, prompts)
    changed = (with_prompts - plain).abs().amax(dim=-1)[0]  # (8, 8)
    for rows in (slice(0, 4), slice(4, 8)):
        for cols in (slice(0, 4), slice(4, 8)):
            assert changed[rows, cols].amin() > 0  # every window attended to the prompts


def test_prompt_tokens_get_zero_relative_position_bias():
    from samunet.backbones.sam_vit import decomposed_rel_pos_bias

    encoder = tiny_encoder("vit_test")
    attention = encoder.blocks[1].attn  # global block over the 4x4 grid
    torch.manual_seed(2)
    x, prompts = torch.randn(1, 4, 4, 32), torch.randn(1, 3, 32)
    image, extra = attention.forward_with_prompts(x, prompts)
    # reference: explicit softmax attention, SAM's bias between image tokens, none with prompts
    heads, head_dim = attention.num_heads, attention.head_dim
    qkv = attention.qkv(torch.cat([x.reshape(1, 16, 32), prompts], dim=1)).reshape(1, 19, 3, heads, head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    scores = q @ k.transpose(-1, -2) * head_dim ** -0.5
    grid_q = q[:, :, :16].reshape(1, heads, 4, 4, head_dim)
    scores[..., :16, :16] += decomposed_rel_pos_bias(grid_q, attention.rel_pos_h, attention.rel_pos_w)
    out = attention.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(1, 19, 32))
    assert torch.allclose(image, out[:, :16].reshape(1, 4, 4, 32), atol=1e-5)
    assert torch.allclose(extra, out[:, 16:], atol=1e-5)


def test_wrong_prompt_shapes_are_rejected():
    encoder = tiny_encoder("vit_test")
    with pytest.raises(ValueError, match="one prompt set per prompt level"):
        encoder(torch.randn(1, 3, 64, 64), prompt_tokens=[torch.randn(2, 32)])
    with pytest.raises(ValueError, match="prompt tokens of level 1"):
        encoder(torch.randn(1, 3, 64, 64), prompt_tokens=[torch.randn(2, 32), torch.randn(2, 7)])


# ---- Q&A prompt pairs ------------------------------------------------------------------------
def test_a_prompts_come_from_independent_per_prompt_mlps_after_a_shared_map():
    torch.manual_seed(0)
    qa = QAPrompts(num_prompts=4, encoder_dim=24, decoder_dim=16)
    answers = qa.answers()
    assert answers.shape == (4, 16)
    mapped = qa.shared_map(qa.queries)
    for i in range(4):
        assert torch.allclose(answers[i], qa.answer_mlps[i](mapped[i]))
    with torch.no_grad():
        qa.answer_mlps[2].fc2.bias.add_(1.0)
    changed = (qa.answers() - answers).abs().amax(dim=1)
    assert changed[2] > 0.5 and torch.all(changed[[0, 1, 3]] == 0)
    assert len({id(m) for m in qa.answer_mlps}) == 4


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_gradients_reach_q_through_a(backbone):
    network = tiny_network(backbone)
    qa = network.qa_prompts[0]
    qa.answers().square().sum().backward()  # A alone, no encoder involved
    assert qa.queries.grad is not None and qa.queries.grad.abs().sum() > 0
    network.zero_grad()
    network(torch.randn(2, 1, 64, 64)).logsumexp(1).mean().backward()
    for qa in network.qa_prompts:
        assert qa.queries.grad.abs().sum() > 0
        assert all(mlp.fc1.weight.grad.abs().sum() > 0 for mlp in qa.answer_mlps)


# ---- hierarchical fusion ----------------------------------------------------------------------
@pytest.mark.parametrize("skip", [True, False])
def test_top_down_fusion_follows_equation_6(skip):
    x1, x2, x3 = (torch.randn(1, 2, 3, 3) for _ in range(3))
    calls = []

    def decode(level, fused):  # "identity-like" decoder that tags its level
        calls.append(level)
        return fused * (level + 1)

    result = top_down_fusion([x1, x2, x3], decode, skip_connections=skip)
    out3 = 3 * x3
    out2 = 2 * (out3 + x2 + (out3 if skip else 0))
    assert calls == [2, 1]
    assert torch.allclose(result, out2 + x1 + (out3 if skip else 0))
    assert torch.equal(top_down_fusion([x1], decode, skip_connections=skip), x1)


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_network_feeds_its_decoders_by_equation_6(backbone):
    network = tiny_network(backbone).eval()
    captured = {}

    def keep(name, inputs=False):
        def hook(module, args, out):
            captured[name] = args[0] if inputs else out
        return hook

    network.image_encoder.register_forward_hook(keep("encoder"))
    for i, neck in enumerate(network.level_necks):
        neck.register_forward_hook(keep(f"neck{i}"))
    for i, block in enumerate(network.level_decoders):
        block.register_forward_hook(keep(f"in{i + 1}", inputs=True))
        block.register_forward_hook(keep(f"out{i + 1}"))
    network.mask_decoder.transformer.register_forward_hook(keep("in0", inputs=True))
    with torch.no_grad():
        network(torch.randn(1, 1, 64, 64))
    levels = len(network.levels)
    assert levels == len(network.image_encoder.prompt_level_features) and levels >= 2
    top = levels - 1
    out_top = captured[f"out{top}"]
    assert torch.equal(captured[f"in{top}"], captured["encoder"].embedding)  # out_N = Dec_N(neck_N(emb_N))
    dense = network.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
    for i in range(top - 1, -1, -1):
        above = captured[f"out{i + 1}"]
        expected = above + captured[f"neck{i}"] + out_top
        if i == 0:  # level 1's decoder is SAM's, which adds the dense prompt before its transformer
            expected = expected + dense
        assert torch.allclose(captured[f"in{i}"], expected, atol=1e-5), i


def test_prompt_count_defaults_to_the_class_count_and_is_independent_of_it():
    assert [qa.num_prompts for qa in tiny_network("vit_test", num_classes=5).qa_prompts] == [5, 5]
    network = tiny_network("vit_test", num_classes=5, num_prompts=2)
    assert [a.shape for a in network.answer_prompts(3)] == [(3, 2, 32)] * 2
    assert network(torch.randn(1, 1, 64, 64)).shape == (1, 5, 64, 64)


def test_ablation_flags_shape_the_network():
    only_qa = tiny_network("vit_test", hierarchical=False, skip_connections=False)
    assert only_qa.levels == (1,) and len(only_qa.level_decoders) == 0 and len(only_qa.qa_prompts) == 1
    assert only_qa.query_prompts()[0] is None and only_qa.query_prompts()[1] is only_qa.qa_prompts[0].queries
    no_qa = tiny_network("vit_test", qa_prompts=False)
    assert no_qa.qa_prompts is None and no_qa.query_prompts() is None
    assert all(a.shape == (2, 0, 32) for a in no_qa.answer_prompts(2))
    for network in (only_qa, no_qa, tiny_network("vit_test", skip_connections=False)):
        assert network(torch.randn(1, 1, 64, 64)).shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="need hierarchical=True"):
        tiny_network("vit_test", hierarchical=False)


# ---- prompt quantity, LoRA, freezing, training --------------------------------------------------
@pytest.mark.parametrize("num_prompts", [1, 16])
@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_one_and_sixteen_prompts_train(backbone, num_prompts):
    network = tiny_network(backbone, num_classes=3, num_prompts=num_prompts).train()
    assert all(qa.queries.shape[0] == num_prompts for qa in network.qa_prompts)
    loss_fn = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False}, {}, weight_ce=0.2, weight_dice=0.8)
    optimizer = torch.optim.AdamW(list(network.trainable_parameters()), lr=1e-2)
    torch.manual_seed(1)
    image, target = torch.randn(2, 1, 64, 64), torch.randint(0, 3, (2, 1, 64, 64))
    queries_before = network.qa_prompts[0].queries.detach().clone()
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = loss_fn(network(image), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert not torch.equal(network.qa_prompts[0].queries, queries_before)


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_lora_rank_32_on_every_block_starts_as_the_identity(backbone):
    network = tiny_network(backbone).eval()
    assert len(network.lora) == len(network.image_encoder.qkv_projections())
    assert all(layer.rank == 32 for layer in network.lora)
    image = torch.randn(1, 3, 64, 64)
    prompts = network.query_prompts()
    with torch.no_grad():
        with_lora = network.image_encoder(image, prompt_tokens=prompts)
        for layer in network.lora:
            layer.remove()
        without = network.image_encoder(image, prompt_tokens=prompts)
    assert torch.equal(with_lora.embedding, without.embedding)
    assert all(torch.equal(a, b) for a, b in zip(with_lora.prompts, without.prompts))


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_frozen_encoder_weights_stay_bitwise_unchanged(backbone):
    network = tiny_network(backbone).train()
    trainable = {name for name, p in network.named_parameters() if p.requires_grad}
    assert all(name.startswith(TRAINABLE_PREFIXES) for name in trainable)
    assert not any(name.startswith("image_encoder.") for name in trainable)
    frozen = {k: v.clone() for k, v in network.state_dict().items() if not k.startswith(TRAINABLE_PREFIXES)}
    optimizer = torch.optim.AdamW(list(network.trainable_parameters()), lr=1e-2, weight_decay=0.1)
    for _ in range(2):  # the second step moves LoRA's down-projections too
        optimizer.zero_grad()
        network(torch.randn(2, 1, 64, 64)).logsumexp(1).mean().backward()
        assert [n for n, p in network.named_parameters() if not p.requires_grad and p.grad is not None] == []
        optimizer.step()
    after = network.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    moved = {n for n, p in network.named_parameters() if p.grad is not None and p.grad.any()}
    for prefix in TRAINABLE_PREFIXES:
        assert any(n.startswith(prefix) for n in moved), prefix


def test_level_blocks_start_from_the_pretrained_decoder_and_neck():
    network = tiny_network("vit_test")
    with torch.no_grad():
        for param in list(network.mask_decoder.parameters()) + list(network.image_encoder.neck.parameters()):
            param.normal_()
    network._copy_pretrained_into_levels()  # what load_pretrained runs after loading the checkpoint
    block, neck = network.level_decoders[0], network.level_necks[0]
    assert torch.equal(block.mask_tokens.weight, network.mask_decoder.mask_tokens.weight)
    assert torch.equal(block.transformer.layers[0].mlp.lin1.weight,
                       network.mask_decoder.transformer.layers[0].mlp.lin1.weight)
    assert torch.equal(neck[2].weight, network.image_encoder.neck[2].weight)


# ---- trainer -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_trainer_builds_from_the_plans_and_trains_through_nnunet(planned_tiny_dataset):
    import samunet.trainers.hsp_sam  # noqa: F401 - registers HSPSAMTrainer
    from samunet.cli.train import train

    trainer = train(991, "2d", 0, "HSPSAMTrainer_1prompts", device="cpu",
                    hyperparameters={"num_epochs": 1, "num_iterations_per_epoch": 2,
                                     "num_val_iterations_per_epoch": 1, "batch_size": 2})
    network = trainer.network_module
    assert isinstance(network, HSPSAMNetwork) and network.qa_prompts[0].num_prompts == 1
    assert trainer.loss.weight_dice == 0.8 and trainer.loss.weight_ce == pytest.approx(0.2)
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    log = next(Path(trainer.output_folder).glob("training_log_*.txt")).read_text()
    assert "parameters train" in log and "Q&A prompt pair(s) per level" in log


def test_litemedsam_weights_load_and_reach_every_level(litemedsam_checkpoint):
    from samunet.weights import load_state_dict

    state = load_state_dict(litemedsam_checkpoint)
    network = HSPSAMNetwork(input_channels=1, num_classes=3, backbone="litemedsam", img_size=64,
                            intensity_ranges=[[-2.0, 2.0]])
    network.load_pretrained(state)
    assert len(network.levels) == 3  # TinyViT's three attention stages
    for block in network.level_decoders:
        assert torch.equal(block.transformer.final_attn_token_to_image.q_proj.weight,
                           state["mask_decoder.transformer.final_attn_token_to_image.q_proj.weight"])
    assert torch.equal(network.level_necks[0][2].weight, state["image_encoder.neck.2.weight"])
    with torch.no_grad():
        assert network(torch.randn(1, 1, 64, 64)).shape == (1, 3, 64, 64)
