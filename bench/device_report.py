"""The device check's output, written down once: `template()` is device_check.json with every key it always has
(the values it holds when nothing ran); the steps fill it in (each writes its section, merged over the template's
by `report`), `SCHEMA` (the dotted paths a test checks) is read off it, and `report` writes device_check.json and
device_check.md.

A measured figure is {"value": number or null, "unit": text}; null where it cannot be had (e.g. MFU on a CPU, which
has no bf16 peak in the table). Step status: "ok" | "failed" | "timed-out" | "skipped".
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

from common import figure, tail, write_json
from device_wheels import CARRY_LIMIT_MIB, tree_mib, versions

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
MAX_FILES = 8  # the GPU machine returns at most 8 files, at most 2 folders deep
NONE = figure(None, "-")


def deadline() -> float:
    """This step's deadline (epoch seconds) from $DEVICE_CHECK_DEADLINE (set by device_check.sh), else 1 hour."""
    return float(os.environ.get("DEVICE_CHECK_DEADLINE") or time.time() + 3600)


def device_type(smoke: bool) -> str:
    """ "cpu" for the smoke, else "cuda" where a GPU is visible."""
    if smoke:
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------------------- the schema


def template() -> dict:
    """device_check.json with every key it always has, valued as when nothing ran."""
    return {
        "schema_version": SCHEMA_VERSION, "cpu_smoke": False, "device": None, "gpu_name": None,
        "host": {"cpus": None, "python": None, "platform": None},
        "versions": {k: None for k in ("python", "torch", "cuda", "deepspeed", "dtr_scale", "diffusers",
                                       "torch_fidelity", "webdataset", "numpy")},
        "started": None, "wall_s": NONE, "budget_s": NONE, "carried_mib": NONE, "files": [],
        "steps": [{"name": name, "status": "skipped", "rc": None, "seconds": None, "limit_s": None,
                   "log": f"logs/{name}.log", "log_tail": ""} for name in STEPS],
        "cuda_smoke": cuda_smoke_template(), "gpu_bench": gpu_bench_template(),
        "convergence": convergence_template(),
    }  # fmt: skip


def cuda_smoke_template() -> dict:
    """The tests marked `cuda`, train / kill-and-resume / convert at each ZeRO stage, 16 samples, and a flow-matching
    run (20 steps, converted, 4 images through the Heun sampler)."""
    zero = [f"zero{z}" for z in ZERO_STAGES]
    resume = {"ok": False, "killed": False, "resumed_from_step": None, "bitwise": False, "max_abs_diff": NONE,
              "losses_equal": False}  # fmt: skip
    return {
        "ok": False,
        "pytest": {"ok": False, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "files": []},
        "train": {z: {"ok": False, "steps": 0, "loss_first": None, "loss_last": None, "img_per_s": NONE,
                      "seconds": None} for z in zero},
        "resume": {**{z: dict(resume) for z in zero}, "noise_floor_max_abs_diff": NONE, "criterion": None,
                   "deterministic_algorithms": True},
        "convert": {z: {"ok": False, "seconds": None} for z in zero},
        "sample": {"ok": False, "images": 0, "image_shape": None, "dtype": None, "seconds": None},
        "flow": {"ok": False, "steps": 0, "loss_first": None, "loss_last": None, "sample_images": 0},
    }  # fmt: skip


def gpu_bench_template() -> dict:
    """DiT-XL/2 speed: four settings (torch.compile x DTR), the FLOPs behind MFU, host syncs per step."""
    setting = {"status": "skipped", "img_per_s": NONE, "mfu_2mac": NONE, "mfu_dit_paper": NONE,
               "peak_memory": NONE, "step_time": NONE}  # fmt: skip
    return {
        "ok": False, "model": None, "precision": None, "zero_stage": 2, "micro_batch": None,
        "flops": {"forward_gflops_2mac": NONE, "forward_gflops_dit_paper": NONE, "backward": None,
                  "peak_tflops": NONE},
        "settings": [{"compile": c, "routing": r, **setting} for c in (False, True) for r in (False, True)],
        "syncs": {k: {"dtr_scale_calls_per_step": None, "device_syncs_per_step": None}
                  for k in ("accumulation_1", "accumulation_4")},
    }  # fmt: skip


def convergence_template() -> dict:
    """The race of VARIANTS on the digits: the first checkpoint reaching each accuracy threshold, final figures."""
    cfgs = [f"cfg{s:g}" for s in CFG_SCALES]
    return {
        "ok": False, "model": {"name": "DiT-S/2", "hidden_size": None, "depth": None, "num_heads": None},
        "variants": VARIANTS, "seeds": SEEDS, "cfg_scales": CFG_SCALES, "thresholds": THRESHOLDS,
        "calibration": {"step_time": NONE, "runs": 0}, "steps": None, "evals": None, "eval_steps": [],
        "train_seconds": NONE, "kid_network": None,
        "crossings": {v: {c: {f"{t:g}": None for t in THRESHOLDS} for c in cfgs} for v in VARIANTS},
        "final": {v: {"step": None, **{f"{m}_{c}": NONE for m in ("class_accuracy", "kid") for c in cfgs}}
                  for v in VARIANTS},
    }  # fmt: skip


def schema_paths(node, prefix: str = "") -> list[str]:
    """The dotted key paths of a template ("a[]" = each list item; a figure, a list of values or a mapping keyed
    by numbers, such as a crossing's thresholds, is one leaf)."""
    if isinstance(node, list) and node and isinstance(node[0], dict):
        return schema_paths(node[0], prefix + "[]")
    keyed = isinstance(node, dict) and node and all(re.fullmatch(r"[A-Za-z_][\w.+-]*", k) for k in node)
    if not keyed or set(node) == {"value", "unit"}:
        return [prefix]
    return [
        p for key, value in node.items() for p in schema_paths(value, f"{prefix}.{key}" if prefix else key)
    ]


SCHEMA = schema_paths(template())


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


def merge(default, found):
    """`found` over `default`, key by key (so a partly written section still has every key)."""
    if isinstance(default, dict) and isinstance(found, dict):
        return {**default, **{k: merge(default.get(k), v) if k in default else v for k, v in found.items()}}
    return found if found is not None else default


# ------------------------------------------------------------------------------------------- the report


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
    defaults = template()
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
              f"Sampled {sample['images']} images {sample['image_shape']} ({sample['dtype']}): samples.png. "
              f"Flow matching (20 steps, Heun): ok {smoke['flow']['ok']}, loss {smoke['flow']['loss_first']} -> "
              f"{smoke['flow']['loss_last']}, {smoke['flow']['sample_images']} images.", ""]  # fmt: skip
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
