"""Scoring a convergence run's checkpoints and summarising the scores (bench/convergence.py).

`Scorer` converts a checkpoint (EMA weights), samples it class-conditionally (DDIM, CFG) and scores the samples:
KID against real reference images (Inception pool3 features, torch-fidelity's estimator) and, on the built-in
digits, the demo's class accuracy (sample/digits.py). `summarise` / `steps_to_reach` read the records; `report`
writes OUT/table.md and OUT/convergence.png (metric vs steps, seed mean and min-max band).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np
from common import read_metrics


def resolve_device(choice: str) -> str:
    """cpu or cuda for --device (auto: $DS_ACCELERATOR when set, else cuda where torch sees a GPU)."""
    if choice != "auto":
        return choice
    accelerator = os.environ.get("DS_ACCELERATOR")
    if accelerator in ("cpu", "cuda"):
        return accelerator
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cfg_suffix(scale: float) -> str:
    """Record-key suffix of an extra guidance scale: 1.5 -> "_cfg1.5"."""
    return f"_cfg{scale:g}"


class Scorer:
    """Samples a checkpoint's EMA weights and scores them (KID, and class accuracy on the digits)."""

    def __init__(self, args: argparse.Namespace, reference_features, judge) -> None:
        self.args = args
        self.reference_features = reference_features
        self.judge = judge
        self._extractor = None
        self.device = resolve_device(getattr(args, "device", "cpu"))

    def features(self, images: np.ndarray):
        from dtr_scale.metrics import extract_features, inception_extractor, load_inception_weights

        if self._extractor is None:
            state, _ = load_inception_weights(getattr(self.args, "inception_weights", None))
            self._extractor = inception_extractor(state, ("2048",))
        return extract_features(images, self._extractor, device=self.device)["2048"]

    def score(self, run_dir: Path, tag: str, num_classes: int) -> dict:
        from dtr_scale.compat import ensure_torchvision_importable

        ensure_torchvision_importable()  # torch-fidelity imports torchvision (cached reference features: first here)
        from torch_fidelity.metric_kid import kid_features_to_metric

        from dtr_scale.sample.convert import convert_checkpoint
        from dtr_scale.sample.sampler import sample_to_dir

        a = self.args
        model_dir = convert_checkpoint(run_dir, run_dir / "eval" / f"model-{tag}", tag=tag)
        flow = json.loads((model_dir / "config.json").read_text())["diffusion"].get("objective") == "flow"
        classes = [i % num_classes for i in range(a.samples)]  # an even spread over the classes
        record: dict = {}
        # The first scale's keys are plain (kid, class_accuracy); each extra scale's carry its suffix.
        scales = [(a.cfg_scale, "")] + [(s, cfg_suffix(s)) for s in getattr(a, "extra_cfg_scales", [])]
        for cfg_scale, suffix in scales:
            sample_dir = run_dir / "eval" / f"samples-{tag}{suffix}"
            sample_to_dir(
                model_dir,
                sample_dir,
                num_samples=a.samples,
                batch_size=a.samples,
                steps=a.sample_steps,
                sampler=getattr(a, "flow_sampler", "heun") if flow else "ddim",
                cfg_scale=cfg_scale,
                classes=classes,
                seed=0,
                device=self.device,
            )
            images = np.load(sample_dir / "samples.npz")["arr_0"]
            shutil.rmtree(sample_dir / "images", ignore_errors=True)  # keep the npz, drop the PNGs
            step = max(1, len(images) // a.kid_samples)
            scored = images[::step][: a.kid_samples]
            fake = self.features(scored)
            subset = min(len(fake), len(self.reference_features))
            kid = kid_features_to_metric(
                fake, self.reference_features, kid_subsets=100, kid_subset_size=subset, verbose=False
            )
            record[f"kid{suffix}"] = float(kid["kernel_inception_distance_mean"])
            record[f"kid_std{suffix}"] = float(kid["kernel_inception_distance_std"])
            if not suffix:
                record["kid_samples"] = len(scored)
            if self.judge is not None:
                record[f"class_accuracy{suffix}"] = float(self.judge.accuracy(images, classes))
        shutil.rmtree(model_dir)
        return record


def train_seconds_at(metrics_path: Path) -> dict[int, float]:
    """step -> cumulative seconds of optimizer steps (perf/step_time_s x log interval), from metrics.jsonl."""
    seconds, last_step, out = 0.0, 0, {}
    for row in read_metrics(metrics_path):
        if "perf/step_time_s" not in row:  # a skipped step's own record: its time is in the next full one
            continue
        step = int(row["step"])
        seconds += float(row["perf/step_time_s"]) * (step - last_step)
        last_step = step
        out[step] = seconds
    return out


# ------------------------------------------------------------------------------------------- summary


def label(variant: str, objective: str) -> str:
    """The record's variant name: the variant for ddpm (as before objectives existed), flow-VARIANT for flow."""
    return variant if objective == "ddpm" else f"{objective}-{variant}"


def base_variant(name: str) -> str:
    """The variant of a record's name (flow-dtr -> dtr)."""
    return name.split("-", 1)[1] if name.startswith("flow-") else name


CROSSINGS = (0.25, 0.5, 0.75, 0.9)


def crossing_table(records: list[dict], rank) -> list[str]:
    """Per class-accuracy metric and width: the first scored step whose seed mean reaches 25/50/75/90%."""
    lines = []
    for metric in (m for m in metric_keys(records) if m.startswith("class_accuracy")):
        summary = summarise(records, metric)
        for width in sorted({w for _, w in summary}):
            lines += [f"**{metric}**, width {width}: first scored step whose seed mean reaches each level", "",
                      "| variant | " + " | ".join(f"{100 * c:.0f}%" for c in CROSSINGS) + " |",
                      "|---" * (len(CROSSINGS) + 1) + "|"]  # fmt: skip
            for (variant, w), curve in sorted(summary.items(), key=lambda kv: rank(kv[0][0])):
                if w == width:
                    cells = [steps_to_reach(curve, c, False) or "-" for c in CROSSINGS]
                    lines.append(f"| {variant} | " + " | ".join(str(c) for c in cells) + " |")
            lines.append("")
    return lines


def summarise(records: list[dict], metric: str) -> dict:
    """(variant, width) -> step -> (mean, min, max, n) of `metric` over seeds."""
    table: dict = {}
    for r in records:
        if metric in r:
            table.setdefault((r["variant"], r["width"]), {}).setdefault(r["step"], []).append(r[metric])
    return {
        key: {
            s: (float(np.mean(v)), float(np.min(v)), float(np.max(v)), len(v))
            for s, v in sorted(steps.items())
        }
        for key, steps in table.items()
    }


def steps_to_reach(curve: dict, target: float, lower_is_better: bool) -> int | None:
    """First evaluated step whose seed-mean reaches `target` (None: never within the budget)."""
    for step, (mean, *_rest) in sorted(curve.items()):
        if (mean <= target) if lower_is_better else (mean >= target):
            return step
    return None


def metric_keys(records: list[dict]) -> list[str]:
    """The scored metrics present: kid, class_accuracy, then those of --extra-cfg-scales (kid_cfgS, ...)."""
    extra = sorted({k for r in records for k in r if k.startswith(("kid_cfg", "class_accuracy_cfg"))})
    return [m for m in ("kid", "class_accuracy") if any(m in r for r in records)] + extra


def write_table(records: list[dict], out: Path, header: str, order: list[str]) -> str:
    """OUT/table.md: `table_text`, written to `out` and returned."""
    text = table_text(records, header, order)
    out.write_text(text)
    return text


def table_text(records: list[dict], header: str, order: list[str]) -> str:
    """Per metric and width, each variant's seed mean [min, max] per step (rows in `order`), the crossing tables
    and the training seconds, as markdown."""
    rank = ranker(order)
    metrics = [(m, m.startswith("kid")) for m in metric_keys(records)]
    lines = [header, ""]
    for metric, lower in metrics:
        summary = summarise(records, metric)
        if not summary:
            continue
        widths = sorted({w for _, w in summary})
        steps = sorted({s for curve in summary.values() for s in curve})
        for width in widths:
            finals = {
                v: c[max(c)][0]
                for (v, w), c in summary.items()
                if w == width and base_variant(v) == "vanilla"
            }
            lines.append(
                f"**{metric}** ({'lower' if lower else 'higher'} is better), width {width}: seed mean "
                f"[min, max]; last column = first step reaching vanilla's final value"
            )
            lines.append("")
            lines.append(
                "| variant | " + " | ".join(f"step {s}" for s in steps) + " | reaches vanilla's final |"
            )
            lines.append("|---" * (len(steps) + 2) + "|")
            for (variant, w), curve in sorted(summary.items(), key=lambda kv: rank(kv[0][0])):
                if w != width:
                    continue
                cells = []
                for s in steps:
                    if s in curve:
                        mean, lo, hi, n = curve[s]
                        cells.append(
                            f"{mean:.4f} [{lo:.4f}, {hi:.4f}]"
                            if metric.startswith("kid")
                            else f"{100 * mean:.1f}% [{100 * lo:.0f}, {100 * hi:.0f}]"
                        )
                    else:
                        cells.append("-")
                target = finals.get(label("vanilla", "flow" if variant.startswith("flow-") else "ddpm"))
                reach = (
                    steps_to_reach(curve, target, lower) if target is not None else None
                )  # own objective's
                lines.append(
                    f"| {variant} | " + " | ".join(cells) + f" | {reach if reach else 'not reached'} |"
                )
            lines.append("")
    lines += crossing_table(records, rank)
    lines += seconds_table(records, rank)
    return "\n".join(lines) + "\n"


def seconds_table(records: list[dict], rank) -> list[str]:
    """Markdown lines: each variant's training seconds for the whole budget (seed mean) and its ratio to vanilla."""
    seconds: dict[tuple[str, int], list[float]] = {}
    for r in records:
        if r["step"] == max(x["step"] for x in records) and r.get("train_seconds"):
            seconds.setdefault((r["variant"], r["width"]), []).append(r["train_seconds"])
    if not seconds:
        return []
    lines = ["Training seconds for the whole budget (seed mean; compute per step ~ equal when the same):", ""]
    lines += ["| variant | width | seconds | relative to vanilla |", "|---|---|---|---|"]
    for (variant, width), values in sorted(seconds.items(), key=lambda kv: (kv[0][1], rank(kv[0][0]))):
        base = seconds.get(("vanilla", width))
        rel = f"{np.mean(values) / np.mean(base):.2f}x" if base else "-"
        lines.append(f"| {variant} | {width} | {np.mean(values):.0f} | {rel} |")
    return lines


def ranker(order: list[str]):
    """Sort key of a variant: its place in `order` (others last), flow-VARIANT after every ddpm variant."""

    def rank(variant: str) -> int:
        base = base_variant(variant)
        return (order.index(base) if base in order else len(order)) + (len(order) + 1) * variant.startswith(
            "flow-"
        )

    return rank


def plot(records: list[dict], path: Path, order: list[str]) -> None:
    """The metric-vs-steps figure: one panel per metric and width, a line and min-max band per variant."""
    rank = ranker(order)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = metric_keys(records)
    widths = sorted({r["width"] for r in records})
    fig, axes = plt.subplots(
        len(metrics), len(widths), figsize=(5.2 * len(widths), 3.8 * len(metrics)), squeeze=False
    )
    colors = dict(zip(order, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 2))
    for i, metric in enumerate(metrics):
        summary = summarise(records, metric)
        for j, width in enumerate(widths):
            ax = axes[i][j]
            for (variant, w), curve in sorted(summary.items(), key=lambda kv: rank(kv[0][0])):
                if w != width:
                    continue
                steps = list(curve)
                mean = [curve[s][0] for s in steps]
                lo = [curve[s][1] for s in steps]
                hi = [curve[s][2] for s in steps]
                n = max(curve[s][3] for s in steps)
                base = base_variant(variant)
                style = "--" if base.startswith("dtr") else "-"
                marker = "s" if variant.startswith("flow-") else "o"
                color = colors.get(base)
                ax.plot(steps, mean, style, marker=marker, ms=3, color=color, label=f"{variant} (n={n})")
                ax.fill_between(steps, lo, hi, color=color, alpha=0.15)
            ax.set_title(f"width {width}: {metric.replace('_', ' ')}")
            ax.set_xlabel("optimizer steps")
            kid = metric.startswith("kid")
            label = {"kid": "KID", "class_accuracy": "class accuracy"}.get(metric, metric)
            ax.set_ylabel(f"{label} ({'lower' if kid else 'higher'} is better)")
            if kid:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle("EMA samples: seed mean, band = min-max over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(records: list[dict], out: Path, header: str, order: list[str]) -> None:
    """Write OUT/table.md and OUT/convergence.png from the records (variants in `order`), and print the table."""
    print(write_table(records, out / "table.md", header, order))
    plot(records, out / "convergence.png", order)
    print(f"results: {out / 'results.json'}; plot: {out / 'convergence.png'}; table: {out / 'table.md'}")


def describe(records: list[dict]) -> str:
    """One line naming what the records hold (steps, checkpoints, seeds per width)."""
    steps = sorted({r["step"] for r in records})
    per_width: dict[int, set] = {}
    for r in records:
        per_width.setdefault(r["width"], set()).add(r["seed"])
    seeds = "; ".join(f"width {w}: seeds {sorted(s)}" for w, s in sorted(per_width.items()))
    return f"Convergence benchmark: EMA samples scored at steps {steps}; {seeds}"
