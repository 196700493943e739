"""Fine-tuning from a trained samunet model: ``samunet_train ... -pretrained_weights CHECKPOINT``.

nnU-Net's semantics: the checkpoint's network weights are copied into the freshly initialised network
where name and shape match; the class heads of a model with another class count keep their fresh
initialisation and are named in a warning, as are tensors only one side has.
"""
from __future__ import annotations

import contextlib
import json
import logging
from unittest import mock

import pytest
import torch

from samunet.cli.train import main as train_main, train
from samunet.errors import ConfigurationError
from samunet.registry import TRAINERS
from samunet.trainers.base import CheckpointMismatchError
from samunet.trainers.finetune import load_pretrained_weights
from trainer_harness import (DATASET_NAME, in_memory_dataset_class, nnunet_environment, synthetic_dataset_json,
                             synthetic_plans)

HEADS = {"mask_decoder.mask_tokens.weight", "mask_decoder.iou_prediction_head.layers.2.weight",
         "mask_decoder.iou_prediction_head.layers.2.bias"}  # one row per class


def samed_network(num_classes: int, seed: int) -> torch.nn.Module:
    """SAMedTrainer's network for a ``num_classes``-class data set (vit_test, 64 px), as its static builder
    makes it from the plans."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    plans_manager = PlansManager(synthetic_plans(backbone="vit_test", img_size=64))
    torch.manual_seed(seed)
    return TRAINERS.get("SAMedTrainer").build_network_architecture(
        plans_manager, plans_manager.get_configuration("2d"), 1, num_classes, False)


@pytest.fixture
def amos_like_checkpoint(tmp_path):
    """A samunet checkpoint (the keys SAMTrainerBase.save_checkpoint writes that fine-tuning reads) of a
    4-class model whose weights differ from any fresh initialisation."""
    network = samed_network(4, seed=1)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(0.5)
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": network.state_dict(), "trainer_name": "SAMedTrainer", "current_epoch": 3,
                "samunet": {"backbone": "vit_test", "img_size": 64, "stack_depth": None}}, path)
    return path


@contextlib.contextmanager
def in_memory_dataset(num_classes: int):
    """nnU-Net's preprocessed-data class replaced by the harness's in-memory one, wherever initialize() looks;
    the check that preprocessing finished on disk is skipped, since no case is on disk."""
    import samunet.trainers.base as base
    dataset_class = in_memory_dataset_class(num_classes=num_classes, img_size=64)
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch("nnunetv2.training.nnUNetTrainer.nnUNetTrainer.infer_dataset_class",
                                       return_value=dataset_class))
        if hasattr(base, "infer_dataset_class"):
            stack.enter_context(mock.patch.object(base, "infer_dataset_class", return_value=dataset_class))
        stack.enter_context(mock.patch("samunet.preprocessing.completeness.check_preprocessed_dataset"))
        yield


def test_heads_of_another_class_count_are_skipped_by_name_and_the_rest_loads_bit_equal(
        amos_like_checkpoint, tmp_path, caplog):
    network = samed_network(3, seed=2)
    fresh = {k: v.clone() for k, v in network.state_dict().items()}
    source = torch.load(amos_like_checkpoint, map_location="cpu", weights_only=True)["network_weights"]
    with caplog.at_level(logging.WARNING, logger="samunet.trainers.finetune"):
        report = load_pretrained_weights(network, amos_like_checkpoint)
    assert set(report.shape_mismatch) == HEADS
    assert report.unexpected == [k for k in source if k.startswith("mask_decoder.output_hypernetworks_mlps.3.")]
    assert report.missing == []
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert all(name in warned for name in HEADS) and "output_hypernetworks_mlps.3.layers.0.weight" in warned
    loaded = network.state_dict()
    for key, value in loaded.items():
        if key in HEADS:
            assert torch.equal(value, fresh[key]), key  # kept freshly initialised
        else:
            assert torch.equal(value, source[key]), key  # encoder, LoRA, decoder: bit-equal
    assert len(report.loaded) == len(loaded) - len(HEADS)


def test_a_released_sam_checkpoint_or_another_backbone_is_refused(amos_like_checkpoint, tmp_path):
    network = samed_network(3, seed=2)
    torch.save(network.image_encoder.state_dict(), tmp_path / "sam_like.pth")
    with pytest.raises(ConfigurationError, match="--weights"):
        load_pretrained_weights(network, tmp_path / "sam_like.pth")
    checkpoint = torch.load(amos_like_checkpoint, map_location="cpu", weights_only=True)
    checkpoint["samunet"]["backbone"] = "vit_b"
    torch.save(checkpoint, tmp_path / "vit_b.pth")
    with pytest.raises(CheckpointMismatchError, match="vit_b"):
        load_pretrained_weights(network, tmp_path / "vit_b.pth")


@pytest.fixture
def synthetic_dataset(tmp_path):
    """A planned 3-class data set (the harness's synthetic plans) whose cases are served from memory."""
    with nnunet_environment(tmp_path / "target") as folders:
        (folders["nnUNet_raw"] / DATASET_NAME).mkdir()
        preprocessed = folders["nnUNet_preprocessed"] / DATASET_NAME
        preprocessed.mkdir()
        (preprocessed / "samunetPlans.json").write_text(json.dumps(synthetic_plans(backbone="vit_test", img_size=64)))
        (preprocessed / "dataset.json").write_text(json.dumps(synthetic_dataset_json(3)))
        with in_memory_dataset(3):
            yield folders["nnUNet_results"] / DATASET_NAME / "SAMedTrainer__samunetPlans__2d" / "fold_all"


def test_samunet_train_loads_them_after_initialisation_and_before_training(amos_like_checkpoint, synthetic_dataset):
    """``train(..., pretrained_weights=...)`` (what -pretrained_weights sets): the network that starts
    training holds the checkpoint's weights, and the training log says what was skipped."""
    from samunet.trainers.base import SAMTrainerBase
    seen = {}

    def run_training(self):
        seen["weights"] = {k: v.clone() for k, v in self.network_module.state_dict().items()}

    with mock.patch.object(SAMTrainerBase, "run_training", run_training), \
            mock.patch.object(SAMTrainerBase, "perform_actual_validation", lambda self, npz=False: None):
        trainer = train(DATASET_NAME, "2d", "all", "SAMedTrainer", device="cpu",
                        pretrained_weights=str(amos_like_checkpoint))
    log = next(synthetic_dataset.glob("training_log_*.txt")).read_text()
    source = torch.load(amos_like_checkpoint, map_location="cpu", weights_only=True)["network_weights"]
    for key, value in seen["weights"].items():
        if key not in HEADS:
            assert torch.equal(value, source[key]), key
    assert trainer.was_initialized
    assert f"fine-tuning from {amos_like_checkpoint}" in log and "mask_decoder.mask_tokens.weight" in log


def test_val_best_validates_with_the_best_checkpoint_and_disable_checkpointing_writes_none(synthetic_dataset):
    """nnU-Net's --val_best loads checkpoint_best.pth before the final validation; --disable_checkpointing
    makes the trainer write no checkpoint at all."""
    from samunet.trainers.base import SAMTrainerBase
    seen = {}

    def run_training(self):  # "training" that saves a best checkpoint, then moves on to other weights
        self.initialize()
        self.save_checkpoint(str(synthetic_dataset / "checkpoint_best.pth"))
        seen["best"] = {k: v.clone() for k, v in self.network_module.state_dict().items()}
        with torch.no_grad():
            for parameter in self.network_module.parameters():
                parameter.add_(1.0)
        self.save_checkpoint(str(synthetic_dataset / "checkpoint_final.pth"))

    def validate(self, npz=False):
        seen["validated"] = {k: v.clone() for k, v in self.network_module.state_dict().items()}

    with mock.patch.object(SAMTrainerBase, "run_training", run_training), \
            mock.patch.object(SAMTrainerBase, "perform_actual_validation", validate):
        train(DATASET_NAME, "2d", "all", "SAMedTrainer", device="cpu", val_best=True)
        assert all(torch.equal(seen["validated"][k], v) for k, v in seen["best"].items())
        for name in ("checkpoint_best.pth", "checkpoint_final.pth"):
            (synthetic_dataset / name).unlink()
        train(DATASET_NAME, "2d", "all", "SAMedTrainer", device="cpu", disable_checkpointing=True)
    assert not list(synthetic_dataset.glob("checkpoint_*.pth"))


@pytest.mark.parametrize("flag", ["--c", "--val"])
def test_pretrained_weights_only_start_a_new_training(flag, capsys):
    assert train_main(["991", "2d", "0", "-pretrained_weights=model.pth", flag]) == 2
    message = capsys.readouterr().err
    assert "-pretrained_weights starts a new training" in message and flag in message and message.count("\n") == 1
