#!/usr/bin/env bash
# GPU first light (bench/device_check.py has the details, bench/device_report.py the JSON schema): installs what `make device-wheels`
# carried, then checks and measures the GPU machine in time-boxed steps, all written under OUT_DIR:
#   device_check.json, device_check.md, convergence.png, samples.png, logs/{install,cuda_smoke,gpu_bench,convergence}.log
#
#   bash bench/device_check.sh OUT_DIR               # on the GPU machine: <= 9 min on one H200
#   bash bench/device_check.sh --cpu-smoke OUT_DIR   # a dry run on CPU with tiny sizes from the project venv (< 3 min)
#
# From a session lent a GPU (device tool): run(carry=[".whl"], command="bash bench/device_check.sh $OUT", timeout_s=560).
# Every step runs under `timeout` (its whole process group is stopped at its limit), so a slow step cannot eat the
# others' time; steps that finish early leave their time to the convergence benchmark, the last one.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

SMOKE=0
if [ "${1:-}" = "--cpu-smoke" ]; then
    SMOKE=1
    shift
fi
if [ $# -ne 1 ]; then
    echo "usage: bash bench/device_check.sh [--cpu-smoke] OUT_DIR" >&2
    exit 2
fi
mkdir -p "$1/logs" || exit 2
OUT=$(cd "$1" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/dtr-device-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
START=$(date +%s)

export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
export PYTHONPATH="$REPO:$REPO/tests${PYTHONPATH:+:$PYTHONPATH}"
if [ "$SMOKE" = 1 ]; then
    PY=${PY:-$REPO/.venv/bin/python}
    export DS_ACCELERATOR=cpu
    FLAG=--cpu-smoke
    TOTAL=${DEVICE_CHECK_BUDGET_S:-175}           # seconds, the whole script (a loaded CPU may need more)
    LIMITS=(0 $((TOTAL * 50 / 100)) $((TOTAL * 20 / 100)) 0)  # install (skipped), cuda_smoke, gpu_bench, convergence (the rest)
else
    PY=${PY:-python3}
    export DS_ACCELERATOR=cuda
    FLAG=
    TOTAL=${DEVICE_CHECK_BUDGET_S:-530}
    LIMITS=(60 100 150 0)
fi
REPORT_RESERVE=15
DEADLINE=$((START + TOTAL - REPORT_RESERVE))

record() {  # record NAME RC SECONDS LIMIT [SKIPPED_REASON]
    if [ -n "${5:-}" ]; then
        printf '{"name": "%s", "rc": null, "seconds": 0, "limit_s": %s, "skipped": "%s"}\n' "$1" "$4" "$5"
    else
        printf '{"name": "%s", "rc": %s, "seconds": %s, "limit_s": %s}\n' "$1" "$2" "$3" "$4"
    fi >>"$WORK/steps.jsonl"
}

step() {  # step NAME NOMINAL_LIMIT COMMAND...: under timeout, output to OUT/logs/NAME.log
    local name=$1 limit=$2
    shift 2
    local now left
    now=$(date +%s)
    left=$((DEADLINE - now))
    if [ "$limit" -le 0 ] || [ "$limit" -gt "$left" ]; then limit=$left; fi
    if [ "$limit" -lt 10 ]; then
        echo "no time left for $name" >"$OUT/logs/$name.log"
        record "$name" null 0 "$limit" "no time left before the deadline"
        return
    fi
    echo "[$(date +%T)] $name (limit ${limit} s)"
    local t0 t1 rc
    t0=$(date +%s%N)
    DEVICE_CHECK_DEADLINE=$((now + limit - 5)) timeout -k 10 "$limit" "$@" >"$OUT/logs/$name.log" 2>&1
    rc=$?
    t1=$(date +%s%N)
    local ms=$(((t1 - t0) / 1000000))
    record "$name" "$rc" "$((ms / 1000)).$(printf '%03d' $((ms % 1000)))" "$limit"
    echo "[$(date +%T)] $name: exit $rc after $((ms / 1000)) s"
}

if [ "$SMOKE" = 1 ]; then
    echo "cpu smoke: no install, the project venv ($PY)" >"$OUT/logs/install.log"
    record install null 0 0 "cpu smoke: the project venv"
else
    SITE="$WORK/site"
    # The README's install line, with DeepSpeed's sdist built there (no ops: DS_BUILD_OPS=0, against its torch).
    step install "${LIMITS[0]}" bash -c 'set -e; ls -la .whl
        DS_BUILD_OPS=0 python3 -m pip install --no-index --no-deps --no-build-isolation --no-compile \
            --no-cache-dir --upgrade --target "$1" .whl/*.whl .whl/deepspeed-*.tar.gz
        PYTHONPATH="$1:$PYTHONPATH" python3 -c "import deepspeed, webdataset, diffusers, torch
from dtr_scale.inception import import_torch_fidelity
print(\"deepspeed\", deepspeed.__version__, \"torch-fidelity\", import_torch_fidelity().__version__)
print(\"torch\", torch.__version__, \"cuda\", torch.cuda.is_available(), torch.cuda.get_device_name(0))"' _ "$SITE"
    export PYTHONPATH="$SITE:$PYTHONPATH"
fi

step cuda_smoke "${LIMITS[1]}" "$PY" bench/device_check.py step cuda_smoke --work "$WORK" --out "$OUT" $FLAG
step gpu_bench "${LIMITS[2]}" "$PY" bench/device_check.py step gpu_bench --work "$WORK" --out "$OUT" $FLAG
step convergence "${LIMITS[3]}" "$PY" bench/device_check.py step convergence --work "$WORK" --out "$OUT" $FLAG

timeout -k 5 20 "$PY" bench/device_check.py report --work "$WORK" --out "$OUT" $FLAG --started "$START" \
    --budget "$TOTAL" || echo "report failed: see above" >&2
echo "wall $(($(date +%s) - START)) s; files in $OUT:"
find "$OUT" -type f | sort
