"""The device check's step `gpu_bench`: bench/gpu.py on DiT-XL/2 (configs/dit-xl2-dtr-ant.yaml, bf16, ZeRO-2,
micro-batch 32, synthetic 4x32x32 latents): images/s, MFU and peak memory with torch.compile off/on x DTR on/off,
one setting at a time; and the host syncs per optimizer step that cuda_smoke counted (bench/gpu.py --syncs-only).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from common import REPO, figure, log, write_json
from device_report import deadline, device_type

XL2_FORWARD_GFLOPS_DIT_PAPER = 118.6  # DiT paper, Table 4: DiT-XL/2 at 256x256 (multiply-accumulates)


def run_gpu_py(work: Path, device: str, smoke: bool, micro: int) -> dict:
    """bench/gpu.py's JSON document ({} when it wrote none)."""
    raw = work / "gpu_bench_raw.json"
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
    subprocess.run(
        command, cwd=REPO, env=dict(os.environ, DS_ACCELERATOR=device, OMP_NUM_THREADS=threads), check=False
    )
    return json.loads(raw.read_text()) if raw.is_file() else {}


def setting_entry(
    found: dict | None, compiled: bool, routing: bool, smoke: bool, device: str, peak_text: str
) -> dict:
    """One (compile, DTR) setting of the section, from bench/gpu.py's record of it (None: not reached)."""
    entry: dict = {"compile": compiled, "routing": routing}
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
    return entry


def flops(peak: float | None) -> dict:
    """The FLOP counts behind MFU, in both conventions."""
    return {
        "forward_gflops_2mac": figure(2 * XL2_FORWARD_GFLOPS_DIT_PAPER, "GFLOPs per 256x256 image, 2 x MACs"),
        "forward_gflops_dit_paper": figure(
            XL2_FORWARD_GFLOPS_DIT_PAPER, "GFLOPs per 256x256 image as the DiT paper counts them (MACs)"
        ),
        "backward": "2 x forward (3 x forward per trained image); activation checkpointing off, so no recompute",
        "peak_tflops": figure(peak, "TFLOP/s dense bf16 (dtr_scale.train.monitor.PEAK_TFLOPS)"),
    }


def step_gpu_bench(work: Path, out: Path, smoke: bool) -> dict:
    """Run the step; its section of device_check.json (also WORK/gpu_bench.json)."""
    from dtr_scale.train.monitor import PEAK_TFLOPS

    device, micro = device_type(smoke), 8 if smoke else 32
    document = run_gpu_py(work, device, smoke, micro)
    name = peak = None
    if device == "cuda":
        import torch

        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    peak_text = f"{peak:g} TFLOP/s dense bf16" if peak else "the peak (none known for this device: no MFU)"
    recorded = document.get("settings", [])
    settings = [
        setting_entry(next((s for s in recorded if s["compile"] == c and s["routing"] == r), None), c, r, smoke,
                      device, peak_text)
        for c in (False, True) for r in (False, True)
    ]  # fmt: skip
    synced = (
        work / "syncs.json"
    )  # counted by bench/gpu.py --syncs-only during cuda_smoke, where nothing is timed
    syncs = json.loads(synced.read_text()).get("syncs", {}) if synced.is_file() else {}
    for key in ("accumulation_1", "accumulation_4"):
        syncs.setdefault(key, {"error": "not measured"})
        syncs[key].setdefault("dtr_scale_calls_per_step", None)
        syncs[key].setdefault("device_syncs_per_step", None)
    state = {
        "ok": bool(settings) and all(s["status"] in ("ok",) or (smoke and s["compile"]) for s in settings)
        and all(syncs[k].get("dtr_scale_calls_per_step") == 1.0 for k in ("accumulation_1", "accumulation_4")),
        "device": device,
        "gpu_name": name,
        "model": "DiT-XL/2 (configs/dit-xl2-dtr-ant.yaml)" + (", smoke: depth 1, hidden 64" if smoke else ""),
        "precision": "bf16" if device == "cuda" else "fp32",
        "zero_stage": 2,
        "micro_batch": micro,
        "flops": flops(peak),
        "settings": settings,
        "syncs": syncs,
    }  # fmt: skip
    write_json(work / "gpu_bench.json", state)
    print(json.dumps(state, indent=1), flush=True)
    return state
