"""samunet's SAM planner: what it writes into samunetPlans.json."""
from __future__ import annotations

import json
import pydoc

import pytest

from samunet.errors import ConfigurationError, UnknownNameError
from samunet.planners.sam_planner import choose_depth, choose_image_size, estimate_batch_size
from samunet.trainers.samed import SAMedTrainer


def load_plans(folders) -> dict:
    return json.loads((folders["nnUNet_preprocessed"] / "Dataset991_PhantomTiny" / "samunetPlans.json").read_text())


def test_plans_have_one_2d_configuration_sized_for_the_backbone(planned_tiny_dataset):
    plans = load_plans(planned_tiny_dataset)
    assert list(plans["configurations"]) == ["2d"]
    configuration = plans["configurations"]["2d"]
    assert configuration["patch_size"] == [64, 64]
    arch = configuration["architecture"]
    assert arch["arch_kwargs"]["backbone"] == "vit_test" and arch["arch_kwargs"]["img_size"] == 64
    assert arch["arch_kwargs"]["depth"] >= 1
    low, high = arch["arch_kwargs"]["intensity_ranges"][0]
    assert low < 0 < high  # the CT foreground window in z-scored units


def test_planned_network_class_is_a_dotted_path_pydoc_resolves(planned_tiny_dataset):
    plans = load_plans(planned_tiny_dataset)
    name = plans["configurations"]["2d"]["architecture"]["network_class_name"]
    assert name.startswith("samunet.networks.")
    network_class = pydoc.locate(name)
    assert network_class is not None
    assert network_class.__name__ == SAMedTrainer.network_class.rsplit(".", 1)[1]


def test_preprocessed_2d_data_exist_for_every_training_case(planned_tiny_dataset):
    folder = planned_tiny_dataset["nnUNet_preprocessed"] / "Dataset991_PhantomTiny" / "samunetPlans_2d"
    assert len([p for p in folder.iterdir() if p.name.endswith(".pkl")]) == 5


def test_image_size_follows_the_backbone_and_the_data():
    assert choose_image_size("litemedsam", (512.0, 512.0)) == 256
    assert choose_image_size("vit_b", (200.0, 180.0)) == 256
    assert choose_image_size("vit_b", (400.0, 512.0)) == 512
    assert choose_image_size("vit_h", (900.0, 900.0)) == 512  # 1024 only when asked for


def test_depth_covers_about_60_mm_and_at_most_half_the_slices():
    assert choose_depth(10.0, 9) == 4      # ACDC-like: 10 mm slices, ~9 slices
    assert choose_depth(3.0, 150) == 20    # Synapse-like
    assert choose_depth(5.0, 100) == 12    # AMOS-like
    assert choose_depth(1.0, 2) == 1


def test_depth_is_capped_by_the_images_one_step_fits():
    """A slice-stack trainer's smallest batch is one stack: D never exceeds the images the memory target
    holds (a stack of 32, about 27 GB, ran out of a 23 GB machine's memory)."""
    from samunet.planners.sam_planner import images_that_fit
    assert images_that_fit("litemedsam", 256, 8.0) == 9
    assert choose_depth(1.0, 154, images_that_fit("litemedsam", 256, 8.0)) == 9
    assert choose_depth(3.0, 150, images_that_fit("vit_b", 256, 8.0)) == 20  # Synapse-like: fits, unchanged
    assert choose_depth(1.0, 154, images_that_fit("vit_h", 1024, 8.0)) == 1  # not even one image: D = 1


def test_self_prompt_sams_stack_is_sized_with_its_own_memory_per_slice_and_class():
    """Self-Prompt-SAM on LiteMedSAM needs 2.1-2.6 GB per slice at 256 px (measured; SAMed: 0.84 GB per
    image), more with more classes (its decoder runs once per class). Sized with SAMed's memory, 1 mm MRI
    got D = 9 and a step of 23.5 GB on a 23 GB machine; with its own, 3 slices fit 8 GB with 5 heads and
    2 with AMOS's 16. The stacks per batch never hold more slices than fit, nor more images than the 2D
    batch."""
    from samunet.planners.sam_planner import estimate_stack_batch_size, stack_slices_that_fit
    assert stack_slices_that_fit("litemedsam", 256, 5, 8.0) == 3
    assert stack_slices_that_fit("litemedsam", 256, 16, 8.0) == 2
    assert stack_slices_that_fit("litemedsam", 256, 5, 24.0) == 11
    assert stack_slices_that_fit("litemedsam", 512, 5, 8.0) == 1  # not even one slice: still 1
    assert choose_depth(1.0, 154, stack_slices_that_fit("litemedsam", 256, 5, 8.0)) == 3
    assert estimate_stack_batch_size(3, 3, 6) == 1
    assert estimate_stack_batch_size(4, 20, 12) == 3   # memory would hold 5 stacks; the 2D batch holds 12 images
    assert estimate_stack_batch_size(3, 20, 48) == 6   # memory holds 6 stacks of 3
    assert estimate_stack_batch_size(9, 3, 2) == 1     # a --depth beyond the memory: still one stack


def test_the_planner_sizes_depth_and_stacks_with_self_prompt_sams_memory(nnunet_folders):
    """The planned D is what Self-Prompt-SAM fits, not SAMed's images per step: a 4-head phantom with 40
    slices of about 3 mm wants 20 slices; at 8 GB LiteMedSAM's SAMed step fits 9 images, Self-Prompt-SAM's
    3 slices; at 24 GB, 11 (SAMed: 28)."""
    from samunet.cli.plan_and_preprocess import plan_and_preprocess
    from samunet.planners.sam_planner import images_that_fit, stack_slices_that_fit
    from samunet.preprocessing.phantom import write_phantom_dataset
    write_phantom_dataset(nnunet_folders["nnUNet_raw"], dataset_id=993, dataset_name="Deep", num_train=2,
                          num_test=0, shape=(40, 32, 32))
    raw = json.loads((nnunet_folders["nnUNet_raw"] / "Dataset993_Deep" / "dataset.json").read_text())
    heads = len(raw["labels"])
    for memory_gb in (8.0, 24.0):
        plans_file = plan_and_preprocess(993, backbone="litemedsam", image_size=256, gpu_memory_gb=memory_gb,
                                         num_processes=1, preprocess=False, progress_bar=False)
        configuration = json.loads(plans_file.read_text())["configurations"]["2d"]
        depth = configuration["architecture"]["arch_kwargs"]["depth"]
        fits = stack_slices_that_fit("litemedsam", 256, heads, memory_gb)
        assert depth == fits < images_that_fit("litemedsam", 256, memory_gb)
        assert configuration["slice_stack_batch_size"] == max(1, min(fits // depth,
                                                                     round(configuration["batch_size"] / depth)))


def test_batch_size_shrinks_with_image_size_and_memory():
    small = estimate_batch_size("vit_b", 256, 1, 8.0, 1e9)
    large = estimate_batch_size("vit_b", 512, 1, 8.0, 1e9)
    assert small > large >= 2
    assert estimate_batch_size("vit_b", 256, 1, 40.0, 1e9) > small
    assert estimate_batch_size("vit_b", 256, 1, 40.0, 3) == 3  # never more than ~5% of the data set


def test_planning_survives_nnunet_n_proc_da_zero(nnunet_folders, monkeypatch):
    """nnunetv2 2.8.1's own planner crashes with nnUNet_n_proc_DA=0; samunet's must not."""
    from samunet.cli.plan_and_preprocess import plan_and_preprocess
    from samunet.preprocessing.phantom import write_phantom_dataset
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    write_phantom_dataset(nnunet_folders["nnUNet_raw"], dataset_id=992, dataset_name="Mini", num_train=2,
                          num_test=1, shape=(8, 32, 32))
    plans_file = plan_and_preprocess(992, backbone="tinyvit_test", image_size=32, depth=3, num_processes=1)
    arch = json.loads(plans_file.read_text())["configurations"]["2d"]["architecture"]["arch_kwargs"]
    assert arch["depth"] == 3 and arch["img_size"] == 32 and arch["backbone"] == "tinyvit_test"


def test_unknown_backbone_and_bad_image_size_are_refused_before_anything_is_written(nnunet_folders):
    from samunet.cli.plan_and_preprocess import plan_and_preprocess
    with pytest.raises(UnknownNameError, match="unknown backbone 'vit_x'.*litemedsam"):
        plan_and_preprocess(992, backbone="vit_x")
    with pytest.raises(ConfigurationError, match="256, 512, 1024"):
        plan_and_preprocess(992, backbone="vit_b", image_size=300)
    assert list(nnunet_folders["nnUNet_preprocessed"].iterdir()) == []
