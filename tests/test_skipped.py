"""Skipped samples: one line per shard and kind with a count and the first key, every kind counted exactly
(against counts worked out from the files themselves), counts that survive a resume, and the threshold."""

from __future__ import annotations

import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest

from dtr_scale.data.shards import (
    LatentSample,
    _add_member,
    encode_sample,
    shard_name,
    write_manifest,
    write_shard,
)
from dtr_scale.data.skipped import SKIP_KINDS, judge_windows
from dtr_scale.data.stream import LatentStream, ShardError, ShardWarning

SHAPE = (1, 2, 2)
ZEROS = np.zeros((2, *SHAPE), dtype=np.float16)


def _manifest(directory: Path, shards: list[list[LatentSample]], num_labels: int = 10) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    records = [write_shard(directory / shard_name(j), samples) for j, samples in enumerate(shards)]
    return write_manifest(directory, records, latent_shape=SHAPE, scaling_factor=1.0, vae={"name": "t"},
                          image_size=4, labels=[str(c) for c in range(num_labels)])  # fmt: skip


def _good(prefix: str, n: int) -> list[LatentSample]:
    return [LatentSample(f"{prefix}{i:04d}", i % 10, ZEROS, ZEROS) for i in range(n)]


def _drain(stream: LatentStream) -> tuple[list[int], list[str]]:
    """All labels of one pass, and the texts of the ShardWarnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        labels = [int(v) for _, y in stream for v in y]
    return labels, [str(w.message) for w in caught if issubclass(w.category, ShardWarning)]


def test_a_shard_of_bad_labels_gives_one_line_with_count_first_key_and_the_path_once(tmp_path: Path) -> None:
    # The failing input of the issue: 32 samples whose label is outside the manifest's 0..9.
    bad = [LatentSample(f"mnist{1861 + i:05d}", 12, ZEROS, ZEROS) for i in range(32)]
    manifest = _manifest(tmp_path, [bad, _good("g", 8)])
    stream = LatentStream(manifest, 4, seed=0, rank=0, world_size=1, resampled=False, shuffle_buffer=0)
    labels, lines = _drain(stream)
    assert len(labels) == 8
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith(
        f"{tmp_path / shard_name(0)}: 32 samples with a label outside 0..9, first mnist01861"
    )
    assert line.count(shard_name(0)) == 1
    assert stream.skipped.totals["label"] == 32
    assert stream.skipped.by_shard == {shard_name(0): {"label": 32}}


def _tar_with(path: Path, samples: list[LatentSample], replace: dict[int, dict[str, bytes | None]]) -> None:
    """Write samples as a tar, replacing (bytes) or dropping (None) members of the samples listed."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, sample in enumerate(samples):
            members = {**encode_sample(sample), **replace.get(i, {})}
            for ext, data in members.items():
                if data is not None:
                    _add_member(tar, f"{sample.key}.{ext}", data)


def _complete_samples_before_break(path: Path, per_sample: int = 3) -> int:
    """Independent count: complete samples Python's tarfile reads before the file breaks or ends."""
    members = 0
    try:
        with tarfile.open(path, "r|") as tar:
            for member in tar:
                tar.extractfile(member).read()
                members += 1
    except (tarfile.TarError, OSError, EOFError):
        pass
    return members // per_sample


def test_every_kind_is_counted_exactly_and_the_rest_delivered(tmp_path: Path) -> None:
    shards = [_good(f"s{j}_", n) for j, n in enumerate((6, 5, 7, 5, 8, 6))]
    manifest = _manifest(tmp_path, shards)
    wrong = np.zeros((2, 1, 3, 3), dtype=np.float16)
    _tar_with(
        tmp_path / shard_name(0), shards[0], {1: {"cls": b"x1"}, 4: {"std.npy": None}}
    )  # undecodable x2
    _tar_with(tmp_path / shard_name(1), shards[1], {2: {"mean.npy": encode_sample(
        LatentSample("w", 0, wrong, wrong))["mean.npy"]}})  # fmt: skip
    cut = tmp_path / shard_name(2)  # cut inside a member's data: the tar breaks partway
    cut.write_bytes(cut.read_bytes()[: 512 * 13 + 100])
    (tmp_path / shard_name(3)).unlink()  # missing: unreadable
    short = tmp_path / shard_name(4)  # cut on a block boundary: the tar just ends early
    short.write_bytes(short.read_bytes()[: 512 * 12])
    kept_2, kept_4 = _complete_samples_before_break(cut), _complete_samples_before_break(short)
    assert 0 < kept_2 < 7 and 0 < kept_4 < 8

    with pytest.warns(ShardWarning):
        stream = LatentStream(manifest, 3, seed=1, rank=0, world_size=1, resampled=False, interleave=3)
    labels, lines = _drain(stream)
    expected = {"undecodable": 2, "wrong_shape": 1, "corrupt_tar": 7 - kept_2, "unreadable_shard": 5,
                "short_shard": 8 - kept_4, "label": 0}  # fmt: skip
    assert stream.skipped.totals == expected
    assert len(labels) + sum(expected.values()) == 37
    # One line per shard and kind; the missing shard was named up front, not twice.
    assert len(lines) == 4 and not any(shard_name(3) in line for line in lines), lines
    lost = {shard_name(0): 2, shard_name(1): 1, shard_name(2): 7 - kept_2, shard_name(3): 5,
            shard_name(4): 8 - kept_4}  # fmt: skip
    kinds = {shard_name(0): "undecodable", shard_name(1): "wrong_shape", shard_name(2): "corrupt_tar",
             shard_name(3): "unreadable_shard", shard_name(4): "short_shard"}  # fmt: skip
    worst = sorted(lost.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    worst = [(name, n, f"{kinds[name]}, first {first}") for name, n in worst
             for first in [stream.skipped.window_first[name].split(", first ")[1]]]  # fmt: skip
    assert stream.skipped.window() == {"seen": 37, "skipped": sum(expected.values()), "worst": worst}


def test_ignore_counts_without_a_word_and_raise_stops_at_the_first(tmp_path: Path) -> None:
    bad = [LatentSample(f"b{i}", 11, ZEROS, ZEROS) for i in range(3)]
    manifest = _manifest(tmp_path, [_good("g", 5) + bad])
    quiet = LatentStream(manifest, 2, seed=0, rank=0, world_size=1, resampled=False, on_error="ignore")
    labels, lines = _drain(quiet)
    assert (len(labels), lines, quiet.skipped.totals["label"]) == (5, [], 3)
    strict = LatentStream(manifest, 2, seed=0, rank=0, world_size=1, resampled=False, on_error="raise")
    with pytest.raises(ShardError, match=r"b\d\.cls: label 11 is outside"):
        list(strict)


def test_a_resumed_stream_counts_each_skip_exactly_once(tmp_path: Path) -> None:
    shards = [_good(f"s{j}_", 9) for j in range(4)]
    for j in (0, 2):
        shards[j][3] = LatentSample(f"bad{j}", 42, ZEROS, ZEROS)
        shards[j][7] = LatentSample(f"bad{j}b", 43, ZEROS, ZEROS)
    manifest = _manifest(tmp_path, shards)
    kwargs = dict(
        seed=3, rank=0, world_size=1, resampled=False, shuffle_buffer=6, interleave=2, on_error="ignore"
    )
    first = LatentStream(manifest, 4, **kwargs)
    it = iter(first)
    for _ in range(3):
        next(it)
    resumed = LatentStream(manifest, 4, **kwargs)
    resumed.load_state_dict(first.state_dict())
    list(resumed)
    assert resumed.skipped.totals["label"] == 4
    assert resumed.skipped.by_shard == {shard_name(0): {"label": 2}, shard_name(2): {"label": 2}}


def test_judge_windows_names_the_worst_rank_and_its_shards_only_past_the_bound() -> None:
    ok = {"seen": 1000, "skipped": 10, "worst": [("a.tar", 10, "label, first k1")]}  # exactly 1%: not beyond
    bad = {
        "seen": 400,
        "skipped": 100,
        "worst": [("c.tar", 60, "label, first k7"), ("d.tar", 40, "wrong_shape, first k9")],
    }
    assert judge_windows([ok, ok], 0.01, "m.json") is None
    message = judge_windows([ok, bad], 0.01, "m.json")
    assert message == (
        "m.json: rank 1 skipped 100 of the 400 samples it saw since the last check (25.00% > "
        "data.max_skipped_fraction=0.01); worst shards: c.tar (60: label, first k7), d.tar (40: wrong_shape, first k9)"
    )
    assert judge_windows([bad], 1.0, "m.json") is None
    assert judge_windows([{"seen": 0, "skipped": 0, "worst": []}], 0.0, "m.json") is None


def test_kinds_are_the_documented_scalar_names() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "reliability.md").read_text()
    for kind in SKIP_KINDS:
        assert f"data/skipped_{kind}" in doc


def test_a_shard_longer_than_its_manifest_entry_is_named_but_loses_nothing(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, [_good("g", 5)])
    write_shard(tmp_path / shard_name(0), _good("g", 7))  # two samples more than the manifest lists
    stream = LatentStream(manifest, 5, seed=0, rank=0, world_size=1, resampled=False)
    labels, lines = _drain(stream)
    assert len(labels) == 5 and stream.skipped.totals == dict.fromkeys(SKIP_KINDS, 0)
    assert lines == [f"{tmp_path / shard_name(0)}: the shard holds more than the 5 samples the manifest lists; "
                     "the samples past that are ignored"]  # fmt: skip


def test_nan_latents_are_skipped_as_undecodable_never_delivered(tmp_path: Path) -> None:
    nan = np.full((2, *SHAPE), np.nan, dtype=np.float16)
    poisoned = [
        LatentSample("nan0", 1, nan, ZEROS),
        LatentSample("inf0", 2, ZEROS, np.full_like(nan, np.inf)),
    ]
    manifest = _manifest(tmp_path, [_good("g", 4) + poisoned])
    stream = LatentStream(manifest, 2, seed=0, rank=0, world_size=1, resampled=False, shuffle_buffer=0)
    labels, lines = _drain(stream)
    assert len(labels) == 4 and stream.skipped.totals["undecodable"] == 2
    assert len(lines) == 1 and "2 samples that could not be decoded, first nan0" in lines[0], lines


def test_a_shard_read_again_next_epoch_is_reported_with_one_epochs_count(tmp_path: Path) -> None:
    # Resampled: the shard is read epoch after epoch; the line says how many were bad in one pass (3), and
    # the totals keep counting.
    shard = _good("g", 6) + [LatentSample(f"bad{i}", 50, ZEROS, ZEROS) for i in range(3)]
    manifest = _manifest(tmp_path, [shard])
    stream = LatentStream(manifest, 2, seed=0, rank=0, world_size=1, shuffle_buffer=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        it = stream.batches()
        for _ in range(9):  # three passes of the 6 good samples
            next(it)
    lines = [str(w.message) for w in caught if issubclass(w.category, ShardWarning)]
    assert len(lines) == 1 and ": 3 samples with a label outside 0..9, first bad0" in lines[0], lines
    assert stream.skipped.totals["label"] >= 6
