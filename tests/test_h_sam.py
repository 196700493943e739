"""H-SAM (HSAMNetwork, its modules and HSAMTrainer): what the paper specifies, on tiny random backbones.

Generic trainer checks (shapes, finite outputs, frozen weights, gradients, round trips, output[0]
of deep supervision == deployed output) live in tests/test_trainer_contract.py; LoRA's identity
at the start in tests/test_lora.py.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

import samunet.modules.two_way_transformer as two_way_transformer
import samunet.networks.h_sam as h_sam_network
from samunet.modules.cmattn import ClassBalancedMaskAttention, class_balanced_noise_std
from samunet.modules.decoders import decoder_tokens, default_dense_prompt, empty_sparse_prompts
from samunet.modules.mask_attention import token_to_image_message
from samunet.modules.two_way_transformer import run_two_way_transformer
from samunet.networks.base import SAMNetworkConfig
from samunet.networks.h_sam import HSAMNetwork
from samunet.registry import TRAINERS
from samunet.sam_import import sam_modeling
from samunet.trainers.h_sam import (HSAMTrainer, TwoStageLoss, WarmupPolyLRScheduler, linear_scaled_lr,
                                    published_epoch, stage_one_weight)
from trainer_harness import build_trainer, make_batch, nnunet_environment, synthetic_plans

TINY_BACKBONES = ("vit_test", "tinyvit_test")
IMG_SIZE = 64  # vit_test: a 4 x 4 embedding grid, stage 1 at 16 x 16


def tiny_network(backbone: str = "vit_test", num_classes: int = 4, deep_supervision: bool = False,
                 **kwargs) -> HSAMNetwork:
    torch.manual_seed(0)
    config = SAMNetworkConfig(input_channels=1, num_classes=num_classes, backbone=backbone, img_size=IMG_SIZE,
                              intensity_ranges=[[-2.0, 2.0]], deep_supervision=deep_supervision)
    return HSAMNetwork(config, **kwargs)


def label_map(batch: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    """(B, 1, S, S) float labels in 0..K-1, as nnU-Net's loader gives them."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_classes, (batch, 1, IMG_SIZE, IMG_SIZE), generator=generator).float()


@pytest.fixture
def trainer(tmp_path):
    """A real HSAMTrainer (nnunetv2's constructor and initialize(), synthetic plans), vit_test, 3 classes, the
    published batch size of 32 in the plans."""
    with nnunet_environment(tmp_path):
        yield build_trainer("HSAMTrainer", backbone="vit_test", num_classes=3, img_size=IMG_SIZE, batch_size=32)


# ---- loss: two stages, lw schedule, deployed output not trained --------------------------------
def test_stage_one_weight_starts_at_0_8_and_decays_exponentially_with_coefficient_0_005():
    assert stage_one_weight(0) == pytest.approx(0.8)
    assert stage_one_weight(100) == pytest.approx(0.8 * math.exp(-0.5))
    ratios = [stage_one_weight(e + 1) / stage_one_weight(e) for e in range(0, 300, 37)]
    assert ratios == pytest.approx([math.exp(-0.005)] * len(ratios))


def test_total_loss_is_lw_stage_one_plus_one_minus_lw_stage_two_and_ignores_the_deployed_average():
    loss = TwoStageLoss(lambda output, target: (output - target).abs().mean(), stage_one_weight=0.7)
    average = torch.full((1, 2, 4, 4), float("nan"))  # entry 0 (the deployed average) must not enter the loss
    stage_two, stage_one = torch.full((1, 2, 4, 4), 2.0), torch.full((1, 2, 1, 1), 5.0)
    targets = [torch.zeros_like(average), torch.zeros_like(stage_two), torch.zeros_like(stage_one)]
    assert float(loss([average, stage_two, stage_one], targets)) == pytest.approx(0.7 * 5.0 + 0.3 * 2.0)


def test_learning_rate_warms_up_linearly_then_decays_poly():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = WarmupPolyLRScheduler(optimizer, initial_lr=0.01, warmup_iterations=4, max_iterations=14,
                                      iterations_per_epoch=7)
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(13):
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[:4] == pytest.approx([0.0025, 0.005, 0.0075, 0.01])
    assert lrs[4:] == pytest.approx([0.01 * (1 - i / 10) ** 0.9 for i in range(10)])
    scheduler.step(1)  # nnU-Net's per-epoch call resynchronises to the epoch's first iteration
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lrs[7])


# ---- the recipe on the real trainer -------------------------------------------------------------
def test_trainer_optimiser_is_adamw_0_9_0_999_weight_decay_0_1_lr_0_0025_with_warmup_then_poly(trainer):
    optimizer, scheduler = trainer.configure_optimizers()
    assert type(optimizer) is torch.optim.AdamW and len(optimizer.param_groups) == 1
    group = optimizer.param_groups[0]
    assert tuple(group["betas"]) == (0.9, 0.999) and group["weight_decay"] == pytest.approx(0.1)
    assert group["initial_lr"] == pytest.approx(0.0025) and isinstance(scheduler, WarmupPolyLRScheduler)
    # the trainer's own (initialised) scheduler, driven as nnU-Net drives it: step(epoch) at every
    # epoch start, step() after every train_step
    warmup, total = 250, trainer.num_epochs * trainer.num_iterations_per_epoch
    assert (trainer.num_epochs, trainer.num_iterations_per_epoch) == (300, 250)

    def lr() -> float:
        return trainer.optimizer.param_groups[0]["lr"]

    trainer.current_epoch = 0
    trainer.on_train_epoch_start()
    assert lr() == pytest.approx(0.0025 / warmup)  # first iteration of the warm-up
    trainer.train_step(make_batch(trainer))
    assert lr() == pytest.approx(0.0025 * 2 / warmup)  # after step 1 of the warm-up
    for _ in range(warmup - 2):
        trainer.lr_scheduler.step()
    assert lr() == pytest.approx(0.0025)  # last warm-up iteration
    trainer.lr_scheduler.step()
    assert lr() == pytest.approx(0.0025)  # poly starts from the full lr
    trainer.lr_scheduler.step()
    assert lr() == pytest.approx(0.0025 * (1 - 1 / (total - warmup)) ** 0.9)
    trainer.current_epoch = trainer.num_epochs - 1
    trainer.on_train_epoch_start()
    for _ in range(trainer.num_iterations_per_epoch - 1):
        trainer.lr_scheduler.step()
    assert trainer.lr_scheduler.iteration == total - 1
    assert lr() == pytest.approx(0.0025 * (1 / (total - warmup)) ** 0.9)  # last iteration, about 0


def test_a_smaller_batch_gets_the_linearly_scaled_lr_unless_lr_is_given(tmp_path):
    assert linear_scaled_lr(0.0025, 8, 32) == pytest.approx(0.000625)
    assert linear_scaled_lr(0.0025, 6, 32) == pytest.approx(0.00046875)  # the real-MRI runs' batch
    assert linear_scaled_lr(0.0025, 64, 32) == pytest.approx(0.0025)  # never above the published lr
    with pytest.raises(ValueError):
        linear_scaled_lr(0.0025, 0, 32)
    with nnunet_environment(tmp_path):
        trainer = build_trainer("HSAMTrainer", backbone="vit_test", num_classes=3, img_size=IMG_SIZE, batch_size=8)
        assert trainer.optimizer.param_groups[0]["initial_lr"] == pytest.approx(0.0025 * 8 / 32)
        resized = TRAINERS.get("HSAMTrainer")(synthetic_plans(backbone="vit_test", img_size=IMG_SIZE, batch_size=8),
                                              "2d", 0, trainer.dataset_json, torch.device("cpu"))
        resized.set_hyperparameters({"batch_size": 2})  # --batch-size 2
        assert resized.initial_lr == pytest.approx(0.0025 * 2 / 32)
        resized.set_hyperparameters({"initial_lr": 0.003})  # --lr: exactly as given
        assert resized.initial_lr == pytest.approx(0.003)
        variant = build_trainer("HSAMTrainer_learnable_nohpd_cm", backbone="vit_test", num_classes=3,
                                img_size=IMG_SIZE, batch_size=8)
        assert variant.initial_lr == pytest.approx(0.000625)


def test_trainer_loss_is_0_1_ce_plus_0_9_dice_per_stage_with_lw_set_at_every_epoch_start(trainer):
    loss = trainer._build_loss()
    assert isinstance(loss, TwoStageLoss) and isinstance(loss.stage_loss, DC_and_CE_loss)
    assert (loss.stage_loss.weight_ce, loss.stage_loss.weight_dice) == (pytest.approx(0.1), pytest.approx(0.9))
    trainer.num_epochs = 300  # the paper's run: its own schedule
    for epoch, expected in ((0, 0.8), (100, 0.8 * math.exp(-0.005 * 100))):
        trainer.current_epoch = epoch
        trainer.on_train_epoch_start()
        assert trainer.loss.stage_one_weight == pytest.approx(expected)


def test_a_shorter_run_follows_the_published_lw_curve_stretched_over_its_own_epochs(trainer):
    """The supplement: lw decays "in 300 training epochs". A 20-epoch run (a --max-minutes plan, or
    --num-epochs 20) passes the same points at the same fraction of its length, ending near 0.8 exp(-1.5)."""
    trainer.num_epochs = 20
    for epoch in (0, 5, 10, 19):
        trainer.current_epoch = epoch
        trainer.on_train_epoch_start()
        assert trainer.loss.stage_one_weight == pytest.approx(0.8 * math.exp(-0.005 * 300 * epoch / 20))
    assert trainer.loss.stage_one_weight < 0.21  # stage 2 carries most of the loss by the end, as published
    trainer.current_epoch, trainer.num_epochs = 10, 15  # a budget re-planned shorter: lw moves along the curve
    trainer.on_train_epoch_start()
    assert trainer.loss.stage_one_weight == pytest.approx(0.8 * math.exp(-0.005 * 300 * 10 / 15))
    assert published_epoch(3, 300) == 3 and published_epoch(1, 2) == 150
    with pytest.raises(ValueError):
        published_epoch(0, 0)


# ---- CMAttn (Eq. 1): class-balanced noise drawn by each pixel's ground-truth class ---------------
def test_noise_std_is_inversely_proportional_to_the_square_root_of_the_class_frequency():
    frequencies = [0.70, 0.25, 0.04, 0.01]
    module = ClassBalancedMaskAttention(num_classes=4, max_noise_std=0.1)
    module.set_class_frequencies(frequencies)
    std = module.noise_std()
    assert float(std[3]) == pytest.approx(0.1)  # the rarest class gets max_noise_std
    assert (std ** 2 * torch.tensor(frequencies)).allclose(torch.full((4,), 0.01 * 0.01))  # var ~ 1 / frequency


def test_a_class_absent_from_the_training_data_counts_as_the_rarest():
    std = class_balanced_noise_std(torch.tensor([0.9, 0.1, 0.0]), 0.2)
    assert std.tolist() == pytest.approx([0.2 * math.sqrt(0.1 / 0.9), 0.2, 0.2])


def test_noise_std_uses_masked_arithmetic_and_equals_the_former_boolean_indexed_formula():
    """No data-dependent branch or boolean indexing (H-SAM's former host syncs): the same values as the
    former float64 formula, every class the rarest when none was seen, on the frequencies' device."""
    def former(frequencies: torch.Tensor, max_noise_std: float) -> torch.Tensor:
        frequencies = frequencies.double()
        present = frequencies > 0
        if not bool(present.any()):
            return torch.full(frequencies.shape, float(max_noise_std))
        ratio = torch.where(present, frequencies[present].min() / frequencies.clamp_min(1e-300), 1.0)
        return (max_noise_std * ratio.sqrt()).float()

    generator = torch.Generator().manual_seed(0)
    for frequencies in (torch.rand(6, generator=generator), torch.tensor([0.0, 0.3, 0.0, 0.7]), torch.zeros(3),
                        torch.tensor([1e-6, 0.5, 0.25])):
        std = class_balanced_noise_std(frequencies, 0.1)
        assert std.dtype == torch.float32 and std.device == frequencies.device
        assert torch.allclose(std, former(frequencies, 0.1), rtol=1e-6, atol=0)


def test_training_forward_compiles_without_graph_breaks_and_matches_eager():
    """CMAttn no longer branches on device values or indexes with a mask, so torch.compile captures the
    whole training forward (noise and dropout included) in one graph (``fullgraph=True`` raises on a
    graph break); with Dynamo's ``eager`` backend the captured graph draws the same noise and gives
    eager's outputs to 1e-5."""
    net = tiny_network(backbone="tinyvit_test", deep_supervision=True).train()
    net.set_class_frequencies([0.7, 0.2, 0.1, 0.0])
    with torch.no_grad():  # a trained gate: the noise reaches the outputs
        net.stage2_decoder.cmattn.compress.weight.normal_(0, 1.0)
    x, labels = torch.randn(2, 1, IMG_SIZE, IMG_SIZE), label_map(2, 4)
    torch.manual_seed(3)
    eager = net(x, labels)
    torch._dynamo.reset()
    compiled = torch.compile(net, backend="eager", fullgraph=True)
    torch.manual_seed(3)
    traced = compiled(x, labels)
    torch._dynamo.reset()
    for a, b in zip(traced, eager):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_training_noise_at_a_pixel_has_the_std_of_its_ground_truth_class_and_ignore_pixels_get_none():
    """Eq. 1, P(gt = i) + N(0, var(i)): inside a rare class's region every channel of P is perturbed with
    the rare class's std, outside with the common class's (regression: the noise used to follow the class
    channel, the same std at every pixel)."""
    module = ClassBalancedMaskAttention(num_classes=3, max_noise_std=0.1)
    module.set_class_frequencies([0.96, 0.01, 0.03])  # class 1 rare, class 0 common
    std = module.noise_std()
    assert float(std[1]) == pytest.approx(0.1) and float(std[0]) < 0.011
    probabilities = torch.full((4, 3, 32, 32), 1 / 3)
    labels = torch.zeros(4, 1, 128, 128)  # at 4x the grid of P: resized (nearest) inside the module
    labels[:, :, :64, :64] = 1   # class 1: the top left quarter of P
    labels[:, :, 64:, 64:] = 3   # outside 0..K-1 (nnU-Net's ignore label): no noise
    torch.manual_seed(0)
    module.train()
    noise = module.add_class_noise(probabilities, labels) - probabilities
    rare, ignored = noise[..., :16, :16], noise[..., 16:, 16:]
    common = torch.cat([noise[..., :16, 16:].flatten(), noise[..., 16:, :16].flatten()])
    assert float(rare.std()) == pytest.approx(float(std[1]), rel=0.05)
    assert float(common.std()) == pytest.approx(float(std[0]), rel=0.05)
    for channel in range(3):  # every channel of P, not only the class's own
        assert float(rare[:, channel].std()) == pytest.approx(float(std[1]), rel=0.1)
    assert torch.equal(ignored, torch.zeros_like(ignored))


def test_no_noise_and_no_label_map_needed_at_inference_but_training_requires_the_label_map():
    module = ClassBalancedMaskAttention(num_classes=3)
    torch.nn.init.normal_(module.compress.weight)
    embedding, mask_feature = torch.randn(2, 8, 4, 4), torch.randn(2, 3, 4, 4)
    probabilities = mask_feature.softmax(1)
    module.eval()
    assert torch.equal(module.add_class_noise(probabilities, torch.ones(2, 1, 4, 4)), probabilities)
    assert torch.equal(module(embedding, mask_feature), module(embedding, mask_feature))
    module.train()
    with pytest.raises(ValueError, match="ground-truth"):
        module(embedding, mask_feature)
    network = tiny_network(num_classes=3).train()
    with pytest.raises(ValueError, match="ground-truth"):
        network(torch.randn(1, 1, IMG_SIZE, IMG_SIZE))


def test_cmattn_starts_as_the_identity():
    module = ClassBalancedMaskAttention(num_classes=3).eval()
    embedding, mask_feature = torch.randn(2, 8, 4, 4), torch.randn(2, 3, 4, 4)
    assert torch.equal(module(embedding, mask_feature), embedding)
    torch.nn.init.normal_(module.compress.weight)
    assert not torch.allclose(module(embedding, mask_feature), embedding)


def test_class_frequencies_travel_in_the_state_dict():
    network = tiny_network(class_frequencies=[0.6, 0.3, 0.08, 0.02])
    rebuilt = tiny_network()
    assert not torch.allclose(rebuilt.stage2_decoder.cmattn.class_frequencies, torch.tensor([0.6, 0.3, 0.08, 0.02]))
    rebuilt.load_state_dict(network.state_dict())
    assert torch.allclose(rebuilt.stage2_decoder.cmattn.class_frequencies, torch.tensor([0.6, 0.3, 0.08, 0.02]))


def test_cmattn_receives_stage_one_mask_feature_and_the_label_map(monkeypatch):
    """The mask feature is every stage-1 class token times stage 1's transformer image tokens, before
    upsampling (B, K, h, w); it must reach CMAttn undetached, and the stage-1 logits must not."""
    network = tiny_network(num_classes=3, mask_attention="none", hierarchical_pixel_decoder=False,
                           deep_supervision=True).train()
    cmattn = network.stage2_decoder.cmattn
    torch.nn.init.normal_(cmattn.compress.weight)  # the gate starts at zero (identity)
    received = {}
    original = cmattn.forward

    def spy(image_embedding, mask_feature, ground_truth=None):
        received.update(mask_feature=mask_feature, ground_truth=ground_truth)
        return original(image_embedding, mask_feature, ground_truth)

    monkeypatch.setattr(cmattn, "forward", spy)
    image, labels = torch.randn(2, 1, IMG_SIZE, IMG_SIZE), label_map(2, 3)
    _, stage_two, _ = network(image, labels)
    decoder = network.mask_decoder
    with torch.no_grad():
        embedding = network.image_encoder(network.input_stage(image)).embedding
        tokens, image_tokens = run_two_way_transformer(
            decoder.transformer, embedding + default_dense_prompt(network.prompt_encoder),
            network.prompt_encoder.get_dense_pe().expand(2, -1, -1, -1),
            decoder_tokens(decoder, empty_sparse_prompts(network.prompt_encoder, 2)))
        expected = (tokens[:, 1:4] @ image_tokens.transpose(1, 2)).view(2, 3, *embedding.shape[-2:])
    assert received["mask_feature"].shape == (2, 3, *embedding.shape[-2:])
    assert torch.allclose(received["mask_feature"], expected, atol=1e-5)
    assert received["ground_truth"] is labels
    stage_two.square().mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in decoder.transformer.parameters())
    assert all(p.grad is None for p in decoder.output_hypernetworks_mlps.parameters())  # logits not used


def test_trainer_forward_and_loss_gives_the_full_resolution_label_map_to_the_network(trainer, monkeypatch):
    """HSAMTrainer.forward_and_loss passes target[0] into the network's forward (through ``trainer.network``),
    where CMAttn draws its noise by it."""
    network = trainer.network
    torch.nn.init.normal_(trainer.network_module.stage2_decoder.cmattn.compress.weight)  # noise now shows
    network.train()
    received = []
    original = network.forward

    def spy(x, target=None):
        received.append(target)
        return original(x, target)

    monkeypatch.setattr(network, "forward", spy)
    batch = make_batch(trainer)
    data, target = batch["data"], batch["target"]
    torch.manual_seed(1)
    loss = trainer.forward_and_loss(data, target)
    assert len(received) == 1 and received[0] is target[0]
    torch.manual_seed(1)
    assert torch.equal(loss, trainer.loss(network(data, target[0]), target))
    torch.manual_seed(1)  # the same noise draws, another label map: another loss
    assert not torch.equal(loss, trainer.loss(network(data, torch.flip(target[0], dims=(-1,))), target))


# ---- learnable mask cross-attention (Eq. 3) and its binary ablation (Eq. 2) ----------------------
@pytest.fixture
def cross_attention_inputs():
    torch.manual_seed(0)
    attention = sam_modeling().transformer.Attention(16, num_heads=2, downsample_rate=2)
    queries, keys = torch.randn(2, 5, 16), torch.randn(2, 9, 16)
    return attention, queries, keys


def test_learnable_mask_attention_with_m_0_leaves_queries_unchanged_and_with_m_1_is_cross_attention(
        cross_attention_inputs):
    attention, queries, keys = cross_attention_inputs
    zeros, ones = torch.zeros(2, 5, 9), torch.ones(2, 5, 9)
    assert torch.equal(queries + token_to_image_message(attention, queries, keys, keys, zeros, "learnable"), queries)
    plain = attention(q=queries, k=keys, v=keys)
    assert torch.allclose(token_to_image_message(attention, queries, keys, keys, ones, "learnable"), plain, atol=1e-6)
    assert torch.allclose(token_to_image_message(attention, queries, keys, keys, zeros, "none"), plain)


def test_gradients_flow_through_the_learnable_mask_but_not_the_binary_one(cross_attention_inputs):
    attention, queries, keys = cross_attention_inputs
    mask = torch.rand(2, 5, 9, requires_grad=True)
    token_to_image_message(attention, queries, keys, keys, mask, "learnable").square().sum().backward()
    assert mask.grad is not None and mask.grad.abs().sum() > 0
    binary = torch.rand(2, 5, 9, requires_grad=True)
    out = token_to_image_message(attention, queries, keys, keys, binary, "binary")
    assert not out.requires_grad or torch.autograd.grad(out.sum(), binary, allow_unused=True)[0] is None


def test_binary_mask_attention_attends_only_inside_the_mask_and_everywhere_when_it_is_empty(cross_attention_inputs):
    attention, queries, keys = cross_attention_inputs
    mask = torch.zeros(2, 5, 9)
    mask[:, :, :3] = 0.9
    inside = token_to_image_message(attention, queries, keys, keys, mask, "binary")
    assert torch.allclose(inside, attention(q=queries, k=keys[:, :3], v=keys[:, :3]), atol=1e-6)
    empty = token_to_image_message(attention, queries, keys, keys, torch.zeros(2, 5, 9), "binary")
    assert torch.allclose(empty, attention(q=queries, k=keys, v=keys), atol=1e-6)


def test_mask_token_i_attends_with_class_i_resized_stage_one_probability(monkeypatch):
    """M row 1+i is class i's stage-1 probability, area-averaged to the key grid (the IoU token gets
    ones); changing class i's probability in a region changes mask token i's message only."""
    calls, messages = [], []

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return run_two_way_transformer(*args, **kwargs)

    def recording_message(attention, q, k, v, mask, mode):
        messages.append((attention, mask, mode))
        return token_to_image_message(attention, q, k, v, mask, mode)

    monkeypatch.setattr(h_sam_network, "run_two_way_transformer", recording)
    monkeypatch.setattr(two_way_transformer, "token_to_image_message", recording_message)
    network = tiny_network(num_classes=4, hierarchical_pixel_decoder=False, cmattn=False,
                           deep_supervision=True).eval()
    with torch.no_grad():
        _, _, stage_one = network(torch.randn(2, 1, IMG_SIZE, IMG_SIZE))
    assert len(calls) == 2 and calls[0].get("token_masks") is None  # stage 1 is plain SAM
    masks, mode = calls[1]["token_masks"], calls[1]["mask_mode"]
    assert mode == "learnable" and masks.shape == (2, 1 + 4, 16)
    expected = F.interpolate(stage_one.softmax(1), size=(4, 4), mode="area").flatten(2)
    assert torch.equal(masks[:, 0], torch.ones(2, 16))
    assert torch.allclose(masks[:, 1:], expected, atol=1e-6)
    # every token-to-image attention of stage 2 (each two-way block's and the final one) is guided by M
    transformer = network.stage2_decoder.transformer
    guided = [attention for attention, mask, mode in messages if mask is masks and mode == "learnable"]
    assert guided == [layer.cross_attn_token_to_image for layer in transformer.layers] + [
        transformer.final_attn_token_to_image]
    attention = network.stage2_decoder.transformer.layers[0].cross_attn_token_to_image
    torch.manual_seed(1)
    queries, keys = torch.randn(2, 5, attention.embedding_dim), torch.randn(2, 16, attention.embedding_dim)
    with torch.no_grad():
        before = token_to_image_message(attention, queries, keys, keys, masks, mode)
        for i in range(4):
            changed = masks.clone()
            changed[:, 1 + i, :8] = 1 - changed[:, 1 + i, :8]  # class i's probability in half of the grid
            after = token_to_image_message(attention, queries, keys, keys, changed, mode)
            moved = (after - before).abs().amax(dim=(0, 2)) > 1e-6
            assert moved.tolist() == [token == 1 + i for token in range(5)], i


def test_stage_two_loss_reaches_stage_one_through_the_mask_only_when_mask_attention_is_learnable():
    for mode, reaches in (("learnable", True), ("binary", False), ("none", False)):
        network = tiny_network(mask_attention=mode, hierarchical_pixel_decoder=False, cmattn=False,
                               deep_supervision=True)
        _, stage_two, _ = network(torch.randn(2, 1, IMG_SIZE, IMG_SIZE))
        stage_two.logsumexp(1).mean().backward()
        grads = [p.grad for p in network.mask_decoder.output_hypernetworks_mlps.parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads) == reaches, mode


def test_learnable_binary_and_no_mask_attention_give_different_stage_two_outputs():
    """Stage 2 guided by the same stage-1 output gives three different results with learnable, binary
    (Mask2Former) and plain attention. The stage-1 logits are set so that each class is likely on one half
    of the key grid: a binary mask that keeps all keys of a token, or none, would be plain attention."""
    network = tiny_network(num_classes=2, hierarchical_pixel_decoder=False, cmattn=False, deep_supervision=True)
    network.eval()
    embedding = network.image_encoder(network.input_stage(torch.randn(2, 1, IMG_SIZE, IMG_SIZE))).embedding
    image_pe = network.prompt_encoder.get_dense_pe()
    sparse = empty_sparse_prompts(network.prompt_encoder, 2)
    dense = default_dense_prompt(network.prompt_encoder)
    stage_one = h_sam_network.decode_stage_one(network.mask_decoder, embedding, image_pe, sparse, dense)
    halves = torch.zeros_like(stage_one.logits)
    width = halves.shape[-1]
    halves[:, 0, :, : width // 2] = 4.0  # background on the left half, class 1 on the right half
    halves[:, 1, :, width // 2:] = 4.0
    stage_one = stage_one._replace(logits=halves)
    outputs = {}
    with torch.no_grad():
        for mode in ("learnable", "binary", "none"):
            network.stage2_decoder.mask_attention = mode
            outputs[mode] = network.stage2_decoder(embedding, image_pe, sparse, dense, stage_one)
    for a, b in (("learnable", "binary"), ("learnable", "none"), ("binary", "none")):
        assert (outputs[a] - outputs[b]).abs().max() > 1e-4, (a, b)


# ---- hierarchical pixel decoder ---------------------------------------------------------------------
@pytest.mark.parametrize("hierarchical", [True, False])
def test_hierarchical_pixel_decoder_takes_both_skip_levels_of_stage_one(hierarchical):
    """Stage 1's pixel decoder gives a 2h level (after its first ConvT) and a 4h level (after its second);
    stage 2's hierarchical pixel decoder takes both. With stage 1's second ConvT weight at zero its 4h
    level no longer depends on the 2h one, so a gradient at the first ConvT comes through the 2h skip."""
    network = tiny_network(mask_attention="none", cmattn=False, hierarchical_pixel_decoder=hierarchical,
                           deep_supervision=True)
    upscaling = network.mask_decoder.output_upscaling
    with torch.no_grad():
        upscaling[3].weight.zero_()
    _, stage_two, _ = network(torch.randn(2, 1, IMG_SIZE, IMG_SIZE))
    stage_two.square().mean().backward()  # stage 2 only: stage 1 reaches it through the skips alone
    for layer in (3, 0):  # the 4h level, the 2h level
        grad = upscaling[layer].weight.grad
        assert (grad is not None and bool(grad.abs().sum() > 0)) == hierarchical, layer


def test_stage_two_starts_from_the_stage_one_decoder():
    network = tiny_network()
    with torch.no_grad():
        for parameter in network.mask_decoder.parameters():
            parameter.add_(1.0)
    network.stage2_decoder.initialise_from(network.mask_decoder)
    stage_one, stage_two = network.mask_decoder, network.stage2_decoder
    assert torch.equal(stage_two.mask_tokens.weight, stage_one.mask_tokens.weight)
    assert all(torch.equal(a, b) for a, b in zip(stage_two.transformer.parameters(),
                                                 stage_one.transformer.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(stage_two.pixel_decoder.output_upscaling.parameters(),
                                                 stage_one.output_upscaling.parameters()))


# ---- outputs: deployed average first ------------------------------------------------------------------
def test_vit_stage_one_is_supervised_at_a_quarter_and_everything_else_at_full_resolution():
    assert tiny_network("vit_test").deep_supervision_scales() == [[1.0, 1.0], [1.0, 1.0], [0.25, 0.25]]
    assert tiny_network("tinyvit_test").deep_supervision_scales() == [[1.0, 1.0]] * 3


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_deep_supervision_entry_0_is_the_deployed_mean_of_both_stages_probabilities(backbone):
    """Regression: the deep-supervision list used to start with stage 2 alone, so nnU-Net's online
    pseudo-Dice and checkpoint_best rated stage 2 instead of the averaged output prediction uses."""
    network = tiny_network(backbone, num_classes=5, deep_supervision=True).eval()
    image = torch.randn(2, 1, IMG_SIZE, IMG_SIZE)
    with torch.no_grad():
        average, stage_two, stage_one = network(image)
        network.deep_supervision = False
        deployed = network(image)
    assert torch.equal(average, deployed)
    upsampled = F.interpolate(stage_one, size=(IMG_SIZE, IMG_SIZE), mode="bilinear", align_corners=False)
    assert torch.allclose(deployed.exp(), (stage_two.softmax(1) + upsampled.softmax(1)) / 2, atol=1e-6)
    assert not torch.allclose(deployed.softmax(1), stage_two.softmax(1), atol=1e-3)


def test_online_validation_counts_come_from_the_averaged_output(trainer):
    """nnU-Net's validation_step (online pseudo-Dice, hence checkpoint_best) on HSAMTrainer computes
    tp/fp/fn from the stage average, not from stage 2 or stage 1 alone (they disagree here)."""
    trainer.network.eval()
    batch = make_batch(trainer, batch_size=2, seed=3)
    with torch.no_grad():
        counted = trainer.validation_step({"data": batch["data"], "target": [t.clone() for t in batch["target"]]})
        average, stage_two, stage_one = trainer.network(batch["data"])
    labels = batch["target"][0][:, 0].long()

    def counts(logits):
        predicted = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear").argmax(1)
        return [np.array([int(((predicted == k) & (labels == k)).sum()) for k in (1, 2)]),
                np.array([int(((predicted == k) & (labels != k)).sum()) for k in (1, 2)]),
                np.array([int(((predicted != k) & (labels == k)).sum()) for k in (1, 2)])]

    got = [np.asarray(counted[key]) for key in ("tp_hard", "fp_hard", "fn_hard")]
    assert all(np.array_equal(a, b) for a, b in zip(got, counts(average)))
    for single_stage in (stage_two, stage_one):
        assert not all(np.array_equal(a, b) for a, b in zip(got, counts(single_stage)))


# ---- what trains, ablations -----------------------------------------------------------------------------
def test_encoder_frozen_with_rank_4_qv_lora_on_every_attention_layer_decoders_and_default_prompt_train():
    network = tiny_network()
    assert len(network.lora) == len(network.image_encoder.qkv_projections())
    assert all(layer.q_down.out_features == layer.v_down.out_features == 4 for layer in network.lora)
    trainable = {name for name, p in network.named_parameters() if p.requires_grad}
    expected = {name for name, _ in network.named_parameters()
                if name.startswith(("lora.", "mask_decoder.", "stage2_decoder.", "prompt_encoder.no_mask_embed."))
                and not name.startswith("mask_decoder.iou_prediction_head.")}  # no loss supervises SAM's IoU head
    assert trainable == expected


ABLATIONS = {  # Tables 4 and 5: trainer -> (mask attention, hierarchical pixel decoder, CMAttn)
    "HSAMTrainer_learnable_hpd_nocm": ("learnable", True, False),
    "HSAMTrainer_learnable_nohpd_cm": ("learnable", False, True),
    "HSAMTrainer_learnable_nohpd_nocm": ("learnable", False, False),
    "HSAMTrainer_none_hpd_cm": ("none", True, True),
    "HSAMTrainer_none_hpd_nocm": ("none", True, False),
    "HSAMTrainer_none_nohpd_cm": ("none", False, True),
    "HSAMTrainer_none_nohpd_nocm": ("none", False, False),
    "HSAMTrainer_binary_nohpd_nocm": ("binary", False, False),
}


def trainer_network(name: str) -> HSAMNetwork:
    """The network trainer ``name`` builds from plans (its static builder), vit_test at 64 px, 4 classes."""
    plans = PlansManager(synthetic_plans(backbone="vit_test", img_size=IMG_SIZE))
    torch.manual_seed(0)
    return TRAINERS.get(name).build_network_architecture(plans, plans.get_configuration("2d"), 1, 4, True)


def test_the_registered_h_sam_trainers_are_the_full_model_and_the_papers_ablations():
    assert sorted(n for n in TRAINERS.names() if n.startswith("HSAMTrainer")) == sorted(["HSAMTrainer", *ABLATIONS])
    for name in ABLATIONS:  # an ablation changes the network's options and nothing else of the trainer
        cls = TRAINERS.get(name)
        assert cls.__bases__ == (HSAMTrainer,)
        assert {k for k in vars(cls) if not k.startswith("__")} == {"network_kwargs"}, name


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_ablation_trainer_builds_the_full_network_except_its_switched_parts(name):
    mask_attention, hierarchical, cmattn = ABLATIONS[name]
    full, ablated = trainer_network("HSAMTrainer"), trainer_network(name)
    assert full.stage2_decoder.mask_attention == "learnable"
    assert ablated.stage2_decoder.mask_attention == mask_attention
    full_shapes = {k: v.shape for k, v in full.state_dict().items()}
    shapes = {k: v.shape for k, v in ablated.state_dict().items()}

    def in_module(keys, module: str) -> set[str]:
        return {k for k in keys if k.startswith(f"stage2_decoder.{module}.")}

    expected_missing = (set() if cmattn else in_module(full_shapes, "cmattn")) | (
        set() if hierarchical else in_module(full_shapes, "pixel_decoder"))
    expected_added = set() if hierarchical else in_module(shapes, "output_upscaling")
    assert set(full_shapes) - set(shapes) == expected_missing
    assert set(shapes) - set(full_shapes) == expected_added
    reshaped = {k for k in set(shapes) & set(full_shapes) if shapes[k] != full_shapes[k]}
    # without the hierarchical pixel decoder stage 2's hypernetworks output SAM's C/8 channels, not C/16
    assert reshaped == (set() if hierarchical else {k for k in shapes if k.startswith(
        "stage2_decoder.output_hypernetworks_mlps.") and ".layers.2." in k})
    assert (ablated.stage2_decoder.cmattn is None) == (not cmattn)
    assert (ablated.stage2_decoder.pixel_decoder is None) == (not hierarchical)


# ---- trainer through nnU-Net's loop ------------------------------------------------------------------
@pytest.mark.slow
def test_trainer_trains_through_nnunet_stores_class_frequencies_and_predicts(planned_tiny_dataset, tmp_path):
    from samunet.cli.predict import build_predictor, predict_folder
    from samunet.cli.train import train
    trainer = train(991, "2d", 0, "HSAMTrainer", device="cpu",
                    hyperparameters={"num_epochs": 2, "num_iterations_per_epoch": 2,
                                     "num_val_iterations_per_epoch": 1, "batch_size": 2})
    assert isinstance(trainer, HSAMTrainer)
    assert trainer.loss.stage_one_weight == pytest.approx(stage_one_weight(published_epoch(1, 2)))
    assert trainer.lr_scheduler.warmup_iterations == 1
    output = Path(trainer.output_folder)
    checkpoint = torch.load(output / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    stored = checkpoint["network_weights"]["stage2_decoder.cmattn.class_frequencies"]
    assert torch.allclose(stored, torch.as_tensor(trainer.training_class_frequencies(), dtype=torch.float32))
    assert stored[0] > stored[1:].max() and not torch.allclose(stored, torch.full_like(stored, 0.25))
    assert (output / "validation" / "summary.json").is_file()
    assert np.isclose(float(stored.sum()), 1.0)
    # samunet_predict rebuilds the network without deep supervision (averaged stages) and loads the checkpoint
    raw = planned_tiny_dataset["nnUNet_raw"] / "Dataset991_PhantomTiny"
    predictor = build_predictor("Dataset991_PhantomTiny", "2d", "HSAMTrainer", [0], device="cpu", use_mirroring=False)
    assert predictor.network.deep_supervision is False
    written = predict_folder(predictor, raw / "imagesTs", tmp_path / "pred")
    assert sorted(p.name for p in written) == sorted(p.name for p in (raw / "labelsTs").iterdir())
