"""SAMedNetwork and LoRA: the baseline's trainable/frozen split and LoRA's identity start."""
from __future__ import annotations

import pytest
import torch

from samunet.backbones.catalog import get_backbone_spec
from samunet.backbones.sam import build_sam_parts, load_released_checkpoint
from samunet.modules.lora import add_qv_lora
from samunet.networks.samed import SAMedNetwork
from samunet.weights import WeightsError, load_state_dict

TINY_BACKBONES = ("vit_test", "tinyvit_test")


def tiny_network(backbone: str, num_classes: int = 4, channels: int = 1) -> SAMedNetwork:
    torch.manual_seed(0)
    return SAMedNetwork(input_channels=channels, num_classes=num_classes, backbone=backbone, img_size=64,
                        intensity_ranges=[[-2.0, 2.0]] * channels)


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_forward_gives_one_full_resolution_logit_map_per_class(backbone):
    network = tiny_network(backbone, num_classes=5)
    logits = network(torch.randn(2, 1, 64, 64))
    assert logits.shape == (2, 5, 64, 64)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_lora_at_initialisation_leaves_the_encoder_output_unchanged(backbone):
    torch.manual_seed(0)
    encoder = get_backbone_spec(backbone).build_encoder(64).eval()
    image = torch.randn(2, 3, 64, 64)
    before = encoder(image).embedding
    lora = add_qv_lora(encoder.qkv_projections(), rank=4)
    assert torch.equal(encoder(image).embedding, before)
    with torch.no_grad():
        lora[0].v_up.weight.fill_(0.05)
    assert not torch.allclose(encoder(image).embedding, before)


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_lora_sits_on_q_and_v_of_every_attention_layer_with_rank_4(backbone):
    network = tiny_network(backbone)
    assert len(network.lora) == len(network.image_encoder.qkv_projections())
    assert all(layer.q_down.out_features == 4 and layer.v_down.out_features == 4 for layer in network.lora)


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_only_lora_decoder_and_prompt_embedding_train_and_frozen_weights_stay_bitwise(backbone):
    network = tiny_network(backbone)
    network.train()
    trainable = {name for name, p in network.named_parameters() if p.requires_grad}
    assert trainable, "nothing trains"
    assert all(name.startswith(("lora.", "mask_decoder.", "prompt_encoder.no_mask_embed")) for name in trainable)
    assert not any(name.startswith("image_encoder.") for name in trainable)
    frozen_before = {k: v.clone() for k, v in network.state_dict().items()
                     if not k.startswith(("lora.", "mask_decoder.", "prompt_encoder.no_mask_embed"))}
    optimizer = torch.optim.AdamW(list(network.trainable_parameters()), lr=1e-2, weight_decay=0.1)
    for _ in range(2):  # the second step moves LoRA's down-projections too (its up-projections start at 0)
        optimizer.zero_grad()
        network(torch.randn(2, 1, 64, 64)).logsumexp(1).mean().backward()
        frozen_grads = [n for n, p in network.named_parameters() if not p.requires_grad and p.grad is not None]
        assert frozen_grads == []
        optimizer.step()
    after = network.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen_before.items())
    moved = [n for n, p in network.named_parameters() if p.requires_grad and p.grad is not None and p.grad.any()]
    assert any(n.startswith("lora.") and "up" in n for n in moved)
    assert any(n.startswith("lora.") and "down" in n for n in moved)
    assert any(n.startswith("mask_decoder.") for n in moved)
    assert "prompt_encoder.no_mask_embed.weight" in moved


def test_more_than_three_channels_go_through_a_trainable_mixer():
    network = tiny_network("vit_test", channels=2)
    assert network.input_stage.channel_mixer is not None
    assert network(torch.randn(1, 2, 64, 64)).shape == (1, 4, 64, 64)


def test_litemedsam_checkpoint_loads_strictly_into_the_sam_parts(litemedsam_checkpoint):
    parts = build_sam_parts(get_backbone_spec("litemedsam"), 256)
    state = load_state_dict(litemedsam_checkpoint)
    assert len(state) == 435
    load_released_checkpoint(parts, state, str(litemedsam_checkpoint))
    assert torch.equal(parts.mask_decoder.mask_tokens.weight, state["mask_decoder.mask_tokens.weight"])


def test_class_tokens_start_from_the_released_mask_tokens(litemedsam_checkpoint):
    state = load_state_dict(litemedsam_checkpoint)
    network = SAMedNetwork(input_channels=1, num_classes=6, backbone="litemedsam", img_size=64,
                           intensity_ranges=[[-2.0, 2.0]])
    network.load_pretrained(state)
    tokens = network.mask_decoder.mask_tokens.weight
    released = state["mask_decoder.mask_tokens.weight"]
    assert tokens.shape[0] == 6
    assert torch.equal(tokens[4], released[0]) and torch.equal(tokens[5], released[1])


def test_a_checkpoint_of_another_backbone_is_refused_with_a_clear_error(litemedsam_checkpoint):
    network = tiny_network("vit_test")
    with pytest.raises(WeightsError, match="does not fit backbone 'vit_test'"):
        network.load_pretrained(load_state_dict(litemedsam_checkpoint), "lite_medsam.pth")
