"""`dtr-scale convert RUN --out DIR --format diffusers`: a folder that `diffusers.DiTPipeline` loads offline.

    DIR/model_index.json          DiTPipeline, its components and `id2label` (the manifest's labels)
    DIR/transformer/              config.json + diffusion_pytorch_model.safetensors (EMA or raw weights)
    DIR/scheduler/                scheduler_config.json: the run's betas, DDIM (default) or DDPM
    DIR/vae/                      the run's AutoencoderKL, or dtr_scale.hf.PixelShuffleVAE for the pixel codec
    DIR/README.md                 model card (sample/model_card.py)

The transformer class:
- an unrouted DiT with mlp_ratio 4, at most 1000 classes and an AutoencoderKL -> diffusers' own
  `DiTTransformer2DModel`, weights renamed as diffusers' scripts/convert_dit_to_diffusers.py does (q/k/v split
  from qkv; the timestep and class embedders copied into every block's AdaLayerNormZero): no dtr_scale needed.
- otherwise (DTR, another MLP ratio, more classes, the pixel codec, or `transformer_class="dtr"`) ->
  `dtr_scale.hf.DTRDiTTransformer2DModel`, dtr-scale's own DiT (`import dtr_scale.hf` first).

Two facts of diffusers' DiT that the export works around or reports:
- DiTPipeline always passes class 1000 as the null label. For fewer classes the class table is padded to 1001
  rows: row 1000 is the trained null embedding, and so are the unused rows num_classes..999.
- diffusers' DiT embeds the timestep with frequencies exp(-ln(10^4) i / 127), the reference DiT (and dtr-scale)
  with exp(-ln(10^4) i / 128) (diffusers models/embeddings.py CombinedTimestepLabelEmbeddings:
  `Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)`; facebookresearch/DiT models.py
  `TimestepEmbedder.timestep_embedding`). So diffusers' own class computes another function of the same
  weights (as for the official DiT-XL/2 on the Hub), measured per export (`native_drift`);
  `transformer_class="dtr"` gives the exact function. tests/test_diffusers_export.py checks both.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dtr_scale.fileio import atomic_directory

TRANSFORMER_CLASSES = ("auto", "diffusers", "dtr")
SCHEDULERS = ("ddim", "ddpm")
MODEL_INDEX = "model_index.json"


# ------------------------------------------------------------------------------- transformer


def native_class_refusal(config: dict[str, Any]) -> str | None:
    """Why diffusers' own DiTTransformer2DModel cannot hold this model (None when it can)."""
    model, routing = config["model"], config["routing"]
    if routing["enabled"] and float(routing["beta"]) < 1.0:
        return f"it uses DTR routing (alpha={routing['alpha']}, beta={routing['beta']})"
    if float(model["mlp_ratio"]) != 4.0:
        return f"its mlp_ratio is {model['mlp_ratio']} (diffusers' DiT blocks have ratio 4)"
    if int(model["num_classes"]) > 1000:
        return f"it has {model['num_classes']} classes (DiTPipeline's null label is 1000)"
    if float(model["class_dropout_prob"]) <= 0:
        return "it was trained without a null class (class_dropout_prob 0)"
    return None


def diffusers_dit_state(
    state: dict[str, torch.Tensor], depth: int, num_classes: int
) -> dict[str, torch.Tensor]:
    """Reference-DiT state dict -> diffusers DiTTransformer2DModel state dict (fp32 copies).

    Follows diffusers' scripts/convert_dit_to_diffusers.py; the class table (num_classes + 1 rows, the last the
    null class) is padded to 1001 rows with the null row (see the module docstring). `pos_embed` is dropped:
    diffusers recomputes the same sin-cos table.
    """
    s = {k: v.detach().float() for k, v in state.items()}
    table = s["y_embedder.embedding_table.weight"]
    null = table[num_classes : num_classes + 1]
    padded = torch.cat([table[:num_classes], null.expand(1001 - num_classes, -1)], dim=0)
    out = {
        "pos_embed.proj.weight": s["x_embedder.proj.weight"],
        "pos_embed.proj.bias": s["x_embedder.proj.bias"],
    }
    for i in range(depth):
        block, new = f"blocks.{i}.", f"transformer_blocks.{i}."
        emb = new + "norm1.emb."
        for which, index in (("linear_1", 0), ("linear_2", 2)):
            for kind in ("weight", "bias"):
                out[f"{emb}timestep_embedder.{which}.{kind}"] = s[f"t_embedder.mlp.{index}.{kind}"]
        out[emb + "class_embedder.embedding_table.weight"] = padded
        for kind in ("weight", "bias"):
            out[f"{new}norm1.linear.{kind}"] = s[f"{block}adaLN_modulation.1.{kind}"]
            q, k, v = s[f"{block}attn.qkv.{kind}"].chunk(3, dim=0)
            out[f"{new}attn1.to_q.{kind}"], out[f"{new}attn1.to_k.{kind}"], out[f"{new}attn1.to_v.{kind}"] = (
                q,
                k,
                v,
            )
            out[f"{new}attn1.to_out.0.{kind}"] = s[f"{block}attn.proj.{kind}"]
            out[f"{new}ff.net.0.proj.{kind}"] = s[f"{block}mlp.fc1.{kind}"]
            out[f"{new}ff.net.2.{kind}"] = s[f"{block}mlp.fc2.{kind}"]
    for kind in ("weight", "bias"):
        out[f"proj_out_1.{kind}"] = s[f"final_layer.adaLN_modulation.1.{kind}"]
        out[f"proj_out_2.{kind}"] = s[f"final_layer.linear.{kind}"]
    return {k: v.contiguous().clone() for k, v in out.items()}


def build_transformer(
    config: dict[str, Any], state: dict[str, torch.Tensor], transformer_class: str = "auto"
):
    """The diffusers transformer holding `state` (reference DiT keys) of a model-dir `config`, fp32, eval mode.

    transformer_class: "auto" (diffusers' own class where it can hold the model and the folder needs no
    dtr_scale otherwise, i.e. with an AutoencoderKL; the pixel codec needs dtr_scale.hf anyway, so there the
    exact class), "diffusers" (that class or a ValueError saying why not) or "dtr"
    (dtr_scale.hf.DTRDiTTransformer2DModel)."""
    if transformer_class not in TRANSFORMER_CLASSES:
        raise ValueError(f"transformer class must be one of {TRANSFORMER_CLASSES}, got {transformer_class!r}")
    m, routing = config["model"], config["routing"]
    refusal = native_class_refusal(config)
    if transformer_class == "auto" and refusal is None and _pixel_codec(config):
        refusal = "the built-in pixel codec needs dtr_scale.hf anyway, so the exact class is used"
    if transformer_class == "diffusers" and refusal:
        raise ValueError(f"diffusers' DiTTransformer2DModel cannot hold this model: {refusal}; use 'dtr'")
    out_channels = 2 * m["in_channels"] if m["learn_sigma"] else m["in_channels"]
    if transformer_class == "dtr" or refusal:
        from dtr_scale.hf import DTRDiTTransformer2DModel

        routed = routing["enabled"] and float(routing["beta"]) < 1.0
        model = DTRDiTTransformer2DModel(
            sample_size=m["input_size"], patch_size=m["patch_size"], in_channels=m["in_channels"],
            out_channels=out_channels, hidden_size=m["hidden_size"], num_layers=m["depth"],
            num_attention_heads=m["num_heads"], mlp_ratio=float(m["mlp_ratio"]),
            num_embeds_ada_norm=m["num_classes"], class_dropout_prob=float(m["class_dropout_prob"]),
            routing_alpha=float(routing["alpha"]) if routed else None,
            routing_beta=float(routing["beta"]) if routed else None,
            routing_num_tasks=int(routing["num_tasks"]) if routed else None,
        )  # fmt: skip
        model.dit.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        return model.eval()
    from dtr_scale.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(
        num_attention_heads=m["num_heads"], attention_head_dim=m["hidden_size"] // m["num_heads"],
        in_channels=m["in_channels"], out_channels=out_channels, num_layers=m["depth"],
        sample_size=m["input_size"], patch_size=m["patch_size"], num_embeds_ada_norm=1000,
        norm_eps=1e-6,  # the reference DiT's LayerNorm eps (diffusers' default is 1e-5)
    )  # fmt: skip
    model.load_state_dict(diffusers_dit_state(state, m["depth"], m["num_classes"]), strict=True)
    return model.eval()


def _pixel_codec(config: dict[str, Any]) -> bool:
    from dtr_scale.data.vae import BUILTIN_VAE_NAME

    return config["data"]["vae"].get("name") == BUILTIN_VAE_NAME


@torch.no_grad()
def native_drift(config: dict[str, Any], state: dict[str, torch.Tensor], transformer) -> dict[str, float]:
    """How far diffusers' DiTTransformer2DModel (timestep frequencies i/127) is from the exact DiT (i/128) on
    these weights: the noise prediction's max abs and relative RMS difference over 16 seeded random latents,
    labels and timesteps spread over the schedule (the card and the command report it)."""
    from dtr_scale.models.model_dir import build_model_from_config

    exact = build_model_from_config(config)
    exact.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    exact.eval()
    g = torch.Generator().manual_seed(0)
    shape = config["data"]["latent_shape"]
    steps, classes = int(config["diffusion"]["diffusion_steps"]), int(config["model"]["num_classes"])
    x = torch.randn(16, *shape, generator=g)
    t = torch.linspace(0, steps - 1, 16).round().long()
    y = torch.randint(0, classes, (16,), generator=g)
    channels = shape[0]
    ours = exact(x, t, y)[:, :channels]
    theirs = transformer.float()(x, timestep=t, class_labels=y).sample[:, :channels]
    diff = theirs - ours
    rms = float(diff.pow(2).mean().sqrt() / ours.pow(2).mean().sqrt().clamp_min(1e-12))
    return {"max_abs": float(diff.abs().max()), "relative_rms": rms}


# ------------------------------------------------------------------------------- scheduler and VAE


def training_betas(config: dict[str, Any]) -> list[float]:
    """The run's beta_t, t = 0..T-1 (float64 values of diffusion/schedules.py), as a JSON-able list."""
    from dtr_scale.diffusion.schedules import get_named_beta_schedule

    schedule = config["diffusion"]
    betas = get_named_beta_schedule(schedule["noise_schedule"], int(schedule["diffusion_steps"]))
    return [float(b) for b in np.asarray(betas, dtype=np.float64)]


def build_scheduler(config: dict[str, Any], kind: str = "ddim"):
    """A diffusers DDIM or DDPM scheduler on the run's exact betas (`trained_betas`), epsilon prediction, no
    clipping (as dtr-scale samples), "leading" spacing: for a step count n dividing T its timesteps are
    range(0, T, T // n), the same as `dtr-scale sample --sampler ddim --steps n`."""
    if kind not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {kind!r}")
    from dtr_scale.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from diffusers import DDIMScheduler, DDPMScheduler

    betas = training_betas(config)
    common = dict(
        num_train_timesteps=len(betas), trained_betas=betas, clip_sample=False, prediction_type="epsilon",
        timestep_spacing="leading", steps_offset=0,
    )  # fmt: skip
    if kind == "ddim":
        # alpha_bar before the first step is 1 (set_alpha_to_one), as in the respaced ADM/DiT DDIM.
        return DDIMScheduler(**common, set_alpha_to_one=True)
    # DiTPipeline passes only the eps half of a learned-sigma output to the scheduler, so DDPM cannot use the
    # learned variance there: the posterior variance (fixed_small) stands in; without learned sigma the
    # reference DiT samples with beta_t (fixed_large).
    variance = "fixed_small" if config["model"]["learn_sigma"] else "fixed_large"
    return DDPMScheduler(**common, variance_type=variance)


def build_vae(config: dict[str, Any], vae_dir: str | Path | None = None):
    """The pipeline's VAE: PixelShuffleVAE for the built-in codec, else the run's AutoencoderKL (from `vae_dir`
    or the recorded path), refused by name when its config is not the one the data manifest recorded."""
    from dtr_scale.data.vae import BUILTIN_VAE_NAME, load_vae, vae_identity

    data = config["data"]
    recorded, scaling = dict(data["vae"]), float(data["scaling_factor"])
    if recorded.get("name") == BUILTIN_VAE_NAME:
        from dtr_scale.hf import PixelShuffleVAE

        factor = int(recorded.get("downscale_factor", 2))
        channels = int(data["latent_shape"][0]) // (factor * factor)
        return PixelShuffleVAE(downscale_factor=factor, image_channels=channels, scaling_factor=scaling)
    source = vae_dir if vae_dir is not None else recorded.get("path")
    if source is None:
        raise ValueError("the run's data manifest records no VAE path; pass the VAE directory with --vae")
    vae = load_vae(source, context="the VAE of the converted run")
    found = vae_identity(source, dict(vae.config))["config_sha256"]
    if found != recorded.get("config_sha256"):
        raise ValueError(
            f"VAE {source} is not the one this run's latents were made with: its config sha256 is {found[:12]}..., "
            f"the data manifest records {recorded.get('name')!r} ({recorded.get('path')}) with "
            f"{str(recorded.get('config_sha256'))[:12]}...; pass that VAE with --vae"
        )
    vae.register_to_config(scaling_factor=scaling)  # the pipeline divides latents by it before decoding
    return vae.eval()


# ------------------------------------------------------------------------------- the folder


def write_diffusers_folder(
    out_dir: str | Path,
    config: dict[str, Any],
    state: dict[str, torch.Tensor],
    *,
    scheduler: str = "ddim",
    transformer_class: str = "auto",
    vae_dir: str | Path | None = None,
    card: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write the DiTPipeline folder of a model-dir `config` with weights `state` (reference DiT keys) to
    `out_dir`, complete or not at all (an older folder there is replaced; anything else is refused)."""
    from dtr_scale.compat import ensure_torchvision_importable
    from dtr_scale.sample.model_card import model_card

    ensure_torchvision_importable()
    from diffusers import DiTPipeline

    transformer = build_transformer(config, state, transformer_class)
    card = dict(card or {})
    if type(transformer).__name__ == "DiTTransformer2DModel":
        card["native_drift"] = drift = native_drift(config, state, transformer)
        print(
            f"{out_dir}: diffusers' DiTTransformer2DModel embeds timesteps with other frequencies than the reference "
            f"DiT; on these weights its noise prediction is {drift['relative_rms']:.2%} (RMS) and at most "
            f"{drift['max_abs']:.3g} away from the exact one; --transformer-class dtr exports the exact function",
            file=sys.stderr,
        )
    if dtype != torch.float32:
        transformer = transformer.to(dtype)
    labels = list(config["data"]["labels"])
    pipe = DiTPipeline(
        transformer=transformer,
        vae=build_vae(config, vae_dir),
        scheduler=build_scheduler(config, scheduler),
        id2label={str(i): str(name) for i, name in enumerate(labels)},
    )
    with atomic_directory(out_dir, MODEL_INDEX) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for path in tmp.rglob("*.safetensors"):
            path.chmod(0o644)  # safetensors writes 0600; a model folder is shared like the other files
        index = json.loads((tmp / MODEL_INDEX).read_text())
        # DiTPipeline takes id2label but does not record it; from_pretrained passes it back from here.
        index["id2label"] = {str(i): str(name) for i, name in enumerate(labels)}
        (tmp / MODEL_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(
            model_card(config, index, {**card, "dtype": str(dtype).removeprefix("torch.")})
        )
    return Path(out_dir)


def export_run(
    out_dir: str | Path,
    config: dict[str, Any],
    states: dict[str, dict[str, torch.Tensor]],
    run_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    weights: str = "ema",
    scheduler: str = "ddim",
    transformer_class: str = "auto",
    vae_dir: str | Path | None = None,
    command: list[str] | None = None,
    evaluation: str | None = None,
) -> Path:
    """`convert --format diffusers`: the folder of a converted run's `weights` ("ema" or "model" of `states`),
    its transformer stored in `dtype` (fp32 or bf16)."""
    if weights not in states:
        raise ValueError(f"weights must be one of {sorted(states)}, got {weights!r}")
    card = {
        "command": command,
        "weights": weights,
        "run_dir": str(run_dir),
        "out_name": str(out_dir),
        "scheduler": scheduler,
        "eval": evaluation,
    }
    state = {k: v.to(dtype).float() for k, v in states[weights].items()}  # bf16: the stored values, rounded
    out = write_diffusers_folder(
        out_dir, config, state, scheduler=scheduler, transformer_class=transformer_class, vae_dir=vae_dir,
        card=card, dtype=dtype,
    )  # fmt: skip
    return out


def cli_options(args) -> dict[str, Any] | None:
    """`convert`'s --format diffusers options as export_run keywords; ValueError if given with another format."""
    options = {"--weights": args.weights, "--scheduler": args.scheduler,
               "--transformer-class": args.transformer_class, "--vae": args.vae}  # fmt: skip
    given = [k for k, v in options.items() if v is not None]
    if args.format != "diffusers" and given:
        raise ValueError(
            f"{', '.join(given)} only apply to --format diffusers (this is --format {args.format})"
        )
    return None if args.format != "diffusers" else {
        "weights": args.weights or "ema", "scheduler": args.scheduler or "ddim", "vae_dir": args.vae,
        "transformer_class": args.transformer_class or "auto", "command": getattr(args, "argv", None),
    }  # fmt: skip
