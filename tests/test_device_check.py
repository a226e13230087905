"""GPU first light (bench/device_check.sh): its CPU dry run in CI, and the tests it runs on a GPU.

The `cuda` tests are the CUDA twins of CPU tests elsewhere (DiT forward through fused SDPA under bf16 autocast,
backward, no host sync in a training forward/backward, losses, DDIM, the sampler, torch.compile); they skip
without a GPU. `bash bench/device_check.sh OUT` runs them there with `pytest -m cuda`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ------------------------------------------------------------------------------------- the CPU dry run


@pytest.fixture(scope="session")
def smoke(tmp_path_factory, worker_id) -> tuple[dict, Path, float]:
    """The CPU smoke, run once per pytest run: under pytest-xdist (`make test-slow`) the first worker to need it
    runs it into the run's shared temporary directory, under a file lock, and the other reads it."""
    from filelock import FileLock  # torch's own dependency

    base = tmp_path_factory.getbasetemp()
    shared = (
        base.parent if worker_id != "master" else base
    )  # pytest-of-USER/pytest-N: this run's, all workers'
    out, timing = shared / "device-check", shared / "device-check-wall.txt"
    with FileLock(str(shared / "device-check.lock")):
        if not timing.is_file():
            out.mkdir(exist_ok=True)
            # a roomier budget than the script's default 170 s: CI's two cores are often shared
            env = {**os.environ, "PY": sys.executable,
                   "DEVICE_CHECK_BUDGET_S": os.environ.get("DEVICE_CHECK_BUDGET_S", "420")}  # fmt: skip
            env.pop("DEVICE_CHECK_DEADLINE", None)
            started = time.time()
            done = subprocess.run(
                ["bash", str(REPO / "bench/device_check.sh"), "--cpu-smoke", str(out)],
                cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            assert (out / "device_check.json").is_file(), done.stdout[-3000:] + done.stderr[-3000:]
            timing.write_text(str(time.time() - started))
    return json.loads((out / "device_check.json").read_text()), out, float(timing.read_text())


@pytest.mark.slow
@pytest.mark.minutes  # ~2.5 min on 2 cores: `make test-slow`, which CI runs
def test_cpu_smoke_writes_every_field_of_the_schema(smoke):
    from device_report import MAX_FILES, SCHEMA, STEPS, missing_keys

    doc, out, wall = smoke
    assert missing_keys(doc) == []
    assert all(path in {p for p in SCHEMA} for path in SCHEMA)  # the schema names each path once
    assert doc["schema_version"] == 1 and doc["cpu_smoke"] is True and doc["device"] == "cpu"
    assert doc["gpu_name"] is None  # CPU figures are marked as such, never as a GPU's
    assert [s["name"] for s in doc["steps"]] == list(STEPS)
    status = {s["name"]: s["status"] for s in doc["steps"]}
    logs = {s["name"]: s["log_tail"][-1500:] for s in doc["steps"]}
    assert status == {"install": "skipped", "cuda_smoke": "ok", "gpu_bench": "ok", "convergence": "ok"}, logs
    files = doc["files"]
    assert len(files) <= MAX_FILES and all(f.count("/") <= 2 for f in files)
    for name in ("device_check.json", "device_check.md", "convergence.png", "samples.png"):
        assert name in files and (out / name).stat().st_size > 100, name
    assert {f"logs/{name}.log" for name in STEPS} <= set(files)
    assert 0 < doc["wall_s"]["value"] <= doc["budget_s"]["value"] + 30 and doc["wall_s"]["unit"].startswith(
        "s"
    )
    assert 0 < doc["carried_mib"]["value"] < 64


@pytest.mark.slow
@pytest.mark.minutes
def test_cpu_smoke_values_are_sane(smoke):
    doc = smoke[0]
    cs = doc["cuda_smoke"]
    assert cs["ok"] and cs["pytest"]["ok"] and cs["pytest"]["failed"] == 0 and cs["pytest"]["errors"] == 0
    assert cs["pytest"]["skipped"] > 0 and cs["pytest"]["passed"] == 0  # the cuda tests skip on a CPU
    for zero in ("zero1", "zero2", "zero3"):
        train, resume = cs["train"][zero], cs["resume"][zero]
        assert train["ok"] and train["steps"] == 20 and np.isfinite(train["loss_last"])
        assert train["img_per_s"]["value"] > 0 and train["img_per_s"]["unit"].startswith("images/s")
        assert resume["ok"] and resume["killed"] and resume["resumed_from_step"] == 10
        assert resume["bitwise"] is True and resume["losses_equal"] is True  # the CPU is deterministic
        assert resume["max_abs_diff"]["value"] == 0.0
        assert cs["convert"][zero]["ok"]
    assert cs["resume"]["noise_floor_max_abs_diff"]["value"] == 0.0
    assert cs["sample"]["ok"] and cs["sample"]["images"] == 16 and cs["sample"]["dtype"] == "uint8"
    flow = cs["flow"]  # the flow-matching run: trained 20 steps, converted, 4 images through --sampler heun
    assert (
        flow["ok"] and flow["steps"] == 20 and flow["sample_images"] == 4 and np.isfinite(flow["loss_last"])
    )

    bench = doc["gpu_bench"]
    assert bench["ok"] and len(bench["settings"]) == 4
    for s in bench["settings"]:
        if s["compile"]:
            assert s["status"] == "skipped" and "cpu smoke" in s["reason"]
            continue
        assert s["status"] == "ok" and s["img_per_s"]["value"] > 0 and s["peak_memory"]["value"] > 0
        assert (
            s["mfu_2mac"]["value"] is None and s["mfu_dit_paper"]["value"] is None
        )  # no CPU peak to divide by
    assert bench["flops"]["forward_gflops_dit_paper"]["value"] == 118.6
    assert bench["flops"]["forward_gflops_2mac"]["value"] == pytest.approx(237.2)
    for key in ("accumulation_1", "accumulation_4"):
        assert bench["syncs"][key]["dtr_scale_calls_per_step"] == 1.0  # as tests/test_step_syncs.py expects

    conv = doc["convergence"]
    assert (
        conv["ok"]
        and conv["variants"] == ["vanilla", "dtr", "ant-uw", "dtr+ant-uw"]
        and conv["seeds"] == [0]  # the smoke's size; the GPU run trains seeds 0 and 1
    )
    assert conv["eval_steps"] == [conv["steps"] // 2, conv["steps"]] and conv["calibration"]["runs"] == 2
    assert conv["calibration"]["step_time"]["value"] > 0
    for variant in conv["variants"]:
        for cfg in ("cfg3", "cfg1.5"):
            crossing = conv["crossings"][variant][cfg]
            assert set(crossing) == {"0.25", "0.5", "0.75"}
            assert all(v is None or v in conv["eval_steps"] for v in crossing.values())
            accuracy = conv["final"][variant][f"class_accuracy_{cfg}"]["value"]
            assert 0 <= accuracy <= 1 and np.isfinite(conv["final"][variant][f"kid_{cfg}"]["value"])


def test_missing_keys_reads_wildcards_lists_and_dotted_cfg_keys():
    from device_report import missing_keys

    schema = ["a.*.x", "b[].y", "c.cfg1.5", "d.zero1.ok"]
    good = {"a": {"p": {"x": 1}}, "b": [{"y": None}], "c": {"cfg1.5": 0}, "d": {"zero1": {"ok": True}}}
    assert missing_keys(good, schema) == []
    bad = {"a": {}, "b": [{"z": 1}], "c": {"cfg1": {"5": 0}}, "d": {"zero1": {}}}
    assert missing_keys(bad, schema) == schema


def test_jobs_run_every_job_when_the_running_ones_end_in_the_same_poll(tmp_path):
    # Two instant jobs fill both slots and end before the next poll; the third must still run (the scheduler
    # once read "nothing running" as "the rest waits for a job that never ran" and dropped the rest).
    from device_smoke import Jobs

    jobs = Jobs(2, time.time() + 60, tmp_path)
    for name in ("a", "b"):  # started together, they end within one 0.2 s poll
        jobs.add(name, ["sleep", "0.5"], dict(os.environ))
    for name in ("c", "d"):
        jobs.add(name, ["true"], dict(os.environ))
    jobs.add("e", ["true"], dict(os.environ), after="d")
    jobs.add("f", ["true"], dict(os.environ), after="never-added")
    results = jobs.run()
    assert {name: r["rc"] for name, r in results.items()} == {
        "a": 0, "b": 0, "c": 0, "d": 0, "e": 0, "f": "not run"}  # fmt: skip


def test_the_carried_inception_round_trips_to_a_full_fp32_state_dict(tmp_path):
    """pack-inception keeps pool3 (conv weights in fp16); unpacked it loads strictly, logits layer zero."""
    from device_wheels import pack_inception, unpack_inception

    from dtr_scale.inception import inception_extractor, load_inception_weights

    packed = tmp_path / "packed.safetensors"
    pack_inception(packed)
    assert packed.stat().st_size < 45 * 2**20
    state, _ = load_inception_weights(unpack_inception(packed, tmp_path / "full.safetensors"))
    full, _ = load_inception_weights(None)
    assert state.keys() == full.keys() and all(v.dtype == full[k].dtype for k, v in state.items())
    assert not state["fc.weight"].any()
    key = next(k for k in full if k.endswith("conv.weight"))
    torch.testing.assert_close(state[key], full[key].half().float(), rtol=0, atol=0)
    inception_extractor(state)  # loads strictly


# ------------------------------------------------------------------------------------- CUDA twins


def tiny_routed(**kwargs):
    from test_dit import NUM_TASKS, perturb_zero_init, tiny_dit

    model = tiny_dit(routing={"beta": 0.8, "num_tasks": NUM_TASKS}, hidden_size=64, num_heads=2, **kwargs)
    perturb_zero_init(model)
    return model


@pytest.mark.cuda
@needs_cuda
def test_dit_bf16_forward_through_fused_sdpa_on_cuda_matches_fp32_on_cpu():
    from test_dit import tiny_inputs
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = tiny_routed(class_dropout_prob=0.0).eval()
    x, t, y = tiny_inputs()
    with torch.no_grad():
        reference = model(x, t, y)
        gpu = model.cuda()
        # fused kernels only: an input they cannot take raises instead of falling back to the math kernel
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = gpu(x.cuda(), t.cuda(), y.cuda())
    assert out.dtype == torch.bfloat16 and reference.abs().max() > 1e-3
    torch.testing.assert_close(
        out.float().cpu(), reference, rtol=0.05, atol=0.02 * float(reference.abs().max())
    )


@pytest.mark.cuda
@needs_cuda
def test_routed_dit_bf16_backward_on_cuda_reaches_every_parameter():
    from test_dit import tiny_inputs

    model = tiny_routed(class_dropout_prob=0.0).cuda().train()
    x, t, y = (v.cuda() for v in tiny_inputs())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(x, t, y).float().square().mean()
    loss.backward()
    zero = [n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert zero == [] and all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())


@pytest.mark.cuda
@needs_cuda
def test_a_training_forward_and_backward_make_no_host_sync_on_cuda():
    """The lean step on the device itself: DTR mask lookup, label dropout, q_sample and the loss never wait for
    the GPU (torch raises on any synchronizing CUDA call in sync-debug mode "error")."""
    from dtr_scale.diffusion import create_diffusion

    model = tiny_routed(class_dropout_prob=0.1).cuda().train()
    diffusion = create_diffusion("")
    x = torch.randn(8, 4, 8, 8, device="cuda")
    y = torch.randint(0, 10, (8,), device="cuda")

    def step():
        t = torch.randint(0, 1000, (8,), device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            terms = diffusion.training_losses(lambda xt, tt: model(xt, tt, y), x, t)
        terms["loss"].mean().backward()
        return terms

    step()  # first use: schedule tables copied to the GPU once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        terms = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert terms["loss"].dtype == torch.float32 and bool(torch.isfinite(terms["loss"]).all())


@pytest.mark.cuda
@needs_cuda
def test_schedule_tables_are_copied_to_the_gpu_once():
    from dtr_scale.diffusion.tables import table_on

    table = np.linspace(0, 1, 1000)
    first = table_on(table, torch.device("cuda"))
    assert first.device.type == "cuda" and first.dtype == torch.float64
    assert table_on(table, torch.device("cuda")) is first


@pytest.mark.cuda
@needs_cuda
def test_ddim_with_the_exact_eps_recovers_x0_on_cuda():
    from dtr_scale.diffusion import create_diffusion, get_named_beta_schedule

    abar = torch.from_numpy(np.cumprod(1 - get_named_beta_schedule("linear", 1000))).cuda()
    x0 = torch.rand(2, 4, 3, 3, device="cuda", generator=torch.Generator("cuda").manual_seed(16)) * 2 - 1

    def oracle(x, t):
        a = abar[t].view(-1, 1, 1, 1)
        eps = ((x.double() - a.sqrt() * x0.double()) / (1 - a).sqrt()).float()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)

    diffusion = create_diffusion("ddim10")
    sample = diffusion.ddim_sample_loop(oracle, x0.shape, generator=torch.Generator("cuda").manual_seed(0))
    assert sample.device.type == "cuda"
    torch.testing.assert_close(sample, x0, rtol=0, atol=1e-4)


@pytest.mark.cuda
@needs_cuda
def test_sampler_on_cuda_is_reproducible_and_close_to_the_cpu(tmp_path, model_dir):
    from test_sampler import FAST, quiet

    from dtr_scale.sample.sampler import sample_to_dir

    def draw(out: Path, device: str) -> dict[str, np.ndarray]:
        sample_to_dir(model_dir, out, **FAST, device=device, log=quiet)
        with np.load(out / "samples.npz") as data:
            return {key: data[key] for key in data.files}

    first, again = draw(tmp_path / "a", "cuda"), draw(tmp_path / "b", "cuda")
    cpu = draw(tmp_path / "c", "cpu")
    assert np.array_equal(first["arr_0"], again["arr_0"])
    assert np.array_equal(first["arr_1"], cpu["arr_1"])  # the same labels
    # bf16 autocast on the GPU vs fp32 on the CPU: close, not equal
    assert np.abs(first["arr_0"].astype(int) - cpu["arr_0"].astype(int)).mean() < 8


@pytest.mark.cuda
@needs_cuda
def test_compiled_routed_dit_on_cuda_matches_eager():
    from test_dit import NUM_TASKS, perturb_zero_init

    from dtr_scale.models.dit import DiT_models

    torch.manual_seed(0)
    model = DiT_models["DiT-S/8"](input_size=16, routing={"beta": 0.8, "num_tasks": NUM_TASKS}).eval()
    perturb_zero_init(model, std=0.02)
    model = model.cuda()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=generator).cuda()
    t, y = torch.tensor([3, 900]).cuda(), torch.tensor([1, 500]).cuda()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        eager = model(x, t, y)
        out = compiled(x, t, y)
    assert eager.abs().max() > 1e-3
    # fp32 both ways; the fused kernels sum in another order (and cuDNN's patch conv may use TF32 in both)
    torch.testing.assert_close(out, eager, rtol=1e-3, atol=1e-3)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny routed model directory, as tests/test_sampler.py builds it."""
    from test_sampler import DATA, NUM_CLASSES

    from dtr_scale.models.dit import DiT
    from dtr_scale.models.model_dir import make_config, save_model_dir

    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2,
                num_classes=NUM_CLASSES, routing={"alpha": 4.0, "beta": 0.8, "num_tasks": 1000})  # fmt: skip
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    ema = {k: v * 0.5 for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("model") / "tiny"
    return save_model_dir(path, model.state_dict(), ema, make_config(model, DATA))
