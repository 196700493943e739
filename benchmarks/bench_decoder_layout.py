"""SAM's mask decoder, forward and backward, with its pixel decoder in the contiguous layout or the channels-last one.

``samunet.modules.two_way_transformer.image_tokens_to_grid`` copies the transformer's image tokens into a
contiguous (B, C, h, w) grid before SAM's pixel decoder (``output_upscaling``). The reference is the grid as a
strided view of the tokens (what samunet did before 2026-12-01, and what a plain ``transpose(1, 2).reshape``
gives): a channels-last layout that the transposed convolutions keep, while the gradient of the mask product
comes back contiguous. Both settings run ``samunet.modules.decoders.decode_masks`` on LiteMedSAM's decoder at
256 px (64 x 64 image tokens) in the same process, median of ``--repeats`` calls, with GFLOP/s, the share of
the matmul peak measured in this run and the working memory of one call.

    python benchmarks/bench_decoder_layout.py --rows 6 18 --dtype fp32 bf16

``--rows 18`` is AutoMedSAM's training step at batch 6 (three prompted classes per image). Run it alone: a
second torch process on a 2-core machine makes every figure noise.
"""
from __future__ import annotations

import argparse
import logging
from unittest import mock

import torch

from bench_common import count_flops, format_table, matmul_peak_gflops, median_seconds, working_memory_mib

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def strided_grid(image_tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The reference: the (B, h*w, C) tokens viewed as (B, C, h, w) without a copy (channels-last strides)."""
    batch, _, channels = image_tokens.shape
    return image_tokens.transpose(1, 2).reshape(batch, channels, height, width)


def decoder_call(rows: int, dtype: torch.dtype):
    """One forward and backward of ``decode_masks`` for ``rows`` (image, prompt) pairs under autocast."""
    from samunet.host_allocator import keep_freed_memory_for_reuse
    from samunet.modules.decoders import decode_masks
    from samunet.networks.base import SAMNetworkConfig
    from samunet.networks.samed import SAMedNetwork
    keep_freed_memory_for_reuse()
    torch.manual_seed(0)
    config = SAMNetworkConfig(input_channels=1, num_classes=5, backbone="litemedsam", img_size=256,
                              intensity_ranges=[[-3.0, 3.0]])
    network = SAMedNetwork(config)
    decoder, image_pe = network.mask_decoder, network.prompt_encoder.get_dense_pe().detach()
    generator = torch.Generator().manual_seed(1)
    embedding = torch.randn(rows, 256, 64, 64, generator=generator).requires_grad_()
    sparse = torch.randn(rows, 2, 256, generator=generator)
    dense = torch.randn(1, 256, 64, 64, generator=generator)

    def call():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            masks = decode_masks(decoder, embedding, image_pe, sparse, dense).masks
        masks.float().square().mean().backward()
    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[6, 18], help="(image, prompt) pairs per call")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per setting (median kept)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log = logging.getLogger("bench_decoder_layout")
    log.info("torch %s, %d threads", torch.__version__, torch.get_num_threads())
    rows = []
    for name in args.dtype:
        dtype = DTYPES[name]
        peak = matmul_peak_gflops("cpu", dtype=dtype)
        for count in args.rows:
            call = decoder_call(count, dtype)
            contiguous = median_seconds(call, args.repeats)
            flops, memory = count_flops(call), working_memory_mib(call)
            with mock.patch("samunet.modules.decoders.image_tokens_to_grid", strided_grid):
                strided = median_seconds(call, args.repeats)
                strided_memory = working_memory_mib(call)
            rows.append([name, count, f"{contiguous:.3f}", f"{strided:.3f}", f"{strided / contiguous:.2f}x",
                         f"{flops / contiguous / 1e9:.0f}", f"{100 * flops / contiguous / 1e9 / peak:.0f}% of {peak:.0f}",
                         f"{memory:.0f} / {strided_memory:.0f}"])
    log.info(format_table(["dtype", "rows", "contiguous s", "channels-last (reference) s", "speed-up", "GFLOP/s",
                           "% of matmul peak", "working MiB, contiguous / reference"], rows))


if __name__ == "__main__":
    main()
