#!/usr/bin/env bash
# One node, or one invocation per node, with torchrun (c10d rendezvous).
#
#   single node:  launch/torchrun.sh 8 configs/dit-xl2-dtr-ant.yaml [key.sub=value ...]
#   node i of N:  NNODES=N NODE_RANK=i MASTER_ADDR=host0 launch/torchrun.sh 8 configs/... [...]
set -euo pipefail
if [[ $# -lt 2 ]]; then echo "usage: $0 GPUS_PER_NODE CONFIG [key.sub=value ...]" >&2; exit 2; fi
NPROC="$1"; CONFIG="$2"; shift 2
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
NNODES="${NNODES:-1}"
if [[ "$NNODES" == 1 ]]; then
  exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m dtr_scale train --config "$CONFIG" "$@"
fi
exec "$PY" -m torch.distributed.run --nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK}" \
  --nproc_per_node "$NPROC" --master_addr "${MASTER_ADDR:?set MASTER_ADDR}" --master_port "${MASTER_PORT:-29500}" \
  -m dtr_scale train --config "$CONFIG" "$@"
