#!/usr/bin/env bash
# Multi-node training with the DeepSpeed launcher (pdsh/ssh to every host of the hostfile).
#
#   launch/train.sh --hostfile hostfile --num_nodes 4 --num_gpus 8 configs/dit-xl2-dtr-ant.yaml [key.sub=value ...]
#
# Every host needs the same checkout/venv at the same path and the shards on a shared filesystem.
# Extra environment for all ranks goes into ~/.deepspeed_env (one VAR=value per line, e.g.
# NCCL_IB_HCA=mlx5, NCCL_SOCKET_IFNAME=ib0). Re-running the same command resumes from `latest`.
set -euo pipefail

HOSTFILE=""; NUM_NODES=""; NUM_GPUS=""; MASTER_ADDR_ARG=""; MASTER_PORT="${MASTER_PORT:-29500}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --hostfile) HOSTFILE="$2"; shift 2 ;;
    --num_nodes) NUM_NODES="$2"; shift 2 ;;
    --num_gpus) NUM_GPUS="$2"; shift 2 ;;
    --master_addr) MASTER_ADDR_ARG="$2"; shift 2 ;;
    --master_port) MASTER_PORT="$2"; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
if [[ $# -lt 1 ]]; then echo "usage: $0 [--hostfile F] [--num_nodes N] [--num_gpus G] CONFIG [key.sub=value ...]" >&2; exit 2; fi
CONFIG="$1"; shift

cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
LAUNCHER=(deepspeed)
[[ -x .venv/bin/deepspeed ]] && LAUNCHER=(.venv/bin/deepspeed)
ARGS=(--master_port "$MASTER_PORT")
[[ -n "$HOSTFILE" ]] && ARGS+=(--hostfile "$HOSTFILE")
[[ -n "$NUM_NODES" ]] && ARGS+=(--num_nodes "$NUM_NODES")
[[ -n "$NUM_GPUS" ]] && ARGS+=(--num_gpus "$NUM_GPUS")
[[ -n "$MASTER_ADDR_ARG" ]] && ARGS+=(--master_addr "$MASTER_ADDR_ARG")

# Print the resolved config, DeepSpeed JSON and memory estimate once, before any node starts.
WORLD=$(( ${NUM_NODES:-1} * ${NUM_GPUS:-1} ))
"$PY" -m dtr_scale train --config "$CONFIG" --dry-run --world-size "$WORLD" "$@"

exec "${LAUNCHER[@]}" "${ARGS[@]}" --module dtr_scale train --config "$CONFIG" "$@"
