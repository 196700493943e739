#!/usr/bin/env bash
# Creates ./.venv and installs samunet into it without letting pip replace torch.
# nnunetv2 -> dynamic-network-architectures -> timm -> torchvision would otherwise pull a newer
# torch with several GB of CUDA wheels (see docs/architecture.md, "Installing").
# Usage: bash scripts/install.sh [extra]   e.g. `bash scripts/install.sh test`
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${SAMUNET_TORCH_VERSION:-2.13.0}"
PYTHON="${PYTHON:-python3}"
extra="${1:-}"

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==${TORCH_VERSION}"
fi
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
.venv/bin/python -m pip freeze | grep -i '^torch==' > "$constraints"
target="."
if [ -n "$extra" ]; then target=".[${extra}]"; fi
.venv/bin/python -m pip install -q -c "$constraints" -e "$target"
echo "samunet installed in $(pwd)/.venv (torch $(.venv/bin/python -c 'import torch; print(torch.__version__)'))"
