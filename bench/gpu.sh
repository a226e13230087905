#!/usr/bin/env bash
# On a GPU box: images/s per GPU, MFU and peak memory of DiT-XL/2 bf16 training at micro-batch 32 per GPU,
# ZeRO-1/2/3, with and without torch.compile; appends the table to bench/RESULTS.md (see bench/gpu.py).
#   bash bench/gpu.sh                 # after `make setup TORCH_INDEX=https://download.pytorch.org/whl/cu128`
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
exec "$PY" bench/gpu.py --append "$@"
