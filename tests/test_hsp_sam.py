"""HSP-SAM (Hierarchical Self-Prompting SAM): the paper's behaviour on tiny random backbones.

What every trainer must satisfy (shapes, finite losses, frozen weights unchanged, gradients, round
trips) is checked once for every registered trainer in ``tests/test_trainer_contract.py``; LoRA's
own behaviour in ``tests/test_lora.py``. This file holds what is specific to the paper: Q prompts
in the encoder's attention at their own level, the Q&A pairs and their count, A_j feeding Dec_j,
eq. 6 with and without the skip connection, Table 5's ablation trainers and the training recipe.
"""
from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

import samunet.networks.hsp_sam as hsp_sam_module
from samunet.backbones.catalog import get_backbone_spec
from samunet.modules.hierarchical_fusion import ImageSideDecoderBlock, top_down_fusion
from samunet.modules.qa_prompts import QAPrompts
from samunet.modules.two_way_transformer import run_two_way_transformer
from samunet.networks.base import SAMNetworkConfig
from samunet.networks.hsp_sam import HSPSAMNetwork
from trainer_harness import build_trainer, make_batch, trainer_workdir

TINY_BACKBONES = ("vit_test", "tinyvit_test")  # 2 and 3 hierarchy levels; SAM's two-block decoder
TRAINER_IMG_SIZE = 32  # the smallest input the tiny backbones take
# Table 5: trainer -> (Q&A prompt pairs, hierarchy, skip connection)
TABLE_5 = {
    "HSPSAMTrainer": (True, True, True),  # Ablation_3, the paper's model
    "HSPSAMTrainer_QAOnly": (True, False, False),  # Ablation_1
    "HSPSAMTrainer_NoSkip": (True, True, False),  # Ablation_2
    "HSPSAMTrainer_HierarchyOnly": (False, True, False),  # Ablation_4
    "HSPSAMTrainer_NoQA": (False, True, True),  # Ablation_5
}


def network_config(backbone: str, num_classes: int = 3) -> SAMNetworkConfig:
    return SAMNetworkConfig(input_channels=1, num_classes=num_classes, backbone=backbone, img_size=64,
                            intensity_ranges=[[-2.0, 2.0]])


def tiny_network(backbone: str, num_classes: int = 3, **kwargs) -> HSPSAMNetwork:
    torch.manual_seed(0)
    return HSPSAMNetwork(network_config(backbone, num_classes), **kwargs)


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


def perturb(*modules: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> None:
    """Add noise to every parameter of ``modules`` (non-trivial weights: away from SAM's init values)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for param in module.parameters():
                param.add_(scale * torch.randn(param.shape, generator=generator))


class DecoderTaps:
    """What each level's decoder received and returned in the last forward, by 0-based level index
    (0 = Dec_1, SAM's mask decoder, run through ``decode_masks``; i >= 1 = ``level_decoders[i - 1]``):
    ``inputs[i]`` the fused image embedding, ``sparse[i]`` the sparse prompts, ``outputs[i]`` Dec_i's
    output (image embedding for i >= 1, mask logits for i = 0)."""

    def __init__(self, network: HSPSAMNetwork, monkeypatch) -> None:
        self.inputs, self.sparse, self.outputs = {}, {}, {}
        for index, block in enumerate(network.level_decoders, start=1):
            block.register_forward_hook(self._keep(index))
        decode = hsp_sam_module.decode_masks

        def decode_and_keep(decoder, image_embeddings, image_pe, sparse_prompts, dense_prompts, **kwargs):
            result = decode(decoder, image_embeddings, image_pe, sparse_prompts, dense_prompts, **kwargs)
            if decoder is network.mask_decoder:
                self.inputs[0], self.sparse[0], self.outputs[0] = image_embeddings, sparse_prompts, result.masks
            return result

        monkeypatch.setattr(hsp_sam_module, "decode_masks", decode_and_keep)

    def _keep(self, index: int):
        def hook(module, args, output):
            self.inputs[index], self.sparse[index], self.outputs[index] = args[0], args[2], output
        return hook

    def snapshot(self) -> dict[int, torch.Tensor]:
        return {index: output.clone() for index, output in self.outputs.items()}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """nnU-Net folders for the trainers this module builds; one intra-op thread while it lasts."""
    root = tmp_path_factory.mktemp("hsp_sam_trainers")
    with trainer_workdir(root):
        yield root


def hsp_trainer(name: str = "HSPSAMTrainer", *, backbone: str = "vit_test", num_classes: int = 3):
    return build_trainer(name, backbone=backbone, num_classes=num_classes, img_size=TRAINER_IMG_SIZE)


def last_log_lines(trainer, count: int = 2) -> list[str]:
    return Path(trainer.log_file).read_text().strip().splitlines()[-count:]


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
    from samunet.sam_import import sam_modeling
    add_decomposed_rel_pos = sam_modeling().image_encoder.add_decomposed_rel_pos

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
    grid_q = q[:, :, :16].reshape(heads, 16, head_dim)
    scores[0, :, :16, :16] = add_decomposed_rel_pos(scores[0, :, :16, :16], grid_q, attention.rel_pos_h,
                                                    attention.rel_pos_w, (4, 4), (4, 4))
    out = attention.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(1, 19, 32))
    assert torch.allclose(image, out[:, :16].reshape(1, 4, 4, 32), atol=1e-5)
    assert torch.allclose(extra, out[:, 16:], atol=1e-5)


def test_wrong_prompt_shapes_are_rejected():
    encoder = tiny_encoder("vit_test")
    with pytest.raises(ValueError, match="one prompt set per prompt level"):
        encoder(torch.randn(1, 3, 64, 64), prompt_tokens=[torch.randn(2, 32)])
    with pytest.raises(ValueError, match="prompt tokens of level 1"):
        encoder(torch.randn(1, 3, 64, 64), prompt_tokens=[torch.randn(2, 32), torch.randn(2, 7)])


@pytest.mark.parametrize("hierarchical", [True, False], ids=["hierarchy", "last-level-only"])
@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_each_levels_q_prompts_join_the_encoders_attention_at_that_level(backbone, hierarchical):
    """Changing Q_j leaves the encoder's features before level j bit-identical and changes level j's:
    the network hands Q_j to the encoder at its own level (the last one alone without hierarchy)."""
    network = tiny_network(backbone, hierarchical=hierarchical, skip_connections=hierarchical).eval()
    encoder = network.image_encoder
    captured = []
    encoder.register_forward_hook(lambda module, args, output: captured.append(output))
    image = torch.randn(1, 1, 64, 64)
    assert len(network.qa_prompts) == len(network.levels)
    for qa, level in zip(network.qa_prompts, network.levels):
        with torch.no_grad():
            network(image)
            before = captured[-1]
            qa.queries.add_(torch.randn_like(qa.queries))
            network(image)
            after = captured[-1]
        first_changed = encoder.prompt_level_features[level]
        for index, (a, b) in enumerate(zip(after.features, before.features)):
            assert torch.equal(a, b) == (index < first_changed), (level, index)
        assert not torch.equal(after.embedding, before.embedding)


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


@pytest.mark.parametrize("num_classes", [2, 5])
def test_prompt_pairs_default_to_the_number_of_segmentation_targets(num_classes):
    """c = the foreground classes K - 1 ("their quantity is set to match the number of segmentation
    targets c"): a binary task has one Q&A pair per level, five classes four. An explicit c is
    independent of K."""
    network = tiny_network("vit_test", num_classes=num_classes)
    assert [qa.num_prompts for qa in network.qa_prompts] == [num_classes - 1] * len(network.levels)
    assert [a.shape for a in network.answer_prompts(2)] == [(2, num_classes - 1, 32)] * len(network.levels)
    assert [q.shape[0] for q in network.query_prompts()] == [num_classes - 1] * len(network.levels)
    for count in (1, 16):
        explicit = tiny_network("vit_test", num_classes=num_classes, num_prompts=count)
        assert [a.shape for a in explicit.answer_prompts(3)] == [(3, count, 32)] * len(explicit.levels)


def test_the_trainer_logs_the_default_prompt_count(workdir):
    trainer = hsp_trainer(num_classes=2)
    assert trainer.network_module.qa_prompts[0].num_prompts == 1
    assert "1 Q&A prompt pair(s) per level" in last_log_lines(trainer)[-1]


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
def test_network_feeds_its_decoders_by_equation_6(backbone, monkeypatch):
    network = tiny_network(backbone).eval()
    taps = DecoderTaps(network, monkeypatch)
    captured = {}
    network.image_encoder.register_forward_hook(lambda module, args, out: captured.update(encoder=out))
    for i, neck in enumerate(network.level_necks):
        neck.register_forward_hook(lambda module, args, out, i=i: captured.update({f"neck{i}": out}))
    with torch.no_grad():
        network(torch.randn(1, 1, 64, 64))
    levels = len(network.levels)
    assert levels == len(network.image_encoder.prompt_level_features) and levels >= 2
    top = levels - 1
    out_top = taps.outputs[top]
    assert torch.equal(taps.inputs[top], captured["encoder"].embedding)  # out_N = Dec_N(neck_N(emb_N))
    for i in range(top - 1, -1, -1):
        expected = taps.outputs[i + 1] + captured[f"neck{i}"] + out_top
        assert torch.allclose(taps.inputs[i], expected, atol=1e-5), i


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_each_levels_answer_prompts_reach_that_levels_decoder(backbone, monkeypatch):
    """Dec_j's sparse prompts are A_j; changing A_j (its answer MLPs, Q untouched) leaves every deeper
    decoder's output (computed before Dec_j) bit-identical and changes Dec_j's."""
    network = tiny_network(backbone, num_classes=3).eval()
    perturb(network.level_decoders)
    taps = DecoderTaps(network, monkeypatch)
    image = torch.randn(1, 1, 64, 64)
    levels = len(network.levels)
    for j in range(levels):
        with torch.no_grad():
            network(image)
            before = taps.snapshot()
            for i, qa in enumerate(network.qa_prompts):
                assert torch.equal(taps.sparse[i], qa.answers().unsqueeze(0)), (j, i)
            for mlp in network.qa_prompts[j].answer_mlps:
                mlp.fc2.bias.add_(0.5)
            network(image)
        for deeper in range(j + 1, levels):
            assert torch.equal(taps.outputs[deeper], before[deeper]), (j, deeper)
        assert not torch.allclose(taps.outputs[j], before[j], atol=1e-5), j


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_the_skip_connection_flag_changes_the_output(backbone, monkeypatch):
    """Same weights, with and without the ``+ out_N`` term: the fused input of Dec_1 differs by out_N
    and so do the masks."""
    with_skip = tiny_network(backbone).eval()
    perturb(with_skip.level_decoders, with_skip.level_necks, with_skip.mask_decoder)
    without = tiny_network(backbone, skip_connections=False).eval()
    without.load_state_dict(with_skip.state_dict())
    taps_with, taps_without = DecoderTaps(with_skip, monkeypatch), DecoderTaps(without, monkeypatch)
    image = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        masks_with, masks_without = with_skip(image), without(image)
    top = len(with_skip.levels) - 1
    out_top = taps_with.outputs[top]
    assert out_top.abs().amax() > 0
    assert torch.equal(taps_without.inputs[top], taps_with.inputs[top])  # level N has no skip either way
    assert not torch.allclose(masks_with, masks_without, atol=1e-4)
    if top == 1:  # two levels: Dec_1's input is out_2 + neck_1(emb_1) (+ out_2)
        assert torch.allclose(taps_with.inputs[0] - taps_without.inputs[0], out_top, atol=1e-5)


# ---- decoder blocks of levels 2..N --------------------------------------------------------------
def test_image_side_blocks_hold_only_what_shapes_their_output():
    """Dec_2..Dec_N return the image side of SAM's two-way transformer: its blocks and output tokens,
    no final token-to-image attention and no mask or IoU heads."""
    network = tiny_network("tinyvit_test")
    assert len(network.level_decoders) == len(network.levels) - 1 == 2
    for block in network.level_decoders:
        assert {name.split(".")[0] for name, _ in block.named_parameters()} == {"layers", "iou_token",
                                                                                 "mask_tokens"}
        assert len(block.layers) == len(network.mask_decoder.transformer.layers)


@pytest.mark.parametrize("num_classes", [2, 5])
def test_image_side_block_computes_the_image_side_of_sams_transformer(num_classes):
    network = tiny_network("vit_test", num_classes=num_classes)
    perturb(network.mask_decoder)
    block = ImageSideDecoderBlock(transformer=network.mask_decoder.transformer, num_mask_tokens=num_classes,
                                  dim=32)
    block.copy_from(network.mask_decoder)
    torch.manual_seed(3)
    embedding, image_pe = torch.randn(2, 32, 4, 4), torch.randn(1, 32, 4, 4)
    sparse, dense = torch.randn(2, 3, 32), torch.randn(1, 32, 4, 4)
    tokens = torch.cat([network.mask_decoder.iou_token.weight, network.mask_decoder.mask_tokens.weight])
    tokens = torch.cat([tokens.unsqueeze(0).expand(2, -1, -1), sparse], dim=1)
    with torch.no_grad():
        _, keys = run_two_way_transformer(network.mask_decoder.transformer, embedding + dense,
                                          image_pe.expand(2, -1, -1, -1), tokens)
        expected = keys.transpose(1, 2).reshape(2, 32, 4, 4)
        assert torch.allclose(block(embedding, image_pe, sparse, dense), expected, atol=1e-5)


def test_level_blocks_start_from_the_pretrained_decoder_and_neck():
    network = tiny_network("vit_test")
    with torch.no_grad():
        for param in list(network.mask_decoder.parameters()) + list(network.image_encoder.neck.parameters()):
            param.normal_()
    network._copy_pretrained_into_levels()  # what load_pretrained runs after loading the checkpoint
    block, neck = network.level_decoders[0], network.level_necks[0]
    assert torch.equal(block.mask_tokens.weight, network.mask_decoder.mask_tokens.weight)
    assert torch.equal(block.iou_token.weight, network.mask_decoder.iou_token.weight)
    for own, source in zip(block.layers.parameters(), network.mask_decoder.transformer.layers.parameters()):
        assert torch.equal(own, source) and own is not source
    assert torch.equal(neck[2].weight, network.image_encoder.neck[2].weight)


# ---- what trains -------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_what_trains_is_lora_qa_pairs_necks_and_decoders(backbone):
    """The paper's trainable set: LoRA, the Q&A pairs, the new necks, every level's decoder (Dec_1
    without SAM's IoU head, which no loss supervises) and the dense "no mask" prompt; the image
    encoder, its neck (neck_N) and the prompt encoder's other parts stay frozen."""
    network = tiny_network(backbone)
    trainable = {name for name, p in network.named_parameters() if p.requires_grad}
    prefixes = ("lora.", "qa_prompts.", "level_necks.", "level_decoders.", "mask_decoder.",
                "prompt_encoder.no_mask_embed.")
    assert all(name.startswith(prefixes) for name in trainable)
    assert all(any(name.startswith(prefix) for name in trainable) for prefix in prefixes)
    assert not any(name.startswith(("image_encoder.", "mask_decoder.iou_prediction_head.")) for name in trainable)
    decoder = {name for name, _ in network.mask_decoder.named_parameters()}
    assert {f"mask_decoder.{name}" for name in decoder if not name.startswith("iou_prediction_head.")} <= trainable


@pytest.mark.parametrize("backbone, num_classes", [("tinyvit_test", 2), ("vit_test", 5)])
def test_every_trainable_parameter_learns_through_the_trainers_loss(workdir, backbone, num_classes):
    """Two of the trainer's own steps (0.8 Dice + 0.2 CE, AdamW) give every trainable parameter a non-zero
    gradient, the deepest level's decoder block included, and the count the trainer logs is the count of
    parameters that learn."""
    trainer = hsp_trainer(backbone=backbone, num_classes=num_classes)
    network = trainer.network_module
    batch = make_batch(trainer)
    trainer.network.train()
    learned: set[str] = set()
    for _ in range(2):  # LoRA's down-projections learn in the second step (the up-projections start at 0)
        trainer.train_step(batch)
        learned |= {n for n, p in network.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n: p.numel() for n, p in network.named_parameters() if p.requires_grad}
    never_learned = sorted(set(trainable) - learned)
    assert never_learned == [], "trainable but no gradient in two steps:\n" + "\n".join(never_learned)
    deepest = f"level_decoders.{len(network.level_decoders) - 1}."
    assert any(name.startswith(deepest) for name in learned)
    assert not any("iou_prediction_head" in name for name in trainable)
    logged = sum(p.numel() for p in network.trainable_parameters())
    assert logged == sum(trainable[name] for name in learned)
    assert f"{logged:,} of" in "\n".join(last_log_lines(trainer))


# ---- trainers ----------------------------------------------------------------------------------
def test_each_table_5_trainer_builds_its_own_network(workdir):
    """Every ablation trainer's network has its row's components, and any two of them differ: in the
    modules they hold, or (same modules, e.g. with and without the skip) in their output on the same
    weights."""
    networks = {}
    for name, (qa_prompts, hierarchical, skip) in TABLE_5.items():
        network = hsp_trainer(name, backbone="tinyvit_test").network_module.eval()
        assert (network.qa_prompts is not None, len(network.levels) > 1, network.skip_connections) == \
            (qa_prompts, hierarchical, skip), name
        assert len(network.level_decoders) == len(network.level_necks) == len(network.levels) - 1
        networks[name] = network
        perturb(network)
    image = torch.randn(1, 1, TRAINER_IMG_SIZE, TRAINER_IMG_SIZE)
    for (name_a, a), (name_b, b) in itertools.combinations(networks.items(), 2):
        if set(a.state_dict()) != set(b.state_dict()):
            continue  # different modules present
        b.load_state_dict(a.state_dict())
        with torch.no_grad():
            assert not torch.allclose(a(image), b(image), atol=1e-4), (name_a, name_b)


def test_trainer_uses_the_papers_recipe(workdir):
    """Loss 0.8 Dice + 0.2 CE, LoRA rank 32 on q and v of every attention layer, AdamW (lr 1e-3, weight
    decay 0.1) over exactly the trainable parameters, poly learning rate (exponent 0.9)."""
    trainer = hsp_trainer(num_classes=3)
    network = trainer.network_module
    loss = trainer._build_loss()
    assert isinstance(loss, DC_and_CE_loss)
    assert loss.weight_dice == pytest.approx(0.8) and loss.weight_ce == pytest.approx(0.2)
    assert isinstance(trainer.loss, DC_and_CE_loss) and trainer.loss.weight_dice == pytest.approx(0.8)
    projections = network.image_encoder.qkv_projections()
    assert len(network.lora) == len(projections) and all(layer.rank == 32 for layer in network.lora)
    assert all(projection.owner.adapters.qkv is layer for projection, layer in zip(projections, network.lora))
    optimizer, scheduler = trainer.configure_optimizers()
    assert type(optimizer) is torch.optim.AdamW
    assert [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [(1e-3, 0.1)]
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in network.trainable_parameters()]
    assert isinstance(scheduler, PolyLRScheduler) and scheduler.exponent == 0.9
    epochs = trainer.num_epochs
    scheduler.step(epochs // 2)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * (1 - (epochs // 2) / epochs) ** 0.9)
    log = last_log_lines(trainer)[-1]
    assert re.search(r"\d hierarchy level\(s\), 2 Q&A prompt pair\(s\) per level, skip connections True, "
                     r"LoRA rank 32", log), log


# ---- released weights --------------------------------------------------------------------------
def test_litemedsam_weights_load_and_reach_every_level(litemedsam_checkpoint):
    from samunet.weights import load_state_dict

    state = load_state_dict(litemedsam_checkpoint)
    network = HSPSAMNetwork(SAMNetworkConfig(input_channels=1, num_classes=3, backbone="litemedsam", img_size=64,
                                             intensity_ranges=[[-2.0, 2.0]]))
    network.load_pretrained(state)
    assert len(network.levels) == 3  # TinyViT's three attention stages
    for block in network.level_decoders:
        assert torch.equal(block.layers[1].cross_attn_image_to_token.q_proj.weight,
                           state["mask_decoder.transformer.layers.1.cross_attn_image_to_token.q_proj.weight"])
    assert torch.equal(network.level_necks[0][2].weight, state["image_encoder.neck.2.weight"])
    with torch.no_grad():
        assert network(torch.randn(1, 1, 64, 64)).shape == (1, 3, 64, 64)
