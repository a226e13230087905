"""The device check's step `cuda_smoke`: the tests marked `cuda`; `dtr-scale train` of the demo model on the bundled
digits (bf16, DTR + ANT-UW, 20 steps, checkpoints at 10 and 20) at ZeRO-1, 2 and 3, each beside a run that SIGKILLs
itself after step 12 (tests/dtr_scale_testhooks.py) and is resumed from step 10; the resumed run's final weights and
EMA (`dtr-scale convert`, fp32) and logged losses are compared with the straight run's, and a repeat of the ZeRO-2
straight run gives the run-to-run noise floor. All runs use `torch.use_deterministic_algorithms(True,
warn_only=True)` and CUBLAS_WORKSPACE_CONFIG=:4096:8. Then `dtr-scale sample` draws 16 images from the converted
ZeRO-2 model. The host syncs per step (bench/gpu.py --syncs-only) are counted here too, where nothing is timed,
and reported by gpu_bench.
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, figure, log, read_metrics, single_rank_env, stop, tail, write_json
from device_report import ZERO_STAGES, deadline, device_type

TAG = "step00000020"


class Jobs:
    """Runs commands with at most `parallel` at once (a job may wait for another), each logging to its own file,
    all stopped at `stop_at` (epoch seconds). No new process session: `timeout` around the step reaches them."""

    def __init__(self, parallel: int, stop_at: float, log_dir: Path) -> None:
        self.parallel, self.stop_at, self.log_dir = parallel, stop_at, log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.todo: list[dict] = []
        self.results: dict[str, dict] = {}
        self.running: dict[str, tuple] = {}

    def add(self, name: str, command: list[str], env: dict, after: str | None = None) -> None:
        self.todo.append({"name": name, "command": command, "env": env, "after": after})

    def run(self) -> dict[str, dict]:
        """Run every job; {name: {"rc": exit status | "timed-out" | "not run", "seconds", "log"}}."""
        while self.todo or self.running:
            if time.time() > self.stop_at:
                self._give_up()
            self._start_ready()
            self._collect_finished()
            if self.todo and not self.running:  # every running job ended in this poll: start the next ones
                self._start_ready()
                if not self.running:
                    self._give_up()  # what is left waits for a job that never ran
            time.sleep(0.2)
        return self.results

    def _give_up(self) -> None:
        for job in self.todo:
            self.results[job["name"]] = {"rc": "not run", "seconds": 0.0, "log": None}
        self.todo = []

    def _start_ready(self) -> None:
        for job in list(self.todo):
            if len(self.running) >= self.parallel:
                break
            if job["after"] is not None and job["after"] not in self.results:
                continue
            self.todo.remove(job)
            path = self.log_dir / f"{job['name']}.log"
            handle = open(path, "w")  # noqa: SIM115 - closed when the job ends
            proc = subprocess.Popen(
                job["command"], env=job["env"], cwd=REPO, stdout=handle, stderr=subprocess.STDOUT
            )
            self.running[job["name"]] = (proc, handle, time.time(), path)
            log(f"started {job['name']}")

    def _collect_finished(self) -> None:
        for name, (proc, handle, started, path) in list(self.running.items()):
            code = proc.poll()
            if code is None and time.time() > self.stop_at:
                stop(proc, grace=10)
                code = "timed-out"
            if code is not None:
                handle.close()
                self.results[name] = {"rc": code, "seconds": round(time.time() - started, 1), "log": path}
                del self.running[name]
                log(f"finished {name}: rc {code} in {self.results[name]['seconds']} s")


# ----------------------------------------------------------------------------------------- comparisons


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
    """{ok, passed, failed, errors, skipped, files} from pytest's JUnit XML (ok on CUDA needs a passed test)."""
    import xml.etree.ElementTree as ET

    out = {"ok": False, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "files": files}
    if not xml.is_file():
        return out
    root = ET.parse(xml).getroot()
    for suite in [root] if root.tag == "testsuite" else list(root.iter("testsuite")):
        failed, errors, skipped = (int(suite.get(k, 0)) for k in ("failures", "errors", "skipped"))
        out["failed"] += failed
        out["errors"] += errors
        out["skipped"] += skipped
        out["passed"] += int(suite.get("tests", 0)) - failed - errors - skipped
    out["ok"] = out["failed"] == 0 and out["errors"] == 0 and (device != "cuda" or out["passed"] > 0)
    return out


def cuda_test_files() -> list[str]:
    """The test files holding tests marked `cuda`."""
    return sorted(
        str(p.relative_to(REPO))
        for p in (REPO / "tests").glob("test_*.py")
        if "pytest.mark.cuda" in p.read_text()
    )


# ----------------------------------------------------------------------------------------- the step


def train_command(
    work: Path, manifest: str, run_dir: Path, zero: int, smoke: bool, hooks: bool = False
) -> list[str]:
    """`dtr-scale train` of the demo model for 20 steps under deterministic algorithms (`hooks`: the kill hook)."""
    size = ["model.hidden_size=32", "model.depth=1", "model.num_heads=2", "train.global_batch_size=16",
            "train.max_micro_batch_size=16"] if smoke else []  # fmt: skip
    return [
        sys.executable, str(REPO / "bench/device_check.py"), "deterministic",
        "dtr_scale_testhooks" if hooks else "dtr_scale", "train", "--config", str(REPO / "configs/demo-cpu.yaml"),
        f"run_dir={run_dir}", f"data.shards={manifest}", f"deepspeed.zero_stage={zero}", "train.max_steps=20",
        "train.checkpoint_every=10", "train.precision=bf16", "routing.enabled=true", "mtl.method=uw",
        "train.log_every=1", "monitor.sample_every=0", "eval.every=0", "monitor.progress=false",
        "monitor.tensorboard=false", "data.num_workers=0", *size,
    ]  # fmt: skip


def queue_jobs(work: Path, device: str, smoke: bool, stop_at: float) -> Jobs:
    """The runs of the step: crashes first, each resume as soon as its crash is done, then the rest (the order
    matters only where jobs wait for a slot, as in the CPU smoke)."""
    from dtr_scale.data.builtin import prepare_builtin

    manifest = prepare_builtin(work / "digits16", image_size=16)["train"]
    runs = work / "runs"
    # convert and sample come after the jobs: ~25 s on the GPU machine, ~10 s for the smoke's tiny model
    jobs = Jobs(2 if device == "cpu" else 16, stop_at - (12 if smoke else 25), work / "logs" / "cuda_smoke")

    def env(**extra: str) -> dict[str, str]:
        fixed = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
        return single_rank_env(device, {**fixed, **extra}, tests=True)

    for zero in ZERO_STAGES:
        crashed = train_command(work, manifest, runs / f"crashed-zero{zero}", zero, smoke, hooks=True)
        jobs.add(f"crash-zero{zero}", crashed, env(DTR_TEST_KILL_AFTER_STEP="12"))
    for zero in ZERO_STAGES:
        resume = train_command(work, manifest, runs / f"crashed-zero{zero}", zero, smoke)
        jobs.add(f"resume-zero{zero}", resume, env(), after=f"crash-zero{zero}")
    syncs = [sys.executable, str(REPO / "bench/gpu.py"), "--syncs-only", "--device", device, "--json",
             str(work / "syncs.json"), "--deadline", str(jobs.stop_at - 2)]  # fmt: skip
    jobs.add("syncs", syncs, {**os.environ, "DS_ACCELERATOR": device})
    for name, zero in [*((f"straight-zero{z}", z) for z in ZERO_STAGES), ("repeat-zero2", 2)]:
        jobs.add(name, train_command(work, manifest, runs / name, zero, smoke), env())
    flow = [*train_command(work, manifest, runs / "flow-zero2", 2, smoke), "diffusion.objective=flow"]
    jobs.add("flow-zero2", flow, env())
    pytest_cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                  f"--junitxml={work / 'pytest.xml'}", *cuda_test_files()]  # fmt: skip
    jobs.add("pytest", pytest_cmd, env())
    return jobs


def convert(work: Path, name: str) -> dict:
    """`convert_checkpoint` of run `name` at step 20 into work/models/NAME: {ok, seconds[, error]}."""
    from dtr_scale.sample.convert import convert_checkpoint

    started = time.time()
    try:
        convert_checkpoint(work / "runs" / name, work / "models" / name, tag=TAG)
        return {"ok": True, "seconds": round(time.time() - started, 2)}
    except Exception as err:  # noqa: BLE001 - reported, not raised: the other checks still run
        return {"ok": False, "seconds": round(time.time() - started, 2), "error": repr(err)[:500]}


def train_record(work: Path, name: str, result: dict) -> dict:
    """The straight run's section: reached step 20, first and last loss, images/s."""
    metrics = read_metrics(work / "runs" / name / "metrics.jsonl")
    rates = [m["perf/img_per_s_per_device"] for m in metrics[2:] if "perf/img_per_s_per_device" in m]
    return {
        "ok": result.get("rc") == 0 and bool(metrics) and metrics[-1]["step"] == 20,
        "steps": metrics[-1]["step"] if metrics else 0,
        "loss_first": metrics[0].get("loss/mean") if metrics else None,
        "loss_last": metrics[-1].get("loss/mean") if metrics else None,
        "img_per_s": figure(statistics.median(rates) if rates else None, "images/s (median of steps 3-20)"),
        "seconds": result.get("seconds"),
    }


def resume_records(work: Path, results: dict) -> dict:
    """Each stage's kill-and-resume against its straight run, judged against the noise floor of two straight runs."""
    runs, models = work / "runs", work / "models"
    noise_bitwise, noise = (False, None)
    if results.get("repeat-zero2", {}).get("rc") == 0 and convert(work, "repeat-zero2")["ok"]:
        noise_bitwise, noise = compare_model_dirs(models / "straight-zero2", models / "repeat-zero2")
    records = {}
    for zero in ZERO_STAGES:
        resume_log = tail(work / "logs" / "cuda_smoke" / f"resume-zero{zero}.log", 200_000)
        found = re.search(r"resumed from \S+ at step (\d+)", resume_log)
        record = {
            "killed": results.get(f"crash-zero{zero}", {}).get("rc") == -signal.SIGKILL,
            "resumed_from_step": int(found.group(1)) if found else None,
            "bitwise": False,
            "max_abs_diff": figure(None, "max |w_resumed - w_straight| over fp32 weights and EMA"),
            "losses_equal": losses_equal(read_metrics(runs / f"straight-zero{zero}" / "metrics.jsonl"),
                                         read_metrics(runs / f"crashed-zero{zero}" / "metrics.jsonl")),
        }  # fmt: skip
        a, b = models / f"straight-zero{zero}", models / f"crashed-zero{zero}"
        if (a / "config.json").is_file() and (b / "config.json").is_file():
            record["bitwise"], record["max_abs_diff"]["value"] = compare_model_dirs(a, b)
        diff = record["max_abs_diff"]["value"]
        within = record["bitwise"] or (
            noise is not None and not noise_bitwise and diff is not None and diff <= 4 * noise
        )
        # Bitwise-equal weights must come with equal logged losses; within the noise floor, losses may differ too.
        record["ok"] = bool(record["killed"] and record["resumed_from_step"] == 10 and within
                            and (record["losses_equal"] or not record["bitwise"]))  # fmt: skip
        records[f"zero{zero}"] = record
    records["noise_floor_max_abs_diff"] = figure(
        noise, "max |w| difference of two straight ZeRO-2 runs (0: the runs are bitwise reproducible)"
    )
    records["criterion"] = (
        "resumed (SIGKILL after step 12, resume from the step-10 checkpoint) == straight at step 20: bitwise, or, "
        "when two straight runs already differ (non-deterministic kernels), a max |difference| of the fp32 "
        "weights and EMA within 4x that run-to-run difference"
    )
    records["deterministic_algorithms"] = True
    return records


def sample_images(work: Path, out: Path, device: str, smoke: bool, stop_at: float) -> dict:
    """16 images from the converted ZeRO-2 model through the CLI; OUT/samples.png."""
    import numpy as np

    started, model = time.time(), work / "models" / "straight-zero2"
    sample = {"ok": False, "images": 0, "image_shape": None, "dtype": None, "seconds": None}
    if (model / "config.json").is_file():
        command = [sys.executable, "-m", "dtr_scale", "sample", "--model", str(model), "--out", str(work / "samples"),
                   "--num-samples", "16", "--batch-size", "16", "--steps", "5" if smoke else "25", "--sampler",
                   "ddim", "--cfg-scale", "3", "--classes", ",".join(str(i % 10) for i in range(16)), "--seed", "0"]  # fmt: skip
        env = {
            k: v
            for k, v in single_rank_env(device, tests=True).items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")
        }
        env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CUBLAS_WORKSPACE_CONFIG=":4096:8")
        try:
            done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True,
                                  timeout=max(5.0, stop_at - time.time() - 5))  # fmt: skip
            print(done.stdout[-2000:] + done.stderr[-2000:], flush=True)
        except subprocess.TimeoutExpired:
            print("sampling timed out", flush=True)
        npz = work / "samples" / "samples.npz"
        if npz.is_file():
            images = np.load(npz)["arr_0"]
            sample.update(
                images=int(len(images)), image_shape=list(images.shape[1:]), dtype=str(images.dtype)
            )
            sample["ok"] = len(images) == 16 and images.dtype == np.uint8
            save_grid(images, out / "samples.png")
    sample["seconds"] = round(time.time() - started, 1)
    return sample


def flow_record(work: Path, results: dict, device: str, smoke: bool, stop_at: float) -> dict:
    """The flow-matching run (diffusion.objective=flow, ZeRO-2 bf16, 20 steps): trained, converted, and 4
    images drawn through `dtr-scale sample --sampler heun`."""
    import numpy as np

    metrics = [
        row for row in read_metrics(work / "runs" / "flow-zero2" / "metrics.jsonl") if "loss/mean" in row
    ]
    record = {
        "ok": False,
        "steps": metrics[-1]["step"] if metrics else 0,
        "loss_first": metrics[0].get("loss/mean") if metrics else None,
        "loss_last": metrics[-1].get("loss/mean") if metrics else None,
        "sample_images": 0,
    }
    trained = results.get("flow-zero2", {}).get("rc") == 0 and record["steps"] == 20
    if trained and convert(work, "flow-zero2")["ok"]:
        out = work / "flow_samples"
        command = [sys.executable, "-m", "dtr_scale", "sample", "--model", str(work / "models" / "flow-zero2"),
                   "--out", str(out), "--num-samples", "4", "--batch-size", "4", "--steps", "3" if smoke else "25",
                   "--sampler", "heun", "--cfg-scale", "3", "--classes", "0,1,2,3"]  # fmt: skip
        env = {
            k: v
            for k, v in single_rank_env(device, tests=True).items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")
        }
        env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        try:
            subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True,
                           timeout=max(5.0, stop_at - time.time() - 3))  # fmt: skip
        except subprocess.TimeoutExpired:
            print("flow sampling timed out", flush=True)
        if (out / "samples.npz").is_file():
            record["sample_images"] = int(len(np.load(out / "samples.npz")["arr_0"]))
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


def step_cuda_smoke(work: Path, out: Path, smoke: bool) -> dict:
    """Run the step; its section of device_check.json, also written to WORK/cuda_smoke.json as it grows."""
    device, stop_at = device_type(smoke), deadline()
    state: dict = {"ok": False, "device": device}
    state_path = work / "cuda_smoke.json"
    write_json(state_path, state)
    jobs = queue_jobs(work, device, smoke, stop_at)
    results = jobs.run()
    state["jobs"] = {k: {"rc": v["rc"], "seconds": v["seconds"]} for k, v in results.items()}
    state["pytest"] = pytest_summary(work / "pytest.xml", cuda_test_files(), device)
    state["train"], state["convert"] = {}, {}
    for zero in ZERO_STAGES:
        name = f"straight-zero{zero}"
        state["train"][f"zero{zero}"] = train_record(work, name, results.get(name, {}))
        state["convert"][f"zero{zero}"] = convert(work, name)
        convert(work, f"crashed-zero{zero}")
    state["resume"] = resume_records(work, results)
    write_json(state_path, state)
    state["sample"] = sample_images(work, out, device, smoke, stop_at)
    state["flow"] = flow_record(work, results, device, smoke, stop_at)
    state["ok"] = bool(
        state["pytest"]["ok"]
        and all(t["ok"] for t in state["train"].values())
        and all(state["resume"][f"zero{z}"]["ok"] for z in ZERO_STAGES)
        and all(c["ok"] for c in state["convert"].values())
        and state["sample"]["ok"]
        and state["flow"]["ok"]
    )
    write_json(state_path, state)
    for name, result in results.items():  # every sub-log's end into this step's log
        if result.get("log"):
            print(f"\n----- {name}: rc {result['rc']}, {result['seconds']} s\n{tail(result['log'], 1500)}")
    print(
        json.dumps(
            {k: state[k] for k in ("pytest", "train", "resume", "sample", "flow")}, indent=1, default=str
        )
    )
    return state
