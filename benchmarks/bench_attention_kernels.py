"""Attention kernels in reduced precision: torch's fused SDPA against the explicit form samunet uses on the CPU.

Two parts, both in one process, each timing the two kernels side by side in the same run:

1. The attention shapes of samunet's encoders at 256 px (TinyViT's windowed stages for a batch of
   six images, ViT-B's 14 x 14 windows and its global attention at 256 px; the number of windows
   follows from the grid), forward and forward + backward: milliseconds per call and the ratio
   fused / explicit (above 1: the explicit form is faster).
2. One training step (forward, CE loss, backward, AdamW) of a network on LiteMedSAM at 256 px under
   autocast: samunet's choice (:func:`samunet.backbones.attention.dot_product_attention`) against
   the fused kernel everywhere (``EXPLICIT_MAX_KEYS`` set to 0), median of ``--steps`` steps; samunet's
   GFLOP/s (``FlopCounterMode``) and its share of the matmul peak in the same dtype, measured in the same run,
   and each setting's working memory (``bench_common.working_memory_mib``).

    python benchmarks/bench_attention_kernels.py --dtype bf16 --networks self_prompt_sam samed

Run it alone: a second torch process on a 2-core machine makes every figure noise.
"""
from __future__ import annotations

import argparse
import logging
import time

import torch
import torch.nn.functional as F

from bench_common import count_flops, format_table, matmul_peak_gflops, median_seconds, working_memory_mib

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# (name, batch of windows, heads, tokens, head dim): six 256 px images through LiteMedSAM's TinyViT
# (stage 2: 128 px grid in 7 x 7 windows, 19 x 19 of them; stage 3: 64 px in 14 x 14, 5 x 5; stage 4:
# 64 px in 7 x 7, 10 x 10) and ViT-B at 256 px (16 x 16 tokens: 4 windows of 14 x 14, or one global).
SHAPES = (("TinyViT stage 2", 6 * 361, 4, 49, 32), ("TinyViT stage 3", 6 * 25, 5, 196, 32),
          ("TinyViT stage 4", 6 * 100, 10, 49, 32), ("ViT-B window", 6 * 4, 12, 196, 64),
          ("ViT-B global 256 px", 6, 12, 256, 64))


def milliseconds(call, repeats: int) -> float:
    """Best-of-``repeats`` milliseconds of ``call()`` after one warm-up call."""
    call()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def kernel_rows(dtype: torch.dtype, repeats: int) -> list[list[object]]:
    from samunet.backbones import attention
    rows = []
    generator = torch.Generator().manual_seed(0)
    for name, batch, heads, tokens, head_dim in SHAPES:
        q, k, v = (torch.randn(batch, heads, tokens, head_dim, generator=generator).to(dtype).requires_grad_()
                   for _ in range(3))
        kernels = {"fused": lambda: F.scaled_dot_product_attention(q, k, v),
                   "explicit": lambda: attention.dot_product_attention(q, k, v)}
        assert attention.uses_explicit_attention(q, k)
        times = {}
        for kernel, call in kernels.items():
            def forward(call=call):
                with torch.no_grad():
                    call()

            def forward_backward(call=call):
                call().float().sum().backward()
            times[kernel] = (milliseconds(forward, repeats), milliseconds(forward_backward, repeats))
        rows.append([name, f"({batch}, {heads}, {tokens}, {head_dim})",
                     f"{times['fused'][0]:.1f}", f"{times['explicit'][0]:.1f}",
                     f"{times['fused'][0] / times['explicit'][0]:.2f}x",
                     f"{times['fused'][1]:.1f}", f"{times['explicit'][1]:.1f}",
                     f"{times['fused'][1] / times['explicit'][1]:.2f}x"])
    return rows


def build_network(name: str, classes: int):
    from samunet.networks.base import SAMNetworkConfig
    from samunet.networks.samed import SAMedNetwork
    from samunet.networks.self_prompt_sam import SelfPromptSAMNetwork
    torch.manual_seed(0)
    if name == "self_prompt_sam":
        config = SAMNetworkConfig(input_channels=1, num_classes=classes, backbone="litemedsam", img_size=256,
                                  intensity_ranges=[[-3.0, 3.0]], depth=3, deep_supervision=True)
        return SelfPromptSAMNetwork(config).train(), torch.randn(1, 1, 3, 256, 256)
    config = SAMNetworkConfig(input_channels=1, num_classes=classes, backbone="litemedsam", img_size=256,
                              intensity_ranges=[[-3.0, 3.0]])
    return SAMedNetwork(config).train(), torch.randn(6, 1, 256, 256)


def step_measures(name: str, dtype: torch.dtype, steps: int, classes: int) -> tuple[float, int, float]:
    """Median seconds of one training step (after one warm-up step) of network ``name``, its FLOPs and its
    working memory in MiB (one untimed step each)."""
    network, image = build_network(name, classes)
    optimizer = torch.optim.AdamW(list(network.trainable_parameters()), lr=1e-4)
    generator = torch.Generator().manual_seed(1)

    def step():
        with torch.autocast("cpu", dtype=dtype):
            outputs = network(image)
            outputs = outputs if isinstance(outputs, list) else [outputs]
            loss = sum(F.cross_entropy(output.float(), torch.randint(0, classes, (output.shape[0], *output.shape[2:]),
                                                                      generator=generator))
                       for output in outputs)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return median_seconds(step, steps), count_flops(step), working_memory_mib(step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per kernel and shape (best kept)")
    parser.add_argument("--networks", nargs="*", default=["self_prompt_sam", "samed"],
                        choices=["self_prompt_sam", "samed"], help="training steps to time (none: kernels only)")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per setting (median kept)")
    parser.add_argument("--classes", type=int, default=5, help="output classes of the networks, background included")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    log = logging.getLogger("bench_attention_kernels")
    log.info("torch %s, %d threads, %s on the CPU", torch.__version__, torch.get_num_threads(), args.dtype)
    log.info(format_table(["attention", "(batch, heads, tokens, head dim)", "fused fwd ms", "explicit fwd ms",
                           "fwd ratio", "fused fwd+bwd ms", "explicit fwd+bwd ms", "fwd+bwd ratio"],
                          kernel_rows(dtype, args.repeats)))
    if not args.networks:
        return
    from samunet.backbones import attention
    peak = matmul_peak_gflops("cpu", dtype=dtype)
    log.info("matmul peak in %s: %.0f GFLOP/s", args.dtype, peak)
    rows = []
    for name in args.networks:
        chosen, flops, chosen_mib = step_measures(name, dtype, args.steps, args.classes)
        kept = attention.EXPLICIT_MAX_KEYS
        attention.EXPLICIT_MAX_KEYS = 0
        try:
            fused, _, fused_mib = step_measures(name, dtype, args.steps, args.classes)
        finally:
            attention.EXPLICIT_MAX_KEYS = kept
        rows.append([name, f"{fused:.2f}", f"{chosen:.2f}", f"{fused / chosen:.2f}x", f"{flops / chosen / 1e9:.0f}",
                     f"{flops / chosen / 1e9 / peak:.0%}", f"{fused_mib:.0f}", f"{chosen_mib:.0f}"])
    log.info(format_table(["training step (LiteMedSAM 256 px)", "fused SDPA s", "samunet s", "speed-up",
                           "samunet GFLOP/s", "% peak", "fused working MiB", "samunet working MiB"], rows))


if __name__ == "__main__":
    main()
