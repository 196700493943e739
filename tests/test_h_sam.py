"""H-SAM (HSAMNetwork, its modules and HSAMTrainer): the paper's behaviour on tiny random backbones."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from samunet.modules.cmattn import ClassBalancedMaskAttention, class_balanced_noise_std
from samunet.modules.mask_attention import masked_cross_attention
from samunet.networks.h_sam import HSAMNetwork
from samunet.sam_import import sam_modeling
from samunet.trainers.h_sam import (ABLATION_TRAINERS, HSAMTrainer, TwoStageLoss, WarmupPolyLRScheduler,
                                    stage_one_weight)

TINY_BACKBONES = ("vit_test", "tinyvit_test")
TRAINABLE_PREFIXES = ("lora.", "mask_decoder.", "stage2_decoder.", "prompt_encoder.no_mask_embed")


def tiny_network(backbone: str = "vit_test", num_classes: int = 4, **kwargs) -> HSAMNetwork:
    torch.manual_seed(0)
    return HSAMNetwork(input_channels=1, num_classes=num_classes, backbone=backbone, img_size=64,
                       intensity_ranges=[[-2.0, 2.0]], **kwargs)


# ---- loss weight and schedule ---------------------------------------------------------------
def test_stage_one_weight_starts_at_0_8_and_decays_exponentially_with_coefficient_0_005():
    assert stage_one_weight(0) == pytest.approx(0.8)
    assert stage_one_weight(100) == pytest.approx(0.8 * math.exp(-0.5))
    assert stage_one_weight(300) == pytest.approx(0.8 * math.exp(-1.5))
    ratios = [stage_one_weight(e + 1) / stage_one_weight(e) for e in range(0, 300, 37)]
    assert ratios == pytest.approx([math.exp(-0.005)] * len(ratios))


def test_total_loss_is_lw_stage_one_plus_one_minus_lw_stage_two():
    loss = TwoStageLoss(lambda output, target: (output - target).abs().mean(), stage_one_weight=0.7)
    stage_two, stage_one = torch.full((1, 2, 4, 4), 2.0), torch.full((1, 2, 1, 1), 5.0)
    value = loss([stage_two, stage_one], [torch.zeros_like(stage_two), torch.zeros_like(stage_one)])
    assert float(value) == pytest.approx(0.7 * 5.0 + 0.3 * 2.0)


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


# ---- CMAttn ------------------------------------------------------------------------------------
def test_class_noise_variance_is_larger_for_a_rare_class_and_zero_at_inference():
    frequencies = [0.70, 0.25, 0.04, 0.01]
    module = ClassBalancedMaskAttention(num_classes=4, max_noise_std=0.1)
    module.set_class_frequencies(frequencies)
    std = module.noise_std()
    assert float(std[3]) == pytest.approx(0.1)
    assert (std[1:] > std[:-1]).all()
    assert (std ** 2 * torch.tensor(frequencies)).allclose(torch.full((4,), 0.01 * 0.01))  # var ~ 1 / frequency
    probabilities = torch.full((2, 4, 64, 64), 0.25)
    torch.manual_seed(0)
    module.train()
    noise = module.add_class_noise(probabilities) - probabilities
    variance = noise.transpose(0, 1).flatten(1).var(dim=1)
    assert variance[3] > 10 * variance[0]
    assert variance[2] > variance[1] > variance[0]
    module.eval()
    assert torch.equal(module.add_class_noise(probabilities), probabilities)


def test_a_class_absent_from_the_training_data_counts_as_the_rarest():
    std = class_balanced_noise_std(torch.tensor([0.9, 0.1, 0.0]), 0.2)
    assert std.tolist() == pytest.approx([0.2 * math.sqrt(0.1 / 0.9), 0.2, 0.2])


def test_cmattn_starts_as_the_identity_and_is_deterministic_at_inference():
    module = ClassBalancedMaskAttention(num_classes=3).eval()
    embedding, mask_feature = torch.randn(2, 8, 4, 4), torch.randn(2, 3, 4, 4)
    assert torch.equal(module(embedding, mask_feature), embedding)
    torch.nn.init.normal_(module.compress.weight)
    first = module(embedding, mask_feature)
    assert not torch.allclose(first, embedding)
    assert torch.equal(module(embedding, mask_feature), first)


def test_class_frequencies_travel_in_the_state_dict():
    network = tiny_network(class_frequencies=[0.6, 0.3, 0.08, 0.02])
    rebuilt = tiny_network()
    assert not torch.allclose(rebuilt.stage2_decoder.cmattn.class_frequencies, torch.tensor([0.6, 0.3, 0.08, 0.02]))
    rebuilt.load_state_dict(network.state_dict())
    assert torch.allclose(rebuilt.stage2_decoder.cmattn.class_frequencies, torch.tensor([0.6, 0.3, 0.08, 0.02]))


# ---- learnable mask cross-attention -------------------------------------------------------------
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
    assert torch.equal(queries + masked_cross_attention(attention, queries, keys, keys, zeros, "learnable"), queries)
    plain = attention(q=queries, k=keys, v=keys)
    assert torch.allclose(masked_cross_attention(attention, queries, keys, keys, ones, "learnable"), plain, atol=1e-6)
    assert torch.allclose(masked_cross_attention(attention, queries, keys, keys, zeros, "none"), plain)


def test_gradients_flow_through_the_learnable_mask_but_not_the_binary_one(cross_attention_inputs):
    attention, queries, keys = cross_attention_inputs
    mask = torch.rand(2, 5, 9, requires_grad=True)
    masked_cross_attention(attention, queries, keys, keys, mask, "learnable").square().sum().backward()
    assert mask.grad is not None and mask.grad.abs().sum() > 0
    binary = torch.rand(2, 5, 9, requires_grad=True)
    out = masked_cross_attention(attention, queries, keys, keys, binary, "binary")
    assert not out.requires_grad or torch.autograd.grad(out.sum(), binary, allow_unused=True)[0] is None


def test_binary_mask_attention_attends_only_inside_the_mask_and_everywhere_when_it_is_empty(cross_attention_inputs):
    attention, queries, keys = cross_attention_inputs
    mask = torch.zeros(2, 5, 9)
    mask[:, :, :3] = 0.9
    inside = masked_cross_attention(attention, queries, keys, keys, mask, "binary")
    assert torch.allclose(inside, attention(q=queries, k=keys[:, :3], v=keys[:, :3]), atol=1e-6)
    empty = masked_cross_attention(attention, queries, keys, keys, torch.zeros(2, 5, 9), "binary")
    assert torch.allclose(empty, attention(q=queries, k=keys, v=keys), atol=1e-6)


def test_stage_two_loss_reaches_stage_one_through_the_mask_only_when_mask_attention_is_learnable():
    for mode, reaches in (("learnable", True), ("none", False)):
        network = tiny_network(mask_attention=mode, hierarchical_pixel_decoder=False, cmattn=False,
                               deep_supervision=True)
        stage_two, _ = network(torch.randn(2, 1, 64, 64))
        stage_two.logsumexp(1).mean().backward()
        grads = [p.grad for p in network.mask_decoder.output_hypernetworks_mlps.parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads) == reaches, mode


# ---- network outputs ----------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_final_output_is_full_resolution_and_inference_averages_both_stages(backbone):
    network = tiny_network(backbone, num_classes=5, deep_supervision=True).eval()
    image = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        stage_two, stage_one = network(image)
        network.deep_supervision = False
        averaged = network(image)
    scale = network.deep_supervision_scales()[1][0]
    assert stage_two.shape == (2, 5, 64, 64)
    assert stage_one.shape == (2, 5, round(64 * scale), round(64 * scale))
    assert averaged.shape == (2, 5, 64, 64)
    upsampled = torch.nn.functional.interpolate(stage_one, size=(64, 64), mode="bilinear", align_corners=False)
    expected = (stage_two.softmax(1) + upsampled.softmax(1)) / 2
    assert torch.allclose(averaged.softmax(1), expected, atol=1e-5)
    assert torch.allclose(averaged.exp().sum(1), torch.ones(2, 64, 64), atol=1e-5)


def test_vit_stage_one_is_supervised_at_a_quarter_and_stage_two_at_full_resolution():
    assert tiny_network("vit_test").deep_supervision_scales() == [[1.0, 1.0], [0.25, 0.25]]


@pytest.mark.parametrize("name", ["HSAMTrainer_none_nohpd_nocm", "HSAMTrainer_binary_nohpd_nocm",
                                  "HSAMTrainer_learnable_nohpd_cm", "HSAMTrainer_none_hpd_cm"])
def test_ablation_trainers_build_the_network_they_name(name):
    kwargs = ABLATION_TRAINERS[name].network_kwargs
    network = tiny_network(deep_supervision=True, **kwargs)
    decoder = network.stage2_decoder
    assert decoder.mask_attention == kwargs["mask_attention"]
    assert (decoder.pixel_decoder is not None) == kwargs["hierarchical_pixel_decoder"]
    assert (decoder.cmattn is not None) == kwargs["cmattn"]
    assert network(torch.randn(1, 1, 64, 64))[0].shape == (1, 4, 64, 64)
    assert len(ABLATION_TRAINERS) == 8


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


# ---- LoRA and what trains -------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_lora_starts_as_the_identity(backbone):
    network = tiny_network(backbone).eval()
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        with_lora = network.image_encoder(image).embedding
        for layer in network.lora:
            layer.remove()
        without = network.image_encoder(image).embedding
    assert len(network.lora) == len(network.image_encoder.qkv_projections())
    assert all(layer.q_down.out_features == 4 for layer in network.lora)
    assert torch.equal(with_lora, without)


def test_only_lora_prompt_embedding_and_decoders_receive_gradients():
    network = tiny_network(deep_supervision=True).train()
    trainable = {name for name, p in network.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith(TRAINABLE_PREFIXES) for name in trainable)
    frozen_before = {k: v.clone() for k, v in network.state_dict().items() if not k.startswith(TRAINABLE_PREFIXES)}
    optimizer = torch.optim.AdamW(list(network.trainable_parameters()), lr=1e-2, weight_decay=0.1)
    for _ in range(2):  # the second step moves LoRA's down-projections too (its up-projections start at 0)
        optimizer.zero_grad()
        stage_two, stage_one = network(torch.randn(2, 1, 64, 64))
        (stage_two.logsumexp(1).mean() + stage_one.logsumexp(1).mean()).backward()
        assert [n for n, p in network.named_parameters() if not p.requires_grad and p.grad is not None] == []
        optimizer.step()
    after = network.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen_before.items())
    moved = {n for n, p in network.named_parameters() if p.grad is not None and p.grad.any()}
    for prefix in ("lora.", "mask_decoder.", "stage2_decoder.cmattn.", "stage2_decoder.pixel_decoder.",
                   "stage2_decoder.transformer.", "prompt_encoder.no_mask_embed"):
        assert any(n.startswith(prefix) for n in moved), prefix


# ---- trainer through nnU-Net's loop ------------------------------------------------------------------
@pytest.mark.slow
def test_trainer_trains_through_nnunet_stores_class_frequencies_and_predicts(planned_tiny_dataset, tmp_path):
    from samunet.cli.predict import build_predictor, predict_folder
    from samunet.cli.train import train
    trainer = train(991, "2d", 0, "HSAMTrainer", device="cpu",
                    hyperparameters={"num_epochs": 2, "num_iterations_per_epoch": 2,
                                     "num_val_iterations_per_epoch": 1, "batch_size": 2})
    assert isinstance(trainer, HSAMTrainer)
    assert trainer.loss.stage_one_weight == pytest.approx(stage_one_weight(1))
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
