"""Self-Prompt-SAM: depth-fused adapters, depth embeddings, the network on slice stacks, the trainer."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from samunet.modules.channel_adapters import MAdapter, MCAdapter, plain_multiclass_logits
from samunet.modules.depth_adapters import ADAPTER_MODES, DepthAdapter, DepthPositionalEmbedding
from samunet.modules.prompt_generators import StackedCNNPromptGenerator
from samunet.networks.self_prompt_sam import SelfPromptSAMNetwork
from samunet.registry import TRAINERS
from samunet.trainers.self_prompt_sam import (ABLATIONS, SelfPromptLoss, SelfPromptSAMTrainer, phase_two_start_epoch,
                                              stacked_configuration)

RANGES = [[-2.0, 2.0]]


def network(backbone: str = "vit_test", depth: int = 3, num_classes: int = 3, img_size: int = 64,
            **options) -> SelfPromptSAMNetwork:
    torch.manual_seed(0)
    return SelfPromptSAMNetwork(input_channels=1, num_classes=num_classes, backbone=backbone, img_size=img_size,
                                intensity_ranges=RANGES, depth=depth, **options)


def randomise(module: torch.nn.Module) -> None:
    """Give zero-initialised adapter weights random values (as after training)."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0, 0.2)


def test_dfused_adapter_implements_the_papers_equation():
    torch.manual_seed(0)
    adapter = DepthAdapter(dim=16, depth=3, mode="dfused")
    randomise(adapter)
    x = torch.randn(2 * 3, 5, 5, 16)  # two stacks of three slices, 5x5 tokens
    act = torch.nn.functional.gelu
    hidden = act(x @ adapter.down.weight.T + adapter.down.bias)  # s(X W_dn), (N, 5, 5, 4)
    stacks = hidden.reshape(2, 3, 5, 5, 4).movedim(1, -1)  # depth last
    mlp = adapter.depth_mlp
    depth_term = act(stacks @ mlp.up.weight.T + mlp.up.bias) @ mlp.down.weight.T + mlp.down.bias
    depth_term = depth_term.movedim(-1, 1).reshape(6, 5, 5, 4)  # s(s(X W_dn) W_Dup) W_Ddn
    expected = x + (hidden + depth_term) @ adapter.up.weight.T + adapter.up.bias
    out = adapter(x)
    assert out.shape == x.shape and adapter.down.out_features == 4  # W_dn: C -> C/4
    assert mlp.up.in_features == 3 and mlp.up.out_features == 12  # W_Dup: D -> 4D
    assert torch.allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("mode", ADAPTER_MODES)
def test_every_adapter_is_the_identity_with_its_up_projection_at_zero(mode):
    adapter = DepthAdapter(dim=8, depth=2, mode=mode)
    x = torch.randn(4, 7, 8)
    assert torch.equal(adapter(x), x) and not adapter.delta(x).any()


def test_the_depth_path_mixes_only_the_same_token_of_the_slices_of_one_stack():
    torch.manual_seed(0)
    adapter = DepthAdapter(dim=8, depth=3, mode="dfused")
    randomise(adapter)
    x = torch.randn(6, 4, 4, 8)
    changed = x.clone()
    changed[1, 2, 3] += 1.0  # stack 0, slice 1, token (2, 3)
    difference = (adapter(changed) - adapter(x)).abs().sum(-1)
    assert difference[:3, 2, 3].gt(0).all()  # that token in every slice of stack 0
    difference[:3, 2, 3] = 0
    assert not difference.any()  # nothing else, and nothing in stack 1


@pytest.mark.parametrize("backbone", ["vit_test", "tinyvit_test"])
def test_changing_one_slice_changes_the_other_slices_only_at_the_same_positions_in_the_first_depth_path(backbone):
    """The depth mixing acts on un-windowed tokens: a change inside one attention window of slice 0
    reaches the other slices only at that window's positions (MaskSAM's reshape after window
    partitioning would move it to other windows)."""
    size = 128 if backbone == "vit_test" else 64  # several attention windows in the first block
    net = network(backbone, depth=3, img_size=size)
    randomise(net.encoder_adapters)
    net.train()  # frozen BatchNorms stay in eval mode (batch statistics would mix everything)
    block = net.image_encoder.transformer_blocks()[0][0]
    assert not block.is_global if backbone == "vit_test" else True
    adapter = block.adapters.after_attention
    seen = []
    adapter.depth_mlp.register_forward_hook(lambda module, inputs, output: seen.append(output.detach()))
    x = torch.randn(1, 1, 3, size, size)
    changed = x.clone()
    changed[0, 0, 0, 2:6, 3:7] += 3.0  # a few pixels of slice 0, in the first window's area
    with torch.no_grad():
        net.image_encoder(net.encoder_input(x[0].transpose(0, 1)))
        net.image_encoder(net.encoder_input(changed[0].transpose(0, 1)))
    before, after = seen[0], seen[1]  # (3, H, W, C/4) for slices 0, 1, 2
    moved = (after - before).abs().sum(-1) > 1e-6
    source = moved[0]
    assert source.any() and not source.all()  # the change stays inside slice 0's window(s)
    for other in (1, 2):
        assert moved[other].any()
        assert not (moved[other] & ~source).any()  # only where slice 0 changed


@pytest.mark.parametrize("backbone", ["vit_test", "tinyvit_test"])
def test_the_network_starts_as_sam(backbone):
    """Adapters' up-projections, depth embeddings and the MAdapter's output start at zero."""
    net = network(backbone)
    plain = network(backbone, adapter=None, depth_pos_embed=False, madapter=False)
    plain.load_state_dict(net.state_dict(), strict=False)
    images = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        a = net.image_encoder(net.encoder_input(images)).embedding
        b = plain.image_encoder(plain.input_stage(images)).embedding
    assert torch.allclose(a, b, atol=1e-6)


def test_depth_positional_embedding_is_one_vector_per_slice_index():
    embedding = DepthPositionalEmbedding(depth=3, dim=4)
    with torch.no_grad():
        embedding.embedding.copy_(torch.arange(12.0).view(3, 4))
    x = torch.zeros(6, 2, 2, 4)
    out = embedding(x)
    for n in range(6):
        assert torch.equal(out[n, 1, 1], embedding.embedding[n % 3])
    assert torch.equal(embedding(torch.zeros(6, 4, 2, 2), channel_axis=1)[4, :, 0, 0], embedding.embedding[1])


@pytest.mark.parametrize("backbone", ["vit_test", "tinyvit_test"])
def test_outputs_cover_every_deep_supervision_scale_and_keep_the_stacks(backbone):
    net = network(backbone, depth=2, deep_supervision=True)
    outputs = net(torch.randn(2, 1, 2, 64, 64))
    scales = net.deep_supervision_scales()
    assert len(outputs) == len(scales) == 6
    for output, (depth_scale, scale, _) in zip(outputs, scales):
        assert depth_scale == 1.0 and output.shape == (2, 3, 2, round(64 * scale), round(64 * scale))
    with pytest.raises(ValueError, match="stacks"):
        net(torch.randn(2, 1, 3, 64, 64))


def test_one_decoder_pass_per_class_decodes_that_classs_prompts():
    net = network("tinyvit_test", depth=1, num_classes=4)
    calls = []
    net.mask_decoder.transformer.register_forward_hook(lambda module, inputs, output: calls.append(inputs[2].shape))
    net.eval()
    with torch.no_grad():
        net(torch.randn(2, 1, 1, 64, 64))
    assert calls[0][0] == 3 * 2  # (K-1) classes x 2 images in one batched decoder call


def test_only_adapters_embeddings_generator_and_mc_adapter_get_gradients_and_sam_stays_bitwise_frozen():
    net = network("tinyvit_test", depth=2, deep_supervision=True)
    frozen = {k: v.clone() for k, v in net.state_dict().items()
              if not k.startswith(("encoder_adapters", "decoder_adapters", "encoder_depth_embedding",
                                   "decoder_depth_embedding", "madapter", "mc_adapter", "prompt_generator"))}
    optimizer = torch.optim.SGD(net.trainable_parameters(), lr=0.01, momentum=0.99, nesterov=True, weight_decay=3e-5)
    net.train()
    target = torch.randint(0, 3, (2, 2, 64, 64))
    for _ in range(2):
        optimizer.zero_grad()
        outputs = net(torch.randn(2, 1, 2, 64, 64))
        loss = sum(F.cross_entropy(o, F.interpolate(target[:, None].float(), size=o.shape[2:]).long()[:, 0])
                   for o in outputs)
        loss.backward()
        with_gradient = {name.split(".")[0] for name, p in net.named_parameters() if p.grad is not None}
        assert with_gradient == {"encoder_adapters", "decoder_adapters", "encoder_depth_embedding",
                                 "decoder_depth_embedding", "madapter", "mc_adapter", "prompt_generator"}
        optimizer.step()
    changed = [k for k, v in net.state_dict().items() if k in frozen and not torch.equal(v, frozen[k])]
    assert not changed  # includes TinyViT's BatchNorm running statistics


def test_madapter_and_mc_adapter_are_convolutional_inverted_bottlenecks():
    madapter, mc = MAdapter(2), MCAdapter(4)
    assert madapter.layers[0].out_channels > 3 and madapter.layers[-1].out_channels == 3
    assert not madapter(torch.rand(1, 2, 8, 8)).any()  # starts at zero
    assert mc.layers[0].in_channels == 3 and mc.layers[0].out_channels > 4 and mc(torch.randn(1, 3, 8, 8)).shape[1] == 4
    assert not any(isinstance(m, torch.nn.InstanceNorm2d) for m in mc.modules())  # keeps the logits' level
    logits = torch.tensor([[-0.5, -1.5]]).view(1, 2, 1, 1)  # both classes below 0: background wins
    assert plain_multiclass_logits(logits).argmax(1).item() == 0
    class_logits = torch.randn(1, 3, 8, 8)
    assert torch.equal(mc(class_logits), plain_multiclass_logits(class_logits))  # starts as the plain mapping


def test_stacks_come_from_the_2d_configuration_with_patch_d_s_s_and_batch_per_stack():
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
    configuration = {"patch_size": [96, 96], "batch_size": 12, "spacing": [1.0, 1.0],
                     "architecture": {"network_class_name": "x", "arch_kwargs": {"depth": 5}, "_kw_requires_import": []}}
    stacked = stacked_configuration(ConfigurationManager(configuration))
    assert stacked.patch_size == [5, 96, 96] and stacked.batch_size == 2 and stacked.spacing == [1.0, 1.0]
    assert configuration["patch_size"] == [96, 96]  # the plans are not changed
    with pytest.raises(Exception, match="2d"):
        stacked_configuration(stacked)


def test_phase_one_trains_only_the_generator_for_the_first_20_percent_of_epochs():
    assert phase_two_start_epoch(1000) == 200 and phase_two_start_epoch(10) == 2 and phase_two_start_epoch(3) == 1
    calls = []

    def fake_loss(output, target):
        calls.append(output.item())
        return output

    loss = SelfPromptLoss(fake_loss, [0.75, 0.25])
    outputs = [torch.tensor(100.0), torch.tensor(1.0), torch.tensor(2.0)]
    assert loss(outputs, [None] * 3).item() == pytest.approx(0.75 + 0.5)
    loss.include_output = True
    assert loss(outputs, [None] * 3).item() == pytest.approx(100 + 0.75 + 0.5)


def test_ablations_s1_to_s8_and_prompt_combinations_are_named_trainers():
    assert TRAINERS.get("SelfPromptSAMTrainer").network_kwargs["adapter"] == "dfused"
    assert ABLATIONS["S1"]["prompt_generator"] == "stacked_cnn"
    s1 = network(depth=2, **{**ABLATIONS["S1"], "prompts": ["box", "point", "mask"]})
    assert isinstance(s1.prompt_generator, StackedCNNPromptGenerator) and s1.mc_adapter is None
    assert len(s1.encoder_adapters) == 0 and s1.madapter is None
    expected_adapters = {"S3": "vanilla", "S4": "depth_before", "S5": "depth_after", "S6": "dfused"}
    for row, mode in expected_adapters.items():
        assert TRAINERS.get(f"SelfPromptSAMTrainer_{row}").network_kwargs["adapter"] == mode
    s8 = TRAINERS.get("SelfPromptSAMTrainer_S8").network_kwargs
    assert s8["madapter"] and s8["depth_pos_embed"] and not s8["mc_adapter"]
    short = TRAINERS.get("SelfPromptSAMTrainer_adamw")
    assert short.optimizer_name == "adamw" and short.network_kwargs == SelfPromptSAMTrainer.network_kwargs
    assert SelfPromptSAMTrainer.optimizer_name == "sgd" and SelfPromptSAMTrainer.default_hyperparameters == {
        "initial_lr": 0.01, "weight_decay": 3e-5}  # the paper's recipe (Appendix D)
    box_only = TRAINERS.get("SelfPromptSAMTrainer_box").network_kwargs["prompts"]
    assert box_only == ["box"] and TRAINERS.get("SelfPromptSAMTrainer_point_mask").network_kwargs["prompts"] == [
        "point", "mask"]


def test_prompt_kinds_select_what_the_prompt_encoder_sees():
    net = network("tinyvit_test", depth=1, prompts=["box"])
    seen = []
    net.mask_decoder.transformer.register_forward_hook(lambda module, inputs, output: seen.append(inputs[2].shape))
    net.eval()
    with torch.no_grad():
        net(torch.randn(1, 1, 1, 64, 64))
    tokens = 1 + net.mask_decoder.num_mask_tokens
    assert seen[0][1] == tokens + 2  # two box corners, no point


def test_litemedsam_weights_load_into_the_self_prompt_network(litemedsam_checkpoint):
    from samunet.weights import load_state_dict
    net = SelfPromptSAMNetwork(input_channels=1, num_classes=3, backbone="litemedsam", img_size=64,
                               intensity_ranges=RANGES, depth=2)
    net.load_pretrained(load_state_dict(litemedsam_checkpoint, map_location="cpu"))
    net.eval()
    with torch.no_grad():
        assert net(torch.randn(1, 1, 2, 64, 64)).shape == (1, 3, 2, 64, 64)


def test_depth_applies_only_to_slice_stack_trainers():
    from samunet.cli.train import apply_depth_override
    from samunet.errors import ConfigurationError
    plans = {"configurations": {"2d": {"architecture": {"arch_kwargs": {"depth": 4}}}}}
    apply_depth_override(plans, "2d", 2, SelfPromptSAMTrainer)
    assert plans["configurations"]["2d"]["architecture"]["arch_kwargs"]["depth"] == 2
    with pytest.raises(ConfigurationError, match="slice-stack"):
        apply_depth_override(copy.deepcopy(plans), "2d", 2, TRAINERS.get("SAMedTrainer"))


@pytest.mark.slow
def test_trains_on_stacks_and_predicts_a_volume_end_to_end(planned_tiny_dataset, tmp_path):
    import SimpleITK as sitk

    from samunet.cli.predict import main as predict_main
    from samunet.cli.train import train
    trainer = train(991, "2d", 0, "SelfPromptSAMTrainer", device="cpu", depth=3,
                    hyperparameters={"num_epochs": 2, "num_iterations_per_epoch": 2,
                                     "num_val_iterations_per_epoch": 1, "batch_size": 2})
    folder = Path(trainer.output_folder)
    assert trainer.configuration_manager.patch_size == [3, 64, 64]
    assert trainer.inference_allowed_mirroring_axes == (1, 2)
    log = next(folder.glob("training_log_*.txt")).read_text()
    assert "phase 1 (until epoch 1)" in log and "phase 2" in log
    checkpoint = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    assert checkpoint["samunet"]["stack_depth"] == 3
    assert (folder / "validation" / "summary.json").is_file()
    raw = planned_tiny_dataset["nnUNet_raw"] / "Dataset991_PhantomTiny"
    assert predict_main(["-i", str(raw / "imagesTs"), "-o", str(tmp_path / "pred"), "-d", "991",
                         "-tr", "SelfPromptSAMTrainer", "-f", "0", "-device", "cpu"]) == 0
    for image in sorted((raw / "imagesTs").glob("*_0000.nii.gz")):
        predicted = sitk.ReadImage(str(tmp_path / "pred" / image.name.replace("_0000", "")))
        assert predicted.GetSize() == sitk.ReadImage(str(image)).GetSize()  # 8 slices, D = 3: every slice


def test_sliding_over_depth_gives_every_slice_both_sides_and_returns_the_volumes_depth():
    """Edge slices are repeated D // 2 times, so the outermost slices are the centre of a (D, S, S)
    window (context on both sides); the logits come back aligned with the input's slices."""
    from types import SimpleNamespace

    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    from samunet.inference.slice_stack_predictor import SliceStackPredictor, depth_padding

    class EchoNetwork(torch.nn.Module):
        """(B, 1, D, S, S) -> (B, 2, D, S, S): the input as class-1 logit; records window centres."""

        def __init__(self):
            super().__init__()
            self.centres = []

        def forward(self, x):
            self.centres.append(x[0, 0, x.shape[2] // 2, 0, 0].item())
            return torch.cat([torch.zeros_like(x), x], dim=1)

    predictor = SliceStackPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                    perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.network = EchoNetwork()
    predictor.configuration_manager = ConfigurationManager({"patch_size": [3, 8, 8], "architecture": {
        "network_class_name": "EchoNetwork", "arch_kwargs": {}, "_kw_requires_import": []}})
    predictor.label_manager = SimpleNamespace(num_segmentation_heads=2)
    predictor.allowed_mirroring_axes = None
    volume = torch.arange(7.0).view(1, 7, 1, 1).expand(1, 7, 8, 8).contiguous()  # slice z holds the value z
    logits = predictor.predict_sliding_window_return_logits(volume)
    assert depth_padding(3) == 1 and logits.shape == (2, 7, 8, 8)
    assert torch.allclose(torch.as_tensor(logits[1]).float(), volume[0], atol=1e-2)  # nnU-Net returns fp16
    assert {0.0, 6.0} <= set(predictor.network.centres)  # the outermost slices sit mid-window
