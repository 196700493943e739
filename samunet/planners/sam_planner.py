"""samunet's experiment planner: one ``2d`` configuration sized for a SAM backbone.

It reuses nnunetv2's fingerprint, target spacing, resampling and normalisation decisions and
replaces the U-Net topology search with what a SAM backbone needs:

- patch size = the backbone's input size S (LiteMedSAM: 256; ViT: 256 or 512, the smallest that
  holds the median slice; 224 and 1024 only on request, 1024 costing 15x more than 256);
- in-plane target spacing coarsened so that the median slice fits S when it is larger (SAM
  methods resize whole slices to the encoder input; nnU-Net's sliding window covers the rest);
- depth D of the slice-stack method (Self-Prompt-SAM) from slice spacing and count (about 60 mm of
  context, at most half the median slice count, and at most the slices one of its training steps fits
  in the memory target; see docs/architecture.md), and its batch of stacks (``slice_stack_batch_size``);
- batch size from the measured training memory of the backbone (benchmarks/measure_training_memory.py);
- ``architecture``: the baseline network's dotted path and ``arch_kwargs`` with the backbone,
  S, D, the per-channel intensity window and the pixel normalisation of the default weights.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape
from nnunetv2.utilities.json_export import recursive_fix_for_json_export
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from samunet.atomic_files import write_json_atomically
from samunet.backbones.catalog import check_img_size, get_backbone_spec
from samunet.errors import ConfigurationError
from samunet.preprocessing.completeness import PARTIAL_PREFIX

logger = logging.getLogger(__name__)

PLANS_NAME = "samunetPlans"
BASELINE_NETWORK = "samunet.networks.samed.SAMedNetwork"
DEPTH_CONTEXT_MM = 60.0
MAX_DEPTH = 32
# sizes the planner picks by itself for a ViT (224 and 1024 only when asked for with --image-size)
AUTO_VIT_SIZES = (256, 512)
MIN_BATCH_SIZE = 2
MAX_BATCH_SIZE = 48
# z-scored MR / other modalities: the [-3, 3] sigma window covers ~99.7% of the intensities
ZSCORE_WINDOW = (-3.0, 3.0)

# Training memory of one SAMed step (forward + backward + AdamW, fp32) at 256x256, measured with
# benchmarks/measure_training_memory.py on 2026-11-22 (CPU peak RSS; a CUDA run with autocast
# needs less, so these are upper bounds): growth per image, and the fixed part (weights,
# optimiser state, runtime). Per-image memory is scaled with the input area.
TRAINING_MB_PER_IMAGE_AT_256 = {
    "litemedsam": 844.0,
    "vit_b": 356.0,
    "vit_l": 1154.0,
    "vit_h": 1497.0,
    "vit_test": 11.0,
    "tinyvit_test": 104.0,
}
BASE_MB = {"litemedsam": 528.0, "vit_b": 704.0, "vit_l": 1453.0, "vit_h": 3132.0,
           "vit_test": 318.0, "tinyvit_test": 343.0}

# Training memory of one Self-Prompt-SAM step in phase 2 (everything it adds trains; one stack of D
# slices), measured like SAMed's with ``benchmarks/measure_training_memory.py --network self_prompt_sam
# --classes 5 9`` on 2026-11-30 (2-core CPU, fp32, 256 px): per slice, a part that does not depend on the
# classes plus one per segmentation head (its mask decoder runs once per class), and the fixed part.
# LiteMedSAM needs 2.6x SAMed's memory per image with 5 heads: its high-resolution stages feed the
# MSPGenerator and carry trainable depth adapters.
SELF_PROMPT_SAM_MB_PER_SLICE_AT_256 = {
    "litemedsam": (1604.0, 110.0),
    "vit_b": (469.0, 14.0),
    "vit_l": (1038.0, 11.0),
    "vit_h": (1473.0, 22.0),
    "vit_test": (176.0, 2.0),
    "tinyvit_test": (291.0, 24.0),
}
SELF_PROMPT_SAM_BASE_MB = {"litemedsam": 615.0, "vit_b": 698.0, "vit_l": 1659.0, "vit_h": 3127.0,
                           "vit_test": 333.0, "tinyvit_test": 375.0}


def choose_image_size(backbone: str, median_inplane_shape: tuple[float, float]) -> int:
    """S from the backbone and the median in-plane shape (after resampling to target spacing)."""
    spec = get_backbone_spec(backbone)
    if not spec.allowed_img_sizes:
        return spec.default_img_size
    largest = max(median_inplane_shape)
    candidates = [s for s in spec.allowed_img_sizes if s in AUTO_VIT_SIZES]
    return next((s for s in candidates if s >= largest), candidates[-1])


def choose_depth(slice_spacing_mm: float, median_num_slices: float, max_by_memory: int = MAX_DEPTH) -> int:
    """D ~ 60 mm of context along the slice axis, at least 1, at most half the median slice count, and at
    most ``max_by_memory`` (the slices one training step can hold: :func:`stack_slices_that_fit`), because
    a slice-stack trainer's smallest batch is one whole stack."""
    wanted = int(round(DEPTH_CONTEXT_MM / max(slice_spacing_mm, 1e-3)))
    return int(max(1, min(wanted, MAX_DEPTH, int(median_num_slices // 2), max_by_memory)))


def images_that_fit(backbone: str, img_size: int, vram_gb: float) -> int:
    """Images of ``img_size`` px one training step of ``backbone`` can hold within ``vram_gb`` (from the
    measured per-image and fixed training memory), at least 1."""
    per_image = TRAINING_MB_PER_IMAGE_AT_256[backbone] * (img_size / 256.0) ** 2
    return _items_that_fit(per_image, BASE_MB[backbone], vram_gb)


def _items_that_fit(per_item_mb: float, fixed_mb: float, vram_gb: float) -> int:
    """Items of ``per_item_mb`` that fit ``vram_gb`` beside ``fixed_mb``, at least 1."""
    return max(1, int((vram_gb * 1024.0 - fixed_mb) // per_item_mb))


def stack_slices_that_fit(backbone: str, img_size: int, num_heads: int, vram_gb: float) -> int:
    """Slices of ``img_size`` px one Self-Prompt-SAM training step of ``backbone`` with ``num_heads``
    segmentation heads (background included) holds within ``vram_gb``, at least 1; from the measured
    :data:`SELF_PROMPT_SAM_MB_PER_SLICE_AT_256` (per-slice memory scaled with the input area)."""
    per_slice, per_head = SELF_PROMPT_SAM_MB_PER_SLICE_AT_256[backbone]
    per_slice_mb = (per_slice + per_head * num_heads) * (img_size / 256.0) ** 2
    return _items_that_fit(per_slice_mb, SELF_PROMPT_SAM_BASE_MB[backbone], vram_gb)


def estimate_stack_batch_size(depth: int, slices_that_fit: int, batch_size: int) -> int:
    """Stacks of ``depth`` slices per step: as many as ``slices_that_fit`` holds, never more images than
    the 2D ``batch_size`` (which also caps the share of the data set one step sees), at least 1."""
    return max(1, min(slices_that_fit // depth, round(batch_size / depth)))


def estimate_batch_size(backbone: str, img_size: int, depth: int, vram_gb: float,
                        max_by_dataset: float) -> int:
    """Images per step that fit ``vram_gb``; stacked-slice methods count D images per sample."""
    fits = images_that_fit(backbone, img_size, vram_gb) // max(depth, 1)
    return int(max(MIN_BATCH_SIZE, min(fits, MAX_BATCH_SIZE, int(max_by_dataset))))


class SAMPlanner(ExperimentPlanner):
    """Plans ``samunetPlans`` with a single ``2d`` configuration for a SAM backbone.

    ``image_size`` / ``depth`` override the planned values when given.
    """

    def __init__(self, dataset_name_or_id, gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = PLANS_NAME,
                 overwrite_target_spacing=None, suppress_transpose: bool = False, *,
                 backbone: str = "litemedsam", image_size: int | None = None, depth: int | None = None) -> None:
        spec = get_backbone_spec(backbone)  # unknown backbone: fail before touching anything
        if image_size is not None:
            check_img_size(spec, image_size)
        if depth is not None and depth < 1:
            raise ConfigurationError(f"--depth must be >= 1, got {depth}")
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)
        self.backbone = backbone
        self.image_size = image_size
        self.depth = depth

    def intensity_ranges(self, normalization_schemes: list[str]) -> list[list[float]]:
        """Per channel (low, high) in normalised units, mapped to [0, 1] at the network input."""
        properties = self.dataset_fingerprint["foreground_intensity_properties_per_channel"]
        ranges = []
        for channel, scheme in enumerate(normalization_schemes):
            stats = properties.get(str(channel))
            if scheme == "CTNormalization" and stats:
                std = max(float(stats["std"]), 1e-8)
                low = (float(stats["percentile_00_5"]) - float(stats["mean"])) / std
                high = (float(stats["percentile_99_5"]) - float(stats["mean"])) / std
                ranges.append([low, high] if high > low else list(ZSCORE_WINDOW))
            else:
                ranges.append(list(ZSCORE_WINDOW))
        return ranges

    def plan_experiment(self) -> dict:
        transpose_forward, transpose_backward = self.determine_transpose()
        fullres_spacing = self.determine_fullres_target_spacing()
        spacing = np.asarray(fullres_spacing)[transpose_forward]
        new_shapes = [compute_new_shape(shape, old_spacing, fullres_spacing) for old_spacing, shape in
                      zip(self.dataset_fingerprint["spacings"], self.dataset_fingerprint["shapes_after_crop"])]
        median_shape = np.median(new_shapes, 0)[transpose_forward]

        img_size = self.image_size or choose_image_size(self.backbone, tuple(median_shape[1:]))
        inplane_spacing = spacing[1:].astype(float)
        largest = float(max(median_shape[1:]))
        if largest > img_size:
            inplane_spacing = inplane_spacing * (largest / img_size)
        median_inplane = np.asarray(median_shape[1:]) * (spacing[1:] / inplane_spacing)
        num_heads = LabelManager(self.dataset_json["labels"],
                                 self.dataset_json.get("regions_class_order")).num_segmentation_heads
        slices_that_fit = stack_slices_that_fit(self.backbone, img_size, num_heads, self.UNet_vram_target_GB)
        depth = self.depth or choose_depth(float(spacing[0]), float(median_shape[0]), slices_that_fit)

        voxels_per_case = float(np.prod(median_inplane)) * float(median_shape[0])
        max_by_dataset = voxels_per_case * self.dataset_json["numTraining"] * self.max_dataset_covered / (img_size ** 2)
        batch_size = estimate_batch_size(self.backbone, img_size, 1, self.UNet_vram_target_GB, max_by_dataset)
        stack_batch_size = estimate_stack_batch_size(depth, slices_that_fit, batch_size)

        resampling_data, resampling_data_kwargs, resampling_seg, resampling_seg_kwargs = self.determine_resampling()
        resampling_softmax, resampling_softmax_kwargs = self.determine_segmentation_softmax_export_fn()
        normalization_schemes, mask_is_used_for_norm = self.determine_normalization_scheme_and_whether_mask_is_used_for_norm()
        spec = get_backbone_spec(self.backbone)
        plan_2d = {
            "data_identifier": self.generate_data_identifier("2d"),
            "preprocessor_name": self.preprocessor_name,
            "batch_size": batch_size,
            "slice_stack_batch_size": stack_batch_size,
            "patch_size": [img_size, img_size],
            "median_image_size_in_voxels": [float(v) for v in median_inplane],
            "spacing": [float(v) for v in inplane_spacing],
            "normalization_schemes": normalization_schemes,
            "use_mask_for_norm": mask_is_used_for_norm,
            "resampling_fn_data": resampling_data.__name__,
            "resampling_fn_seg": resampling_seg.__name__,
            "resampling_fn_data_kwargs": resampling_data_kwargs,
            "resampling_fn_seg_kwargs": resampling_seg_kwargs,
            "resampling_fn_probabilities": resampling_softmax.__name__,
            "resampling_fn_probabilities_kwargs": resampling_softmax_kwargs,
            "architecture": {
                "network_class_name": BASELINE_NETWORK,
                "arch_kwargs": {
                    "backbone": self.backbone,
                    "img_size": int(img_size),
                    "depth": int(depth),
                    "intensity_ranges": self.intensity_ranges(normalization_schemes),
                    "pixel_normalization": spec.pixel_normalization,
                },
                "_kw_requires_import": [],
            },
            "batch_dice": True,
        }
        logger.info("samunet 2d configuration: backbone %s, patch %s, spacing %s, batch size %d; slice stacks: "
                    "depth %d, %d per batch", self.backbone, plan_2d["patch_size"], plan_2d["spacing"], batch_size,
                    depth, stack_batch_size)

        median_spacing = np.median(self.dataset_fingerprint["spacings"], 0)[transpose_forward]
        original_median_shape = np.median(self.dataset_fingerprint["shapes_after_crop"], 0)[transpose_forward]
        preprocessed = Path(nnUNet_preprocessed) / self.dataset_name
        preprocessed.mkdir(parents=True, exist_ok=True)
        write_json_atomically(preprocessed / "dataset.json", self.dataset_json, prefix=PARTIAL_PREFIX)
        plans = {
            "dataset_name": self.dataset_name,
            "plans_name": self.plans_identifier,
            "original_median_spacing_after_transp": [float(i) for i in median_spacing],
            "original_median_shape_after_transp": [int(round(i)) for i in original_median_shape],
            "image_reader_writer": self.determine_reader_writer().__name__,
            "transpose_forward": [int(i) for i in transpose_forward],
            "transpose_backward": [int(i) for i in transpose_backward],
            "configurations": {"2d": plan_2d},
            "experiment_planner_used": self.__class__.__name__,
            "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel":
                self.dataset_fingerprint["foreground_intensity_properties_per_channel"],
        }
        self.plans = plans
        self.save_plans(plans)
        return plans

    def save_plans(self, plans: dict) -> None:
        """nnunetv2's ``save_plans`` (configurations of an existing plans file that these plans do not
        define are kept), written atomically: an interrupted run leaves the previous plans file or none,
        never half of one. An existing plans file that cannot be read (cut off by a run killed with an
        older version) is replaced, with a warning."""
        recursive_fix_for_json_export(plans)
        plans_file = Path(nnUNet_preprocessed) / self.dataset_name / f"{self.plans_identifier}.json"
        if plans_file.is_file():
            try:
                previous = dict(json.loads(plans_file.read_text(encoding="utf-8"))["configurations"])
            except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
                logger.warning("the existing plans file %s is unreadable (%s); replacing it", plans_file, error)
                previous = {}
            plans["configurations"].update({name: configuration for name, configuration in previous.items()
                                            if name not in plans["configurations"]})
        plans_file.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomically(plans_file, plans, prefix=PARTIAL_PREFIX)
