"""Build a real, initialised samunet trainer without any data on disk, and batches for it.

The trainer is constructed as nnunetv2 constructs it (from a synthetic plans dict of the shape
``SAMPlanner`` writes) and initialised by its own ``initialize()``: network from the trainer's
static builder, optimiser, lr scheduler, loss, and whatever the trainer adds there (AutoMedSAM's
joint loss, H-SAM's class frequencies). The only data ``initialize()`` may read are a few
synthetic cases served from memory in place of nnU-Net's preprocessed dataset, so nothing but
nnU-Net's split file and log files is written. Batches look like what nnU-Net's data loader gives:
``data`` (B, 1, *patch) and ``target`` label maps as floats, one per deep-supervision scale
(nearest-exact downsampling) when the trainer supervises several outputs.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Iterator
from unittest import mock

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from samunet.backbones.catalog import get_backbone_spec
from samunet.registry import TRAINERS

NNUNET_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
DATASET_NAME = "Dataset999_TrainerHarness"
PLANS_NAME = "samunetPlans"
INTENSITY_RANGE = [-2.0, 2.0]
NUM_SYNTHETIC_CASES = 5
SYNTHETIC_CASE_SLICES = 4


@contextlib.contextmanager
def nnunet_environment(root: Path) -> Iterator[dict[str, Path]]:
    """nnUNet_raw / _preprocessed / _results under ``root`` (created) while the context lasts."""
    folders = {name: Path(root) / name for name in NNUNET_VARIABLES}
    previous = {name: os.environ.get(name) for name in NNUNET_VARIABLES}
    for name, folder in folders.items():
        folder.mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(folder)
    try:
        yield folders
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def trainer_workdir(root: Path) -> Iterator[dict[str, Path]]:
    """:func:`nnunet_environment` under ``root`` with one intra-op thread while it lasts: the tensors of the
    tiny backbones are small, and on a shared 2-core machine a second OpenMP thread makes every op wait
    for a busy core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with nnunet_environment(root) as folders:
            yield folders
    finally:
        torch.set_num_threads(threads)


def synthetic_plans(*, backbone: str, img_size: int, depth: int = 1, batch_size: int = 2) -> dict:
    """A ``samunetPlans`` dict with one ``2d`` configuration for ``backbone`` at ``img_size`` px, with
    every field nnunetv2's PlansManager / ConfigurationManager read, as ``SAMPlanner`` writes it."""
    resampling_kwargs = {"order_z": 0, "force_separate_z": None}
    configuration = {
        "data_identifier": f"{PLANS_NAME}_2d",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": batch_size,
        "patch_size": [img_size, img_size],
        "median_image_size_in_voxels": [float(img_size), float(img_size)],
        "spacing": [1.0, 1.0],
        "normalization_schemes": ["CTNormalization"],
        "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, **resampling_kwargs},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, **resampling_kwargs},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, **resampling_kwargs},
        "architecture": {
            "network_class_name": "samunet.networks.samed.SAMedNetwork",
            "arch_kwargs": {
                "backbone": backbone,
                "img_size": int(img_size),
                "depth": int(depth),
                "intensity_ranges": [list(INTENSITY_RANGE)],
                "pixel_normalization": get_backbone_spec(backbone).pixel_normalization,
            },
            "_kw_requires_import": [],
        },
        "batch_dice": True,
    }
    return {
        "dataset_name": DATASET_NAME,
        "plans_name": PLANS_NAME,
        "original_median_spacing_after_transp": [3.0, 1.0, 1.0],
        "original_median_shape_after_transp": [16, img_size, img_size],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {"2d": configuration},
        "experiment_planner_used": "SAMPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {"max": 2.0, "mean": 0.0, "median": 0.0, "min": -2.0, "percentile_00_5": -2.0,
                  "percentile_99_5": 2.0, "std": 1.0}},
        "continue_training": False,  # nnUNetTrainer.__init__ pops it
    }


def synthetic_dataset_json(num_classes: int) -> dict:
    """dataset.json of a one-channel CT data set with labels background, c1 .. c{K-1}."""
    labels = {"background": 0, **{f"c{k}": k for k in range(1, num_classes)}}
    return {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": NUM_SYNTHETIC_CASES, "file_ending": ".nii.gz"}


def in_memory_dataset_class(*, num_classes: int, img_size: int, seed: int = 0) -> type:
    """A stand-in for nnU-Net's preprocessed dataset classes (same constructor, ``identifiers``,
    ``get_identifiers`` and ``load_case``) serving ``NUM_SYNTHETIC_CASES`` synthetic cases of
    ``SYNTHETIC_CASE_SLICES`` x S x S from memory, every class present."""
    generator = torch.Generator().manual_seed(seed)
    cases = {}
    for index in range(NUM_SYNTHETIC_CASES):
        labels = synthetic_labels(1, (SYNTHETIC_CASE_SLICES, img_size, img_size), num_classes, generator)[0]
        image = labels / max(num_classes - 1, 1) + 0.3 * torch.randn(labels.shape, generator=generator)
        cases[f"case_{index}"] = (image.numpy().astype(np.float32), labels.numpy().astype(np.int16))

    class InMemoryDataset:
        def __init__(self, folder=None, identifiers=None, folder_with_segs_from_previous_stage=None):
            self.identifiers = sorted(cases) if identifiers is None else list(identifiers)

        @staticmethod
        def get_identifiers(folder=None) -> list[str]:
            return sorted(cases)

        def load_case(self, identifier: str):
            data, seg = cases[identifier]
            properties = {"spacing": [3.0, 1.0, 1.0], "shape_before_cropping": data.shape[1:],
                          "bbox_used_for_cropping": [[0, n] for n in data.shape[1:]],
                          "class_locations": {}}
            return data, seg, None, properties

    return InMemoryDataset


def build_trainer(name: str, *, backbone: str, num_classes: int, img_size: int, depth: int = 1,
                  seed: int = 0, batch_size: int = 2, device: str = "cpu", hyperparameters: dict | None = None):
    """Trainer ``name`` from ``TRAINERS`` for a 1-channel, ``num_classes``-class data set at ``img_size``
    px (``depth`` slices per stack for slice-stack trainers, ``batch_size`` in the plans), constructed on
    ``device`` (benchmarks/gpu_check.py builds them on CUDA), given ``hyperparameters`` (as
    ``samunet_train`` overrides them) and initialised by
    its own ``initialize()`` with torch seeded by ``seed``.

    nnunetv2's ``initialize()`` does, without data: the network from the trainer's own static
    ``build_network_architecture`` (with the trainer's ``configuration_manager``, which slice-stack
    trainers replace by a (D, S, S) one), ``configure_optimizers()``, ``_build_loss()``; its data set
    class is the in-memory one (:func:`in_memory_dataset_class`). The tiny backbones have no
    pretrained weights, so nothing is loaded. The nnU-Net folder variables must be set (see
    :func:`nnunet_environment`).
    """
    cls = TRAINERS.get(name)
    trainer = cls(synthetic_plans(backbone=backbone, img_size=img_size, depth=depth, batch_size=batch_size), "2d",
                  0, synthetic_dataset_json(num_classes), torch.device(device))
    if hyperparameters:
        trainer.set_hyperparameters(hyperparameters)
    os.makedirs(trainer.preprocessed_dataset_folder_base, exist_ok=True)  # nnU-Net writes its split file there
    dataset_class = in_memory_dataset_class(num_classes=num_classes, img_size=img_size, seed=seed)
    torch.manual_seed(seed)
    with contextlib.ExitStack() as patches:
        # nnU-Net picks the data set class with infer_dataset_class(folder); patch it wherever the
        # trainer's classes look it up (nnunetv2's module, samunet's base, ...)
        for module in {sys.modules[klass.__module__] for klass in cls.__mro__}:
            if hasattr(module, "infer_dataset_class"):
                patches.enter_context(mock.patch.object(module, "infer_dataset_class", return_value=dataset_class))
        trainer.initialize()
    return trainer


def build_fresh_network(trainer, enable_deep_supervision: bool = False) -> torch.nn.Module:
    """A new network from ``trainer``'s static builder and its plans (what nnU-Net's predictor builds
    before loading a checkpoint)."""
    return type(trainer).build_network_architecture(
        trainer.plans_manager, trainer.configuration_manager, 1, trainer.label_manager.num_segmentation_heads,
        enable_deep_supervision)


def synthetic_labels(batch: int, patch: tuple[int, ...], num_classes: int,
                     generator: torch.Generator) -> torch.Tensor:
    """(B, 1, *patch) float label maps: a random rectangle per foreground class on every 2D slice, and
    every class present in every slice (a small block is painted where a rectangle was covered)."""
    *stack, height, width = patch
    slices = batch * (stack[0] if stack else 1)
    labels = torch.zeros(slices, height, width)
    for image in labels:
        for k in range(1, num_classes):
            h = int(torch.randint(max(height // 8, 2), max(height // 3, 3), (1,), generator=generator))
            w = int(torch.randint(max(width // 8, 2), max(width // 3, 3), (1,), generator=generator))
            y = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            x = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            image[y:y + h, x:x + w] = k
        for k in range(num_classes):
            if not (image == k).any():
                row = 2 * k % (height - 1)
                image[row:row + 2, :2] = k
        if len(torch.unique(image)) != num_classes:
            raise ValueError(f"synthetic labels: a {height} x {width} slice cannot hold {num_classes} classes")
    return labels.reshape(batch, 1, *patch)


def deep_supervision_targets(target: torch.Tensor, scales) -> list[torch.Tensor]:
    """nnU-Net's ``DownsampleSegForDSTransform`` on a batch: one label map per scale, nearest-exact."""
    targets = []
    for scale in scales:
        scale = list(scale) if isinstance(scale, (list, tuple)) else [scale] * (target.ndim - 2)
        if all(s == 1 for s in scale):
            targets.append(target)
        else:
            size = [round(n * s) for n, s in zip(target.shape[2:], scale)]
            targets.append(F.interpolate(target, size=size, mode="nearest-exact"))
    return targets


def make_batch(trainer, *, batch_size: int = 2, seed: int = 0) -> dict:
    """``{"data": (B, 1, *patch), "target": ...}`` for ``trainer``'s patch size ((S, S), or (D, S, S)
    for slice-stack trainers): labels 0..K-1 with every class present in every slice, an image that
    shows them (class-dependent mean plus noise), and the target as nnU-Net's loader gives it: a list
    at ``trainer._get_deep_supervision_scales()`` when that is not None, else one tensor."""
    generator = torch.Generator().manual_seed(seed)
    patch = tuple(int(n) for n in trainer.configuration_manager.patch_size)
    num_classes = trainer.label_manager.num_segmentation_heads
    labels = synthetic_labels(batch_size, patch, num_classes, generator)
    data = labels / max(num_classes - 1, 1) * 2.0 - 1.0 + 0.3 * torch.randn(labels.shape, generator=generator)
    scales = trainer._get_deep_supervision_scales()
    target = deep_supervision_targets(labels, scales) if scales is not None else labels
    return {"data": data, "target": target}


# ---- a tiny model folder for prediction tests ----
PREDICTION_CASES = [f"case_{i:04d}" for i in range(4)]
PREDICTION_CASE_SHAPE = (3, 40, 40)  # (z, y, x): one 64-px window per slice


def write_prediction_images(folder: Path) -> Path:
    """PREDICTION_CASES as 1-channel NIfTI images of PREDICTION_CASE_SHAPE (random values) in ``folder``."""
    folder.mkdir(parents=True)
    generator = np.random.default_rng(0)
    for case in PREDICTION_CASES:
        image = sitk.GetImageFromArray(generator.normal(size=PREDICTION_CASE_SHAPE).astype(np.float32))
        image.SetSpacing((1.0, 1.0, 3.0))
        sitk.WriteImage(image, str(folder / f"{case}_0000.nii.gz"))
    return folder


def make_model_folder(results: Path, trainer_name: str, depth: int = 1) -> Path:
    """$nnUNet_results/DATASET/TRAINER__samunetPlans__2d with plans.json, dataset.json and fold_0's
    checkpoint_final.pth holding a freshly built network."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from samunet.registry import TRAINERS
    plans, dataset_json = synthetic_plans(backbone="vit_test", img_size=64, depth=depth), synthetic_dataset_json(3)
    folder = results / DATASET_NAME / f"{trainer_name}__samunetPlans__2d"
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset_json))
    trainer_class = TRAINERS.get(trainer_name)
    plans_manager = PlansManager(plans)
    configuration = trainer_class.inference_configuration(plans_manager.get_configuration("2d"))
    torch.manual_seed(0)
    network = trainer_class.build_network_architecture(plans_manager, configuration, 1, 3, False)
    torch.save({"network_weights": network.state_dict(), "trainer_name": trainer_name,
                "inference_allowed_mirroring_axes": [0, 1],
                "samunet": {"backbone": "vit_test", "img_size": 64,
                            "stack_depth": getattr(network, "stack_depth", None)}},
               folder / "fold_0" / "checkpoint_final.pth")
    return folder


def export_onto_a_full_disk(*arguments):
    """:func:`samunet.inference.predict_cases.export_case_atomically` on a disk that fills up while nnunetv2
    writes the label map: SimpleITK then leaves half the file without an error. Top-level, so that a spawned
    export worker can run it."""
    from samunet.inference import predict_cases
    real_export = predict_cases.export_prediction_from_logits

    def export_half(logits, properties, configuration_manager, plans_manager, dataset_json, output, *rest):
        real_export(logits, properties, configuration_manager, plans_manager, dataset_json, output, *rest)
        path = Path(output + dataset_json["file_ending"])
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    with mock.patch.object(predict_cases, "export_prediction_from_logits", export_half), \
            mock.patch.object(predict_cases.shutil, "disk_usage", return_value=mock.Mock(free=0)):
        return predict_cases.export_case_atomically(*arguments)
