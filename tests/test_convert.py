"""`dtr-scale convert`: DeepSpeed checkpoints of a world-2 run (ZeRO 0/1/2/3) -> safetensors model dirs.

Each run trains a tiny DiT for 2 steps on 2 processes (gloo on 127.0.0.1), saves a checkpoint, and rank 0
writes the live engine's full weights and the gathered EMA next to it; the converted files must equal
them bit for bit. The ZeRO-0 run is the unrouted one, so it also serves the `--format dit` tests.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed import run_ranks
from safetensors.torch import load_file
from test_dit import reference_keys
from test_train_distributed import train_args

from dtr_scale.models.model_dir import load_model_dir
from dtr_scale.sample.convert import convert_checkpoint

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

STEPS = 2
TAG = f"step{STEPS:08d}"

# Train, checkpoint, then record what the live engine holds (every rank takes part in both gathers).
LIVE_SCRIPT = r"""
import sys, deepspeed, torch
from safetensors.torch import save_file
from dtr_scale.config import load_config
from dtr_scale.train.engine import Trainer
out, steps = sys.argv[1], int(sys.argv[2])
cfg = load_config(sys.argv[3], sys.argv[4:])
tr = Trainer(cfg)
batches = iter(tr.stream)
for _ in range(steps):
    assert tr.train_step(batches)
    tr.step += 1
    tr.samples_seen += cfg.train.global_batch_size
tr.save()
model = tr.engine.module.model
with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=cfg.deepspeed.zero_stage == 3):
    live = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()}
ema = tr.ema.gather(dst=0)
if tr.rank == 0:
    save_file(live, out + "/live_model.safetensors")
    save_file({k: v.contiguous() for k, v in ema.items()}, out + "/live_ema.safetensors")
from distributed import leave
leave()  # not through interpreter exit while gloo threads still release tensors (tests/distributed.py)
"""

RUNS = {0: ["routing.enabled=false"], 1: [], 2: [], 3: []}  # zero stage -> extra overrides


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, builtin_data):
    """zero_stage -> run directory of a 2-process, 2-step run (trained once per module and stage)."""
    runs: dict[int, Path] = {}

    def get(zero_stage: int) -> Path:
        if zero_stage not in runs:
            run_dir = tmp_path_factory.mktemp(f"zero{zero_stage}")
            args = train_args(
                run_dir, builtin_data["train"], f"deepspeed.zero_stage={zero_stage}", *RUNS[zero_stage]
            )
            run_ranks(["-c", LIVE_SCRIPT, str(run_dir), str(STEPS), *args[4:]])
            runs[zero_stage] = run_dir
        return runs[zero_stage]

    return get


@pytest.mark.parametrize("zero_stage", sorted(RUNS))
def test_two_process_converted_weights_and_ema_equal_the_live_engine_exactly(
    tmp_path, trained_run, zero_stage
):
    run_dir = trained_run(zero_stage)
    out = convert_checkpoint(run_dir, tmp_path / "model")
    live, live_ema = (
        load_file(run_dir / "live_model.safetensors"),
        load_file(run_dir / "live_ema.safetensors"),
    )
    model, ema = load_file(out / "model.safetensors"), load_file(out / "ema.safetensors")
    assert set(model) == set(ema) == set(live) | {"pos_embed"}
    for key in live:
        assert model[key].dtype == torch.float32
        assert torch.equal(model[key], live[key]), key
        assert torch.equal(ema[key], live_ema[key]), key
    assert any(not torch.equal(ema[k], live[k]) for k in live)  # EMA and weights differ: both were checked


def test_converted_model_dir_loads_strictly_and_samples(tmp_path, trained_run):
    from dtr_scale.sample.sampler import sample_to_dir

    out = convert_checkpoint(trained_run(2), tmp_path / "model")
    model, config = load_model_dir(out, weights="model")
    live = load_file(trained_run(2) / "live_model.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in live.items())
    assert model.mask_table is not None  # routing rebuilt from config.json
    result = sample_to_dir(
        out,
        tmp_path / "samples",
        num_samples=2,
        batch_size=2,
        steps=2,
        sampler="ddim",
        cfg_scale=1.0,
        classes=[3, 7],
        device="cpu",
    )
    assert result["count"] == 2
    npz = np.load(tmp_path / "samples" / "samples.npz")
    assert npz["arr_0"].dtype.name == "uint8" and npz["arr_0"].shape[0] == 2
    assert npz["arr_1"].tolist() == [3, 7]


def test_config_records_routing_diffusion_data_provenance_and_ant(tmp_path, trained_run):
    run_dir = trained_run(1)
    config = json.loads((convert_checkpoint(run_dir, tmp_path / "model") / "config.json").read_text())
    assert config["model"]["name"] == "DiT-S/2" and config["model"]["hidden_size"] == 32
    assert config["model"]["depth"] == 2
    assert config["routing"] == {"enabled": True, "alpha": 4.0, "beta": 0.8, "num_tasks": 1000}
    assert config["diffusion"] == {"noise_schedule": "linear", "diffusion_steps": 1000, "learn_sigma": True}
    assert config["data"]["latent_shape"] == [4, 16, 16]
    assert config["train"] == {
        "step": STEPS,
        "samples_seen": 32,
        "run_dir": str(run_dir.resolve()),
        "tag": TAG,
    }
    assert config["mtl"]["method"] == "uw" and config["mtl"]["num_clusters"] == 4
    assert config["mtl"]["clusters"] == [[0, 249], [250, 499], [500, 749], [750, 999]]
    weights = config["mtl"]["balancer_weights"]
    # UW's weights 0.5 exp(-s_k) / k start at 0.125 (s = 0) and moved in training
    assert len(weights) == 4 and all(w != 0.125 and abs(w - 0.125) < 0.05 for w in weights)


def test_bf16_dtype_stores_the_rounded_fp32_weights(tmp_path, trained_run):
    from dtr_scale.cli import main

    run_dir = trained_run(3)
    assert main(["convert", str(run_dir), "--out", str(tmp_path / "model"), "--dtype", "bf16"]) == 0
    model, live = (
        load_file(tmp_path / "model" / "model.safetensors"),
        load_file(run_dir / "live_model.safetensors"),
    )
    for key, value in live.items():
        assert model[key].dtype == torch.bfloat16
        assert torch.equal(model[key], value.to(torch.bfloat16)), key


def test_dit_format_is_refused_for_a_routed_model(tmp_path, trained_run):
    with pytest.raises(ValueError, match=r"DTR routing \(alpha=4.0, beta=0.8.*reference DiT"):
        convert_checkpoint(trained_run(1), tmp_path / "model", fmt="dit")
    assert not (tmp_path / "model").exists()


def test_dit_format_writes_reference_keys_for_an_unrouted_model(tmp_path, trained_run):
    run_dir = trained_run(0)
    out = convert_checkpoint(run_dir, tmp_path / "model", fmt="dit")
    checkpoint = torch.load(out / "dit.pt", map_location="cpu", weights_only=True)
    assert set(checkpoint) == {"model", "ema"}
    assert set(checkpoint["model"]) == set(checkpoint["ema"]) == reference_keys(depth=2)
    live = load_file(run_dir / "live_model.safetensors")
    assert all(torch.equal(checkpoint["model"][k], v) for k, v in live.items())
    assert torch.equal(checkpoint["ema"]["pos_embed"], load_file(out / "ema.safetensors")["pos_embed"])


def test_run_dir_without_latest_is_reported(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"checkpoints/latest does not exist.*no complete checkpoint"):
        convert_checkpoint(tmp_path / "run", tmp_path / "model")


def test_unknown_tag_is_reported_with_the_available_tags(tmp_path, trained_run):
    with pytest.raises(
        FileNotFoundError, match=rf"'step00000099'.*does not exist; complete tags: \['{TAG}'\]"
    ):
        convert_checkpoint(trained_run(1), tmp_path / "model", tag="step00000099")


def test_missing_rank_file_names_the_lost_ema_shard(tmp_path, trained_run):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run(1), run_dir)
    (run_dir / "checkpoints" / TAG / "dtr_scale" / "rank00001.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"rank00001.safetensors is missing: the run had 2 ranks"):
        convert_checkpoint(run_dir, tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_existing_output_that_is_not_a_model_dir_is_left_alone(tmp_path, trained_run):
    precious = tmp_path / "out" / "notes.txt"
    precious.parent.mkdir()
    precious.write_text("keep me")
    with pytest.raises(FileExistsError, match="not a dtr-scale model directory"):
        convert_checkpoint(trained_run(1), tmp_path / "out")
    assert precious.read_text() == "keep me"


def test_moved_manifest_is_reported_and_can_be_passed(tmp_path, trained_run, builtin_data):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run(1), run_dir)
    moved = tmp_path / "moved-data"
    shutil.copytree(Path(builtin_data["train"]).parent, moved)
    # Simulate a run copied to another machine: the recorded data.shards no longer exists.
    from dtr_scale.checkpoint_format import read_state_file, write_state_file

    global_path = run_dir / "checkpoints" / TAG / "dtr_scale" / "global.safetensors"
    state = read_state_file(global_path)
    state["run"]["config"] = state["run"]["config"].replace(
        str(builtin_data["train"]), str(tmp_path / "gone" / "manifest.json")
    )
    assert "gone" in state["run"]["config"]
    write_state_file(global_path, state)
    with pytest.raises(FileNotFoundError, match="pass its current location with --manifest"):
        convert_checkpoint(run_dir, tmp_path / "model")
    out = convert_checkpoint(run_dir, tmp_path / "model", manifest=moved / "manifest.json")
    assert json.loads((out / "config.json").read_text())["data"]["manifest"] == str(
        (moved / "manifest.json").resolve()
    )


# ------------------------------------------------------------------------------- --format diffusers


@pytest.mark.parametrize("zero_stage", [0, 2], ids=["unrouted-zero0", "routed-zero2"])
def test_diffusers_format_from_the_cli_holds_the_runs_ema_and_a_model_card(tmp_path, trained_run, zero_stage):
    from dtr_scale.cli import main
    from dtr_scale.sample.diffusers_export import diffusers_dit_state

    run_dir = trained_run(zero_stage)
    out = tmp_path / "hf"
    argv = ["convert", str(run_dir), "--out", str(out), "--format", "diffusers"]
    if zero_stage == 0:  # unrouted: diffusers' own class (auto would pick the exact one for the pixel codec)
        argv += ["--transformer-class", "diffusers"]
    assert main(argv) == 0
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "DiTPipeline"
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert index["vae"] == ["dtr_scale.hf", "PixelShuffleVAE"]  # the built-in pixel codec
    assert index["id2label"]["7"] == "7"
    live_ema = load_file(run_dir / "live_ema.safetensors")
    stored = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    if zero_stage == 0:  # unrouted: diffusers' own class, reference keys renamed
        assert index["transformer"] == ["diffusers", "DiTTransformer2DModel"]
        full = {
            **live_ema,
            "pos_embed": load_file(convert_checkpoint(run_dir, tmp_path / "m") / "ema.safetensors")[
                "pos_embed"
            ],
        }
        expected = diffusers_dit_state(full, depth=2, num_classes=10)
    else:  # routed: dtr-scale's class, reference keys under `dit.`
        assert index["transformer"] == ["dtr_scale.hf", "DTRDiTTransformer2DModel"]
        config = json.loads((out / "transformer" / "config.json").read_text())
        assert (config["routing_alpha"], config["routing_beta"], config["routing_num_tasks"]) == (
            4.0,
            0.8,
            1000,
        )
        expected = {f"dit.{k}": v for k, v in live_ema.items()}
    for key, value in expected.items():
        assert torch.equal(stored[key], value), key
    card = (out / "README.md").read_text()
    assert f"step {STEPS}, 32 samples" in card and TAG in card
    assert " ".join(["dtr-scale", *argv]) in card
    assert "DTR routing | alpha 4.0, beta 0.8" in card if zero_stage else "DTR routing | off" in card
    assert "uw, 4 clusters" in card


def test_diffusers_format_with_raw_weights_and_ddpm(tmp_path, trained_run):
    from dtr_scale.sample.diffusers_export import export_run  # noqa: F401  (the keyword path of convert)

    run_dir = trained_run(1)
    out = convert_checkpoint(
        run_dir, tmp_path / "hf", fmt="diffusers", diffusers={"weights": "model", "scheduler": "ddpm"}
    )
    from dtr_scale.cli import main

    assert main(["convert", str(run_dir), "--out", str(tmp_path / "m"), "--weights", "model"]) == 2
    stored = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    live = load_file(run_dir / "live_model.safetensors")
    assert all(torch.equal(stored[f"dit.{k}"], v) for k, v in live.items())
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDPMScheduler" and scheduler["variance_type"] == "fixed_small"
    assert "Weights: model, stored in float32. Scheduler: ddpm." in (out / "README.md").read_text()
