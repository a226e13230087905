"""A rule between config keys names every key in conflict, its value and where that value came from (the config
file, a command-line override, or the default), never just the last override. One test per cross-key rule; each
expected message is written out by hand."""

from __future__ import annotations

import re

import pytest

from dtr_scale.config import ConfigError, load_config


def _error(tmp_path, yaml_text: str, overrides: list[str]) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value).replace(str(path), "run.yaml")


def test_repa_deeper_than_the_model_names_both_depths_and_their_sources(tmp_path):
    # The example: the last override (model.num_heads=2) has nothing to do with the conflict.
    message = _error(
        tmp_path,
        "model:\n  name: DiT-S/2\n",
        ["model.depth=4", "model.num_heads=2", "repa.encoder=/models/enc"],
    )
    assert message == (
        "repa.depth=8 is deeper than the model (model.depth=4) "
        "(repa.depth=8 from the defaults, model.depth=4 from override model.depth=4)"
    )
    assert "num_heads" not in message


def test_hidden_size_not_divisible_by_heads(tmp_path):
    message = _error(tmp_path, "model:\n  hidden_size: 130\n", ["model.num_heads=4"])
    assert message == (
        "model.hidden_size=130 must be divisible by model.num_heads=4 "
        "(model.hidden_size=130 from run.yaml, model.num_heads=4 from override model.num_heads=4)"
    )


def test_num_clusters_beyond_the_diffusion_steps(tmp_path):
    message = _error(tmp_path, "diffusion:\n  diffusion_steps: 10\n", ["mtl.num_clusters=20"])
    assert message.endswith(
        "(mtl.num_clusters=20 from override mtl.num_clusters=20, diffusion.diffusion_steps=10 from run.yaml)"
    )
    assert message.startswith("mtl.num_clusters must be in [1, 10]")


def test_affinity_objective_without_its_files(tmp_path):
    message = _error(tmp_path, "mtl:\n  num_clusters: 4\n", ["mtl.objective=affinity"])
    assert message.endswith(
        "(mtl.objective=affinity from override mtl.objective=affinity, mtl.affinity_file=null from the defaults, "
        "mtl.clusters_file=null from the defaults)"
    )


def test_gram_balancer_under_zero3(tmp_path):
    message = _error(tmp_path, "mtl:\n  method: nash\n  num_clusters: 5\n", ["deepspeed.zero_stage=3"])
    assert message.startswith("mtl.method=nash needs whole per-cluster gradients")
    assert message.endswith(
        "(mtl.method=nash from run.yaml, deepspeed.zero_stage=3 from override deepspeed.zero_stage=3)"
    )


def test_balancer_with_one_cluster(tmp_path):
    message = _error(tmp_path, "mtl:\n  method: uw\n", [])
    assert message == (
        "mtl.method=uw balances cluster losses: set mtl.num_clusters >= 2 "
        "(mtl.method=uw from run.yaml, mtl.num_clusters=1 from the defaults)"
    )


def test_global_batch_not_a_multiple_of_the_micro_batch(tmp_path):
    message = _error(tmp_path, "train:\n  global_batch_size: 128\n", ["train.micro_batch_size=48"])
    assert message == (
        "train.global_batch_size=128 is not a multiple of train.micro_batch_size=48 "
        "(train.global_batch_size=128 from run.yaml, train.micro_batch_size=48 from override train.micro_batch_size=48)"
    )


def test_stratified_micro_batch_not_divisible_by_the_clusters(tmp_path):
    message = _error(
        tmp_path, "mtl:\n  num_clusters: 4\ntrain:\n  global_batch_size: 60\n", ["train.micro_batch_size=30"]
    )
    assert message.startswith("train.micro_batch_size=30 must be divisible by mtl.num_clusters=4")
    assert message.endswith(
        "(train.micro_batch_size=30 from override train.micro_batch_size=30, mtl.num_clusters=4 from run.yaml, "
        "mtl.sampling=auto from the defaults, mtl.objective=timestep from the defaults)"
    )


def test_loss_weighting_with_a_balancer(tmp_path):
    message = _error(
        tmp_path, "mtl:\n  method: uw\n  num_clusters: 4\n", ["diffusion.loss_weighting=min_snr"]
    )
    assert message.endswith(
        "(diffusion.loss_weighting=min_snr from override diffusion.loss_weighting=min_snr, mtl.method=uw from run.yaml)"
    )


def test_a_section_override_is_the_source_of_the_keys_under_it(tmp_path):
    # `repa={...}` as one override sets repa.depth too; the file's model.depth stays the file's.
    message = _error(tmp_path, "model:\n  depth: 4\n", ["repa={encoder: /models/enc, depth: 6}"])
    assert re.search(
        r"\(repa\.depth=6 from override repa=\{encoder: /models/enc, depth: 6\}, model\.depth=4 from run\.yaml\)$",
        message,
    )


def test_a_single_key_error_still_blames_its_override(tmp_path):
    message = _error(tmp_path, "train:\n  lr: 0.001\n", ["train.lr=-1", "train.seed=3"])
    assert message == "override train.lr=-1: train.lr must be > 0, got -1.0"


def test_a_value_that_is_wrong_by_itself_is_named_before_a_rule_between_keys(tmp_path):
    # From a fresh user's run: min_snr on the flow config was first answered with its conflict with
    # mtl.method=uw ("set one of them to none"), and an invalid mtl.method with a conflict it cannot have.
    flow = _error(
        tmp_path, "diffusion:\n  objective: flow\nmtl:\n  method: uw\n", ["diffusion.loss_weighting=min_snr"]
    )
    assert "is a DDPM setting; diffusion.objective=flow does not use it" in flow and "mtl.method" not in flow
    method = _error(tmp_path, "diffusion:\n  loss_weighting: min_snr\n", ["mtl.method=uniform"])
    assert "mtl.method must be one of none, uw, nash, pcgrad; got 'uniform'" in method
    assert "re-weight" not in method


# The batch layout is judged at launch, for the world size started: the same provenance, from `dtr-scale train`.
def _launch_error(tmp_path, capsys, yaml_text: str, overrides: list[str], world: int) -> str:
    from dtr_scale.cli import main

    path = tmp_path / "run.yaml"
    path.write_text(yaml_text)
    assert main(["train", "--config", str(path), "--dry-run", "--world-size", str(world), *overrides]) == 2
    return capsys.readouterr().err.strip().replace(str(path), "run.yaml")


def test_a_global_batch_that_does_not_split_over_the_ranks_says_where_it_was_set(tmp_path, capsys):
    message = _launch_error(tmp_path, capsys, "train:\n  global_batch_size: 100\n", [], world=3)
    assert message == (
        "dtr-scale train: error: train.global_batch_size=100 cannot be split evenly over 3 ranks "
        "(train.global_batch_size=100 from run.yaml)"
    )


def test_no_micro_batch_that_fits_names_the_batch_the_cap_and_the_clusters(tmp_path, capsys):
    yaml_text = "train:\n  global_batch_size: 64\nmtl:\n  method: uw\n  num_clusters: 4\n"
    message = _launch_error(tmp_path, capsys, yaml_text, ["train.max_micro_batch_size=2"], world=2)
    assert message.endswith(
        "(train.global_batch_size=64 from run.yaml, train.max_micro_batch_size=2 from override "
        "train.max_micro_batch_size=2, mtl.num_clusters=4 from run.yaml, mtl.sampling=auto from the defaults)"
    )
    assert "32 per rank" in message and "its 4 clusters" in message


def test_micro_batch_times_accumulation_times_world_names_all_three_keys(tmp_path, capsys):
    overrides = ["train.micro_batch_size=8", "train.gradient_accumulation_steps=2"]
    message = _launch_error(tmp_path, capsys, "train:\n  global_batch_size: 128\n", overrides, world=2)
    assert message == (
        "dtr-scale train: error: train.micro_batch_size (8) x train.gradient_accumulation_steps (2) x world size "
        "(2) = 32 != train.global_batch_size (128) (train.micro_batch_size=8 from override "
        "train.micro_batch_size=8, train.gradient_accumulation_steps=2 from override "
        "train.gradient_accumulation_steps=2, train.global_batch_size=128 from run.yaml)"
    )
