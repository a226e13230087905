"""The trainer's side of bad data (2 processes, gloo): skipped samples summed over ranks into `data/skipped_*`
in metrics.jsonl, and a run that skips more than `data.max_skipped_fraction` stops with one line naming the
worst shards, before it writes the checkpoint."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from distributed import run_ranks
from test_cli_errors import _ranks
from test_train_distributed import read_metrics, train_args

from dtr_scale.data.shards import decode_sample, iter_raw_samples, load_manifest, write_manifest, write_shard
from dtr_scale.data.skipped import SKIP_KINDS
from dtr_scale.data.stream import LatentStream

pytestmark = [pytest.mark.multiprocess]

BAD_EVERY = 4  # every 4th sample of every shard gets label 99 (outside the 10 digits)


@pytest.fixture(scope="module")
def quarter_bad(builtin_data, tmp_path_factory) -> Path:
    """The first 3 built-in shards, with a quarter of their samples labelled outside the manifest."""
    source = load_manifest(builtin_data["train"])
    out = tmp_path_factory.mktemp("quarter_bad")
    records = []
    for j in range(3):
        samples = [
            decode_sample(raw, tuple(source.latent_shape)) for raw in iter_raw_samples(source.shard_path(j))
        ]
        samples = [
            dataclasses.replace(s, label=99) if i % BAD_EVERY == 0 else s for i, s in enumerate(samples)
        ]
        records.append(write_shard(out / source.shards[j]["name"], samples))
    return write_manifest(out, records, latent_shape=source.latent_shape, scaling_factor=source.scaling_factor,
                          vae=source.vae, image_size=source.image_size, labels=source.labels,
                          extra={"hflip": False})  # fmt: skip


def _skips_of_rank(manifest: Path, rank: int, batches: int) -> int:
    """Label skips rank `rank`'s stream meets in `batches` micro-batches of 8 (the run's stream settings, with
    the trainer's canonical streams at world 2: lcm(8, 2) = 8)."""
    stream = LatentStream(manifest, 8, seed=0, rank=rank, world_size=2, shuffle_buffer=64, drop_last=True,
                          on_error="ignore", canonical_streams=8)  # fmt: skip
    it = stream.batches()
    for _ in range(batches):
        next(it)
    return stream.skipped.totals["label"]


def test_two_process_skipped_samples_are_summed_over_ranks_into_metrics(tmp_path: Path, quarter_bad: Path):
    run_ranks(train_args(tmp_path, quarter_bad, "train.max_steps=3", "train.checkpoint_every=3",
                         "data.max_skipped_fraction=1.0", "data.on_error=ignore"))  # fmt: skip
    lines = read_metrics(tmp_path)
    last = lines[-1]
    expected = _skips_of_rank(quarter_bad, 0, 3) + _skips_of_rank(quarter_bad, 1, 3)
    assert last["data/skipped_label"] == expected > 0
    assert last["data/skipped_total"] == expected
    assert all(last[f"data/skipped_{k}"] == 0 for k in SKIP_KINDS if k != "label")
    assert [line["data/skipped_label"] for line in lines] == sorted(
        line["data/skipped_label"] for line in lines
    )


def test_two_process_run_past_the_bound_stops_before_the_checkpoint_naming_the_shards(
    tmp_path: Path, quarter_bad: Path
):
    args = train_args(
        tmp_path, quarter_bad, "train.max_steps=4", "train.checkpoint_every=2", "data.on_error=ignore"
    )
    procs = _ranks(args[2:])  # without "-m dtr_scale"
    assert [p.returncode for p in procs] == [2, 2]
    errors = [line for line in procs[0].stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, procs[0].stderr
    match = re.search(
        r"rank (\d) skipped (\d+) of the (\d+) samples .* \((\d+\.\d+)% > data.max_skipped_fraction=0.01\); "
        r"worst shards: (.*)$",
        errors[0],
    )
    assert match, errors[0]
    skipped, seen = int(match[2]), int(match[3])
    assert seen == skipped + 2 * 8  # two steps of one micro-batch of 8 per rank, plus what was skipped
    assert abs(100 * skipped / seen - float(match[4])) < 0.01
    assert 0.05 < skipped / seen < 0.6  # a quarter of the data is bad; 16 good samples is a small window
    names = re.findall(r"(shard-\d{6}\.tar) \((\d+): label, first [\w.-]+\)", match[5])
    assert names and {n for n, _ in names} <= {f"shard-{j:06d}.tar" for j in range(3)}
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
