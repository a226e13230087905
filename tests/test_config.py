"""Config: YAML + overrides -> typed dataclasses; errors name the key before any work starts."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from distributed import REPO, rank_env

from dtr_scale.config import (
    ConfigError,
    deepspeed_config,
    gradient_accumulation,
    load_config,
    merge_user_deepspeed_config,
    resolve_batch_layout,
    resolve_precision,
)

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = resolve_batch_layout(load_config(path), 1)
    assert cfg.train.global_batch_size % cfg.train.micro_batch_size == 0


def test_paper_configs_use_the_papers_settings():
    for name in ("dit-xl2-dtr-ant.yaml", "dit-l2-dtr-ant.yaml"):
        cfg = load_config(REPO / "configs" / name)
        assert (cfg.mtl.method, cfg.mtl.num_clusters, cfg.mtl.objective) == ("uw", 8, "timestep")
        assert (cfg.routing.alpha, cfg.routing.beta) == (4.0, 0.8)
        assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.global_batch_size) == (1e-4, 0.0, 256)
        assert (cfg.train.ema_decay, cfg.train.max_steps, cfg.train.precision) == (0.9999, 400_000, "bf16")
        assert cfg.deepspeed.zero_stage == 2 and cfg.model.class_dropout_prob == 0.1


def test_dotted_overrides_are_parsed_as_yaml_and_typed():
    cfg = load_config(
        REPO / "configs/demo-cpu.yaml", ["train.max_steps=7", "routing.beta=1", "train.betas=[0.8, 0.9]"]
    )
    assert cfg.train.max_steps == 7 and cfg.routing.beta == 1.0 and isinstance(cfg.routing.beta, float)
    assert cfg.train.betas == [0.8, 0.9]


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("train.max_stepz=3", "train.max_stepz"),
        ("train.max_steps=ten", "train.max_steps"),
        ("routing.enabled=3", "routing.enabled"),
        ("deepspeed.zero_stage=5", "deepspeed.zero_stage"),
        ("routing.beta=1.5", "routing.beta"),
        ("mtl.method=gradnorm", "mtl.method"),
        ("train.micro_batch_size=6", "train.micro_batch_size"),  # 64 % 6, and 6 % 4 clusters
        ("model.name=DiT-M/2", "model.name"),
        ("train.precision=fp16", "train.precision"),
        ("data.on_error=ignore_all", "data.on_error"),
    ],
)
def test_bad_values_are_errors_naming_the_key(override, names):
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        load_config(REPO / "configs/demo-cpu.yaml", [override])


def test_micro_batch_must_split_evenly_over_the_clusters():
    with pytest.raises(ConfigError, match=r"divisible by mtl\.num_clusters"):
        load_config(
            REPO / "configs/demo-cpu.yaml",
            ["train.micro_batch_size=32", "mtl.num_clusters=3", "train.global_batch_size=96"],
        )


def test_nash_and_pcgrad_are_refused_under_zero3_with_the_reason():
    with pytest.raises(ConfigError, match="zero_stage 0, 1 or 2"):
        load_config(REPO / "configs/demo-cpu.yaml", ["mtl.method=nash", "deepspeed.zero_stage=3"])


def test_duplicate_yaml_keys_are_refused(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  max_steps: 3\n  max_steps: 4\n")
    with pytest.raises(ConfigError, match="duplicate key 'max_steps'"):
        load_config(path)


def test_batch_arithmetic_against_the_world_size():
    cfg = load_config(
        REPO / "configs/demo-cpu.yaml", ["train.global_batch_size=256", "train.micro_batch_size=32"]
    )
    assert gradient_accumulation(cfg, 2) == 4
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        gradient_accumulation(cfg, 3)
    cfg = load_config(
        REPO / "configs/demo-cpu.yaml",
        ["train.gradient_accumulation_steps=2", "train.global_batch_size=256", "train.micro_batch_size=32"],
    )
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps \(2\) x world size \(2\) = 128 != "):
        gradient_accumulation(cfg, 2)


def test_bf16_is_refused_without_a_bf16_device():
    cfg = load_config(REPO / "configs/dit-xl2-dtr-ant.yaml")
    with pytest.raises(ConfigError, match="train.precision=bf16"):
        resolve_precision(cfg, "cpu", False)
    assert resolve_precision(cfg, "cuda", True) == "bf16"
    assert resolve_precision(cfg, "cpu", True) == "bf16"  # DeepSpeed's CPU accelerator trains bf16
    auto = load_config(REPO / "configs/demo-cpu.yaml")
    assert resolve_precision(auto, "cpu", False) == "fp32"


def test_deepspeed_json_is_derived_from_the_config():
    cfg = load_config(REPO / "configs/dit-xl2-dtr-ant.yaml")
    ds = deepspeed_config(cfg, world_size=4, precision="bf16", device_type="cuda")
    assert ds["train_batch_size"] == 256 and ds["train_micro_batch_size_per_gpu"] == 32
    assert ds["gradient_accumulation_steps"] == 2 and ds["zero_optimization"]["stage"] == 2
    assert ds["bf16"]["enabled"] is True and "optimizer" not in ds


def test_user_deepspeed_json_is_checked_against_the_yaml(tmp_path):
    cfg = load_config(REPO / "configs/dit-xl2-dtr-ant.yaml")
    derived = deepspeed_config(cfg, 8, "bf16", "cuda")
    good = tmp_path / "good.json"
    good.write_text(
        json.dumps(
            {"zero_optimization": {"stage": 2, "allgather_bucket_size": 5e8}, "bf16": {"enabled": True}}
        )
    )
    merged = merge_user_deepspeed_config(good, derived)
    assert merged["zero_optimization"]["allgather_bucket_size"] == 5e8 and merged["train_batch_size"] == 256
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(
        ConfigError, match=r"zero_optimization\.stage = 3 disagrees with deepspeed\.zero_stage"
    ):
        merge_user_deepspeed_config(bad, derived)
    opt = tmp_path / "opt.json"
    opt.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="'optimizer' is set by dtr-scale"):
        merge_user_deepspeed_config(opt, derived)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dtr_scale", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=rank_env(0, 1, 29999),
        timeout=120,
    )


def test_dry_run_prints_config_deepspeed_json_and_memory_estimate():
    out = _cli(
        "train",
        "--config",
        "configs/dit-xl2-dtr-ant.yaml",
        "--dry-run",
        "--world-size",
        "8",
        "train.precision=fp32",
        "data.shards=",
    )
    assert out.returncode == 0, out.stderr
    assert '"train_batch_size": 256' in out.stdout
    assert "674.8M parameters" in out.stdout  # plus the fixed pos_embed buffer: the reference 675.1M
    assert "Estimated memory needed for params, optim states and gradients" in out.stdout


def test_latent_shape_mismatch_fails_before_training(builtin_data, tmp_path):
    out = _cli(
        "train",
        "--config",
        "configs/demo-cpu.yaml",
        f"data.shards={builtin_data['train']}",
        f"run_dir={tmp_path}",
        "model.input_size=32",
    )
    assert out.returncode == 2
    assert "model.input_size=32 but the data manifest's latent_shape is [4, 16, 16]" in out.stderr
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    "override",
    [
        "train.max_steps=0", "train.max_steps=-5", "train.checkpoint_every=0", "train.log_every=0",
        "train.lr=0", "train.lr=-0.0001", "train.grad_clip=-1", "train.eps=0", "train.warmup_steps=-1",
        "train.weight_decay=-0.1", "train.global_batch_size=0", "train.max_nonfinite_steps=0",
        "mtl.uw_lr=0", "mtl.update_every=0", "data.shuffle_buffer=-1", "data.interleave=0",
        "data.num_workers=-1", "model.hidden_size=0", "model.depth=-2", "eval.every=-1",
        "monitor.sample_steps=0", "deepspeed.reduce_bucket_size=0", "train.keep_every=-1",
    ],
)  # fmt: skip
def test_out_of_range_numbers_are_rejected_by_key(override):
    key, value = override.split("=")
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}(=\S+)? must be .*{re.escape(value)}"):
        load_config(REPO / "configs/demo-cpu.yaml", [override])


def test_hidden_size_must_split_over_the_heads():
    with pytest.raises(ConfigError, match=r"model\.hidden_size=130 must be divisible by model\.num_heads=4"):
        load_config(REPO / "configs/demo-cpu.yaml", ["model.hidden_size=130"])


def test_loss_weighting_is_refused_beside_a_balancer_by_name():
    cfg = load_config(REPO / "configs/demo-cpu.yaml", ["mtl.method=none", "diffusion.loss_weighting=min_snr"])
    assert cfg.diffusion.loss_weighting == "min_snr" and cfg.diffusion.min_snr_gamma == 5.0
    with pytest.raises(
        ConfigError, match=r"diffusion\.loss_weighting=p2 cannot be combined with mtl\.method=uw"
    ):
        load_config(REPO / "configs/demo-cpu.yaml", ["diffusion.loss_weighting=p2"])
    with pytest.raises(ConfigError, match=r"diffusion\.loss_weighting must be none, min_snr or p2"):
        load_config(REPO / "configs/demo-cpu.yaml", ["mtl.method=none", "diffusion.loss_weighting=snr"])


def test_nash_and_pcgrad_configs_keep_the_dit_marginal_and_nash_clips_like_the_official_code():
    for method in ("nash", "pcgrad"):
        cfg = load_config(REPO / f"configs/dit-b2-dtr-{method}.yaml")
        assert (cfg.mtl.method, cfg.mtl.objective, cfg.mtl.sampling) == (method, "timestep", "uniform")
        assert cfg.train.global_batch_size == 256
        assert cfg.train.grad_clip == (1.0 if method == "nash" else 0.0)
    minsnr = load_config(REPO / "configs/dit-b2-dtr-minsnr.yaml")
    assert (minsnr.diffusion.loss_weighting, minsnr.diffusion.min_snr_gamma, minsnr.mtl.method) == (
        "min_snr",
        5.0,
        "none",
    )


@pytest.mark.parametrize(
    ("world", "expected"),
    [(1, (32, 8)), (2, (32, 4)), (8, (32, 1)), (32, (8, 1)), (64, (4, 1)), (256, (1, 1))],
)
def test_unset_micro_batch_is_derived_from_the_world_size(world, expected):
    # global 256, max 32: per rank 256 / world; capped at 32 by accumulation (hand-worked table)
    cfg = resolve_batch_layout(load_config(REPO / "configs/dit-b2-dtr-minsnr.yaml"), world)
    assert (cfg.train.micro_batch_size, gradient_accumulation(cfg, world)) == expected


def test_derived_micro_batch_respects_stratified_clusters_and_refuses_what_cannot_split():
    # XL: k = 8 equal clusters, stratified: the micro-batch must be a multiple of 8
    xl = load_config(REPO / "configs/dit-xl2-dtr-ant.yaml", ["train.max_micro_batch_size=20"])
    cfg = resolve_batch_layout(xl, 4)  # 64 per rank: divisors <= 20 that 8 divides -> 16, accumulation 4
    assert (cfg.train.micro_batch_size, gradient_accumulation(cfg, 4)) == (16, 4)
    with pytest.raises(ConfigError, match=r"cannot be split evenly over 24 ranks"):
        resolve_batch_layout(xl, 24)
    with pytest.raises(
        ConfigError, match=r"is 2 per rank, with no micro-batch .* that its 8 clusters divide"
    ):
        resolve_batch_layout(xl, 128)


@pytest.mark.parametrize(("world", "accumulation", "micro"), [(1, 8, 32), (2, 4, 32), (8, 1, 32), (4, 16, 4)])
def test_a_given_accumulation_is_kept_and_the_micro_batch_follows_from_it(world, accumulation, micro):
    # It used to be dropped silently when train.micro_batch_size was unset. 256 / world / accumulation, by hand.
    cfg = load_config(
        REPO / "configs/dit-b2-dtr-minsnr.yaml", [f"train.gradient_accumulation_steps={accumulation}"]
    )
    cfg = resolve_batch_layout(cfg, world)
    assert (cfg.train.micro_batch_size, gradient_accumulation(cfg, world)) == (micro, accumulation)


def test_an_accumulation_that_cannot_split_the_batch_names_its_keys():
    cfg = load_config(REPO / "configs/dit-b2-dtr-minsnr.yaml", ["train.gradient_accumulation_steps=3"])
    with pytest.raises(ConfigError, match=r"in train.gradient_accumulation_steps=3 micro-batches does not split ev"
                                          r"enly \(128 per rank\)") as info:  # fmt: skip
        resolve_batch_layout(cfg, 2)
    assert info.value.keys == ("train.global_batch_size", "train.gradient_accumulation_steps")
    # One device holds at most train.max_micro_batch_size (32 here): 256 / 1 / 2 = 128 is refused, not taken.
    two = load_config(REPO / "configs/dit-b2-dtr-minsnr.yaml", ["train.gradient_accumulation_steps=2"])
    with pytest.raises(
        ConfigError, match=r"gives micro-batches of 128, above train.max_micro_batch_size=32"
    ) as info:
        resolve_batch_layout(two, 1)
    assert "train.max_micro_batch_size" in info.value.keys
    xl = load_config(REPO / "configs/dit-xl2-dtr-ant.yaml", ["train.gradient_accumulation_steps=16"])
    with pytest.raises(ConfigError, match=r"micro-batches of 4, which its 8 clusters do not divide") as info:
        resolve_batch_layout(xl, 4)  # 256 / 4 / 16 = 4 per micro-batch, 8 stratified clusters
    assert "mtl.sampling" in info.value.keys


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("world", [1, 8, 32])
def test_every_shipped_config_dry_runs_for_a_gpu_cluster_from_this_cpu_machine(path, world):
    from dtr_scale.train.dryrun import dry_run

    cfg = load_config(path)
    text = dry_run(cfg, world, None, device_type="cuda")
    assert f"x world size {world} " in text and "global batch " in text
    if cfg.train.precision in ("bf16", "auto"):
        assert "precision bf16" in text  # resolved for the target, not refused on this CPU-only box


def test_an_error_from_a_command_line_override_names_the_override_not_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"^override train\.lr=-1: train\.lr must be > 0"):
        load_config(REPO / "configs/demo-cpu.yaml", ["train.lr=-1"])
    with pytest.raises(
        ConfigError,
        match=r"^train\.global_batch_size=128 is not a multiple of train\.micro_batch_size=48 \(train\.global_batch_size=128 from \S*demo-cpu\.yaml, train\.micro_batch_size=48 from override train\.micro_batch_size=48\)$",
    ):
        load_config(REPO / "configs/demo-cpu.yaml", ["train.micro_batch_size=48"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: 0\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: train\.lr must be > 0"):  # from the file itself
        load_config(bad, ["train.max_steps=5"])


def test_errors_blame_the_override_that_caused_them_and_only_that(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: -1\n")
    with pytest.raises(ConfigError, match=r"^.*bad\.yaml: train\.lr must be > 0"):
        load_config(bad, ["train.seed=1"])  # a sibling key is not the culprit
    with pytest.raises(ConfigError, match=r"^override foo\.bar=1: unknown config key foo"):
        load_config(
            REPO / "configs/demo-cpu.yaml", ["run_dir=/tmp/x", "foo.bar=1"]
        )  # not run_dir (in "known")
    with pytest.raises(ConfigError, match=r"^override foo\.bar=1: unknown config key foo"):
        load_config(REPO / "configs/demo-cpu.yaml", ["foo.bar=1"])
    with pytest.raises(ConfigError, match=r"^override train\.lr=-1: train\.lr must be > 0"):
        load_config(REPO / "configs/demo-cpu.yaml", ["train.lr=-1", "train.seed=3"])


def test_user_deepspeed_json_may_not_change_the_zero_knobs_the_yaml_owns(tmp_path):
    from dtr_scale.config import deepspeed_config, merge_user_deepspeed_config

    cfg = load_config(REPO / "configs/demo-cpu.yaml", ["deepspeed.zero_stage=2"])
    derived = deepspeed_config(cfg, 1, "fp32", "cpu")
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 5}}))
    with pytest.raises(
        ConfigError, match=r"reduce_bucket_size = 5 disagrees with deepspeed.reduce_bucket_size"
    ):
        merge_user_deepspeed_config(user, derived)
    user.write_text(json.dumps({"zero_optimization": {"stage3_max_live_parameters": 7}}))
    with pytest.raises(ConfigError, match=r"not used at deepspeed.zero_stage=2"):
        merge_user_deepspeed_config(user, derived)
    user.write_text(json.dumps({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}))
    merged = merge_user_deepspeed_config(user, derived)  # keys the YAML does not own are taken as written
    assert merged["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert merged["zero_optimization"]["reduce_bucket_size"] == cfg.deepspeed.reduce_bucket_size


def test_dry_run_plans_with_the_clusters_training_would_use(tmp_path):
    """A clusters file decides stratification only once it is read: 4 equal clusters (ANT's uniform split, which
    mtl.sampling=auto stratifies) need a micro-batch that 4 divides, 5 unequal ones do not stratify; a missing
    file fails the dry run as it would fail training. Hand-worked layouts: global 48 over world 2 = 24 per rank,
    max micro-batch 10 -> the largest divisor of 24 that is <= 10 is 8 (4 | 8); stratified over 5 clusters none
    of 1, 2, 3, 4, 6, 8 works."""
    from dtr_scale.train.dryrun import dry_run

    def write(name: str, intervals: list[list[int]]) -> Path:
        path = tmp_path / name
        path.write_text(json.dumps({"intervals": intervals, "num_timesteps": 1000}))
        return path

    equal4 = write("equal4.json", [[0, 249], [250, 499], [500, 749], [750, 999]])
    equal5 = write("equal5.json", [[0, 199], [200, 399], [400, 599], [600, 799], [800, 999]])
    unequal5 = write("unequal5.json", [[0, 99], [100, 299], [300, 599], [600, 899], [900, 999]])
    base = ["train.global_batch_size=48", "train.max_micro_batch_size=10", "data.shards=", "mtl.method=uw"]

    def plan(path: Path, k: int) -> str:
        cfg = load_config(
            REPO / "configs/dit-b2-dtr.yaml", [*base, f"mtl.num_clusters={k}", f"mtl.clusters_file={path}"]
        )
        return dry_run(cfg, 2, None, device_type="cuda")

    assert "micro-batch 8 x gradient accumulation 3 x world size 2" in plan(equal4, 4)
    with pytest.raises(
        ConfigError, match=r"is 24 per rank, with no micro-batch .* that its 5 clusters divide"
    ):
        plan(equal5, 5)
    assert "micro-batch 8 x gradient accumulation 3 x world size 2" in plan(
        unequal5, 5
    )  # uniform t: no k rule
    with pytest.raises(
        ConfigError, match=r"^mtl\.clusters_file: cluster file .*missing\.json does not exist"
    ):
        plan(tmp_path / "missing.json", 5)
