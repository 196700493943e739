"""Training memory of one SAMed-style step per backbone: the numbers behind the planner's batch size.

For each backbone, a fresh process builds ``SAMedNetwork`` (random weights; memory does not
depend on their values) at the given input size, runs one forward + backward + AdamW step at
batch sizes 1 and 3, and reports peak memory. The growth between the two batch sizes gives the
memory per image; what remains at batch 1 is the fixed part (weights, optimiser state,
allocator). On CPU the peak is the process's maximum resident set size (``ru_maxrss``); on CUDA
``torch.cuda.max_memory_allocated``.

    python benchmarks/measure_training_memory.py --backbones litemedsam vit_b --size 256

Measured on 2026-11-22 (2-core CPU, fp32, 256 px, 4 classes, random weights); copied into
``samunet/planners/sam_planner.py``:

    backbone      size  peak@1 MB  peak@3 MB  MB/image  fixed MB
    litemedsam     256       1373       3061       844       528
    vit_b          256       1060       1773       356       704
    vit_l          256       2607       4916      1154      1453
    vit_h          256       4628       7622      1497      3132
    vit_test       256        329        350        11       318
    tinyvit_test   256        446        654       104       343
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def measure_one(backbone: str, size: int, batch: int, device: str) -> dict:
    import torch

    from samunet.networks.base import SAMNetworkConfig
    from samunet.networks.samed import SAMedNetwork
    torch.manual_seed(0)
    config = SAMNetworkConfig(input_channels=1, num_classes=4, backbone=backbone, img_size=size,
                              intensity_ranges=[[-2.0, 2.0]])
    network = SAMedNetwork(config).to(device).train()
    optimizer = torch.optim.AdamW(list(network.trainable_parameters()), lr=1e-4)
    image = torch.randn(batch, 1, size, size, device=device)
    target = torch.randint(0, 4, (batch, size, size), device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    loss = torch.nn.functional.cross_entropy(network(image), target)
    loss.backward()
    optimizer.step()
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return {"backbone": backbone, "size": size, "batch": batch, "peak_mb": peak_mb}


def run_in_subprocess(backbone: str, size: int, batch: int, device: str) -> dict:
    output = subprocess.run([sys.executable, __file__, "--one", backbone, str(size), str(batch), device],
                            check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["litemedsam", "vit_b", "vit_l", "vit_h"])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", nargs=4, metavar=("BACKBONE", "SIZE", "BATCH", "DEVICE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        backbone, size, batch, device = args.one
        print(json.dumps(measure_one(backbone, int(size), int(batch), device)))
        return
    print(f"{'backbone':12s} {'size':>5s} {'peak@1 MB':>10s} {'peak@3 MB':>10s} {'MB/image':>9s} {'fixed MB':>9s}")
    for backbone in args.backbones:
        one = run_in_subprocess(backbone, args.size, 1, args.device)
        three = run_in_subprocess(backbone, args.size, 3, args.device)
        per_image = (three["peak_mb"] - one["peak_mb"]) / 2.0
        fixed = one["peak_mb"] - per_image
        print(f"{backbone:12s} {args.size:5d} {one['peak_mb']:10.0f} {three['peak_mb']:10.0f} "
              f"{per_image:9.0f} {fixed:9.0f}", flush=True)


if __name__ == "__main__":
    main()
