"""nnU-Net's foreground oversampling survives a batch of one (Self-Prompt-SAM's single slice stack).

nnU-Net forces foreground on the last ``B - round(B (1 - 0.33))`` samples of a batch: none when B = 1, so a
trainer planned with one sample per step would draw every patch at a random location, and a class that
occupies a few slices of a volume would hardly ever be trained on (the real brain MRI of docs/evidence.md,
round 11: Self-Prompt-SAM drew every stack at a random depth).
"""
from __future__ import annotations

import numpy as np
import pytest
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

from samunet.trainers.base import oversampling_lost_to_rounding
from trainer_harness import build_trainer, nnunet_environment

MAIN_TRAINERS = ("SAMedTrainer", "SelfPromptSAMTrainer", "HSAMTrainer", "HSPSAMTrainer", "AutoMedSAMTrainer")
SLICES, FOREGROUND_SLICE, SIZE = 40, 17, 16


@pytest.mark.parametrize("batch_size, percent, lost", [(1, 0.33, True), (2, 0.33, False), (3, 0.33, False),
                                                       (6, 0.33, False), (1, 0.0, False), (1, 1.0, False),
                                                       (1, 0.6, False)])
def test_nnunets_rule_forces_no_sample_only_where_rounding_leaves_none(batch_size, percent, lost):
    forced = sum(not i < round(batch_size * (1 - percent)) for i in range(batch_size))  # nnU-Net's rule
    assert oversampling_lost_to_rounding(batch_size, percent) is lost
    assert lost == (percent > 0 and forced == 0)


@pytest.mark.parametrize("name", MAIN_TRAINERS)
def test_every_main_trainer_turns_to_probabilistic_oversampling_at_a_batch_of_one_only(tmp_path, name):
    depth = 3 if name == "SelfPromptSAMTrainer" else 1
    with nnunet_environment(tmp_path):
        single = build_trainer(name, backbone="vit_test", num_classes=3, img_size=32, depth=depth,
                               hyperparameters={"batch_size": 1})
        pair = build_trainer(name, backbone="vit_test", num_classes=3, img_size=32, depth=depth,
                             hyperparameters={"batch_size": 2})
    assert (single.batch_size, single.oversample_foreground_percent) == (1, pytest.approx(0.33))
    assert single.probabilistic_oversampling
    assert pair.batch_size == 2 and not pair.probabilistic_oversampling  # nnU-Net's rule forces one of two


class OneForegroundSlice:
    """nnU-Net's dataset interface for one case of ``SLICES`` slices with foreground in one slice only."""

    identifiers = ["case"]

    def load_case(self, identifier: str):
        data = np.zeros((1, SLICES, SIZE, SIZE), dtype=np.float32)
        seg = np.zeros((1, SLICES, SIZE, SIZE), dtype=np.int16)
        seg[0, FOREGROUND_SLICE, 4:12, 4:12] = 1
        locations = np.argwhere(seg == 1)
        return data, seg, None, {"class_locations": {1: locations}}


def test_a_batch_of_one_draws_foreground_as_often_as_nnunet_asks(tmp_path):
    """The loader built with the trainer's settings, as nnU-Net's ``get_dataloaders`` builds it: with the
    foreground in 1 of 40 slices, a third of single-sample batches hold it, not 1 in 40."""
    with nnunet_environment(tmp_path):
        trainer = build_trainer("SAMedTrainer", backbone="vit_test", num_classes=3, img_size=32,
                                hyperparameters={"batch_size": 1})
    loader = nnUNetDataLoader(OneForegroundSlice(), trainer.batch_size, (SIZE, SIZE), (SIZE, SIZE),
                              trainer.label_manager, oversample_foreground_percent=trainer.oversample_foreground_percent,
                              probabilistic_oversampling=trainer.probabilistic_oversampling)
    np.random.seed(0)
    draws = 300
    hits = sum(bool(next(loader)["target"].max() > 0) for _ in range(draws))
    assert 0.25 < hits / draws < 0.45, hits
