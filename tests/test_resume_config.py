"""Resuming with another config: what defines the run is refused before anything is written, what may change
is applied for real and said (pytorch/examples #816, mosaicml/composer #3154: a new train.lr silently kept the
old one while config.yaml claimed the new; another model.depth died in a load_state_dict traceback and still
rewrote config.yaml)."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from distributed import REPO, run_ranks
from test_cli_errors import _ranks
from test_train_distributed import final_weights, read_metrics, train_args

from dtr_scale.checkpoint_format import global_state_path, write_state_file
from dtr_scale.config import ConfigError, RunConfig, dump_yaml, load_config
from dtr_scale.config.changes import CHANGEABLE, REFUSED_SECTIONS, config_changes, may_change, resume_markdown
from dtr_scale.config_docs import config_fields
from dtr_scale.train.resume import check_config, data_fingerprint, reset_lr_schedule

# ------------------------------------------------------------------------------- the two lists


def test_keys_that_define_the_run_are_refused_and_new_keys_by_default():
    for key in ("model.depth", "model.hidden_size", "model.class_dropout_prob", "routing.beta", "routing.enabled",
                "diffusion.noise_schedule", "diffusion.loss_weighting", "mtl.num_clusters", "mtl.objective",
                "mtl.method", "data.shards", "data.hflip", "train.seed", "train.precision",
                "deepspeed.sub_group_size", "data.canonical_streams", "repa.encoder", "repa.depth"):  # fmt: skip
        assert not may_change(key), key
    # keys that do not exist yet (a flow-matching objective, a new model knob) are refused until listed
    assert not may_change("diffusion.objective") and not may_change("model.qk_norm")
    assert not may_change("flow.time_sampling")
    for key in ("train.lr", "train.max_steps", "train.lr_schedule", "train.warmup_steps", "train.global_batch_size",
                "train.micro_batch_size", "train.log_every", "train.checkpoint_every", "monitor.sample_every",
                "monitor.a_future_key", "eval.every", "run_dir", "mtl.uw_lr",
                "deepspeed.zero_stage"):  # fmt: skip
        assert may_change(key), key


def test_every_listed_key_exists_and_every_section_of_the_schema_is_described():
    keys = set(config_fields())
    sections = {key.split(".")[0] for key in keys if "." in key}
    for pattern in CHANGEABLE:
        assert pattern in keys or (pattern.endswith(".*") and pattern[:-2] in sections), pattern
    assert sections - {p[:-2] for p in CHANGEABLE if p.endswith(".*")} == set(REFUSED_SECTIONS)


def test_docs_resume_md_has_both_lists():
    text = (REPO / "docs/resume.md").read_text()
    assert resume_markdown() in text, (
        "docs/resume.md is stale: paste config.changes.resume_markdown() into it"
    )
    assert "docs/resume.md" in (REPO / "README.md").read_text()


def test_a_key_the_saved_config_lacks_counts_as_its_default():
    saved = {"train": {"lr": 0.001}, "diffusion": {}}  # written before diffusion.loss_weighting existed
    current = {"train": {"lr": 0.001}, "diffusion": {"loss_weighting": "min_snr"}}
    defaults = {"train": {"lr": 1e-4}, "diffusion": {"loss_weighting": "none"}}
    assert config_changes(saved, current, defaults) == [("diffusion.loss_weighting", "none", "min_snr")]
    assert config_changes(saved, {**current, "diffusion": {"loss_weighting": "none"}}, defaults) == []


# ------------------------------------------------------------------------------- check_config, no DeepSpeed


def _manifest(sha: str = "a" * 64):
    return SimpleNamespace(shards=[{"name": "shard-000000.tar", "num_samples": 10, "sha256": sha}],
                           latent_shape=(4, 8, 8), scaling_factor=1.0)  # fmt: skip


def _checkpoint(run_dir: Path, cfg: RunConfig, data: str | None) -> None:
    run = {"config": dump_yaml(cfg), "clusters": [], **({"data": data} if data else {})}
    (run_dir / "checkpoints/step00000007/dtr_scale").mkdir(parents=True)
    write_state_file(global_state_path(run_dir / "checkpoints/step00000007"),
                     {"world_size": 1, "progress": {"step": 7, "samples_seen": 70, "skipped_steps": 0}, "run": run})  # fmt: skip


def _cfg(*overrides: str) -> RunConfig:
    return load_config(REPO / "configs/demo-cpu.yaml", ["data.shards=/data/a/manifest.json", *overrides])


def test_refusal_names_every_key_and_both_values_in_one_line(tmp_path):
    _checkpoint(tmp_path, _cfg(), data_fingerprint(_manifest()))
    with pytest.raises(ConfigError) as caught:
        check_config(_cfg("model.depth=6", "routing.beta=0.5", "train.lr=3e-4", "mtl.objective=snr"),
                     tmp_path, "step00000007", _manifest())  # fmt: skip
    message = str(caught.value)
    assert "\n" not in message and "(step 7)" in message
    assert 'model.depth 4 -> 6; routing.beta 0.8 -> 0.5; mtl.objective "timestep" -> "snr".' in message
    assert "train.lr" not in message  # a key that may change is not blamed


def test_the_same_shards_at_another_path_may_change_other_shards_may_not(tmp_path):
    _checkpoint(tmp_path, _cfg(), data_fingerprint(_manifest()))
    moved = check_config(_cfg("data.shards=/data/b/manifest.json"), tmp_path, "step00000007", _manifest())
    assert moved.applied == ['data.shards: "/data/a/manifest.json" -> "/data/b/manifest.json" (the same shards: '
                             "names, sizes and sha256)"]  # fmt: skip
    with pytest.raises(ConfigError, match=r'data\.shards "/data/a/manifest.json" -> "/data/b/manifest.json" '
                       r"\(other shards\)"):  # fmt: skip
        check_config(_cfg("data.shards=/data/b/manifest.json"), tmp_path, "step00000007", _manifest("b" * 64))
    with pytest.raises(
        ConfigError, match=r'data\.shards "/data/a/manifest.json" \(the same path now holds other'
    ):
        check_config(_cfg(), tmp_path, "step00000007", _manifest("b" * 64))


def test_changes_that_may_happen_are_stated_one_line_each(tmp_path):
    _checkpoint(tmp_path, _cfg(), data_fingerprint(_manifest()))
    changes = check_config(_cfg("train.global_batch_size=256", "train.lr=5e-4", "monitor.sample_every=50",
                                "train.max_steps=3e3"), tmp_path, "step00000007", _manifest())  # fmt: skip
    assert [line.split(" (")[0] for line in changes.applied] == [
        "train.max_steps: 2000 -> 3000", "train.global_batch_size: 128 -> 256", "train.lr: 0.001 -> 0.0005",
        "monitor.sample_every: 1000 -> 50"]  # fmt: skip
    assert changes.step == 7 and changes.saved_config_text == dump_yaml(_cfg())


def test_a_checkpoint_without_a_data_fingerprint_compares_the_path(tmp_path):
    _checkpoint(tmp_path, _cfg(), None)  # written before fingerprints
    assert check_config(_cfg(), tmp_path, "step00000007", _manifest("c" * 64)).applied == []
    with pytest.raises(ConfigError, match=r"data\.shards .* \(another path\)"):
        check_config(_cfg("data.shards=/data/b/manifest.json"), tmp_path, "step00000007", _manifest())


# ------------------------------------------------------------------------------- the LR reaches the optimizer


def test_reset_lr_schedule_gives_the_new_lr_at_the_checkpoints_position():
    from transformers import get_scheduler

    def build(lr: float):
        params = [torch.nn.Parameter(torch.ones(3))]
        opt = torch.optim.AdamW([{"params": params}, {"params": [torch.nn.Parameter(torch.ones(1))], "lr": 0.025}],
                                lr=lr)  # fmt: skip
        return opt, get_scheduler("constant_with_warmup", opt, num_warmup_steps=10)

    opt, sched = build(1e-3)
    for _ in range(3):
        opt.step()
        sched.step()
    saved = opt.state_dict(), sched.state_dict()
    opt, sched = build(2e-3)  # the resumed launch asks for 2e-3
    base = list(sched.base_lrs)
    opt.load_state_dict(saved[0])
    sched.load_state_dict(saved[1])
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 3 / 10)  # what the checkpoint brings back
    reset_lr_schedule(sched, base)
    # warmup factor s / 10 at the resumed position s = 3, then 4 (hand-computed)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2e-3 * 3 / 10, 0.025 * 3 / 10])
    assert opt.param_groups[0]["initial_lr"] == 2e-3 and sched.get_last_lr()[0] == pytest.approx(6e-4)
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2e-3 * 4 / 10, 0.025 * 4 / 10])


# ------------------------------------------------------------------------------- as a user runs it

STEPS = ["train.warmup_steps=0", "train.global_batch_size=8", "train.checkpoint_every=1", "train.max_steps=4"]


@pytest.fixture(scope="module")
def trained_to_step_4(tmp_path_factory, builtin_data) -> Path:
    """A run of 4 steps with its checkpoints at steps 3 and 4 (the tests copy it, or check it is left alone)."""
    run_dir = tmp_path_factory.mktemp("resume") / "run"
    run_ranks(train_args(run_dir, builtin_data["train"], *STEPS), world_size=1)
    return run_dir


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_changed_lr_and_schedule_reach_the_optimizer_on_resume(tmp_path, builtin_data, trained_to_step_4):
    _check_new_lr_reaches_the_optimizer(trained_to_step_4, tmp_path / "changed", builtin_data["train"], 1)


@pytest.mark.multiprocess
@pytest.mark.minutes  # two more two-process runs; ZeRO-2 at world 1 above is the same path in `make test`
def test_two_process_zero3_changed_lr_reaches_the_partitioned_optimizer(tmp_path, builtin_data):
    straight = tmp_path / "straight"
    zero3 = ["deepspeed.zero_stage=3", "train.micro_batch_size=4"]  # 8 = 4 per rank x 2
    run_ranks(train_args(straight, builtin_data["train"], *STEPS, *zero3), world_size=2)
    _check_new_lr_reaches_the_optimizer(straight, tmp_path / "changed", builtin_data["train"], 2, *zero3)


def _check_new_lr_reaches_the_optimizer(
    straight: Path, changed: Path, manifest: Path, world: int, *extra: str
):
    # Step 4 from the checkpoint of step 3, once as trained and once resumed with lr 0.002 and a linear decay to
    # step 5: the same weights, Adam moments and gradient, so AdamW's update (lr x m_hat / (sqrt(v_hat) + eps), no
    # weight decay) scales by the ratio of the LRs used at step 4: 0.002 x (5 - 3) / 5 = 0.0008 against 0.001.
    # (Before the fix the checkpoint's LR 0.001 came back: ratio 1.)
    shutil.copytree(straight, changed)
    args = train_args(changed, manifest, *STEPS, *extra, "train.max_steps=5", "train.lr=2e-3",
                      "train.lr_schedule=linear", "--resume", "step00000003")  # fmt: skip
    out = run_ranks(args, world_size=world)[0].stdout
    said = [line for line in out.splitlines() if line.startswith("resume: changed")]
    assert [line.removeprefix("resume: changed ").split(":")[0] for line in said] == [
        "run_dir", "train.max_steps", "train.lr", "train.lr_schedule"]  # fmt: skip
    assert "resume: changed train.lr: 0.001 -> 0.002 (" in out
    w3 = final_weights(straight, "step00000003")
    w_same, w_changed = final_weights(straight, "step00000004"), final_weights(changed, "step00000004")
    eps = torch.finfo(torch.float32).eps
    moved = 0.0
    for key in w3:
        d_same, d_changed = (w_same[key] - w3[key]).detach(), (w_changed[key] - w3[key]).detach()
        # UW's s keeps its own base LR (mtl.uw_lr, 0.025), under the new schedule: 0.025 x 2 / 5 against 0.025
        ratio = 0.4 if key.startswith("balancer.") else 0.8
        bound = 4 * eps * (w3[key].abs() + d_same.abs())  # fp32 rounding of the two weight updates
        assert ((d_changed - ratio * d_same).abs() <= bound).all(), key
        moved = max(moved, float(d_same.abs().max()))
    assert moved > 1e-4  # the updates are large enough for the ratio to mean something
    lr = {m["step"]: m["lr"] for m in read_metrics(changed)}
    assert lr == pytest.approx({1: 1e-3, 2: 1e-3, 3: 1e-3, 4: 2e-3 * (5 - 4) / 5, 5: 0.0})
    assert "lr: 0.002\n" in (changed / "config.yaml").read_text()
    kept = (changed / "config.step00000003.yaml").read_text()
    assert kept == (straight / "config.yaml").read_text() and "lr: 0.001\n" in kept


@pytest.mark.multiprocess
def test_a_refused_change_is_one_line_and_writes_nothing(builtin_data, trained_to_step_4):
    run_dir = trained_to_step_4
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    args = train_args(run_dir, builtin_data["train"], *STEPS, "train.max_steps=6", "model.depth=3",
                      "routing.beta=0.5", "train.lr=1e-4")  # fmt: skip
    (result,) = _ranks(args[2:], world_size=1)
    assert result.returncode == 2 and "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == [
        f"dtr-scale train: error: {run_dir} resumes from {run_dir}/checkpoints/step00000004 (step 4), where these "
        "keys cannot change: model.depth 2 -> 3; routing.beta 0.8 -> 0.5. Set them back (the overrides that resume: "
        "model.depth=2 routing.beta=0.8), or train them in a new run_dir (what may change on resume: docs/resume.md)"
    ]
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before  # config.yaml included


@pytest.mark.multiprocess
def test_a_larger_global_batch_is_applied_with_gradient_accumulation(
    tmp_path, builtin_data, trained_to_step_4
):
    # 8 per step until the checkpoint at step 4, then 16 (two micro-batches of 8, the micro-batch the data stream
    # was saved with): step 5 trains on 16 samples and the run has seen 4 x 8 + 16 = 48.
    from dtr_scale.checkpoint_format import read_state_file

    run_dir = tmp_path / "run"
    shutil.copytree(trained_to_step_4, run_dir)
    args = train_args(run_dir, builtin_data["train"], *STEPS, "train.max_steps=5", "train.global_batch_size=16",
                      "train.micro_batch_size=8")  # fmt: skip
    out = run_ranks(args, world_size=1)[0].stdout
    assert "resume: changed train.global_batch_size: 8 -> 16 (" in out
    last = read_metrics(run_dir)[-1]
    assert last["step"] == 5 and sum(last[f"cluster/count_{i}"] for i in range(4)) == 16
    state = read_state_file(run_dir / "checkpoints/step00000005/dtr_scale/global.safetensors")
    assert state["progress"]["samples_seen"] == 48
