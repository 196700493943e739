"""Training memory of one SAMed or Self-Prompt-SAM step per backbone: the numbers behind the planner's batch
size, slice-stack depth and stacks per batch.

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

``--network self_prompt_sam`` measures one stack of 1 and 3 slices of Self-Prompt-SAM in phase 2
(everything it adds trains, loss on every output); its decoder runs once per class, so ``--classes``
gives more than one head count. Measured on 2026-11-30 (same machine), ``--classes 5 9``; the
planner's ``SELF_PROMPT_SAM_MB_PER_SLICE_AT_256`` is the per-slice part without the heads and the
growth per head, ``SELF_PROMPT_SAM_BASE_MB`` the larger fixed part:

    backbone      size  classes  peak@1 MB  peak@3 MB  MB/slice  fixed MB
    litemedsam     256        5       2768       7075      2154       615
    litemedsam     256        9       3116       8302      2593       523
    vit_b          256        5       1237       2316       539       698
    vit_b          256        9       1280       2470       595       684
    vit_l          256        5       2752       4938      1093      1659
    vit_l          256        9       2759       5031      1136      1622
    vit_h          256        5       4710       7875      1583      3127
    vit_h          256        9       4706       8045      1670      3036
    vit_test       256        5        519        891       186       333
    vit_test       256        9        527        917       195       331
    tinyvit_test   256        5        787       1609       411       375
    tinyvit_test   256        9        878       1892       507       371
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def measure_one(network_name: str, backbone: str, size: int, images: int, classes: int, device: str) -> dict:
    """Peak memory of one training step: ``images`` 2D images (SAMed) or one stack of ``images``
    slices (Self-Prompt-SAM, phase 2: everything it adds trains; the loss on every output)."""
    import torch

    from samunet.networks.base import SAMNetworkConfig
    from samunet.networks.samed import SAMedNetwork
    from samunet.networks.self_prompt_sam import SelfPromptSAMNetwork
    torch.manual_seed(0)
    stacked = network_name == "self_prompt_sam"
    config = SAMNetworkConfig(input_channels=1, num_classes=classes, backbone=backbone, img_size=size,
                              intensity_ranges=[[-2.0, 2.0]], depth=images if stacked else 1,
                              deep_supervision=stacked)
    network = (SelfPromptSAMNetwork(config) if stacked else SAMedNetwork(config)).to(device).train()
    optimizer = torch.optim.AdamW(list(network.trainable_parameters()), lr=1e-4)
    shape = (1, 1, images, size, size) if stacked else (images, 1, size, size)
    image = torch.randn(*shape, device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    outputs = network(image)
    outputs = outputs if isinstance(outputs, list) else [outputs]
    loss = sum(torch.nn.functional.cross_entropy(
        output, torch.randint(0, classes, (output.shape[0], *output.shape[2:]), device=device))
        for output in outputs)
    loss.backward()
    optimizer.step()
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return {"backbone": backbone, "size": size, "images": images, "peak_mb": peak_mb}


def run_in_subprocess(network: str, backbone: str, size: int, images: int, classes: int, device: str) -> dict:
    output = subprocess.run([sys.executable, __file__, "--one", network, backbone, str(size), str(images),
                             str(classes), device], check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["litemedsam", "vit_b", "vit_l", "vit_h"])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--network", choices=("samed", "self_prompt_sam"), default="samed",
                        help="SAMed: batches of 1 and 3 images; Self-Prompt-SAM: one stack of 1 and 3 slices")
    parser.add_argument("--classes", type=int, nargs="+", default=[4],
                        help="segmentation heads, background included (Self-Prompt-SAM decodes once per class)")
    parser.add_argument("--one", nargs=6, metavar=("NETWORK", "BACKBONE", "SIZE", "IMAGES", "CLASSES", "DEVICE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        network, backbone, size, images, classes, device = args.one
        print(json.dumps(measure_one(network, backbone, int(size), int(images), int(classes), device)))
        return
    print(f"{'network':16s} {'backbone':12s} {'size':>5s} {'classes':>7s} {'peak@1 MB':>10s} {'peak@3 MB':>10s} "
          f"{'MB/image':>9s} {'fixed MB':>9s}")
    for backbone in args.backbones:
        for classes in args.classes:
            one = run_in_subprocess(args.network, backbone, args.size, 1, classes, args.device)
            three = run_in_subprocess(args.network, backbone, args.size, 3, classes, args.device)
            per_image = (three["peak_mb"] - one["peak_mb"]) / 2.0
            fixed = one["peak_mb"] - per_image
            print(f"{args.network:16s} {backbone:12s} {args.size:5d} {classes:7d} {one['peak_mb']:10.0f} "
                  f"{three['peak_mb']:10.0f} {per_image:9.0f} {fixed:9.0f}", flush=True)


if __name__ == "__main__":
    main()
