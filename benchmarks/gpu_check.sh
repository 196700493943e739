#!/usr/bin/env bash
# The prepared GPU check (issue 14): every main trainer's training step under autocast + torch.compile on
# CUDA, slices/s and peak memory at 256 and 1024 px (ViT-B) and 256 px (LiteMedSAM), plus a 2-GPU DDP
# row when two GPUs exist; one table, under 10 minutes. On a machine without a CUDA GPU it says so and
# exits 0. Arguments go to benchmarks/gpu_check.py (e.g. --steps 5 --budget-minutes 5).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python}"
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then python=.venv/bin/python; fi
exec "$python" benchmarks/gpu_check.py "$@"
