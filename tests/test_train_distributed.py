"""The DeepSpeed trainer at world size 2 on 127.0.0.1 (gloo), ZeRO 1/2/3, tiny routed DiT."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed import REPO, free_port, launcher_env, run_ranks

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

TINY = [
    "model.hidden_size=32",
    "model.depth=2",
    "model.num_heads=2",
    "train.micro_batch_size=8",
    "train.global_batch_size=16",
    "mtl.method=uw",
    "mtl.num_clusters=4",
    "monitor.sample_every=0",
    "monitor.progress=false",
    "monitor.tensorboard=false",
    "train.log_every=1",
    "data.num_workers=0",
    "data.shuffle_buffer=64",
    "train.ema_decay=0.9",
    "train.ema_warmup=false",
    "train.lr=0.001",
]


def train_args(run_dir: Path, manifest: Path, *extra: str, hooks: bool = False) -> list[str]:
    """`-m dtr_scale train ...` of a tiny run; hooks=True runs it through tests/dtr_scale_testhooks.py."""
    return [
        "-m",
        "dtr_scale_testhooks" if hooks else "dtr_scale",
        "train",
        "--config",
        str(REPO / "configs/demo-cpu.yaml"),
        f"run_dir={run_dir}",
        f"data.shards={manifest}",
        *TINY,
        *extra,
    ]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def same_state(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return a == b


def final_weights(run_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag=tag)


@pytest.mark.parametrize(
    ("zero_stage", "method", "num_workers", "world_size", "precision"),
    [
        (1, "uw", 0, 2, "fp32"),
        (2, "uw", 0, 2, "fp32"),
        (3, "uw", 0, 2, "fp32"),
        (2, "nash", 0, 2, "fp32"),
        (1, "pcgrad", 0, 2, "fp32"),
        # Loader workers: creating the DataLoader must not draw from the restored global RNG (label dropout).
        (2, "uw", 2, 2, "fp32"),
        (3, "uw", 2, 1, "fp32"),
        # bf16 through DeepSpeed's CPU accelerator: the GPU path's bf16 optimizer and checkpoints.
        (2, "uw", 0, 2, "bf16"),
        (3, "uw", 0, 2, "bf16"),
        (2, "nash", 0, 2, "bf16"),
    ],
)
def test_two_process_kill_and_resume_equals_uninterrupted(
    tmp_path, builtin_data, zero_stage, method, num_workers, world_size, precision
):
    kill_and_resume_equals_uninterrupted(
        tmp_path, builtin_data, zero_stage, method, num_workers, world_size, precision
    )


@pytest.mark.minutes  # three two-process ZeRO-3 runs (~40 s): `make test-slow`, which CI runs
def test_two_process_flow_kill_and_resume_equals_uninterrupted_at_zero3_bf16(tmp_path, builtin_data):
    # Flow matching with logit-normal times (ANT-UW takes the clusters' unequal draws): resume stays exact.
    flow = ["diffusion.objective=flow", "flow.time_sampling=logit_normal"]
    kill_and_resume_equals_uninterrupted(tmp_path, builtin_data, 3, "uw", 0, 2, "bf16", flow)


def kill_and_resume_equals_uninterrupted(
    tmp_path, builtin_data, zero_stage, method, num_workers, world_size, precision, extra=()
):
    """Train 6 steps straight, and again killed after step 4 and resumed from step 3: same metrics, weights,
    balancer, EMA shards."""
    manifest = builtin_data["train"]
    steps = [
        f"deepspeed.zero_stage={zero_stage}",
        "train.max_steps=6",
        "train.checkpoint_every=3",
        f"mtl.method={method}",
        "mtl.update_every=2",
        f"data.num_workers={num_workers}",
        f"train.precision={precision}",
        *extra,
    ]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    run_ranks(train_args(straight, manifest, *steps), world_size=world_size)
    # rank 0 SIGKILLs itself after step 4 (checkpoint at 3 exists); the launcher kills rank 1.
    run_ranks(
        train_args(crashed, manifest, *steps, hooks=True),
        world_size=world_size,
        env={"DTR_TEST_KILL_AFTER_STEP": "4"},
        expect_kill=True,
    )
    assert (crashed / "checkpoints/latest").read_text() == "step00000003"
    out = run_ranks(train_args(crashed, manifest, *steps), world_size=world_size)  # resumes from latest
    assert "resumed from" in out[0].stdout and "at step 3" in out[0].stdout

    a, b = read_metrics(straight), read_metrics(crashed)
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]
    for ma, mb in zip(a, b):
        assert ma.keys() == mb.keys() and "cluster/loss_3" in ma
        for key in ma:
            if not key.startswith(("perf/", "memory/")):
                assert ma[key] == mb[key], (ma["step"], key)
    wa, wb = final_weights(straight, "step00000006"), final_weights(crashed, "step00000006")
    assert wa.keys() == wb.keys()
    assert any(k.startswith("balancer.") for k in wa) == (method == "uw")  # UW's s is a trained parameter
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    from dtr_scale.checkpoint_format import read_state_file

    ga = read_state_file(straight / "checkpoints/step00000006/dtr_scale/global.safetensors")
    gb = read_state_file(crashed / "checkpoints/step00000006/dtr_scale/global.safetensors")
    assert same_state(ga["balancer"], gb["balancer"])  # nash/pcgrad weights, Gram, solver/generator state
    for rank in range(world_size):
        sa = read_state_file(straight / f"checkpoints/step00000006/dtr_scale/rank{rank:05d}.safetensors")
        sb = read_state_file(crashed / f"checkpoints/step00000006/dtr_scale/rank{rank:05d}.safetensors")
        assert torch.equal(sa["ema"]["shard"], sb["ema"]["shard"])
        assert sa["stream"] == sb["stream"]
    if precision == "bf16":  # convert reads the bf16 run's checkpoint: fp32 weights equal to DeepSpeed's own
        from safetensors.torch import load_file

        from dtr_scale.sample.convert import convert_checkpoint

        model = load_file(str(convert_checkpoint(straight, tmp_path / "model") / "model.safetensors"))
        checked = [key for key in model if f"model.{key}" in wa]  # (pos_embed is a fixed buffer)
        assert len(checked) > 10
        for key in checked:
            assert model[key].dtype == torch.float32 and torch.equal(model[key], wa[f"model.{key}"]), key


EMA_SCRIPT = r"""
import sys, torch, deepspeed
from dtr_scale.config import load_config
from dtr_scale.train.engine import Trainer
cfg = load_config(sys.argv[1], sys.argv[2:])
tr = Trainer(cfg)
from deepspeed.utils import safe_get_full_fp32_param
model = tr.engine.module.model
params = [p for p in model.parameters()]
def master():  # DeepSpeed's fp32 master weights, whole (a collective)
    return {n: safe_get_full_fp32_param(p).detach().clone().float() for n, p in model.named_parameters()}
def module_weights():  # what the module computes with (bf16 under bf16 training)
    with deepspeed.zero.GatheredParameters(params, enabled=cfg.deepspeed.zero_stage == 3):
        return {n: p.detach().clone().float() for n, p in model.named_parameters()}
ref, ref_module = master(), module_weights()  # unsharded EMAs of the same trajectory, in one place
batches = iter(tr.stream)
decay = cfg.train.ema_decay
for _ in range(4):
    assert tr.train_step(batches)
    for n, w in master().items():
        ref[n].mul_(decay).add_(w, alpha=1 - decay)
    for n, w in module_weights().items():
        ref_module[n].mul_(decay).add_(w, alpha=1 - decay)
gathered = tr.ema.gather(dst=0)
last = master()  # collectives: every rank takes part
if tr.rank == 0:
    worst = max((gathered[n] - ref[n]).abs().max().item() for n in ref)
    vs_module = max((gathered[n] - ref_module[n]).abs().max().item() for n in ref)
    moved = max((ref[n] - w).abs().max().item() for n, w in last.items())
    print(f"EMA_MAX_DIFF {worst} MOVED {moved} SHARD {tr.ema.shard.numel()} TOTAL {sum(v.numel() for v in ref.values())} VS_MODULE {vs_module}")
from distributed import leave
leave()  # not through interpreter exit while gloo threads still release tensors (tests/distributed.py)
"""


@pytest.mark.parametrize(
    ("zero_stage", "precision"),
    [(1, "fp32"), (2, "fp32"), (3, "fp32"), (1, "bf16"), (2, "bf16"), (3, "bf16")],
)
def test_two_process_sharded_ema_equals_single_place_ema_of_the_fp32_master(
    tmp_path, builtin_data, zero_stage, precision
):
    # No warmup: the weights must move enough in a few steps for the bf16 rounding check below to tell the
    # fp32 master from the module weights (transformers' warmup starts at LR 0).
    args = train_args(tmp_path / "run", builtin_data["train"], f"deepspeed.zero_stage={zero_stage}",
                      f"train.precision={precision}", "train.warmup_steps=0")  # fmt: skip
    script_args = ["-c", EMA_SCRIPT, *args[4:]]
    out = run_ranks(script_args)
    line = next(x for x in out[0].stdout.splitlines() if x.startswith("EMA_MAX_DIFF"))
    _, diff, _, moved, _, shard, _, total, _, vs_module = line.split()
    assert float(diff) < 1e-6  # the EMA of DeepSpeed's fp32 master weights, in fp32
    if precision == "bf16":  # and not of the bf16 module weights, which differ by bf16 rounding
        assert float(vs_module) > 1e-5  # (>10x the tolerance above: the test tells the two apart)
    assert float(moved) > 1e-5  # the weights did move, so the comparison means something
    assert int(shard) <= int(total) // 2 + 64  # each rank holds about P / world values


def test_simulated_two_node_torchrun_trains_and_ranks_agree(tmp_path, builtin_data):
    port = free_port()
    args = train_args(
        tmp_path / "run", builtin_data["train"], "train.max_steps=3", "train.checkpoint_every=3", hooks=True
    )
    procs = []
    for node in range(2):
        env = {**launcher_env(), "DTR_TEST_CHECKSUM": "1"}
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--nproc_per_node",
            "1",
            "--node_rank",
            str(node),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            *args,
        ]
        procs.append(
            subprocess.Popen(
                cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    sums = [m for out in outs for m in re.findall(r"parameter checksum (-?\d+\.\d+(?:e-?\d+)?)", out)]
    assert len(sums) == 2 and sums[0] == sums[1], outs
    assert (tmp_path / "run/checkpoints/latest").read_text() == "step00000003"


NAN_SCRIPT = r"""
import sys, torch
from dtr_scale.config import load_config
from dtr_scale.train.engine import Trainer
cfg = load_config(sys.argv[1], sys.argv[2:])
tr = Trainer(cfg)
losses = tr.engine.module.diffusion.training_losses
calls = {"n": 0}
def poisoned(*args, **kwargs):
    calls["n"] += 1
    out = losses(*args, **kwargs)
    if calls["n"] in (2, 3) or cfg.train.max_nonfinite_steps == 2:
        out["loss"] = out["loss"] * float("nan")
    return out
tr.engine.module.diffusion.training_losses = poisoned
before = {n: p.detach().clone() for n, p in tr.engine.module.model.named_parameters()}
try:
    tr.fit()
except FloatingPointError as err:
    print("STOPPED", err)
print("SKIPPED", tr.skipped_steps, "STEP", tr.step)
"""


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_nonfinite_loss_skips_the_step_visibly_then_stops(tmp_path, builtin_data, precision):
    base = train_args(
        tmp_path / "a",
        builtin_data["train"],
        "train.max_steps=5",
        "train.checkpoint_every=100",
        "train.global_batch_size=8",
        f"train.precision={precision}",
    )
    out = run_ranks(["-c", NAN_SCRIPT, *base[4:]], world_size=1)[0].stdout
    assert "non-finite loss on some rank, optimizer step skipped" in out
    assert "SKIPPED 2 STEP 5" in out
    base = train_args(
        tmp_path / "b",
        builtin_data["train"],
        "train.max_steps=5",
        "train.max_nonfinite_steps=2",
        "train.global_batch_size=8",
        f"train.precision={precision}",
    )
    out = run_ranks(["-c", NAN_SCRIPT, *base[4:]], world_size=1)[0].stdout
    assert "STOPPED step 2: stopping after 2 non-finite losses in a row" in out


def test_deepspeed_launcher_module_mode_two_ranks(tmp_path, builtin_data):
    """`deepspeed --module dtr_scale train ...` (what launch/train.sh runs) passes --local_rank first.

    Run as `--module dtr_scale_testhooks` (dtr_scale's CLI plus the test-only checksum print), so that the
    ranks' final weights can be compared."""
    env = {**launcher_env(), "DTR_TEST_CHECKSUM": "1"}
    launcher = Path(sys.executable).parent / "deepspeed"
    args = train_args(
        tmp_path / "run", builtin_data["train"], "train.max_steps=2", "train.checkpoint_every=2", hooks=True
    )
    cmd = [
        sys.executable,
        str(launcher),
        "--num_accelerators",
        "2",
        "--master_port",
        str(free_port()),
        "--module",
        *args[1:],
    ]
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # the launcher relays both ranks' output through one pipe, so lines may interleave
    sums = re.findall(r"rank \d: parameter checksum (-?\d+\.\d+(?:e-?\d+)?)", out.stdout)
    assert len(sums) == 2 and sums[0] == sums[1], out.stdout[-3000:]
    assert (tmp_path / "run/checkpoints/latest").read_text() == "step00000002"


def test_single_process_run_logs_cluster_curves_sample_grids_and_in_loop_kid(tmp_path, builtin_data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    args = train_args(
        run_dir,
        builtin_data["train"],
        "train.max_steps=2",
        "train.checkpoint_every=2",
        "train.global_batch_size=8",
        "monitor.tensorboard=true",
        "monitor.sample_every=2",
        "monitor.sample_steps=3",
        "eval.every=2",
        "eval.num_samples=8",
        "eval.steps=3",
        "eval.reference_size=16",
    )
    run_ranks(args, world_size=1)
    assert (run_dir / "samples/step00000002.png").is_file()
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"loss/mean", "cluster/loss_0", "cluster/weight_3", "mtl/uw_s_0", "lr", "grad_norm"} <= scalars
    assert {"perf/img_per_s", "perf/step_time_s", "eval/kernel_inception_distance_mean"} <= scalars
    assert "samples/ema" in events.Tags()["images"]
    assert (run_dir / "config.yaml").read_text().startswith("run_dir:")


def _tiny_manifest(directory: Path, sizes=(21, 21)) -> Path:
    """Shards of random 4x16x16 latents with labels 0..9 (the failing input of epoch mode: 2 x 21)."""
    import numpy as np

    from dtr_scale.data.shards import LatentSample, shard_name, write_manifest, write_shard

    rng = np.random.default_rng(0)
    directory.mkdir(parents=True)
    shards, n = [], 0
    for j, size in enumerate(sizes):
        samples = []
        for _ in range(size):
            mean = rng.standard_normal((2, 4, 16, 16)).astype(np.float16)
            samples.append(LatentSample(f"s{n:05d}", n % 10, mean, np.zeros_like(mean)))
            n += 1
        shards.append(write_shard(directory / shard_name(j), samples))
    return write_manifest(directory, shards, latent_shape=(4, 16, 16), scaling_factor=1.0, vae={"name": "t"},
                          image_size=32, labels=[str(c) for c in range(10)])  # fmt: skip


def test_two_process_epoch_mode_rolls_over_epochs_and_resumes_exactly(tmp_path):
    # data.resampled=false with 2 shards x 21 and micro-batch 16 died with StopIteration at the end of the
    # data. Now each rank takes one full micro-batch per epoch and training runs on through the epochs.
    manifest = _tiny_manifest(tmp_path / "data")
    # Epoch mode needs a shard per canonical stream: 2 streams for the 2 shards.
    steps = ["data.resampled=false", "train.micro_batch_size=16", "train.global_batch_size=32",
             "train.max_steps=6", "train.checkpoint_every=3", "deepspeed.zero_stage=2",
             "data.canonical_streams=2"]  # fmt: skip
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    run_ranks(train_args(straight, manifest, *steps))
    run_ranks(
        train_args(crashed, manifest, *steps, hooks=True),
        env={"DTR_TEST_KILL_AFTER_STEP": "4"},
        expect_kill=True,
    )
    run_ranks(train_args(crashed, manifest, *steps))
    a, b = read_metrics(straight), read_metrics(crashed)
    assert [m["step"] for m in a] == [1, 2, 3, 4, 5, 6]
    assert [m["data/epoch"] for m in a] == [0, 1, 2, 3, 4, 5]  # one full micro-batch per rank per epoch
    for ma, mb in zip(a, b):
        assert ma["loss/mean"] == mb["loss/mean"], ma["step"]
    wa, wb = final_weights(straight, "step00000006"), final_weights(crashed, "step00000006")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    from dtr_scale.checkpoint_format import read_state_file

    stream = read_state_file(straight / "checkpoints/step00000006/dtr_scale/rank00000.safetensors")["stream"]
    assert stream["batches"] == 6 and stream["samples"] == 6 * 16  # six epochs of one full batch each


def test_two_process_snr_clusters_get_their_share_of_timesteps_in_the_logged_counts(tmp_path, builtin_data):
    # SNR clusters at k = 5 are [0,0], [1,1], [2,6], [7,21], [22,999]. Stratified sampling put 80% of every
    # batch on t <= 21; with the default mtl.sampling=auto t stays uniform, so the last cluster takes ~97.8%.
    run_dir = tmp_path / "snr"
    run_ranks(train_args(run_dir, builtin_data["train"], "mtl.objective=snr", "mtl.num_clusters=5",
                         "train.micro_batch_size=32", "train.global_batch_size=64", "train.max_steps=4"))  # fmt: skip
    metrics = read_metrics(run_dir)
    counts = torch.tensor([[m[f"cluster/count_{i}"] for i in range(5)] for m in metrics])
    assert (counts.sum(dim=1) == 64).all()  # every sample of both ranks, every step
    share = counts.sum(dim=0) / counts.sum()
    assert share[4] > 0.93 and share[:2].sum() < 0.03, share
