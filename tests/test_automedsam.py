"""AutoMedSAM (AutoMedSAMNetwork, its modules and AutoMedSAMTrainer): the paper's behaviour on tiny
random backbones.

What every trainer must satisfy (output shapes, finite values, gradients reaching every trainable
parameter, frozen weights unchanged, DDP, deepcopy / state_dict / pickle) is checked once in
tests/test_trainer_contract.py; this file holds what is specific to AutoMedSAM. Trainer-level checks
run the real trainer built by tests/trainer_harness.py.
"""
from __future__ import annotations

import contextlib
import math
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from torch import nn

from samunet.errors import ConfigurationError
from samunet.modules.diffusion_prompt_encoder import DiffusionClassPromptEncoder, noise_scale
from samunet.modules.mask_geometry import mask_boxes
from samunet.modules.uncertainty_loss import (AutoMedSAMJointLoss, UncertaintyWeighting, class_batch_dice_loss,
                                              knowledge_transfer_mse, shape_distance_loss, signed_distance_maps)
from samunet.networks.automedsam import (AutoMedSAMNetwork, ClassPrediction, class_log_probabilities,
                                         parse_class_selection)
from samunet.networks.base import SAMNetworkConfig
from samunet.trainers.run_identity import CheckpointMismatchError
from samunet.trainers.automedsam import AutoMedSAMTrainer, ValidationPlateauScheduler, sample_prompt_classes
from trainer_harness import build_trainer, make_batch, nnunet_environment

TINY_BACKBONES = ("vit_test", "tinyvit_test")
IMG_SIZE = 64
TRAINER_IMG_SIZE = 32  # trainer-level checks: the smallest input the tiny backbones take
WIRING_HEAD_STD = 0.5  # branch heads large enough that every part of a branch visibly moves the mask


def network_config(backbone: str = "tinyvit_test", num_classes: int = 3, img_size: int = IMG_SIZE) -> SAMNetworkConfig:
    return SAMNetworkConfig(input_channels=1, num_classes=num_classes, backbone=backbone, img_size=img_size,
                            intensity_ranges=[[-2.0, 2.0]])


def tiny_network(backbone: str = "tinyvit_test", num_classes: int = 3, trained_heads: bool = True,
                 head_std: float = 0.05, **kwargs) -> AutoMedSAMNetwork:
    """A tiny network; ``trained_heads`` gives the branches' zero-initialised output layers random
    values (std ``head_std``), as after training, so that the class index, the noise and every branch
    part reach the prompts."""
    torch.manual_seed(0)
    network = AutoMedSAMNetwork(network_config(backbone, num_classes), **kwargs)
    if trained_heads:
        encoder = network.class_prompt_encoder
        with torch.no_grad():
            for head in (encoder.dense_branch.decoder.head, encoder.sparse_branch.decoder.head):
                head.weight.normal_(0, head_std)
                head.bias.normal_(0, head_std)
    return network


def square_label(size: int = IMG_SIZE) -> torch.Tensor:
    """(1, 1, S, S) label map: class 1 is a square, class 2 is absent."""
    label = torch.zeros(1, 1, size, size)
    label[..., 16:40, 20:44] = 1
    return label


@torch.no_grad()
def predict(network: AutoMedSAMNetwork, x: torch.Tensor, labels: torch.Tensor) -> ClassPrediction:
    """The training path ``network(x, class_labels=k)`` in eval mode (no diffusion noise)."""
    network.eval()
    return network(x, class_labels=labels)


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).abs().max()) > 1e-4


def changed_outputs(before: ClassPrediction, after: ClassPrediction) -> dict[str, bool]:
    """Which of mask_logits / sparse / dense changed by more than 1e-6 of their size (a cut connection
    leaves them bitwise equal; the tiny random decoder moves its mask logits only slightly)."""
    return {name: float((getattr(after, name) - getattr(before, name)).abs().max())
            > 1e-6 * float(getattr(before, name).abs().max()) for name in ClassPrediction._fields}


# ---- starting point: residuals on the frozen encoder's whole-image box prompts --------------------
def whole_image_box_prompts(network: AutoMedSAMNetwork) -> tuple[torch.Tensor, torch.Tensor]:
    box = torch.tensor([[[0.0, 0.0, IMG_SIZE - 1.0, IMG_SIZE - 1.0]]])
    with torch.no_grad():
        return network.prompt_encoder(points=None, boxes=box, masks=None)


def test_class_prompts_start_as_the_frozen_encoders_whole_image_box_prompts():
    """Both branch heads start at zero, so an untrained network prompts SAM with a box around the whole image."""
    network = tiny_network(trained_heads=False)
    prediction = predict(network, torch.randn(2, 1, IMG_SIZE, IMG_SIZE), torch.tensor([1, 2]))
    sparse, dense = whole_image_box_prompts(network)
    assert torch.allclose(prediction.sparse, sparse.expand(2, -1, -1))
    assert torch.allclose(prediction.dense, dense.expand(2, -1, -1, -1))


def test_sparse_and_dense_prompts_are_the_class_prompt_encoders_residuals_on_the_whole_image_box_prompts():
    network = tiny_network()
    x, labels = torch.randn(2, 1, IMG_SIZE, IMG_SIZE), torch.tensor([1, 2])
    prediction = predict(network, x, labels)
    with torch.no_grad():
        sparse_residual, dense_residual = network.class_prompt_encoder(network.encode(x), labels - 1)
    box_sparse, box_dense = whole_image_box_prompts(network)
    assert differs(sparse_residual, 0 * sparse_residual) and differs(dense_residual, 0 * dense_residual)
    assert differs(box_sparse, 0 * box_sparse) and differs(box_dense, 0 * box_dense)
    assert torch.allclose(prediction.sparse, box_sparse + sparse_residual, atol=1e-6)
    assert torch.allclose(prediction.dense, box_dense + dense_residual, atol=1e-6)


# ---- diffusion: x_t = E + P(k) + eps_t, noise schedule --------------------------------------------
def test_noise_scale_decreases_with_t_and_is_zero_at_inference():
    steps = torch.arange(0, 1001)
    scales = noise_scale(steps, num_timesteps=1000, max_noise_scale=1.0)
    assert bool((scales[1:] < scales[:-1]).all())
    assert float(scales[0]) == pytest.approx(1.0) and float(scales[-1]) == 0.0
    encoder = DiffusionClassPromptEncoder(num_classes=2, embed_dim=8, embedding_size=(8, 8), num_timesteps=10)
    training_steps = encoder.sample_timesteps(500, torch.device("cpu"))
    assert int(training_steps.min()) >= 0 and int(training_steps.max()) <= 9  # always noised in training
    assert len(torch.unique(training_steps)) > 1  # random per sample
    embedding, labels = torch.randn(3, 8, 8, 8), torch.tensor([0, 1, 1])
    with torch.no_grad():  # inference (no timesteps) is t = T, where nothing is noised
        assert torch.equal(encoder.diffuse(embedding, labels, None),
                           encoder.diffuse(embedding, labels, torch.full((3,), 10)))


def test_x_t_is_the_embedding_plus_the_projected_class_prompt_plus_noise_that_shrinks_with_t():
    encoder = DiffusionClassPromptEncoder(num_classes=2, embed_dim=8, embedding_size=(8, 8))
    embedding, labels = torch.randn(2, 8, 8, 8), torch.tensor([0, 1])
    projected = embedding + encoder.class_to_embedding(torch.eye(2)).view_as(embedding)
    with torch.no_grad():
        clean = encoder.diffuse(embedding, labels, torch.full((2,), 1000))
        early = encoder.diffuse(embedding, labels, torch.zeros(2, dtype=torch.long)) - projected
        late = encoder.diffuse(embedding, labels, torch.full((2,), 900)) - projected
    assert torch.allclose(clean, projected)  # x_T = E + P(k), no noise
    assert float(early.std()) > 5 * float(late.std()) > 0


def test_training_forward_is_noised_at_random_and_inference_is_noise_free():
    network = tiny_network()
    x, labels = torch.randn(1, 1, IMG_SIZE, IMG_SIZE), torch.tensor([1])
    assert torch.equal(predict(network, x, labels).dense, predict(network, x, labels).dense)
    network.train()
    with torch.no_grad():
        assert differs(network(x, class_labels=labels).dense, network(x, class_labels=labels).dense)


# ---- the class-prompt encoder's parts each reach the prompts ---------------------------------------
def test_class_index_changes_the_prompt_embeddings_and_the_mask():
    network = tiny_network(num_classes=4, head_std=WIRING_HEAD_STD)
    x = torch.randn(1, 1, IMG_SIZE, IMG_SIZE)
    predictions = [predict(network, x, torch.tensor([k])) for k in (1, 2, 3)]
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        assert all(changed_outputs(predictions[a], predictions[b]).values()), (a, b)


@pytest.mark.parametrize("path", ["x_t", "bottleneck"])
def test_the_class_reaches_both_prompts_through_x_t_alone_and_through_the_bottleneck_alone(path):
    """The class prompt enters twice (Eqs. 2 and 6): in x_t = E + P(k) and concatenated at the
    bottleneck. With the other entry made class-independent (its projection's weight zeroed), each
    alone still makes class 1's prompts differ from class 2's."""
    network = tiny_network(head_std=WIRING_HEAD_STD)
    encoder = network.class_prompt_encoder
    other = encoder.class_to_bottleneck if path == "x_t" else encoder.class_to_embedding
    with torch.no_grad():
        other.weight.zero_()
    x = torch.randn(1, 1, IMG_SIZE, IMG_SIZE)
    changed = changed_outputs(predict(network, x, torch.tensor([1])), predict(network, x, torch.tensor([2])))
    assert changed == {"mask_logits": True, "sparse": True, "dense": True}


def test_dense_branch_element_wise_attention_gates_only_the_dense_prompt():
    """Dense branch: sigmoid(conv(F)) * F element-wise (Eq. 8) before its decoder; changing the
    attention's weights changes the dense prompt (and the mask), never the sparse one."""
    network = tiny_network(head_std=WIRING_HEAD_STD)
    branch = network.class_prompt_encoder.dense_branch
    bottleneck = torch.randn(2, branch.attention.in_channels, 2, 2)
    skips = [torch.randn(2, stage[0].out_channels, 2 ** (i + 2), 2 ** (i + 2)) for i, stage in
             enumerate(branch.decoder.stages)]
    with torch.no_grad():
        expected = branch.decoder(torch.sigmoid(branch.attention(bottleneck)) * bottleneck, skips)
        assert torch.allclose(branch(bottleneck, skips), expected, atol=1e-6)
    x, labels = torch.randn(2, 1, IMG_SIZE, IMG_SIZE), torch.tensor([1, 2])
    before = predict(network, x, labels)
    with torch.no_grad():
        branch.attention.weight.normal_(0, 1.0)
    assert changed_outputs(before, predict(network, x, labels)) == {"mask_logits": True, "sparse": False,
                                                                   "dense": True}


def test_sparse_branch_channel_attention_gates_only_the_sparse_prompt():
    """Sparse branch: sigmoid(MLP(GAP(F))) per channel (Eq. 10) before its decoder; changing the
    attention MLP changes the sparse prompt (and the mask), never the dense one."""
    network = tiny_network(head_std=WIRING_HEAD_STD)
    branch = network.class_prompt_encoder.sparse_branch
    bottleneck = torch.randn(2, branch.channel_attention[0].in_features, 2, 2)
    skips = [torch.randn(2, stage[0].out_channels, 2 ** (i + 2), 2 ** (i + 2)) for i, stage in
             enumerate(branch.decoder.stages)]
    with torch.no_grad():
        weights = torch.sigmoid(branch.channel_attention(bottleneck.mean(dim=(2, 3))))
        features = branch.decoder(bottleneck * weights[:, :, None, None], skips)
        maps = branch.token_maps(features).flatten(2).softmax(dim=-1)
        assert torch.allclose(branch(bottleneck, skips), maps @ features.flatten(2).transpose(1, 2), atol=1e-6)
    x, labels = torch.randn(2, 1, IMG_SIZE, IMG_SIZE), torch.tensor([1, 2])
    before = predict(network, x, labels)
    with torch.no_grad():
        branch.channel_attention[2].weight.normal_(0, 1.0)
    assert changed_outputs(before, predict(network, x, labels)) == {"mask_logits": True, "sparse": True,
                                                                   "dense": False}


@pytest.mark.parametrize("branch_name,prompt", [("dense_branch", "dense"), ("sparse_branch", "sparse")])
@pytest.mark.parametrize("stage", [0, 1])
def test_each_decoder_stage_reads_its_encoder_skip_connection(branch_name, prompt, stage):
    """Both branches decode with skip connections from the encoder (Eqs. 9, 11): zeroing the weights
    that read the skip features in one decoder stage changes that branch's prompt only."""
    network = tiny_network(head_std=WIRING_HEAD_STD)
    x, labels = torch.randn(2, 1, IMG_SIZE, IMG_SIZE), torch.tensor([1, 2])
    before = predict(network, x, labels)
    conv = getattr(network.class_prompt_encoder, branch_name).decoder.stages[stage][0]
    skip_channels = conv.out_channels  # the stage's input is cat([upsampled, skip]), skip last
    with torch.no_grad():
        conv.weight[:, -skip_channels:] = 0
    changed = changed_outputs(before, predict(network, x, labels))
    assert changed == {"mask_logits": True, "sparse": prompt == "sparse", "dense": prompt == "dense"}


def test_litemedsam_sized_prompt_encoder_gives_a_256_x_64_x_64_dense_prompt():
    encoder = DiffusionClassPromptEncoder(num_classes=4, embed_dim=256, embedding_size=(64, 64))
    encoder.eval()
    with torch.no_grad():
        sparse, dense = encoder(torch.randn(1, 256, 64, 64), torch.tensor([3]))
    assert dense.shape == (1, 256, 64, 64) and sparse.shape == (1, 2, 256)


# ---- network -------------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_class_prompts_have_the_shapes_of_the_teachers_box_prompts(backbone):
    """Two sparse tokens (a box's two corners) and a dense map of the image embedding's size, so the
    knowledge-transfer MSE compares like with like."""
    network = tiny_network(backbone)
    prediction = predict(network, torch.randn(2, 1, IMG_SIZE, IMG_SIZE), torch.tensor([1, 2]))
    teacher_sparse, teacher_dense = network.teacher_prompts(torch.tensor([[0.0, 0.0, 9.0, 9.0]] * 2))
    assert prediction.sparse.shape == teacher_sparse.shape == (2, 2, 32)
    assert prediction.dense.shape == teacher_dense.shape == (2, 32, *network.prompt_encoder.image_embedding_size)
    assert prediction.mask_logits.shape == (2, 1, IMG_SIZE, IMG_SIZE)


def test_litemedsam_network_at_256_loads_the_released_teacher_and_gives_256_x_64_x_64_prompts(
        litemedsam_checkpoint):
    from samunet.weights import load_state_dict

    state = load_state_dict(litemedsam_checkpoint)
    network = AutoMedSAMNetwork(SAMNetworkConfig(input_channels=1, num_classes=3, backbone="litemedsam",
                                                 img_size=256, intensity_ranges=[[-2.0, 2.0]]))
    network.load_pretrained(state)
    assert torch.equal(network.prompt_encoder.point_embeddings[2].weight,
                       state["prompt_encoder.point_embeddings.2.weight"])
    prediction = predict(network, torch.randn(1, 1, 256, 256), torch.tensor([2]))
    teacher_sparse, teacher_dense = network.teacher_prompts(torch.tensor([[40.0, 50.0, 120.0, 200.0]]))
    assert prediction.dense.shape == teacher_dense.shape == (1, 256, 64, 64)
    assert prediction.sparse.shape == teacher_sparse.shape == (1, 2, 256)
    assert prediction.mask_logits.shape == (1, 1, 256, 256)


def test_only_the_class_prompt_encoder_mask_decoder_and_uncertainties_train_and_sams_iou_head_is_frozen():
    network = tiny_network()
    trainable = {name for name, p in network.named_parameters() if p.requires_grad}
    assert {name.split(".")[0] for name in trainable} == {"class_prompt_encoder", "mask_decoder", "uncertainty"}
    assert not any(p.requires_grad for p in network.prompt_encoder.parameters())
    assert not any(p.requires_grad for p in network.image_encoder.parameters())
    assert not any(p.requires_grad for p in network.mask_decoder.iou_prediction_head.parameters())
    # only mask token 0 (SAM's single-mask output) is read: the other tokens' hypernetwork MLPs cannot learn
    mlps = network.mask_decoder.output_hypernetworks_mlps
    assert all(p.requires_grad for p in mlps[0].parameters())
    assert not any(p.requires_grad for mlp in mlps[1:] for p in mlp.parameters())
    assert network.mask_decoder.mask_tokens.weight.requires_grad
    assert all(p.requires_grad for p in network.class_prompt_encoder.parameters())
    assert network.uncertainty.log_variances.requires_grad


def test_the_lora_variant_adapts_the_encoder_through_lora_alone_and_the_training_loss_reaches_it():
    """``lora_rank`` > 0 (AutoMedSAMTrainer_lora): SAMed's LoRA on q and v of every attention layer trains; the
    encoder's released weights stay frozen, and a class prompt's mask loss sends a gradient into every LoRA."""
    network = tiny_network(lora_rank=4)
    trainable = {name.split(".")[0] for name, p in network.named_parameters() if p.requires_grad}
    assert trainable == {"class_prompt_encoder", "mask_decoder", "uncertainty", "lora"}
    assert not any(p.requires_grad for p in network.image_encoder.parameters())
    assert len(network.lora) == len(network.image_encoder.qkv_projections())
    for lora in network.lora:  # LoRA's up-projections start at zero: give them values so every A gets a gradient
        for p in lora.parameters():
            if not p.abs().sum():
                torch.nn.init.normal_(p, std=0.1)
    prediction = network.train()(torch.randn(2, 1, IMG_SIZE, IMG_SIZE), class_labels=torch.tensor([1, 2]))
    prediction.mask_logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in network.lora.parameters())
    assert tiny_network().lora is None  # the paper's default: no LoRA, the encoder frozen
    with pytest.raises(ConfigurationError, match="lora_rank"):
        tiny_network(lora_rank=-1)


def test_all_class_output_merges_the_per_class_probabilities_and_follows_the_class_selection():
    probabilities = torch.zeros(1, 3, 1, 3)
    probabilities[0, 1] = torch.tensor([0.9, 0.2, 0.7])
    probabilities[0, 2] = torch.tensor([0.1, 0.3, 0.8])
    merged = class_log_probabilities(probabilities)
    assert merged.argmax(dim=1).flatten().tolist() == [1, 0, 2]
    # p_0 = 1 - max_k p_k, then every channel divided by the sum
    expected = torch.tensor([[0.1, 0.9, 0.1], [0.7, 0.2, 0.3], [0.2, 0.7, 0.8]])
    expected = expected / expected.sum(dim=1, keepdim=True)
    assert torch.allclose(merged.exp()[0, :, 0].T, expected, atol=1e-6)
    network = tiny_network(num_classes=4)
    x = torch.randn(1, 1, IMG_SIZE, IMG_SIZE)
    network.eval()
    with torch.no_grad():
        per_class = torch.cat([torch.sigmoid(network(x, class_labels=torch.tensor([k])).mask_logits)
                               for k in (1, 2, 3)], dim=1)
        output = network(x)
    assert torch.allclose(output, class_log_probabilities(torch.cat([torch.zeros_like(per_class[:, :1]),
                                                                      per_class], dim=1)), atol=1e-5)
    network.set_predict_classes([2])
    with torch.no_grad():
        selected = network(x).exp()
    assert float(selected[:, [1, 3]].max()) < 1e-6 and float(selected[:, 2].min()) > 0
    with pytest.raises(ConfigurationError):
        network.set_predict_classes([0])


def test_class_selection_takes_names_or_label_values():
    labels = {"background": 0, "liver": 1, "kidney": 2, "spleen": 3}
    assert parse_class_selection("liver,spleen", labels) == [1, 3]
    assert parse_class_selection("3, 2", labels) == [2, 3]
    for wrong in ("background", "lung", "7", ""):
        with pytest.raises(ConfigurationError):
            parse_class_selection(wrong, labels)


# ---- loss -------------------------------------------------------------------------------------------
def test_uncertainty_weighting_equals_sum_of_l_over_2_s_squared_plus_log_s():
    weighting = UncertaintyWeighting(num_terms=4)
    with torch.no_grad():
        weighting.log_variances.copy_(torch.tensor([0.3, -0.5, 1.2, 0.0]))
    losses = torch.tensor([0.7, 1.5, 0.2, -0.1])
    s = weighting.scales().detach()
    expected = (losses / (2 * s ** 2) + torch.log(s)).sum()
    assert float(weighting(losses).detach()) == pytest.approx(float(expected), rel=1e-6)
    skipped = weighting(losses, torch.tensor([False, True, True, True])).detach()
    assert float(skipped) == pytest.approx(float(expected - (losses[0] / (2 * s[0] ** 2) + torch.log(s[0]))), rel=1e-6)


def test_shape_distance_loss_is_lower_for_a_prediction_inside_the_object_than_outside():
    target = square_label()
    distance = signed_distance_maps(target)
    assert float(distance[target > 0].max()) <= 0 and float(distance[target == 0].min()) > 0
    inside, outside = torch.zeros_like(target), torch.zeros_like(target)
    inside[..., 24:32, 28:36] = 1
    outside[..., 50:58, 2:10] = 1
    inside_loss, outside_loss = (float(shape_distance_loss(p, target, distance)) for p in (inside, outside))
    assert 0 < inside_loss < outside_loss
    # The paper's mean(p * phi) shifted by its optimum: never negative, zero at the ground truth (the
    # uncertainty weighting diverges on a negative term), gradient unchanged.
    assert float(shape_distance_loss(target, target, distance)) == 0
    assert inside_loss == pytest.approx(float((inside * distance).mean() - (target * distance).mean()), abs=1e-7)
    assert bool((signed_distance_maps(torch.zeros(1, 1, 4, 4)) == 1).all())  # empty class: any prediction costs


def scipy_signed_distance_map(mask: np.ndarray) -> np.ndarray:
    """The reference (samunet's SciPy implementation before issue 14): (H, W) bool -> float32 map."""
    from scipy.ndimage import distance_transform_edt
    if not mask.any():
        return np.ones(mask.shape, dtype=np.float32)
    if mask.all():
        return -np.ones(mask.shape, dtype=np.float32)
    outside, inside = distance_transform_edt(~mask), distance_transform_edt(mask)
    return (outside / outside.max() - inside / inside.max()).astype(np.float32)


def test_signed_distance_maps_equal_scipys_on_fixed_masks_and_stay_on_the_masks_device():
    """The batched torch maps equal the former SciPy ones (distance transforms of the mask and of its
    complement, each side normalised) on random blobs, a single pixel, masks touching the border, a
    one-pixel ring, an empty and a full mask."""
    generator = np.random.default_rng(0)
    masks = [generator.random((24, 20)) > 0.6, generator.random((24, 20)) > 0.05]
    single, border, ring = (np.zeros((24, 20), bool) for _ in range(3))
    single[7, 3] = True
    border[:, :6] = True
    border[20:, :] = True
    ring[2:20, 3:18] = True
    ring[3:19, 4:17] = False
    masks += [single, border, ring, np.zeros((24, 20), bool), np.ones((24, 20), bool)]
    batch = torch.from_numpy(np.stack(masks)[:, None].astype(np.float32))
    maps = signed_distance_maps(batch)
    assert maps.dtype == torch.float32 and maps.device == batch.device and maps.shape == batch.shape
    expected = np.stack([scipy_signed_distance_map(m) for m in masks])[:, None]
    assert np.abs(maps.numpy() - expected).max() < 1e-6


def test_knowledge_transfer_mse_averages_the_present_samples_without_indexing_them_out():
    torch.manual_seed(0)
    sparse, teacher_sparse = torch.randn(4, 2, 8), torch.randn(4, 2, 8)
    dense, teacher_dense = torch.randn(4, 8, 3, 3), torch.randn(4, 8, 3, 3)
    present = torch.tensor([True, False, True, False])
    expected = (F.mse_loss(sparse[present], teacher_sparse[present])
                + F.mse_loss(dense[present], teacher_dense[present]))
    value = knowledge_transfer_mse(sparse, dense, teacher_sparse, teacher_dense, present)
    assert float(value) == pytest.approx(float(expected), rel=1e-6)
    sparse.requires_grad_(True)
    none = knowledge_transfer_mse(sparse, dense, teacher_sparse, teacher_dense, torch.zeros(4, dtype=torch.bool))
    assert float(none.detach()) == 0 and none.requires_grad


def test_the_dice_term_is_per_class_over_the_batch_and_charges_foreground_on_absent_samples():
    """Each prompted class's Dice sums intersection and volume over all its samples of the batch (nnU-Net's
    batch Dice), averaged over the classes present in one of their samples: foreground predicted where the class
    is absent raises its Dice loss when the class is present elsewhere in the batch, and is left to the CE and
    the shape distance when it is not; a batch without a present class leaves the MSE and the Dice (and their
    log s_i) out of the sum."""
    torch.manual_seed(0)
    square, empty = square_label(), torch.zeros_like(square_label())
    # samples: class 1 present, class 1 absent, class 2 absent (class 2 present nowhere in the batch)
    target = torch.cat([square, empty, empty])
    labels, present = torch.tensor([1, 1, 2]), torch.tensor([True, False, False])
    logits = torch.randn(3, 1, IMG_SIZE, IMG_SIZE) - 4 + 8 * square  # finds class 1 where present, little elsewhere
    probabilities = torch.sigmoid(logits)
    overlap = (probabilities[0] * target[0]).sum()
    class_one = 1 - (2 * overlap + 1) / (probabilities[:2].sum() + target[0].sum() + 1)
    value = class_batch_dice_loss(probabilities, target, labels, present, num_labels=3)
    assert float(value) == pytest.approx(float(class_one), rel=1e-6)
    weighting = UncertaintyWeighting(num_terms=4)
    with torch.no_grad():
        weighting.log_variances.copy_(torch.tensor([0.4, -0.3, 0.8, -0.6]))
    loss = AutoMedSAMJointLoss(weighting=weighting, num_labels=3)
    prompts = dict(sparse=torch.randn(3, 2, 8), dense=torch.randn(3, 8, 4, 4), teacher_sparse=torch.randn(3, 2, 8),
                   teacher_dense=torch.randn(3, 8, 4, 4))
    distance_maps = signed_distance_maps(target)

    def terms(mask_logits: torch.Tensor, present: torch.Tensor):
        return loss(mask_logits=mask_logits, target=target, distance_maps=distance_maps, labels=labels,
                    present=present, **prompts)

    before = terms(logits, present)
    assert float(before.terms[2]) == pytest.approx(float(class_one), rel=1e-6)
    absent_elsewhere_present = logits.clone()
    absent_elsewhere_present[1] += 8.0  # class 1's absent sample answers with foreground
    after = terms(absent_elsewhere_present, present)
    assert float(after.terms[2]) > float(before.terms[2]) + 0.3
    assert float(after.terms[1]) > float(before.terms[1]) and float(after.terms[3]) > float(before.terms[3])
    absent_everywhere = logits.clone()
    absent_everywhere[2] += 8.0  # class 2, present in no sample, answers with foreground: no Dice for it
    after = terms(absent_everywhere, present)
    assert float(after.terms[2]) == pytest.approx(float(before.terms[2]), rel=1e-6)
    assert float(after.terms[1]) > float(before.terms[1]) and float(after.terms[3]) > float(before.terms[3])
    none_present = terms(logits, torch.tensor([False, False, False]))
    assert float(none_present.terms[0]) == float(none_present.terms[2]) == 0
    ce, shape = float(none_present.terms[1]), float(none_present.terms[3])
    expected = 0.5 * math.exp(0.3) * ce - 0.15 + 0.5 * math.exp(0.6) * shape - 0.3  # only v = -0.3 and -0.6 count
    assert float(none_present.total.detach()) == pytest.approx(expected, rel=1e-6)


def test_the_class_batch_dice_averages_the_classes_with_a_present_sample():
    """Two present classes: the mean of their two batch Dice losses, each over its own samples only."""
    torch.manual_seed(3)
    square, empty = square_label(), torch.zeros_like(square_label())
    target = torch.cat([square, empty, square, square])
    labels, present = torch.tensor([1, 1, 3, 3]), torch.tensor([True, False, True, True])
    probabilities = torch.rand(4, 1, IMG_SIZE, IMG_SIZE)

    def dice_loss(rows: list[int]) -> torch.Tensor:
        p, g = probabilities[rows], target[rows]
        return 1 - (2 * (p * g).sum() + 1) / (p.sum() + g.sum() + 1)

    expected = (dice_loss([0, 1]) + dice_loss([2, 3])) / 2
    value = class_batch_dice_loss(probabilities, target, labels, present, num_labels=4)
    assert float(value) == pytest.approx(float(expected), rel=1e-6)


def test_sampled_classes_are_present_80_percent_of_the_time_and_absent_ones_give_empty_masks():
    target = square_label()[:, 0].repeat(2000, 1, 1)
    labels, present = sample_prompt_classes(target, num_classes=4, generator=torch.Generator().manual_seed(0))
    assert labels.shape == present.shape == (2000, 1)  # one draw per image by default
    labels, present = labels[:, 0], present[:, 0]
    assert float(present.float().mean()) == pytest.approx(0.8, abs=0.03)
    assert bool((labels[present] == 1).all()) and set(labels[~present].tolist()) == {2, 3}
    empty = torch.zeros(3, 8, 8)
    labels, present = sample_prompt_classes(empty, num_classes=3)
    labels, present = labels[:, 0], present[:, 0]
    assert not bool(present.any())
    masks = (empty == labels.view(-1, 1, 1))
    assert not bool(masks.any()) and not bool(mask_boxes(masks).any())
    full = torch.arange(4.0).repeat(2, 1, 1)  # every class present: always a present class
    for seed in range(5):
        labels, present = sample_prompt_classes(full, num_classes=4, generator=torch.Generator().manual_seed(seed))
        assert bool(present.all()) and set(labels.flatten().tolist()) <= {1, 2, 3}


def test_class_sampling_is_uniform_within_the_group_and_reproducible_with_a_seeded_generator():
    target = torch.zeros(3000, 8, 8)
    target[:, :2] = 1
    target[:, 2:4] = 3  # classes 1 and 3 present, 2 and 4 absent
    labels, present = sample_prompt_classes(target, num_classes=5, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(labels[:, 0], minlength=5).float() / len(labels)
    assert counts.tolist() == pytest.approx([0, 0.4, 0.1, 0.4, 0.1], abs=0.03)
    assert bool((present == ((labels == 1) | (labels == 3))).all())
    again = sample_prompt_classes(target, num_classes=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(labels, again[0]) and torch.equal(present, again[1])


def test_an_images_classes_are_drawn_without_replacement_until_every_class_has_been_drawn():
    """Each image's m draws hold no class twice while an undrawn class is left; the first draw keeps the
    0.8 / 0.2 split, and later draws fall back to the other group when one is used up."""
    target = torch.zeros(3000, 8, 8)
    target[:, :2] = 1
    target[:, 2:4] = 3  # classes 1 and 3 present, 2 and 4 absent
    labels, present = sample_prompt_classes(target, num_classes=5, per_image=3,
                                            generator=torch.Generator().manual_seed(0))
    assert labels.shape == present.shape == (3000, 3)
    assert bool((labels.sort(dim=1).values.diff(dim=1) != 0).all())  # three different classes per image
    assert float(present[:, 0].float().mean()) == pytest.approx(0.8, abs=0.03)
    assert bool((present == ((labels == 1) | (labels == 3))).all())
    both_present = present[:, :2].all(dim=1)
    assert not bool(present[both_present, 2].any())  # the present group used up: an absent class
    one_class = torch.ones(4, 8, 8)  # K - 1 = 1 and m = 3: the same class three times
    labels, present = sample_prompt_classes(one_class, num_classes=2, per_image=3)
    assert labels.tolist() == [[1, 1, 1]] * 4 and bool(present.all())


def test_teacher_targets_come_from_the_frozen_prompt_encoder_fed_with_the_ground_truth_box():
    network = tiny_network()
    target = square_label()
    box = mask_boxes(target[:, 0] > 0)
    assert box.tolist() == [[20.0, 16.0, 43.0, 39.0]]
    sparse, dense = network.teacher_prompts(box)
    reference_sparse, reference_dense = network.prompt_encoder(points=None, boxes=box[:, None], masks=None)
    assert torch.equal(sparse, reference_sparse) and torch.equal(dense, reference_dense)
    prediction = network(torch.randn(1, 1, IMG_SIZE, IMG_SIZE), class_labels=torch.tensor([1]))
    joint = AutoMedSAMJointLoss(weighting=network.uncertainty, num_labels=network.num_classes)(
        mask_logits=prediction.mask_logits, target=target, distance_maps=signed_distance_maps(target),
        sparse=prediction.sparse, dense=prediction.dense, teacher_sparse=sparse, teacher_dense=dense,
        labels=torch.tensor([1]), present=torch.tensor([True]))
    expected = (F.mse_loss(prediction.sparse, sparse) + F.mse_loss(prediction.dense, dense)).detach()
    assert float(joint.terms[0]) == pytest.approx(float(expected), rel=1e-5)


def test_several_classes_per_image_are_decoded_from_one_encoding_image_major():
    """class_labels (B, m): each image is encoded once, and row i * m + j is what prompting image i with its
    j-th class alone gives."""
    network = tiny_network(num_classes=4)
    images = torch.randn(2, 1, IMG_SIZE, IMG_SIZE)
    labels = torch.tensor([[1, 3, 3], [2, 1, 3]])
    encoder_inputs = []
    hook = network.image_encoder.register_forward_hook(lambda module, args, output: encoder_inputs.append(args[0]))
    try:
        together = predict(network, images, labels)
    finally:
        hook.remove()
    assert [tuple(x.shape[:1]) for x in encoder_inputs] == [(2,)]
    assert together.mask_logits.shape == (6, 1, IMG_SIZE, IMG_SIZE)
    for i in range(2):
        for j in range(3):
            alone = predict(network, images[i:i + 1], labels[i, j:j + 1])
            assert torch.allclose(together.mask_logits[i * 3 + j], alone.mask_logits[0], atol=1e-5)
            assert torch.allclose(together.dense[i * 3 + j], alone.dense[0], atol=1e-5)


def test_the_trainer_prompts_each_image_with_three_classes_and_the_one_class_variant_with_one(nnunet_root):
    assert AutoMedSAMTrainer.classes_per_image == 3
    trainer = real_trainer("AutoMedSAMTrainer_one_class")
    target = torch.zeros(4, 1, TRAINER_IMG_SIZE, TRAINER_IMG_SIZE)
    target[..., 8:20, 10:24] = 1
    assert trainer.class_targets(target)["labels"].shape == (4,)


def test_training_learns_the_present_class_and_an_empty_mask_for_the_absent_one():
    """Class-index prompting learned: after training on two images (class 1 present, class 2 absent),
    prompting class 2 gives an empty mask and prompting class 1 finds the square, in the per-class
    output and in the merged all-class output. (With the class index cut off, class 2 gets the square too.)"""
    network = tiny_network()
    torch.manual_seed(1)
    image, target = torch.randn(2, 1, IMG_SIZE, IMG_SIZE), square_label().repeat(2, 1, 1, 1)
    image[target > 0] += 2.0
    loss = AutoMedSAMJointLoss(weighting=network.uncertainty, num_labels=network.num_classes)
    # 150 steps at 2e-3: learned (absent class empty, Dice > 0.9) for each of 5 network seeds tried; 60 steps at
    # 5e-3 depended on the seed
    optimizer = torch.optim.AdamW(network.trainable_parameters(), lr=2e-3, weight_decay=0.0)
    labels, present = torch.tensor([1, 2]), torch.tensor([True, False])
    masks = (target == labels.view(-1, 1, 1, 1)).float()
    distance_maps = signed_distance_maps(masks)
    teacher = network.teacher_prompts(mask_boxes(masks[:, 0] > 0))
    network.train()
    for _ in range(150):
        optimizer.zero_grad()
        prediction = network(image, class_labels=labels)
        loss(mask_logits=prediction.mask_logits, target=masks, distance_maps=distance_maps,
             sparse=prediction.sparse, dense=prediction.dense, teacher_sparse=teacher[0],
             teacher_dense=teacher[1], labels=labels, present=present).total.backward()
        optimizer.step()
    torch.manual_seed(2)
    test_image = torch.randn(1, 1, IMG_SIZE, IMG_SIZE)
    square = square_label() > 0
    test_image[square] += 2.0

    def dice(found: torch.Tensor) -> float:
        return float(2 * (found & square).sum() / (found.sum() + square.sum()))

    absent = torch.sigmoid(predict(network, test_image, torch.tensor([2])).mask_logits) > 0.5
    found = torch.sigmoid(predict(network, test_image, torch.tensor([1])).mask_logits) > 0.5
    with torch.no_grad():
        merged = network(test_image).argmax(dim=1, keepdim=True)
    assert not bool(absent.any())
    assert dice(found) > 0.5
    assert not bool((merged == 2).any()) and dice(merged == 1) > 0.5


# ---- schedule -----------------------------------------------------------------------------------------
def test_plateau_scheduler_cuts_the_lr_by_0_9_after_5_epochs_without_improvement():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = ValidationPlateauScheduler(optimizer)
    scheduler.step(3)
    scheduler.report(1.0)
    for _ in range(5):
        scheduler.report(1.0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1.0)
    scheduler.report(1.0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.9)


# ---- the real trainer (tests/trainer_harness.py) ---------------------------------------------------
@pytest.fixture(scope="module")
def nnunet_root(tmp_path_factory):
    with nnunet_environment(tmp_path_factory.mktemp("automedsam_trainers")) as folders:
        yield folders


def real_trainer(name: str, num_classes: int = 3) -> AutoMedSAMTrainer:
    """``name`` built and initialised by nnunetv2's own code (tiny ViT, 32 px, no data on disk)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return build_trainer(name, backbone="vit_test", num_classes=num_classes, img_size=TRAINER_IMG_SIZE)


def assert_adamw_groups(trainer: AutoMedSAMTrainer, *, class_prompt_lr_factor: float) -> None:
    """AdamW (0.9, 0.999, eps 1e-8) over three groups that together hold every trainable parameter once: the
    decoder at lr 1e-4 with decay 0.01 (nnU-Net logs the first group's lr), the class-prompt encoder at
    ``class_prompt_lr_factor`` x 1e-4 with decay 0.01, the loss's log-variances at 1e-4 without decay."""
    optimizer = trainer.optimizer
    assert type(optimizer) is torch.optim.AdamW
    decoder, class_prompts, uncertainties = optimizer.param_groups
    for group in optimizer.param_groups:
        assert group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-4, 1e-4 * class_prompt_lr_factor, 1e-4])
    module = trainer.network_module
    log_variances = module.uncertainty.log_variances
    assert decoder["weight_decay"] == class_prompts["weight_decay"] == 0.01 and uncertainties["weight_decay"] == 0.0
    assert len(uncertainties["params"]) == 1 and uncertainties["params"][0] is log_variances
    encoder = {id(p) for p in module.class_prompt_encoder.parameters()}
    assert {id(p) for p in class_prompts["params"]} == encoder and len(class_prompts["params"]) == len(encoder)
    rest = {id(p) for p in module.trainable_parameters() if p is not log_variances and id(p) not in encoder}
    assert {id(p) for p in decoder["params"]} == rest and len(decoder["params"]) == len(rest)
    assert any(id(p) in rest for p in module.mask_decoder.parameters())


def test_trainer_recipe_is_adamw_lr_1e4_with_poly_lr_the_class_prompts_at_10x_and_undecayed_uncertainties(
        nnunet_root):
    """The default trains the class-prompt encoder at 10x the decoder's lr along the whole poly schedule."""
    trainer = real_trainer("AutoMedSAMTrainer")
    assert trainer.initial_lr == 1e-4 and trainer.weight_decay == 0.01 and trainer.num_epochs == 100
    assert_adamw_groups(trainer, class_prompt_lr_factor=10.0)
    assert isinstance(trainer.lr_scheduler, PolyLRScheduler)
    for epoch in (0, 10, 50, 99):
        trainer.lr_scheduler.step(epoch)
        expected = 1e-4 * (1 - epoch / 100) ** 0.9
        assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([expected, 10 * expected, expected])
        assert trainer.lr_scheduler.get_last_lr() == [g["lr"] for g in trainer.optimizer.param_groups]


def test_the_one_class_variant_trains_every_module_at_one_lr(nnunet_root):
    trainer = real_trainer("AutoMedSAMTrainer_one_class")
    assert_adamw_groups(trainer, class_prompt_lr_factor=1.0)
    trainer.lr_scheduler.step(50)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([1e-4 * 0.5 ** 0.9] * 3)


def test_the_lora_variant_trains_the_encoders_lora_at_samed_lr_in_a_group_of_its_own(nnunet_root):
    trainer = real_trainer("AutoMedSAMTrainer_lora")
    groups = trainer.optimizer.param_groups
    assert len(groups) == 4
    lora = {id(p) for p in trainer.network_module.lora.parameters()}
    assert lora and {id(p) for p in groups[3]["params"]} == lora and len(groups[3]["params"]) == len(lora)
    assert not any(id(p) in lora for group in groups[:3] for p in group["params"])
    assert [g["lr"] for g in groups] == pytest.approx([1e-4, 1e-3, 1e-4, 1e-3])  # LoRA at SAMedTrainer's lr
    assert groups[3]["weight_decay"] == 0.01
    trainer.lr_scheduler.step(50)
    assert groups[3]["lr"] == pytest.approx(1e-3 * 0.5 ** 0.9)


def test_continuing_a_checkpoint_written_before_the_class_prompt_group_is_refused_in_one_line(nnunet_root, tmp_path):
    """A run saved with the former two AdamW groups (decayed, uncertainties) does not fit today's three; --c
    says so and names -pretrained_weights instead of failing in torch's optimizer loading."""
    trainer = real_trainer("AutoMedSAMTrainer")
    saved = tmp_path / "checkpoint_latest.pth"
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.save_checkpoint(str(saved))
    checkpoint = torch.load(saved, weights_only=True)
    module = trainer.network_module
    log_variances = module.uncertainty.log_variances
    former = torch.optim.AdamW([{"params": [p for p in module.trainable_parameters() if p is not log_variances]},
                                {"params": [log_variances], "weight_decay": 0.0}], lr=1e-4)
    checkpoint["optimizer_state"] = former.state_dict()
    torch.save(checkpoint, saved)
    decoder_and_prompts = len(former.param_groups[0]["params"])
    with pytest.raises(CheckpointMismatchError, match=(
            rf"checkpoint_latest.pth holds an optimizer state for parameter groups of \[{decoder_and_prompts}, 1\] "
            r"tensors, but this trainer's optimizer has groups of \[\d+, \d+, 1\]: the trainer's recipe changed")):
        trainer.load_checkpoint(str(saved))
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.save_checkpoint(str(saved))
        trainer.load_checkpoint(str(saved))  # today's own checkpoint fits


def test_plateau_trainer_cuts_the_lr_by_0_9_after_5_validation_epochs_without_improvement(nnunet_root):
    """``AutoMedSAMTrainer_plateau``: AdamW as above with ReduceLROnPlateau(min, factor 0.9, patience 5,
    no cooldown) stepped by each epoch's validation loss; nnU-Net's per-epoch ``step(epoch)`` leaves
    the lr alone. The same batch every epoch gives the same validation loss: no improvement."""
    trainer = real_trainer("AutoMedSAMTrainer_plateau")
    assert_adamw_groups(trainer, class_prompt_lr_factor=1.0)  # the paper: one lr
    plateau = trainer.lr_scheduler.plateau
    assert (plateau.mode, plateau.factor, plateau.patience, plateau.cooldown) == ("min", 0.9, 5, 0)
    batch = make_batch(trainer, batch_size=2, seed=0)
    lrs = []
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        for epoch in range(7):
            trainer.current_epoch = epoch
            trainer.on_train_epoch_start()
            trainer.on_validation_epoch_start()
            trainer.on_validation_epoch_end([trainer.validation_step(batch)])
            lrs.append([g["lr"] for g in trainer.optimizer.param_groups])
    validation_losses = trainer.logger.get_value("val_losses", step=None)
    assert len(set(float(v) for v in validation_losses)) == 1
    assert plateau.best == pytest.approx(float(validation_losses[0]))
    assert lrs[:6] == [[1e-4] * 3] * 6
    assert lrs[6] == pytest.approx([0.9e-4] * 3)


def test_trainer_loss_is_the_uncertainty_weighted_sum_of_mse_ce_dice_and_shape_distance(nnunet_root):
    """forward_and_loss = sum_i L_i / (2 s_i^2) + log s_i over (MSE to the teacher's box prompts, CE,
    Dice, shape distance) of the sampled class's mask, recomputed here from the same draws."""
    trainer = real_trainer("AutoMedSAMTrainer")
    network = trainer.network_module
    with torch.no_grad():
        network.uncertainty.log_variances.copy_(torch.tensor([0.4, -0.3, 0.8, -0.6]))
    batch = make_batch(trainer, batch_size=2, seed=3)
    data, target = batch["data"], batch["target"]
    network.train()
    with torch.no_grad():
        torch.manual_seed(7)
        loss = trainer.forward_and_loss(data, target)
        torch.manual_seed(7)  # the same class draws and the same diffusion noise
        per_image = trainer.classes_per_image
        labels, present = sample_prompt_classes(target[:, 0], num_classes=3, per_image=per_image)
        labels, present = labels.reshape(-1), present.reshape(-1)  # image-major: each image's draws together
        target = target.repeat_interleave(per_image, dim=0)
        prediction = network(data, class_labels=labels.view(2, per_image))
    assert per_image == 3 and bool(present.all())  # the harness's batches hold every class
    mask = (target == labels.view(-1, 1, 1, 1)).float()
    boxes = []
    for m in mask[:, 0]:
        ys, xs = torch.nonzero(m, as_tuple=True)
        boxes.append([float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())])
    teacher_sparse, teacher_dense = network.prompt_encoder(points=None, boxes=torch.tensor(boxes)[:, None],
                                                           masks=None)
    probabilities = torch.sigmoid(prediction.mask_logits)
    dice = []  # per prompted class, over all its rows of the batch, smooth 1
    for label in sorted(set(labels.tolist())):
        rows = labels == label
        p, g = probabilities[rows], mask[rows]
        dice.append(1 - (2 * (p * g).sum() + 1) / (p.sum() + g.sum() + 1))
    terms = torch.stack([
        F.mse_loss(prediction.sparse, teacher_sparse) + F.mse_loss(prediction.dense, teacher_dense),
        F.binary_cross_entropy_with_logits(prediction.mask_logits, mask),
        torch.stack(dice).mean(),
        ((probabilities - mask) * signed_distance_maps(mask)).mean(),
    ])
    s = torch.exp(0.5 * torch.tensor([0.4, -0.3, 0.8, -0.6]))
    expected = (terms / (2 * s ** 2) + torch.log(s)).sum()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_trainer_prompts_a_present_class_80_percent_of_the_time_and_an_absent_one_with_an_empty_target(nnunet_root):
    """The trainer's per-sample targets: an image's first class is present in the patch with probability
    0.8 (its mask, ground-truth box, signed distance map), else absent (empty mask, no box, distance +1);
    its second is the class the first was not (no class twice before both were drawn)."""
    trainer = real_trainer("AutoMedSAMTrainer")
    target = torch.zeros(1000, 1, TRAINER_IMG_SIZE, TRAINER_IMG_SIZE)
    target[..., 8:20, 10:24] = 1  # class 1 present, class 2 absent
    torch.manual_seed(0)
    targets = trainer.class_targets(target)
    target = target.repeat_interleave(trainer.classes_per_image, dim=0)  # the draws, image-major
    present, labels = targets["present"], targets["labels"]
    per_image = present.view(-1, trainer.classes_per_image)
    assert float(per_image[:, 0].float().mean()) == pytest.approx(0.8, abs=0.04)
    assert torch.equal(per_image[:, 1], ~per_image[:, 0])
    assert float(per_image[:, 2].float().mean()) == pytest.approx(0.8, abs=0.04)  # both drawn: start over
    assert bool((labels[present] == 1).all()) and bool((labels[~present] == 2).all())
    assert torch.equal(targets["mask"][present], target[present])
    assert not bool(targets["mask"][~present].any())
    assert targets["boxes"][present].unique(dim=0).tolist() == [[10.0, 8.0, 23.0, 19.0]]
    assert not bool(targets["boxes"][~present].any())
    assert bool((targets["distance_maps"][~present] == 1).all())
    assert torch.equal(targets["distance_maps"][present][:1], signed_distance_maps(target[:1]))


class CountingWrapper(nn.Module):
    """Stands where DDP or torch.compile put their wrapper: ``module`` is the network (what
    ``trainer.network_module`` unwraps). Records every forward's arguments and output, and every
    gradient that flows back into that output's mask logits."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.calls: list[tuple[tuple, dict, object]] = []
        self.mask_gradients: list[torch.Tensor] = []

    def forward(self, *args, **kwargs):
        output = self.module(*args, **kwargs)
        self.calls.append((args, kwargs, output))
        if isinstance(output, ClassPrediction) and output.mask_logits.requires_grad:
            output.mask_logits.register_hook(self.mask_gradients.append)
        return output


def test_train_step_runs_the_training_forward_through_the_wrapped_network(nnunet_root):
    """Regression: train_step used to call ``forward_class`` on the unwrapped network, bypassing the
    DDP / compiled wrapper (no gradient all-reduce). The class-prompted forward must go through
    ``trainer.network``, and the loss that is back-propagated must come from that call's output."""
    trainer = real_trainer("AutoMedSAMTrainer")
    module = trainer.network
    wrapper = CountingWrapper(module)
    trainer.network = wrapper
    try:
        assert trainer.network_module is module
        batch = make_batch(trainer, batch_size=2, seed=0)
        with contextlib.redirect_stdout(io.StringIO()):
            result = trainer.train_step(batch)
    finally:
        trainer.network = module
    assert len(wrapper.calls) == 1, "train_step did not call trainer.network (the wrapped module) once"
    args, kwargs, output = wrapper.calls[0]
    assert args[0].shape == batch["data"].shape and isinstance(output, ClassPrediction)
    labels = kwargs["class_labels"]
    assert labels.shape == (2, trainer.classes_per_image) and bool(((labels >= 1) & (labels <= 2)).all())
    assert len(wrapper.mask_gradients) == 1 and bool((wrapper.mask_gradients[0] != 0).any())
    assert np.isfinite(result["loss"])


# ---- trainer through nnU-Net's loop -------------------------------------------------------------------
@pytest.mark.slow
def test_trainer_trains_through_nnunet_logs_uncertainties_and_predicts_all_or_selected_classes(
        planned_tiny_dataset, tmp_path):
    from samunet.cli.predict import build_predictor, predict_folder
    from samunet.cli.train import train
    trainer = train(991, "2d", 0, "AutoMedSAMTrainer", device="cpu",
                    hyperparameters={"num_epochs": 2, "num_iterations_per_epoch": 2,
                                     "num_val_iterations_per_epoch": 1, "batch_size": 2})
    assert isinstance(trainer, AutoMedSAMTrainer)
    logged = trainer.logger.get_value("uncertainty_s", step=None)
    assert len(logged) == 2 and len(logged[0]) == 4 and logged[0] != [1.0] * 4
    output = Path(trainer.output_folder)
    assert (output / "validation" / "summary.json").is_file()
    raw = planned_tiny_dataset["nnUNet_raw"] / "Dataset991_PhantomTiny"
    predictor = build_predictor("Dataset991_PhantomTiny", "2d", "AutoMedSAMTrainer", [0], device="cpu",
                                use_mirroring=False)
    written = predict_folder(predictor, raw / "imagesTs", tmp_path / "all")
    assert sorted(p.name for p in written) == sorted(p.name for p in (raw / "labelsTs").iterdir())
    predictor.network.set_predict_classes(parse_class_selection("kidney", predictor.dataset_json["labels"]))
    import SimpleITK as sitk
    for path in predict_folder(predictor, raw / "imagesTs", tmp_path / "kidney"):
        assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).tolist()) <= {0, 2}
