"""SAMed (Zhang & Liu, 2023), samunet's baseline: what is specific to it.

A frozen SAM encoder with rank-4 LoRA on q and v of every attention layer (LoRA itself: test_lora.py),
prompt-free decoding with the learned 'no mask' embedding, and SAM's mask decoder with one mask token per
output class, loaded from the release only when the class count matches its 4 tokens (as SAMed loads).
Shapes, finiteness, frozen weights and gradient ownership are checked for every trainer in
test_trainer_contract.py.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from samunet.backbones.catalog import get_backbone_spec
from samunet.backbones.sam import CLASS_HEAD_PREFIXES, build_sam_parts, load_released_checkpoint
from samunet.modules.lora import QVLoRA
from samunet.networks.base import SAMNetworkConfig
from samunet.networks.samed import SAMedNetwork
from samunet.weights import WeightsError, load_state_dict

TINY_BACKBONES = ("vit_test", "tinyvit_test")


def config(backbone: str = "vit_test", *, num_classes: int = 4, channels: int = 1,
           img_size: int = 64) -> SAMNetworkConfig:
    return SAMNetworkConfig(input_channels=channels, num_classes=num_classes, backbone=backbone, img_size=img_size,
                            intensity_ranges=[[-2.0, 2.0]] * channels)


def tiny_network(backbone: str = "vit_test", **kwargs) -> SAMedNetwork:
    torch.manual_seed(0)
    return SAMedNetwork(config(backbone, **kwargs), lora_rank=4).eval()


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_lora_of_the_given_rank_fills_the_qkv_slot_of_every_attention_layer(backbone):
    network = tiny_network(backbone)
    projections = network.image_encoder.qkv_projections()
    assert len(network.lora) == len(projections) > 0
    assert all(p.owner.adapters.qkv is layer for p, layer in zip(projections, network.lora))
    assert all(isinstance(layer, QVLoRA) and layer.rank == 4 for layer in network.lora)
    assert all(layer.rank == 8 for layer in SAMedNetwork(config(backbone), lora_rank=8).lora)


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_only_lora_the_mask_decoder_and_the_no_mask_embedding_train(backbone):
    """SAMed trains LoRA, the whole mask decoder (but SAM's IoU head, which no loss supervises) and the
    default dense prompt; the encoder and the rest of the prompt encoder stay frozen."""
    network = tiny_network(backbone)
    names = [name for name, _ in network.named_parameters()]
    expected = {name for name in names
                if name.startswith("lora.")
                or (name.startswith("mask_decoder.") and not name.startswith("mask_decoder.iou_prediction_head."))
                or name == "prompt_encoder.no_mask_embed.weight"}
    assert {name for name, p in network.named_parameters() if p.requires_grad} == expected
    assert any(name.startswith("lora.") for name in expected)
    assert any(name.startswith("mask_decoder.output_hypernetworks_mlps.") for name in expected)


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_each_class_has_its_own_mask_token_whose_mask_is_that_class_logit_map(backbone):
    """K classes (background included) -> K mask tokens; class k's logits come from mask token k's
    hypernetwork MLP, and no other class's."""
    network = tiny_network(backbone, num_classes=5)
    assert network.mask_decoder.num_mask_tokens == 5 == len(network.mask_decoder.output_hypernetworks_mlps)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        before = network(x)
        for param in network.mask_decoder.output_hypernetworks_mlps[3].parameters():
            param.add_(0.5)
        after = network(x)
    changed = [k for k in range(5) if not torch.equal(before[:, k], after[:, k])]
    assert changed == [3]


@pytest.mark.parametrize("channels", [2, 4])
def test_a_channel_count_other_than_one_or_three_goes_through_a_trainable_mixer(channels):
    """The mixer (a 1x1 conv to 3 channels) trains and is what the encoder sees: a mixer that copies
    channel 0 into all three reproduces the same network run on channel 0 alone."""
    network = tiny_network(channels=channels)
    mixer = network.input_stage.channel_mixer
    assert isinstance(mixer, nn.Conv2d) and mixer.in_channels == channels and mixer.out_channels == 3
    assert all(p.requires_grad for p in mixer.parameters())
    single = tiny_network(channels=1)
    single.load_state_dict({k: v for k, v in network.state_dict().items()
                            if not k.startswith("input_stage.channel_mixer.")}, strict=True)
    with torch.no_grad():
        mixer.weight.zero_()
        mixer.weight[:, 0] = 1.0
        mixer.bias.zero_()
        x = torch.randn(2, channels, 64, 64)
        assert torch.allclose(network(x), single(x[:, :1]), atol=1e-5)


def test_litemedsam_checkpoint_loads_strictly_into_the_sam_parts(litemedsam_checkpoint):
    parts = build_sam_parts(get_backbone_spec("litemedsam"), 256)
    state = load_state_dict(litemedsam_checkpoint)
    assert len(state) == 435
    load_released_checkpoint(parts, state, str(litemedsam_checkpoint))
    assert torch.equal(parts.mask_decoder.mask_tokens.weight, state["mask_decoder.mask_tokens.weight"])


def test_class_heads_keep_their_own_initialisation_when_the_class_count_differs(litemedsam_checkpoint):
    """SAMed's load_from: with another token count than the release, mask tokens, hypernetwork MLPs and
    the IoU head are not loaded (copying released heads made the first steps on real MRI collapse to
    background everywhere); everything else is the release."""
    state = load_state_dict(litemedsam_checkpoint)
    torch.manual_seed(0)
    network = SAMedNetwork(config("litemedsam", num_classes=6, img_size=256))
    torch.manual_seed(0)
    fresh = SAMedNetwork(config("litemedsam", num_classes=6, img_size=256))
    network.load_pretrained(state)
    loaded, initial = network.state_dict(), fresh.state_dict()
    heads = [k for k in loaded if k.startswith(CLASS_HEAD_PREFIXES)]
    assert network.mask_decoder.mask_tokens.weight.shape[0] == 6 and len(heads) > 6 * 6
    for key in heads:
        assert torch.equal(loaded[key], initial[key]), key
    for key in ("mask_decoder.output_upscaling.0.weight", "mask_decoder.transformer.layers.0.mlp.lin1.weight",
                "prompt_encoder.no_mask_embed.weight"):
        assert torch.equal(loaded[key], state[key]), key
    # LoRA stays outside the released names and starts as the identity
    assert all(torch.equal(layer.q_up.weight, torch.zeros_like(layer.q_up.weight)) for layer in network.lora)


def test_a_checkpoint_of_another_backbone_is_refused_with_a_clear_error(litemedsam_checkpoint):
    network = tiny_network("vit_test")
    with pytest.raises(WeightsError, match="does not fit backbone 'vit_test'"):
        network.load_pretrained(load_state_dict(litemedsam_checkpoint), "lite_medsam.pth")


def test_samed_trainer_uses_adamw_with_weight_decay_0_1_and_dice_plus_ce(tmp_path):
    """SAMed's recipe: AdamW (weight decay 0.1, lr 1e-3 without warm-up) over exactly the trainable
    parameters, poly schedule, nnU-Net's Dice + CE with equal weights, one output (no deep supervision)."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
    from trainer_harness import build_trainer, nnunet_environment

    with nnunet_environment(tmp_path):
        trainer = build_trainer("SAMedTrainer", backbone="vit_test", num_classes=3, img_size=64)
    network = trainer.network_module
    assert isinstance(network, SAMedNetwork) and all(layer.rank == 4 for layer in network.lora)
    optimizer = trainer.optimizer
    assert type(optimizer) is torch.optim.AdamW
    assert [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [(1e-3, 0.1)]
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {
        id(p) for p in network.parameters() if p.requires_grad}
    assert isinstance(trainer.lr_scheduler, PolyLRScheduler)
    assert type(trainer.loss) is DC_and_CE_loss and (trainer.loss.weight_ce, trainer.loss.weight_dice) == (1, 1)
    assert not trainer.enable_deep_supervision
