"""AutoMedSAM (AutoMedSAMNetwork, its modules and AutoMedSAMTrainer): the paper's behaviour on tiny random backbones."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from samunet.errors import ConfigurationError
from samunet.modules.diffusion_prompt_encoder import DiffusionClassPromptEncoder, noise_scale
from samunet.modules.uncertainty_loss import (AutoMedSAMJointLoss, UncertaintyWeighting, shape_distance_loss,
                                              signed_distance_map, signed_distance_maps)
from samunet.networks.automedsam import AutoMedSAMNetwork, class_log_probabilities, parse_class_selection
from samunet.trainers.automedsam import (AutoMedSAMTrainer, ValidationPlateauScheduler, mask_boxes,
                                         sample_prompt_classes)

TINY_BACKBONES = ("vit_test", "tinyvit_test")


def tiny_network(backbone: str = "tinyvit_test", num_classes: int = 3, trained_heads: bool = True,
                 **kwargs) -> AutoMedSAMNetwork:
    """A tiny network; ``trained_heads`` gives the branches' zero-initialised output layers random
    values, as after training, so that the class index and the noise reach the prompts."""
    torch.manual_seed(0)
    network = AutoMedSAMNetwork(input_channels=1, num_classes=num_classes, backbone=backbone, img_size=64,
                                intensity_ranges=[[-2.0, 2.0]], **kwargs)
    if trained_heads:
        encoder = network.class_prompt_encoder
        with torch.no_grad():
            for head in (encoder.dense_branch.decoder.head, encoder.sparse_branch.decoder.head):
                head.weight.normal_(0, 0.05)
                head.bias.normal_(0, 0.05)
    return network


def square_label(size: int = 64) -> torch.Tensor:
    """(1, 1, S, S) label map: class 1 is a square, class 2 is absent."""
    label = torch.zeros(1, 1, size, size)
    label[..., 16:40, 20:44] = 1
    return label


def test_class_prompts_start_as_the_frozen_encoders_whole_image_box_prompts():
    network = tiny_network(trained_heads=False)
    prediction = network.forward_class(torch.randn(2, 1, 64, 64), torch.tensor([1, 2]))
    box = torch.tensor([[0.0, 0.0, 63.0, 63.0]])
    sparse, dense = network.prompt_encoder(points=None, boxes=box[:, None], masks=None)
    assert torch.allclose(prediction.sparse, sparse.expand(2, -1, -1))
    assert torch.allclose(prediction.dense, dense.expand(2, -1, -1, -1))


# ---- diffusion schedule -------------------------------------------------------------------------
def test_noise_scale_decreases_with_t_and_is_zero_at_inference():
    steps = torch.arange(0, 1001)
    scales = noise_scale(steps, num_timesteps=1000, max_noise_scale=1.0)
    assert bool((scales[1:] < scales[:-1]).all())
    assert float(scales[0]) == pytest.approx(1.0) and float(scales[-1]) == 0.0
    encoder = DiffusionClassPromptEncoder(num_classes=2, embed_dim=8, embedding_size=(8, 8), num_timesteps=10)
    training_steps = encoder.sample_timesteps(500, torch.device("cpu"))
    assert int(training_steps.min()) >= 0 and int(training_steps.max()) <= 9  # always noised in training
    assert len(torch.unique(training_steps)) > 1  # random per sample
    assert bool((encoder.inference_timesteps(3, torch.device("cpu")) == 10).all())


def test_diffusion_noise_is_random_in_training_and_absent_at_inference():
    encoder = DiffusionClassPromptEncoder(num_classes=2, embed_dim=8, embedding_size=(8, 8))
    embedding, labels = torch.randn(2, 8, 8, 8), torch.tensor([0, 1])
    projected = embedding + encoder.class_to_embedding(torch.eye(2)).view_as(embedding)
    with torch.no_grad():
        clean = encoder.diffuse(embedding, labels, encoder.inference_timesteps(2, embedding.device))
        early = encoder.diffuse(embedding, labels, torch.zeros(2, dtype=torch.long)) - projected
        late = encoder.diffuse(embedding, labels, torch.full((2,), 900)) - projected
    assert torch.allclose(clean, projected)  # x_T = E + P(k), no noise
    assert float(early.std()) > 5 * float(late.std()) > 0
    network = tiny_network()
    x = torch.randn(1, 1, 64, 64)
    network.eval()
    with torch.no_grad():
        assert torch.equal(network.forward_class(x, torch.tensor([1])).dense,
                           network.forward_class(x, torch.tensor([1])).dense)
    network.train()
    with torch.no_grad():
        assert not torch.equal(network.forward_class(x, torch.tensor([1])).dense,
                               network.forward_class(x, torch.tensor([1])).dense)


# ---- network -------------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_branch_outputs_have_the_shapes_the_mask_decoder_takes(backbone):
    network = tiny_network(backbone)
    network.eval()
    with torch.no_grad():
        prediction = network.forward_class(torch.randn(2, 1, 64, 64), torch.tensor([1, 2]))
        teacher_sparse, teacher_dense = network.teacher_prompts(torch.tensor([[0.0, 0.0, 9.0, 9.0]] * 2))
        output = network(torch.randn(2, 1, 64, 64))
    assert prediction.sparse.shape == teacher_sparse.shape == (2, 2, 32)
    assert prediction.dense.shape == teacher_dense.shape == (2, 32, *network.prompt_encoder.image_embedding_size)
    assert prediction.mask_logits.shape == (2, 1, 64, 64)
    assert output.shape == (2, 3, 64, 64)
    assert torch.allclose(output.exp().sum(dim=1), torch.ones(2, 64, 64), atol=1e-5)


def test_litemedsam_sized_prompt_encoder_gives_a_256_x_64_x_64_dense_prompt():
    encoder = DiffusionClassPromptEncoder(num_classes=4, embed_dim=256, embedding_size=(64, 64))
    encoder.eval()
    with torch.no_grad():
        sparse, dense = encoder(torch.randn(1, 256, 64, 64), torch.tensor([3]))
    assert dense.shape == (1, 256, 64, 64) and sparse.shape == (1, 2, 256)


def test_litemedsam_network_at_256_loads_the_released_teacher_and_gives_256_x_64_x_64_prompts(
        litemedsam_checkpoint):
    from samunet.weights import load_state_dict

    state = load_state_dict(litemedsam_checkpoint)
    network = AutoMedSAMNetwork(input_channels=1, num_classes=3, backbone="litemedsam", img_size=256,
                                intensity_ranges=[[-2.0, 2.0]])
    network.load_pretrained(state)
    assert torch.equal(network.prompt_encoder.point_embeddings[2].weight,
                       state["prompt_encoder.point_embeddings.2.weight"])
    network.eval()
    with torch.no_grad():
        prediction = network.forward_class(torch.randn(1, 1, 256, 256), torch.tensor([2]))
        teacher_sparse, teacher_dense = network.teacher_prompts(torch.tensor([[40.0, 50.0, 120.0, 200.0]]))
    assert prediction.dense.shape == teacher_dense.shape == (1, 256, 64, 64)
    assert prediction.sparse.shape == teacher_sparse.shape == (1, 2, 256)
    assert prediction.mask_logits.shape == (1, 1, 256, 256)


def test_class_index_changes_the_prompt_embeddings_and_the_mask():
    network = tiny_network(num_classes=4)
    network.eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        predictions = [network.forward_class(x, torch.tensor([k])) for k in (1, 2, 3)]
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        assert not torch.allclose(predictions[a].sparse, predictions[b].sparse)
        assert not torch.allclose(predictions[a].dense, predictions[b].dense)
        assert not torch.allclose(predictions[a].mask_logits, predictions[b].mask_logits)


def test_only_the_class_prompt_encoder_mask_decoder_and_uncertainties_train():
    network = tiny_network()
    trainable = {name.split(".")[0] for name, p in network.named_parameters() if p.requires_grad}
    assert trainable == {"class_prompt_encoder", "mask_decoder", "uncertainty"}
    assert not any(p.requires_grad for p in network.prompt_encoder.parameters())


def test_merged_output_follows_the_per_class_probabilities_and_class_selection():
    probabilities = torch.zeros(1, 3, 1, 3)
    probabilities[0, 1] = torch.tensor([0.9, 0.2, 0.7])
    probabilities[0, 2] = torch.tensor([0.1, 0.3, 0.8])
    assert class_log_probabilities(probabilities).argmax(dim=1).flatten().tolist() == [1, 0, 2]
    network = tiny_network(num_classes=4)
    network.eval()
    network.set_predict_classes([2])
    with torch.no_grad():
        output = network(torch.randn(1, 1, 64, 64)).exp()
    assert float(output[:, [1, 3]].max()) < 1e-6 and float(output[:, 2].min()) > 0
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
    assert (signed_distance_map(np.zeros((4, 4), bool)) == 1).all()  # empty class: any prediction costs


def test_sampled_classes_are_present_80_percent_of_the_time_and_absent_ones_give_empty_masks():
    target = square_label()[:, 0].repeat(2000, 1, 1)
    labels, present = sample_prompt_classes(target, num_classes=4, generator=torch.Generator().manual_seed(0))
    assert float(present.float().mean()) == pytest.approx(0.8, abs=0.03)
    assert bool((labels[present] == 1).all()) and set(labels[~present].tolist()) == {2, 3}
    empty = torch.zeros(3, 8, 8)
    labels, present = sample_prompt_classes(empty, num_classes=3)
    assert not bool(present.any())
    masks = (empty == labels.view(-1, 1, 1))
    assert not bool(masks.any()) and not bool(mask_boxes(masks).any())


def test_teacher_targets_come_from_the_frozen_prompt_encoder_fed_with_the_ground_truth_box():
    network = tiny_network()
    target = square_label()
    box = mask_boxes(target[:, 0] > 0)
    assert box.tolist() == [[20.0, 16.0, 43.0, 39.0]]
    sparse, dense = network.teacher_prompts(box)
    reference_sparse, reference_dense = network.prompt_encoder(points=None, boxes=box[:, None], masks=None)
    assert torch.equal(sparse, reference_sparse) and torch.equal(dense, reference_dense)
    prediction = network.forward_class(torch.randn(1, 1, 64, 64), torch.tensor([1]))
    joint = AutoMedSAMJointLoss(weighting=network.uncertainty)(
        mask_logits=prediction.mask_logits, target=target, distance_maps=signed_distance_maps(target),
        sparse=prediction.sparse, dense=prediction.dense, teacher_sparse=sparse, teacher_dense=dense,
        present=torch.tensor([True]))
    expected = (torch.nn.functional.mse_loss(prediction.sparse, sparse)
                + torch.nn.functional.mse_loss(prediction.dense, dense)).detach()
    assert float(joint.terms[0]) == pytest.approx(float(expected), rel=1e-5)


def train_tiny(network: AutoMedSAMNetwork, steps: int) -> list[torch.Tensor]:
    """Train on one image with class 1 present and class 2 absent; returns the s_i gradients of step 1."""
    torch.manual_seed(1)
    image, target = torch.randn(2, 1, 64, 64), square_label().repeat(2, 1, 1, 1)
    image[target > 0] += 2.0
    loss = AutoMedSAMJointLoss(weighting=network.uncertainty)
    optimizer = torch.optim.AdamW(network.trainable_parameters(), lr=2e-3, weight_decay=0.0)
    labels, present = torch.tensor([1, 2]), torch.tensor([True, False])
    masks = (target == labels.view(-1, 1, 1, 1)).float()
    distance_maps = signed_distance_maps(masks)
    teacher = network.teacher_prompts(mask_boxes(masks[:, 0] > 0))
    gradients = []
    network.train()
    for _ in range(steps):
        optimizer.zero_grad()
        prediction = network.forward_class(image, labels)
        joint = loss(mask_logits=prediction.mask_logits, target=masks, distance_maps=distance_maps,
                     sparse=prediction.sparse, dense=prediction.dense, teacher_sparse=teacher[0],
                     teacher_dense=teacher[1], present=present)
        joint.total.backward()
        gradients.append(network.uncertainty.log_variances.grad.clone())
        optimizer.step()
    network.eval()
    return gradients


def test_training_moves_the_uncertainties_keeps_the_teacher_and_an_absent_class_gives_an_empty_mask():
    network = tiny_network()
    teacher_before = copy.deepcopy(network.prompt_encoder.state_dict())
    s_before = network.uncertainty.scales().detach().clone()
    gradients = train_tiny(network, steps=40)
    assert bool((gradients[0] != 0).all())
    assert bool((network.uncertainty.scales().detach() != s_before).all())
    for name, value in network.prompt_encoder.state_dict().items():
        assert torch.equal(value, teacher_before[name]), name
    image = torch.randn(1, 1, 64, 64)
    image[square_label() > 0] += 2.0
    with torch.no_grad():
        absent = torch.sigmoid(network.forward_class(image, torch.tensor([2])).mask_logits)
        present = torch.sigmoid(network.forward_class(image, torch.tensor([1])).mask_logits)
        merged = network(image).argmax(dim=1)
    assert not bool((absent > 0.5).any())
    assert float(present[square_label() > 0].mean()) > float(present[square_label() == 0].mean())
    assert not bool((merged == 2).any())


# ---- schedule -----------------------------------------------------------------------------------------
def test_plateau_variant_cuts_the_lr_by_0_9_after_5_epochs_without_improvement():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = ValidationPlateauScheduler(optimizer)
    scheduler.step(3)
    scheduler.report(1.0)
    for _ in range(5):
        scheduler.report(1.0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1.0)
    scheduler.report(1.0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.9)


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
    decayed, undecayed = trainer.optimizer.param_groups
    assert undecayed["weight_decay"] == 0.0 and decayed["weight_decay"] == trainer.weight_decay > 0
    assert undecayed["params"] == [trainer.network_module.uncertainty.log_variances]
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


@pytest.mark.slow
def test_plateau_variant_trains_through_nnunet_with_adamw_and_the_validation_plateau(planned_tiny_dataset):
    from samunet.cli.train import train
    trainer = train(991, "2d", 0, "AutoMedSAMTrainer_plateau", device="cpu",
                    hyperparameters={"num_epochs": 1, "num_iterations_per_epoch": 1,
                                     "num_val_iterations_per_epoch": 1, "batch_size": 2})
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    assert isinstance(trainer.lr_scheduler, ValidationPlateauScheduler)
    assert trainer.lr_scheduler.plateau.best == pytest.approx(trainer.logger.get_value("val_losses", step=0))
