"""Which run-config keys may change when a run resumes, and how a change is applied; every other key is refused.

A key may change only if `CHANGEABLE` lists it, exactly or through its section (`monitor.*`). Everything else is
refused, including any key the schema gains later (a new `diffusion.*` or `model.*` key is refused until it is
listed here): a key that defines what is trained (the model's shape, DTR routing, the diffusion objective and
schedule, ANT's clusters and balancer, the data, the seed, the optimizer's state layout) cannot change under a
checkpoint without silently training something else. docs/resume.md renders both lists (`resume_markdown`);
a test keeps it current. Pure: no torch, no files.
"""

from __future__ import annotations

from typing import Any

# key (or "section.*") -> how a new value takes effect when the run resumes (printed beside the change)
CHANGEABLE: dict[str, str] = {
    "run_dir": "the run's directory (a moved or copied run)",
    "train.max_steps": "where training stops; a linear or cosine LR decay is recomputed for the new length",
    "train.lr": "the optimizer's LR: after the checkpoint loads, the LR scheduler's base_lrs and every param "
    "group's initial_lr are set to the new values and the LR is recomputed from the schedule at the resumed step",
    "train.lr_schedule": "the LR schedule's shape is the new one; its position (steps taken) is the checkpoint's",
    "train.warmup_steps": "the LR schedule's warmup is the new one; its position is the checkpoint's",
    "mtl.uw_lr": "UW's parameter group LR, set like train.lr",
    "train.global_batch_size": "the batch layout is planned again for the steps after the resume",
    "train.micro_batch_size": "the batch layout is planned again for the steps after the resume",
    "train.max_micro_batch_size": "the batch layout is planned again for the steps after the resume",
    "train.gradient_accumulation_steps": "the batch layout is planned again for the steps after the resume",
    "train.grad_clip": "DeepSpeed's gradient clipping from the next step",
    "train.ema_decay": "the EMA's decay from the next update (its weights and update count are the checkpoint's)",
    "train.ema_warmup": "the EMA's warmup rule from the next update",
    "train.checkpoint_every": "the checkpoint cadence",
    "train.keep_last": "checkpoint retention",
    "train.keep_every": "checkpoint retention",
    "train.log_every": "the logging cadence",
    "train.max_nonfinite_steps": "the non-finite stop",
    "model.grad_checkpointing": "activation recomputation (memory for compute; the same maths)",
    "model.compile": "torch.compile of the engine (the same maths)",
    "data.on_error": "what an unusable sample does from now on",
    "data.max_skipped_fraction": "the bad-data stop from the next checkpoint",
    "data.vae": "the VAE that decodes in-loop sample grids",
    "deepspeed.zero_stage": "the ZeRO stage: ZeRO-1 <-> ZeRO-2 through DeepSpeed's Universal Checkpointing (a "
    "reshard, docs/multi-node.md); ZeRO-0 and moves to or from ZeRO-3 are refused at load by name",
    "deepspeed.overlap_comm": "DeepSpeed communication overlap (the same maths)",
    "deepspeed.reduce_bucket_size": "DeepSpeed's gradient reduce bucket (the same maths)",
    "deepspeed.stage3_max_live_parameters": "ZeRO-3 gathering (the same maths)",
    "deepspeed.stage3_max_reuse_distance": "ZeRO-3 gathering (the same maths)",
    "deepspeed.stage3_prefetch_bucket_size": "ZeRO-3 prefetching (the same maths)",
    "repa.coeff": "the REPA loss weight from the next step",
    "repa.stop_step": "the step REPA stops at",
    "flow.sampler": "the in-loop sampler and the default a converted model records (nothing trained depends on it)",
    "flow.guidance_low": "the in-loop guidance interval and the default a converted model records",
    "flow.guidance_high": "the in-loop guidance interval and the default a converted model records",
    "monitor.*": "logging, progress, in-loop sample grids",
    "eval.*": "in-loop evaluation",
}

# Keys that define what is trained, by section: what docs/resume.md says of each refused section.
REFUSED_SECTIONS: dict[str, str] = {
    "model": "the network's shape and its parameters (depth, width, heads, patch, classes, label dropout)",
    "routing": "DTR's channel windows, part of every block's computation",
    "diffusion": "the objective, noise schedule and loss weighting: what the network learns to predict",
    "flow": "flow matching's training-time density (flow.time_sampling, logit_mean, logit_std)",
    "mtl": "ANT's clusters, timestep sampling and balancer (its state is in the checkpoint)",
    "data": "which data is trained on and how it is streamed (the stream position is in the checkpoint)",
    "train": "the seed, precision and optimizer settings whose state is in the checkpoint",
    "deepspeed": "the ZeRO stage and the knobs that shape the optimizer checkpoint",
    "repa": "the encoder and projector (the projector's weights are in the checkpoint)",
}


def may_change(key: str) -> bool:
    """Whether `key` (dotted, e.g. "train.lr") may take a new value when a run resumes."""
    section = key.split(".", 1)[0]
    return key in CHANGEABLE or f"{section}.*" in CHANGEABLE


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train.lr": 1e-4, ...} from nested dicts (lists stay values)."""
    flat: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        if isinstance(value, dict):
            flat.update(flatten(value, key))
        else:
            flat[key] = value
    return flat


def config_changes(
    saved: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any]
) -> list[tuple[str, Any, Any]]:
    """[(key, saved value, current value)] for every key of `current` whose value differs, in its order. A key
    the saved config lacks (written before the key existed) counts as its default from `defaults`; a key only
    the saved config has (since removed) is not compared. All three are nested dicts."""
    old, new, fallback = flatten(saved), flatten(current), flatten(defaults)
    changes = []
    for key, value in new.items():
        before = old.get(key, fallback.get(key))
        if before != value:
            changes.append((key, before, value))
    return changes


def resume_markdown() -> str:
    """The two lists of docs/resume.md: what may change on resume (and how it is applied), and what is refused."""
    lines = ["| key | a new value on resume |", "|---|---|"]
    lines += [f"| `{key}` | {how} |" for key, how in CHANGEABLE.items()]
    lines += ["", "Refused: every other key. By section:", ""]
    lines += [f"- `{section}.*`: {what}" for section, what in REFUSED_SECTIONS.items()]
    return "\n".join(lines) + "\n"
