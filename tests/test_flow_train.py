"""The chain on flow matching: a two-process ZeRO-2 run (logit-normal times, ANT-UW over unequal draws, DTR),
its in-loop grid and KID, convert (EMA exact, the objective and sampler defaults recorded, the DDPM-only
formats refused by name), `dtr-scale sample` with the flow samplers, and REPA on flow (its official setting).
Resume under ZeRO-3 bf16 on flow: test_train_distributed.py."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from distributed import launcher_env, run_ranks
from test_repa import repa_shards  # noqa: F401 - a fixture
from test_train_distributed import read_metrics, train_args

from dtr_scale.models.model_dir import load_model_dir
from dtr_scale.sample.convert import convert_checkpoint

# ~50 s in all (a two-process run with in-loop KID, a REPA run): `make test-slow`, which CI runs.
pytestmark = [pytest.mark.multiprocess, pytest.mark.slow, pytest.mark.minutes]

FLOW = [
    "diffusion.objective=flow",
    "flow.time_sampling=logit_normal",
    "flow.sampler=euler",
    "flow.guidance_low=0.1",
    "flow.guidance_high=0.9",
    "deepspeed.zero_stage=2",
    "monitor.sample_every=2",
    "monitor.sample_steps=2",
    "eval.every=2",
    "eval.num_samples=4",
    "eval.steps=2",
    "eval.reference_size=4",
    "train.max_steps=2",
    "train.checkpoint_every=2",
    "monitor.tensorboard=true",
]


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory, builtin_data):
    """A two-process ZeRO-2 flow run of 2 steps with its in-loop grid and KID at step 2 (dtr-scale train)."""
    run_dir = tmp_path_factory.mktemp("flow")
    run_ranks(train_args(run_dir, builtin_data["train"], *FLOW), timeout=400)
    return run_dir


def test_two_process_flow_run_converts_and_records_its_objective(tmp_path, flow_run):
    out = convert_checkpoint(flow_run, tmp_path / "model")
    model, config = load_model_dir(out, weights="ema")
    assert model.out_channels == model.in_channels  # velocity only: no learned variance
    assert config["model"]["learn_sigma"] is False
    assert {k: config["diffusion"][k] for k in ("objective", "time_sampling", "sampler")} == {
        "objective": "flow", "time_sampling": "logit_normal", "sampler": "euler"
    }  # fmt: skip
    assert (config["diffusion"]["guidance_low"], config["diffusion"]["guidance_high"]) == (0.1, 0.9)
    for fmt in ("diffusers", "dit"):
        with pytest.raises(ValueError, match=f"--format {fmt}: .* diffusion.objective=flow"):
            convert_checkpoint(flow_run, tmp_path / fmt, fmt=fmt)


def test_flow_sample_cli_draws_a_hand_integrated_euler_trajectory(tmp_path, flow_run):
    # Independent expectation: Euler steps x <- x + (t_next - t) v(x, t) written out here in float64 from the
    # sample's own generator (label draw, then its noise), CFG s = 2 inside [0.1, 0.9] only.
    from dtr_scale.data.images import to_uint8_nhwc
    from dtr_scale.data.vae import build_decoder
    from dtr_scale.diffusion.sampling import sample_generator

    model_dir = convert_checkpoint(flow_run, tmp_path / "model")
    out = tmp_path / "samples"
    command = [sys.executable, "-m", "dtr_scale", "sample", "--model", str(model_dir), "--out", str(out),
               "--num-samples", "2", "--steps", "3", "--cfg-scale", "2", "--classes", "3,7", "--device", "cpu"]  # fmt: skip
    done = subprocess.run(command, env=launcher_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    settings = json.loads((out / "samples.json").read_text())
    assert settings["sampler"] == "euler" and settings["guidance_interval"] == [0.1, 0.9]  # recorded defaults

    model, config = load_model_dir(model_dir, weights="ema")
    model = model.double().eval()
    expected = []
    for index, label in ((0, 3), (1, 7)):
        g = sample_generator(0, index)
        torch.randint(model.num_classes, (1,), generator=g)  # the label draw comes first
        x = torch.randn(1, *config["data"]["latent_shape"], generator=g).double()
        y, null = torch.tensor([label]), torch.tensor([model.num_classes])
        times = [1.0, 2 / 3, 1 / 3, 0.0]
        for t, t_next in zip(times[:-1], times[1:]):
            time = torch.tensor([t * 999.0], dtype=torch.float64)
            with torch.no_grad():
                v = model(x, time, y)
                if 0.1 <= t <= 0.9:
                    v = model(x, time, null) + 2.0 * (v - model(x, time, null))
            x = x + (t_next - t) * v
        expected.append(x.float())
    decode = build_decoder(config["data"], device="cpu")
    images = to_uint8_nhwc(decode(torch.cat(expected)))
    drawn = np.load(out / "samples.npz")["arr_0"]
    assert np.abs(drawn.astype(int) - images.astype(int)).max() <= 1

    refused = subprocess.run([*command[:-2], "--sampler", "ddim", "--out", str(tmp_path / "x")],
                             env=launcher_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert refused.returncode != 0 and "sampler 'ddim' does not sample a flow model" in refused.stderr


def test_flow_run_logged_its_in_loop_grid_and_kid(flow_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert [m["step"] for m in read_metrics(flow_run)] == [1, 2]
    assert (flow_run / "samples" / "step00000002.png").is_file()
    events = EventAccumulator(str(flow_run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"cluster/loss_3", "mtl/uw_s_0", "eval/kernel_inception_distance_mean"} <= scalars
    assert "samples/ema" in events.Tags()["images"]


def test_repa_on_flow_trains_and_logs_the_alignment(repa_shards, tmp_path):  # noqa: F811
    from test_repa import train_tiny_repa

    metrics = train_tiny_repa(
        tmp_path / "run", "demo-cpu-flow.yaml", repa_shards["manifest"], repa_shards["encoder"], 2
    )
    assert len(metrics) == 2 and all(-1.0 <= m["loss/repa"] <= 1.0 for m in metrics)
    # the objective is flow's velocity MSE plus coeff x REPA: loss/diffusion is what remains of it
    assert all(
        m["loss/diffusion"] == pytest.approx(m["loss/objective"] - 0.5 * m["loss/repa"]) for m in metrics
    )
