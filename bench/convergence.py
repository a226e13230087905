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
The encoder runs on the fly (default), or with `--repa-features precomputed` the built-in digits store its
targets once (`prepare-builtin --repa-encoder`) and training reads them: the two give the same runs up to the
targets' float16 storage.

At `--evals` evenly spaced checkpoints each run is converted (`convert_checkpoint`, EMA weights), sampled
class-conditionally (DDIM, or `--flow-sampler` for flow runs; CFG) and scored: KID against real reference images (Inception pool3 features,
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

import convergence_args
import numpy as np
from common import stop, write_json
from convergence_args import HEAD_DIM, REPA_VARIANTS, VARIANTS
from convergence_scores import Scorer, describe, label, report, train_seconds_at


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """bench/convergence.py's options (convergence_args.py)."""
    return convergence_args.parse_args(argv, description=__doc__.split("\n\n")[0])


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


def run_one(args, manifest: Path, variant: str, width: int, seed: int, scorer: Scorer, num_classes: int,
            objective: str = "ddpm"):  # fmt: skip
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
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        try:
            returncode = proc.wait(timeout=args.train_seconds)
        except subprocess.TimeoutExpired:  # --train-seconds: stop it; its finished checkpoints are scored
            stopped = True
            stop(proc, grace=30)
            returncode = proc.returncode
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
        record = {"variant": label(variant, objective), "objective": objective, "width": width, "seed": seed,
                  "step": step}  # fmt: skip
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


# ------------------------------------------------------------------------------------------- main


def training_data(args: argparse.Namespace, out: Path) -> tuple[Path, dict | None]:
    """(the training manifest, the built-in digits' {"train", "heldout"} manifests or None for the user's data)."""
    from dtr_scale.data.builtin import prepare_builtin

    if args.manifest is not None:
        return Path(args.manifest).resolve(), None
    encoder = args.repa_encoder if args.repa_features == "precomputed" else None
    data = prepare_builtin(out / "data", image_size=16, repa_encoder=encoder)
    return Path(data["train"]).resolve(), data


def load_results(args: argparse.Namespace, results_path: Path) -> dict:
    """OUT/results.json of an interrupted benchmark with these settings (or a new one); refuses other settings.
    More seeds or variants continue it (the settings then list every seed and variant run)."""
    document = json.loads(results_path.read_text()) if results_path.is_file() else {"records": []}
    modes = ("out", "jobs", "keep_runs", "report", "report_only")  # how it runs, not what it measures
    settings = {k: v for k, v in vars(args).items() if k not in modes}
    saved = {k: v for k, v in document.get("settings", settings).items() if k not in modes}
    old = {"repa_features": "on-the-fly", **saved}  # from before the option
    grown = ("seeds", "variants")
    if {k: v for k, v in old.items() if k not in grown} != {
        k: v for k, v in settings.items() if k not in grown
    }:
        raise SystemExit(f"{results_path} holds results of other settings; use another --out")
    for key in grown:
        settings[key] = list(dict.fromkeys([*old[key], *settings[key]]))
    document["settings"] = settings
    return document


def reference_features(args: argparse.Namespace, out: Path, scorer: Scorer, data: dict | None):
    """Inception features of the KID reference, computed once per benchmark (cached in OUT)."""
    import torch

    from dtr_scale.data.builtin import heldout_images
    from dtr_scale.metrics import load_images

    cache = out / "reference_features.npy"
    if cache.is_file():
        return torch.from_numpy(np.load(cache))
    if args.reference is None:
        reference = heldout_images(Path(data["heldout"]), rgb=True)
    else:
        reference, _ = load_images(args.reference, "reference")
    step = max(1, len(reference) // args.reference_size)  # an even spread (the held-out split is ordered)
    reference = reference[::step][: args.reference_size]
    print(f"reference: {len(reference)} real images -> Inception features", flush=True)
    features = scorer.features(reference)
    np.save(cache, features.numpy())
    return features


def train_all(
    args, document: dict, results_path: Path, manifest: Path, scorer: Scorer, num_classes: int
) -> None:
    """Train and score every run not in the results yet, --jobs at a time; the results are saved as runs finish."""
    import torch

    records: list[dict] = document["records"]
    done = {(r["variant"], r["width"], r["seed"]) for r in records}
    todo = [(v, w, s, o) for w in args.widths for s in args.seeds for o in args.objectives for v in args.variants
            if (label(v, o), w, s) not in done]  # fmt: skip
    print(f"{len(todo)} runs to train ({len(done)} done already), {args.jobs} at a time", flush=True)
    started = time.time()

    def save() -> None:
        document["machine"] = {
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads_per_run": args.threads,
        }
        document["command"] = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
        now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        document["date"] = (
            f"{document.get('date', now).split(' to ')[0]} to {now}"  # first start to last save
        )
        write_json(results_path, document)

    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {
            pool.submit(run_one, args, manifest, v, w, s, Scorer(args, scorer.reference_features, scorer.judge),
                        num_classes, o): (v, w, s, o)
            for v, w, s, o in todo
        }  # fmt: skip
        for future in concurrent.futures.as_completed(futures):
            new = future.result()
            records.extend(new)
            save()
            name, elapsed = run_name(*futures[future]), time.time() - started
            if not new:  # --train-seconds stopped it before its first planned checkpoint
                print(f"[{elapsed:6.0f} s] {name}: no checkpoint reached", flush=True)
                continue
            last = new[-1]
            acc = f", class accuracy {100 * last['class_accuracy']:.1f}%" if "class_accuracy" in last else ""
            print(f"[{elapsed:6.0f} s] {name}: KID {last['kid']:.4f}{acc} at step {last['step']}", flush=True)
    save()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.report:
        from convergence_report import main as report_main

        return report_main([])
    if args.report_only:
        records = json.loads((out / "results.json").read_text())["records"]
        report(records, out, describe(records), list(VARIANTS))
        return 0
    import torch

    from dtr_scale.data.shards import load_manifest

    if args.threads:
        torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    document = load_results(args, results_path)  # other settings are refused before any data is touched
    manifest, data = training_data(args, out)
    judge = None
    if args.judge == "digits" or (args.judge == "auto" and data is not None):
        from dtr_scale.sample.digits import DigitClassifier

        judge = DigitClassifier.fit_builtin(image_size=16)
    scorer = Scorer(args, None, judge)
    scorer.reference_features = reference_features(args, out, scorer, data)
    train_all(args, document, results_path, manifest, scorer, len(load_manifest(manifest).labels))
    records = document["records"]
    report(records, out, describe(records), list(VARIANTS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
