"""Seconds per volume: samunet_predict's predictor for each main trainer against nnU-Net's own 2d predictor.

One synthetic data set (2 training cases of ``--slices`` x ``--size`` x ``--size`` voxels at 1 mm, 1 MRI
channel, ``--labels`` labels) is planned twice in a temporary folder: by samunet's planner (``samunetPlans``,
``--backbone`` at ``--size`` px, the slice-stack depth D of Self-Prompt-SAM included) and by nnU-Net's own
``ExperimentPlanner`` (``nnUNetPlans``, whose ``2d`` configuration gives nnU-Net's default 2d U-Net through
``get_network_from_plans``, as ``nnUNetTrainer`` builds it). Every method then predicts the SAME
preprocessed-sized volume (random, 1 x slices x size x size) with the predictor ``samunet_predict`` uses
(``trainer.predictor_class()``: nnunetv2's sliding window, Gaussian weighting, step 0.5), without and with
mirroring (TTA): batched (``BatchedPredictor``'s default tiles per batch for the device) and unbatched (one
tile per network call, nnunetv2's own path), and nnU-Net with ``nnUNetPredictor`` as it ships. Networks have
random weights (a timing needs no training). Each measurement runs in a fresh subprocess (``--one``), so its
peak memory (peak RSS above the RSS after building the network, CPU; peak allocated, CUDA) is its own; the time
is the median of ``--repeats`` volumes after one untimed single-slice warm-up. samunet's predictors (and nnU-Net's
U-Net in samunet's predictor, the "bf16" row) run with the host-memory setting every samunet command makes on a
CPU (``samunet.host_allocator``: freed memory kept for reuse); nnU-Net's predictor as it ships runs with glibc's
defaults (with samunet's setting it was 5-15% faster on 2026-12-02).

Columns: ``s`` seconds per volume (batched); ``max tiles/call`` the batched path's tiles per network call
(fewer when the volume has fewer tiles); ``speed-up`` = unbatched / batched seconds; ``GFLOP/s`` the
prediction's FLOPs (``FlopCounterMode`` over one untimed pass of the same volume: convolutions, matmuls and
attention; TinyViT's oneDNN fused convolutions counted on their plain path) per batched second, and ``% peak``
that over the matmul peak measured at the start of the same run (fp32; bf16 with ``--precision bf16``);
``x nnU-Net 2d`` = batched seconds / nnU-Net's seconds as it ships (issue 14's goal: <= 2); ``x nnU-Net same
precision`` the same against nnU-Net's U-Net in samunet's precision (with ``--precision bf16`` the row "nnU-Net
2d, bf16": its network and one-tile path under autocast bfloat16); ``working MiB`` the peak of the tensors the prediction keeps
alive at once (``bench_common.working_memory_mib``, the same pass), ``peak RSS MiB`` the process's peak
resident memory above what it held after building the network (0 when the prediction stayed below it).

Run by hand (it takes long at full size), e.g. ``.venv/bin/python benchmarks/bench_predict_volume.py``
(48 x 256 x 256, litemedsam at 256); ``--slices 4 --size 64 --backbone tinyvit_test`` checks that it runs.

measured on 2026-11-30, 2-core CPU alone (torch 2.13.0+cpu, 2 threads, matmul peak 327 GFLOP/s measured in
the run), ``--slices 24 --tta off`` (24 x 256 x 256, litemedsam at 256 with random weights, 5 labels):

         method | TTA | unbatched s |       s | max tiles/call | speed-up | GFLOP/s | % peak | x nnU-Net 2d | working MiB | peak RSS MiB
----------------+-----+-------------+---------+----------------+----------+---------+--------+--------------+-------------+-------------
     nnU-Net 2d | off |             |   6.001 |              1 |          |     118 |    36% |         1.00 |         213 |            0
          SAMed | off |      20.553 |  17.111 |              8 |    1.20x |     103 |    32% |         2.85 |         646 |            0
Self-Prompt-SAM | off |     101.717 | 104.768 |              1 |    0.97x |      62 |    19% |        17.46 |        2110 |         1415
          H-SAM | off |      22.941 |  20.523 |              8 |    1.12x |      93 |    29% |         3.42 |         783 |           56
        HSP-SAM | off |      24.464 |  22.583 |              8 |    1.08x |      97 |    30% |         3.76 |         689 |            1
     AutoMedSAM | off |      31.883 |  27.524 |              8 |    1.16x |     104 |    32% |         4.59 |         681 |            0

(nnU-Net's 2d took 4.6 s in the 2026-11-29 run of the same setting: the reference moves by about 30%
between runs on this machine, which is why every ratio is taken against the reference of the same run.)
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from torch.utils.flop_counter import FlopCounterMode

from samunet.host_allocator import keep_freed_memory_for_reuse

from bench_common import (format_table, matmul_peak_gflops, memory_baseline_mib, peak_memory_mib, synchronize,
                          working_memory_mib)

logger = logging.getLogger("bench_predict_volume")

METHODS = {"SAMed": "SAMedTrainer", "Self-Prompt-SAM": "SelfPromptSAMTrainer", "H-SAM": "HSAMTrainer",
           "HSP-SAM": "HSPSAMTrainer", "AutoMedSAM": "AutoMedSAMTrainer"}
NNUNET = "nnUNetTrainer"
DATASET_ID = 987
DATASET_NAME = f"Dataset{DATASET_ID}_BenchVolume"


def write_dataset(raw: Path, slices: int, size: int, num_labels: int) -> None:
    """Two cases of smooth random intensities with ``num_labels`` labels (intensity bands), 1 mm spacing."""
    import SimpleITK as sitk
    from scipy.ndimage import gaussian_filter

    folder = raw / DATASET_NAME
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    generator = np.random.default_rng(0)
    for case in range(2):
        image = gaussian_filter(generator.normal(size=(slices, size, size)), sigma=(1, 4, 4)).astype(np.float32)
        labels = np.digitize(image, np.quantile(image, np.linspace(0, 1, num_labels + 1)[1:-1])).astype(np.uint8)
        for array, path in ((image, folder / "imagesTr" / f"case_{case}_0000.nii.gz"),
                            (labels, folder / "labelsTr" / f"case_{case}.nii.gz")):
            itk = sitk.GetImageFromArray(array)
            itk.SetSpacing((1.0, 1.0, 1.0))
            sitk.WriteImage(itk, str(path))
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, **{f"class_{k}": k for k in range(1, num_labels)}},
        "numTraining": 2, "file_ending": ".nii.gz"}))


def plan(root: Path, args: argparse.Namespace) -> None:
    """samunetPlans (samunet's planner) and nnUNetPlans (nnU-Net's ExperimentPlanner) for the data set."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiment_dataset

    from samunet.cli.plan_and_preprocess import plan_and_preprocess
    write_dataset(root / "nnUNet_raw", args.slices, args.size, args.labels)
    plan_and_preprocess(DATASET_ID, backbone=args.backbone, image_size=args.size, num_processes=1,
                        preprocess=False, progress_bar=False)
    plan_experiment_dataset(DATASET_ID)


def set_folders(root: Path) -> None:
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (root / name).mkdir(exist_ok=True)
        os.environ[name] = str(root / name)


def build_predictor(method: str, root: Path, *, mirroring: bool, tiles_per_batch: int | None, device: str,
                    precision: str | None = None):
    """The predictor (network with random weights) of ``method`` (a samunet trainer name or nnUNetTrainer).
    ``precision`` (samunet's predictor precision; None: nnU-Net's) for nnUNetTrainer gives nnU-Net's network and
    one-tile path in samunet's ``BatchedPredictor`` (``tiles_per_batch`` 1) under that precision."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from samunet.registry import TRAINERS

    folder = root / "nnUNet_preprocessed" / DATASET_NAME
    dataset_json = json.loads((folder / "dataset.json").read_text())
    torch.manual_seed(0)
    common = dict(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring, perform_everything_on_device=True,
                  device=torch.device(device), verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    if method == NNUNET:
        plans_manager = PlansManager(json.loads((folder / "nnUNetPlans.json").read_text()))
        configuration = plans_manager.get_configuration("2d")
        heads = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
        network = get_network_from_plans(configuration.network_arch_class_name,
                                         configuration.network_arch_init_kwargs,
                                         configuration.network_arch_init_kwargs_req_import, 1, heads,
                                         deep_supervision=False)
        if precision is None:
            predictor = nnUNetPredictor(**common)
        else:
            from samunet.inference.batched_predictor import BatchedPredictor
            predictor = BatchedPredictor(**common, tiles_per_batch=1, precision=precision)
        axes = (0, 1)
    else:
        trainer_class = TRAINERS.get(method)
        plans_manager = PlansManager(json.loads((folder / "samunetPlans.json").read_text()))
        configuration = trainer_class.inference_configuration(plans_manager.get_configuration("2d"))
        heads = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
        network = trainer_class.build_network_architecture(plans_manager, configuration, 1, heads, False)
        predictor = trainer_class.predictor_class()(**common, tiles_per_batch=tiles_per_batch, precision=precision)
        axes = (1, 2) if getattr(trainer_class, "uses_slice_stacks", False) else (0, 1)
    predictor.manual_initialization(network.to(device).eval(), plans_manager, configuration, None, dataset_json,
                                    method, axes)
    return predictor


def count_volume(predictor, volume: torch.Tensor) -> tuple[int, float]:
    """FLOPs and working memory (MiB) of one untimed prediction of ``volume``. TinyViT's oneDNN fused
    convolutions are invisible to FlopCounterMode, so this pass runs its plain path (the same products)."""
    from unittest import mock

    from samunet.backbones import tiny_vit
    # FlopCounterMode's module tracker hooks the gradients of inputs that require them, which fails under the
    # predictor's inference mode for parameters used as inputs (HSP-SAM's prompts): count without gradients
    trainable = [p for p in predictor.network.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.requires_grad_(False)
    try:
        with mock.patch.object(tiny_vit, "onednn_ready", lambda *tensors: False), \
                FlopCounterMode(display=False) as flops:
            mib = working_memory_mib(lambda: predictor.predict_sliding_window_return_logits(volume))
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)
    return flops.get_total_flops(), mib


def measure_one(method: str, root: Path, args: argparse.Namespace, *, mirroring: bool,
                tiles_per_batch: int | None, count: bool = True) -> dict:
    """Seconds per volume (median), tiles per call, FLOPs and memory of one predictor, in this process:
    ``peak_mib`` the process's peak (RSS above the RSS after building, CPU; allocated, CUDA),
    ``working_mib`` the tensors the prediction itself keeps alive at once (:func:`working_memory_mib`).
    ``count=False`` skips the FLOP and working-memory pass (the unbatched rows need only their time)."""
    predictor = build_predictor(method, root, mirroring=mirroring, tiles_per_batch=tiles_per_batch,
                                device=args.device, precision=args.precision_of_one or None)
    volume = torch.randn(1, args.slices, args.size, args.size, generator=torch.Generator().manual_seed(1))
    baseline = memory_baseline_mib(args.device)
    predictor.predict_sliding_window_return_logits(volume[:, :1])  # warm-up: one slice
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        predictor.predict_sliding_window_return_logits(volume)
        synchronize(args.device)
        seconds.append(time.perf_counter() - start)
    peak = peak_memory_mib(args.device, baseline)
    flops, working = count_volume(predictor, volume) if count else (0, 0.0)
    tiles = predictor.effective_tiles_per_batch() if hasattr(predictor, "effective_tiles_per_batch") else 1
    return {"seconds": statistics.median(seconds), "tiles_per_call": tiles, "flops": flops, "peak_mib": peak,
            "working_mib": working}


def run_subprocess(method: str, root: Path, args: argparse.Namespace, *, mirroring: bool,
                   tiles_per_batch: int | None, precision: str | None = None) -> dict:
    command = [sys.executable, __file__, "--one", method, "--root", str(root), "--slices", str(args.slices),
               "--size", str(args.size), "--device", args.device, "--repeats", str(args.repeats),
               "--tiles-per-batch", str(tiles_per_batch or 0), "--precision-of-one", precision or ""] + \
        (["--mirroring"] if mirroring else []) + (["--time-only"] if tiles_per_batch == 1 and method != NNUNET else [])
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"measuring {method} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=48, help="slices of the volume")
    parser.add_argument("--size", type=int, default=256, help="in-plane size of the volume and SAM input size")
    parser.add_argument("--labels", type=int, default=5, help="labels including background")
    parser.add_argument("--backbone", default="litemedsam", help="samunet backbone (random weights)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--tta", choices=("both", "off", "on"), default="both", help="mirroring settings measured")
    parser.add_argument("--repeats", type=int, default=1, help="timed volumes per measurement (median)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                        help="samunet's predictors in this precision (samunet_predict --precision); nnU-Net's 2d "
                             "predictor is measured as it ships and, for bf16, also under autocast bfloat16 (its "
                             "network and one-tile path in samunet's predictor). Default: nnU-Net's precision")
    parser.add_argument("--precision-of-one", default="", help=argparse.SUPPRESS)
    parser.add_argument("--one", metavar="METHOD", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--mirroring", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tiles-per-batch", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--time-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:
        set_folders(args.root)
        if args.one != NNUNET or args.precision_of_one:  # samunet's predictor, as samunet_predict runs it
            keep_freed_memory_for_reuse()
        print(json.dumps(measure_one(args.one, args.root, args, mirroring=args.mirroring,
                                     tiles_per_batch=args.tiles_per_batch or None, count=not args.time_only)))
        return

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    bf16 = args.precision == "bf16"
    peak_gflops = matmul_peak_gflops(args.device, dtype=torch.bfloat16 if bf16 else torch.float32)
    logger.info("torch %s, %d threads, device %s; volume 1 x %d x %d x %d, %d labels; samunet backbone %s at %d px "
                "(random weights), samunet's predictors in %s; matmul peak %.0f GFLOP/s (%s 2048^3, measured now)",
                torch.__version__, torch.get_num_threads(), args.device, args.slices, args.size, args.size,
                args.labels, args.backbone, args.size, args.precision or "nnU-Net's precision", peak_gflops,
                "bf16" if bf16 else "fp32")
    mirror_settings = {"both": (False, True), "off": (False,), "on": (True,)}[args.tta]

    def throughput(result: dict) -> list[str]:
        gflops = result["flops"] / result["seconds"] / 1e9
        return [f"{gflops:.0f}", f"{100 * gflops / peak_gflops:.0f}%"]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        set_folders(root)
        plan(root, args)
        for mirroring in mirror_settings:
            reference = run_subprocess(NNUNET, root, args, mirroring=mirroring, tiles_per_batch=None)
            rows.append(["nnU-Net 2d", "on" if mirroring else "off", "", reference["seconds"], 1, "",
                         *throughput(reference), "1.00", "" if bf16 else "1.00", f"{reference['working_mib']:.0f}",
                         f"{reference['peak_mib']:.0f}"])
            same = reference
            if bf16:  # nnU-Net's U-Net in the same precision as samunet's predictors, for a like-for-like ratio
                same = run_subprocess(NNUNET, root, args, mirroring=mirroring, tiles_per_batch=1, precision="bf16")
                rows.append(["nnU-Net 2d, bf16", "on" if mirroring else "off", "", same["seconds"], 1, "",
                             *throughput(same), f"{same['seconds'] / reference['seconds']:.2f}", "1.00",
                             f"{same['working_mib']:.0f}", f"{same['peak_mib']:.0f}"])
            for name in args.methods:
                trainer = METHODS[name]
                unbatched = run_subprocess(trainer, root, args, mirroring=mirroring, tiles_per_batch=1,
                                           precision=args.precision)
                batched = run_subprocess(trainer, root, args, mirroring=mirroring, tiles_per_batch=None,
                                         precision=args.precision)
                rows.append([name, "on" if mirroring else "off", unbatched["seconds"], batched["seconds"],
                             batched["tiles_per_call"], f"{unbatched['seconds'] / batched['seconds']:.2f}x",
                             *throughput(batched), f"{batched['seconds'] / reference['seconds']:.2f}",
                             f"{batched['seconds'] / same['seconds']:.2f}",
                             f"{batched['working_mib']:.0f}", f"{batched['peak_mib']:.0f}"])
    logger.info("%s", format_table(["method", "TTA", "unbatched s", "s", "max tiles/call", "speed-up", "GFLOP/s",
                                    "% peak", "x nnU-Net 2d", "x nnU-Net same precision", "working MiB",
                                    "peak RSS MiB"], rows))


if __name__ == "__main__":
    main()
