"""Self-Prompt-SAM's prompt generators (MSPGenerator, stacked-CNN ablation S1) on tiny inputs."""
from __future__ import annotations

import pytest
import torch

from samunet.modules.prompt_generators import (MSPGenerator, StackedCNNPromptGenerator, deep_supervision_weights,
                                               generator_level_strides)

CHANNELS = (8, 8, 8, 8, 8)
WIDTHS = (4, 4, 8, 8, 8)
VIT_STRIDES = (16, 16, 16, 16, 16)
TINYVIT_STRIDES = (1, 2, 4, 4, 4)


def feature_maps(size: int, strides, channels=CHANNELS, batch: int = 2, grad: bool = False) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(batch, c, size // s, size // s, generator=generator).requires_grad_(grad)
            for c, s in zip(channels, strides)]


def make(cls, strides, num_classes: int = 3):
    torch.manual_seed(0)
    return cls(in_channels=CHANNELS, in_strides=strides, num_classes=num_classes, widths=WIDTHS)


# ---- level strides and deep-supervision weights ---------------------------------------------
def test_plain_vit_maps_get_a_unetr_like_pyramid_and_hierarchical_maps_keep_native_strides():
    assert generator_level_strides(VIT_STRIDES) == (1, 2, 4, 8, 16)
    assert generator_level_strides((8,) * 5) == (1, 1, 2, 4, 8)
    assert generator_level_strides(TINYVIT_STRIDES) == (1, 2, 4, 4, 4)


@pytest.mark.parametrize("strides", [(16,) * 4, (16,) * 6, (1, 2, 4, 4, 2), (1, 4, 4, 4, 4), (0, 1, 2, 4, 4),
                                     (24,) * 5])
def test_generator_level_strides_rejects_other_than_five_non_decreasing_x2_levels(strides):
    with pytest.raises(ValueError):
        generator_level_strides(strides)


def test_deep_supervision_weights_halve_with_each_halving_of_resolution_and_sum_to_one():
    assert deep_supervision_weights((1, 2, 4, 8, 16)) == pytest.approx([16 / 31, 8 / 31, 4 / 31, 2 / 31, 1 / 31])
    weights = deep_supervision_weights((1, 2, 4, 4, 4))
    assert weights == pytest.approx([4 / 9, 2 / 9, 1 / 9, 1 / 9, 1 / 9])
    assert sum(weights) == pytest.approx(1.0)


# ---- MSPGenerator -----------------------------------------------------------------------------
@pytest.mark.parametrize("strides, size, sides", [(VIT_STRIDES, 64, (64, 32, 16, 8, 4)),
                                                  (TINYVIT_STRIDES, 32, (32, 16, 8, 8, 8))])
def test_msp_generator_outputs_at_every_deep_supervision_scale_finest_first(strides, size, sides):
    generator = make(MSPGenerator, strides, num_classes=3)
    outputs = generator(feature_maps(size, strides))
    assert [tuple(o.shape) for o in outputs] == [(2, 3, s, s) for s in sides]
    assert tuple(size // s for s in generator.level_strides) == sides
    assert len(deep_supervision_weights(generator.level_strides)) == len(outputs)


@pytest.mark.parametrize("strides, size", [(VIT_STRIDES, 64), (TINYVIT_STRIDES, 32)])
def test_msp_generator_finest_output_depends_on_every_encoder_level(strides, size):
    generator = make(MSPGenerator, strides)
    features = feature_maps(size, strides, grad=True)
    grads = torch.autograd.grad(generator(features)[0].square().sum(), features, allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)

    generator.eval()
    with torch.no_grad():
        before = generator(features)[0]
        changed = features[:4] + [features[4] + torch.randn_like(features[4])]
        assert not torch.allclose(generator(changed)[0], before)


# ---- stacked-CNN ablation (S1) ----------------------------------------------------------------
@pytest.mark.parametrize("strides, size", [(VIT_STRIDES, 32), (TINYVIT_STRIDES, 32)])
def test_stacked_cnn_generator_uses_only_the_image_embedding_and_outputs_full_resolution(strides, size):
    generator = make(StackedCNNPromptGenerator, strides, num_classes=4)
    assert generator.level_strides == (1,)
    features = feature_maps(size, strides, grad=True)
    outputs = generator(features)
    assert len(outputs) == 1 and tuple(outputs[0].shape) == (2, 4, size, size)
    grads = torch.autograd.grad(outputs[0].square().sum(), features, allow_unused=True)
    assert all(g is None or not g.any() for g in grads[:4])
    assert grads[4] is not None and grads[4].abs().sum() > 0

    generator.eval()
    with torch.no_grad():
        changed = [f + torch.randn_like(f) for f in features[:4]] + features[4:]
        assert torch.equal(generator(changed)[0], generator(features)[0])
