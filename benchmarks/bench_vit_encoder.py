"""Forward time and peak memory of samunet's SAMViTEncoder vs segment-anything's ImageEncoderViT.

Both encoders get the same random weights of one variant (default vit_b) and the same input,
batch 1, fp32. Every measurement runs in a fresh subprocess (``--one IMPL SIZE``), so peak
memory is one model's own: on CPU the peak RSS (``ru_maxrss``) minus the RSS after building
the model, on CUDA ``torch.cuda.max_memory_allocated`` minus the memory held after building.
Time is the median of ``--repeats`` forwards after ``--warmup`` untimed ones. ``--grad`` runs
the forward with autograd recording (what a fine-tuning step keeps for backward) instead of
under ``torch.no_grad``. The last column checks that both saw the same weights.

Run by hand, e.g. ``.venv/bin/python benchmarks/bench_vit_encoder.py --sizes 256 1024``.

measured on 2026-11-29, 2-core CPU alone (torch 2.13.0+cpu, 2 threads), vit_b, batch 1, fp32, no_grad,
``--sizes 256 1024 --repeats 3`` (the 1024 row from a second run ``--sizes 1024``); matmul peak 364-397
GFLOP/s in the same runs:

size | ours s | ref s | speed-up | ours GFLOP | ours GFLOP/s | of peak | ref GFLOP/s | of peak | ours MiB | ref MiB | max diff
-----+--------+-------+----------+------------+--------------+---------+-------------+---------+----------+---------+---------
 256 |  0.333 | 0.396 |    1.19x |       49.1 |          147 |     45% |         174 |     53% |       67 |      63 |  7.9e-06
1024 |  5.546 | 9.310 |    1.68x |      941.8 |          170 |     44% |         104 |     27% |      529 |    2560 |  1.2e-05

Before the attention without the (N, N) bias and the unpadded window projections (2026-11-22, same
machine under load): 256 px 0.90x of the reference's time, 1024 px 0.52x, 1802 vs 2519 MiB.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from bench_common import (count_flops, format_table, matmul_peak_gflops, memory_baseline_mib, peak_memory_mib,
                          synchronize)
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from samunet.backbones.sam_vit import VIT_CONFIGS, build_vit_encoder
from samunet.sam_import import sam_modeling

logger = logging.getLogger("bench_vit_encoder")

IMPLS = ("samunet", "reference")


def build_unseeded(impl: str, variant: str, img_size: int) -> nn.Module:
    """The encoder ``impl`` of ``variant`` with its default initialisation."""
    if impl == "samunet":
        return build_vit_encoder(variant, img_size)
    config = VIT_CONFIGS[variant]
    return sam_modeling().ImageEncoderViT(
        img_size=img_size, embed_dim=config.embed_dim, depth=config.depth,
        num_heads=config.num_heads, global_attn_indexes=list(config.global_attn_indexes),
        window_size=config.window_size, out_chans=config.out_chans, mlp_ratio=4.0,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), qkv_bias=True, use_rel_pos=True)


def build(impl: str, variant: str, img_size: int) -> nn.Module:
    """The encoder ``impl`` of ``variant`` with seeded random weights (same for both impls)."""
    model = build_unseeded(impl, variant, img_size)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        # both implementations list the same names in the same order, so the draws match
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.1 * noise if param.ndim == 1 and name.endswith("weight") else 0.02 * noise)
    return model.eval()


def measure_one(impl: str, variant: str, img_size: int, *, device: str, repeats: int,
                warmup: int, grad: bool, save: Path) -> dict:
    """Time and peak memory of ``repeats`` forwards of one encoder in this process."""
    model = build(impl, variant, img_size).to(device)
    model.requires_grad_(grad)
    x = torch.randn(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(1)).to(device)
    baseline = memory_baseline_mib(device)

    def forward() -> torch.Tensor:
        with torch.set_grad_enabled(grad):
            out = model(x)
            embedding = out if impl == "reference" else out.embedding
        synchronize(device)
        return embedding

    for _ in range(warmup):
        forward()
    seconds, embedding = [], None
    for _ in range(repeats):
        embedding = None  # with --grad, free the previous forward's graph first
        start = time.perf_counter()
        embedding = forward()
        seconds.append(time.perf_counter() - start)
    peak = peak_memory_mib(device, baseline)
    torch.save(embedding.detach().cpu(), save)
    return {"seconds": statistics.median(seconds), "peak_mib": peak}


def forward_flops(impl: str, variant: str, img_size: int, device: str) -> int:
    """FLOPs of one forward of ``impl``, counted on fake tensors of ``device`` (no compute, no memory;
    the device decides which attention path samunet takes)."""
    with FakeTensorMode():
        with torch.device(device):
            model = build_unseeded(impl, variant, img_size)
            x = torch.randn(1, 3, img_size, img_size)
        with torch.no_grad():
            return count_flops(lambda: model(x))


def run_subprocess(impl: str, img_size: int, args: argparse.Namespace, save: Path) -> dict:
    command = [sys.executable, __file__, "--one", impl, str(img_size), "--variant", args.variant,
               "--device", args.device, "--repeats", str(args.repeats), "--warmup",
               str(args.warmup), "--save", str(save)] + (["--grad"] if args.grad else [])
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--repeats", type=int, default=2, help="timed forwards (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed forwards before timing")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variant", default="vit_b", choices=sorted(VIT_CONFIGS))
    parser.add_argument("--grad", action="store_true", help="forward with autograd recording")
    parser.add_argument("--one", nargs=2, metavar=("IMPL", "SIZE"), help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:
        impl, size = args.one
        print(json.dumps(measure_one(impl, args.variant, int(size), device=args.device,
                                     repeats=args.repeats, warmup=args.warmup, grad=args.grad,
                                     save=args.save)))
        return

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    peak = matmul_peak_gflops(args.device)
    logger.info("torch %s, %d threads, device %s, %s, batch 1, fp32, %s, median of %d (warmup %d); "
                "matmul peak %.0f GFLOP/s (fp32 2048^3, best of 5, measured now)", torch.__version__,
                torch.get_num_threads(), args.device, args.variant, "autograd" if args.grad else "no_grad",
                args.repeats, args.warmup, peak)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            results = {impl: run_subprocess(impl, size, args, Path(tmp) / f"{impl}_{size}.pt")
                       for impl in IMPLS}
            diff = (torch.load(Path(tmp) / f"samunet_{size}.pt")
                    - torch.load(Path(tmp) / f"reference_{size}.pt")).abs().max().item()
            ours, ref = results["samunet"], results["reference"]
            flops = {impl: forward_flops(impl, args.variant, size, args.device) for impl in IMPLS}
            gflops = {impl: flops[impl] / results[impl]["seconds"] / 1e9 for impl in IMPLS}
            rows.append([size, ours["seconds"], ref["seconds"], f"{ref['seconds'] / ours['seconds']:.2f}x",
                         f"{flops['samunet'] / 1e9:.1f}", f"{gflops['samunet']:.0f}",
                         f"{100 * gflops['samunet'] / peak:.0f}%", f"{gflops['reference']:.0f}",
                         f"{100 * gflops['reference'] / peak:.0f}%", f"{ours['peak_mib']:.0f}",
                         f"{ref['peak_mib']:.0f}", f"{diff:.1e}"])
    peak_after = matmul_peak_gflops(args.device)
    logger.info("%s\nmatmul peak after the runs: %.0f GFLOP/s", format_table(
        ["size", "ours s", "ref s", "speed-up", "ours GFLOP", "ours GFLOP/s", "of peak", "ref GFLOP/s",
         "of peak", "ours MiB", "ref MiB", "max diff"], rows), peak_after)


if __name__ == "__main__":
    main()
