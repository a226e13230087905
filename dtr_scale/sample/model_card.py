"""The model card (README.md) of a diffusers folder written by `dtr-scale convert --format diffusers`.

It states what a reader needs to trust and reproduce the weights: the model, the data manifest's identity,
the training step, the DTR and ANT settings, the run's last evaluation figures (the `eval/*` scalars of its
TensorBoard log, read with tensorboard's own EventAccumulator), the command that made the folder, and the
three lines that sample from it.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any


def last_eval_figures(run_dir: str | Path) -> dict[str, tuple[int, float]]:
    """{"eval/kid": (step, value), ...}: the last value of every `eval/*` scalar in RUN_DIR/tensorboard
    (empty when the run has no TensorBoard log or never evaluated)."""
    log_dir = Path(run_dir) / "tensorboard"
    if not log_dir.is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    figures: dict[str, tuple[int, float]] = {}
    for events in sorted({p.parent for p in log_dir.rglob("events.out.tfevents.*")}):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags().get("scalars", []):
            if tag.startswith("eval/"):
                last = accumulator.Scalars(tag)[-1]
                if tag not in figures or last.step >= figures[tag][0]:
                    figures[tag] = (int(last.step), float(last.value))
    return figures


def _routed(config: dict[str, Any]) -> bool:
    return bool(config["routing"]["enabled"]) and float(config["routing"]["beta"]) < 1.0


def _front_matter(config: dict[str, Any]) -> str:
    tags = ["diffusers", "dit", "class-conditional", "dtr-scale"]
    if _routed(config):
        tags.append("dtr-routing")
    return "---\nlibrary_name: diffusers\ntags:\n" + "".join(f"- {t}\n" for t in tags) + "---\n"


def _usage(index: dict[str, Any], out_name: str) -> str:
    needs_dtr = any(isinstance(v, list) and v and str(v[0]).startswith("dtr_scale") for v in index.values())
    first = "import dtr_scale.hf  # registers the dtr-scale classes this folder names\n" if needs_dtr else ""
    return (
        "```python\n"
        f"{first}from diffusers import DiTPipeline\n"
        f'pipe = DiTPipeline.from_pretrained("{out_name}")\n'
        "images = pipe(class_labels=[0, 1, 2], guidance_scale=1.5, num_inference_steps=50).images\n"
        "```\n"
    )


def _settings_table(config: dict[str, Any]) -> str:
    m, r, d, mtl, train = config["model"], config["routing"], config["data"], config["mtl"], config["train"]
    routed = _routed(config)
    rows = [
        ("model", f"{_title(config)}: hidden {m['hidden_size']}, depth {m['depth']}, {m['num_heads']} heads, "
         f"patch {m['patch_size']}, learned sigma {m['learn_sigma']}"),
        ("DTR routing", f"alpha {r['alpha']}, beta {r['beta']}, {r['num_tasks']} tasks" if routed else "off"),
        ("ANT", f"{mtl['method']}, {mtl['num_clusters']} clusters {mtl['clusters']}"),
        ("diffusion", f"{config['diffusion']['noise_schedule']} schedule, {config['diffusion']['diffusion_steps']} steps"),
        ("data manifest", f"{d['manifest']}: {len(d['labels'])} classes, latents {d['latent_shape']}, "
         f"image {d['image_size']}px"),
        ("VAE", json.dumps(d["vae"], sort_keys=True)),
        ("trained", f"step {train['step']}, {train['samples_seen']} samples, run {train['run_dir']} tag {train['tag']}"),
    ]  # fmt: skip
    return "| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)


def _title(config: dict[str, Any]) -> str:
    """'DiT-S/2' when the model has that size's width and depth, else 'DiT (patch 2)' (the name is a layout)."""
    from dtr_scale.models.dit import _SIZES

    m, name = config["model"], config["model"]["name"]
    size = name.split("-")[1].split("/")[0] if name and name.startswith("DiT-") else None
    if size in _SIZES and _SIZES[size][:2] == (m["hidden_size"], m["depth"]):
        return name
    return f"DiT (patch {m['patch_size']})"


def model_card(config: dict[str, Any], index: dict[str, Any], card: dict[str, Any]) -> str:
    """README.md text. `card`: {"command": argv list, "weights": "ema"|"model", "run_dir": path,
    "out_name": folder name for the usage lines, "scheduler": "ddim"|"ddpm"} (all optional)."""
    figures = last_eval_figures(card["run_dir"]) if card.get("run_dir") else {}
    evals = (
        "".join(f"- `{tag}` = {value:.6g} (step {step})\n" for tag, (step, value) in sorted(figures.items()))
        or "- none logged (the run had no `eval.every`, or no TensorBoard log)\n"
    )
    if figures and card.get("eval"):
        evals += f"\n(in-loop evaluation: {card['eval']})\n"
    num_classes = int(config["model"]["num_classes"])
    native = index["transformer"][0] == "diffusers"
    notes = [
        f"DiTPipeline passes class 1000 as the null label: classes are 0..{num_classes - 1}"
        + (f"; labels {num_classes}..999 draw unconditional samples" if native and num_classes < 1000 else "")
        + ".",
        "Guidance is applied to all latent channels (DiTPipeline's rule, and dtr-scale's default).",
    ]
    if native:
        drift = card.get("native_drift") or {}
        measured = (
            f" On these weights the noise prediction is {drift['relative_rms']:.2%} (RMS) and at most "
            f"{drift['max_abs']:.3g} away from the exact one (16 random inputs); sampled images can differ visibly."
            if drift
            else ""
        )
        notes.append(
            "diffusers' DiT embeds timesteps with frequencies exp(-ln(1e4) i/127), dtr-scale and the reference "
            "DiT with exp(-ln(1e4) i/128): the same weights compute another function here."
            + measured
            + " For the exact one, convert with `--transformer-class dtr` (needs dtr_scale to load)."
        )
    if card.get("scheduler") == "ddpm" and config["model"]["learn_sigma"]:
        notes.append("DiTPipeline drops the learned variance: DDPM here uses the posterior variance instead.")
    command = shlex.join(card["command"]) if card.get("command") else "(not recorded)"
    return (
        _front_matter(config)
        + f"\n# {_title(config)} trained with dtr-scale\n\n"
        + f"Weights: {card.get('weights', 'ema')}, stored in {card.get('dtype', 'float32')}. "
        + f"Scheduler: {card.get('scheduler', 'ddim')}.\n\n"
        + _settings_table(config)
        + "\n## Last evaluation figures\n\n"
        + evals
        + "\n## Sampling\n\n"
        + _usage(index, card.get("out_name", "."))
        + "\n## Notes\n\n"
        + "".join(f"- {n}\n" for n in notes)
        + f"\n## Made by\n\n```\n{command}\n```\n"
    )
