"""LatentStream: coverage, determinism, exact resume, augmentation, and error handling."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dtr_scale.data.shards import (
    LatentSample,
    _add_member,
    encode_sample,
    shard_name,
    write_manifest,
    write_shard,
)
from dtr_scale.data.stream import LatentStream, ShardError, ShardWarning
from dtr_scale.data.stream_order import emission_order, interleaved_arrival

SHAPE = (1, 2, 2)
SHARD_SIZES = (5, 7, 6, 5, 8, 4)  # 35 samples, uneven on purpose
SCALE = 0.5


def _sample(index: int, std: float) -> LatentSample:
    """Sample `index` has label `index`; its stored orientation is +(index + 100), its flip -(index + 100)."""
    value = np.full(SHAPE, index + 100, dtype=np.float16)
    return LatentSample(
        key=f"s{index:04d}",
        label=index,
        mean=np.stack([value, -value]),
        std=np.full((2, *SHAPE), std, dtype=np.float16),
    )


def _write_dataset(directory: Path, std: float = 0.0, sizes=SHARD_SIZES) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    shards, start = [], 0
    for j, size in enumerate(sizes):
        shards.append(
            write_shard(directory / shard_name(j), [_sample(i, std) for i in range(start, start + size)])
        )
        start += size
    return write_manifest(
        directory,
        shards,
        latent_shape=SHAPE,
        scaling_factor=SCALE,
        vae={"name": "test"},
        image_size=4,
        labels=[str(i) for i in range(sum(sizes))],  # sample i has label i
    )


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    return _write_dataset(tmp_path / "data")


def _take(stream: LatentStream, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for batch in stream:
        out.append(batch)
        if len(out) == n:
            break
    return out


def _assert_same_batches(a, b) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb)
        assert torch.equal(xa, xb)


def test_batches_are_scaled_float32_latents_with_int64_labels(dataset: Path) -> None:
    stream = LatentStream(dataset, 4, seed=0, rank=0, world_size=1)
    latents, labels = next(iter(stream))
    assert latents.shape == (4, *SHAPE) and latents.dtype == torch.float32
    assert labels.shape == (4,) and labels.dtype == torch.int64
    # std = 0: each latent is +-(label + 100) times the manifest's scaling factor
    expected = (labels.float() + 100) * SCALE
    assert torch.equal(latents.abs().flatten(1), expected[:, None].expand(4, 4))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_epoch_mode_at_world_size_2_is_disjoint_and_complete(dataset: Path, num_workers: int) -> None:
    seen = []
    for rank in range(2):
        stream = LatentStream(
            dataset, 3, seed=5, rank=rank, world_size=2, num_workers=num_workers, resampled=False
        )
        seen.append(torch.cat([labels for _, labels in stream]).tolist())
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(sum(SHARD_SIZES)))


def test_epoch_mode_next_iteration_is_a_new_shuffled_epoch(dataset: Path) -> None:
    stream = LatentStream(dataset, 5, seed=1, rank=0, world_size=1, shuffle_buffer=8, resampled=False)
    first = torch.cat([labels for _, labels in stream]).tolist()
    second = torch.cat([labels for _, labels in stream]).tolist()
    assert sorted(first) == sorted(second) == list(range(sum(SHARD_SIZES)))
    assert first != second


def test_stream_is_a_function_of_the_seed(dataset: Path) -> None:
    def labels(seed: int) -> list[int]:
        stream = LatentStream(dataset, 4, seed=seed, rank=0, world_size=1, shuffle_buffer=10)
        return torch.cat([y for _, y in _take(stream, 6)]).tolist()

    assert labels(3) == labels(3)
    assert labels(3) != labels(4)


def test_resampled_mode_is_infinite_and_covers_every_sample(dataset: Path) -> None:
    stream = LatentStream(dataset, 4, seed=0, rank=0, world_size=1, shuffle_buffer=10)
    labels = torch.cat([y for _, y in _take(stream, 30)])  # 120 samples > 3 passes
    assert len(labels) == 120 and set(labels.tolist()) == set(range(sum(SHARD_SIZES)))


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_with_two_workers_yields_exactly_the_uninterrupted_batches(
    dataset: Path, world_size: int
) -> None:
    # 7 + 9 batches of 3 per rank span several per-worker epochs at world size 1 and 2.
    for rank in range(world_size):
        kwargs = dict(seed=11, rank=rank, world_size=world_size, num_workers=2, shuffle_buffer=6)
        reference = _take(LatentStream(dataset, 3, **kwargs), 16)
        interrupted = LatentStream(dataset, 3, **kwargs)
        assert len(_take(interrupted, 7)) == 7
        state = json.loads(json.dumps(interrupted.state_dict()))  # plain data, as in a checkpoint
        resumed = LatentStream(dataset, 3, **kwargs)
        resumed.load_state_dict(state)
        _assert_same_batches(_take(resumed, 9), reference[7:])


def test_resume_in_process_matches_at_odd_positions(dataset: Path) -> None:
    kwargs = dict(seed=2, rank=0, world_size=1, shuffle_buffer=5)
    reference = _take(LatentStream(dataset, 4, **kwargs), 20)
    for stop in (1, 8, 9, 13):  # 35 samples: batch 9 straddles the first epoch's end
        first = LatentStream(dataset, 4, **kwargs)
        _take(first, stop)
        resumed = LatentStream(dataset, 4, **kwargs)
        resumed.load_state_dict(first.state_dict())
        _assert_same_batches(_take(resumed, 20 - stop), reference[stop:])


def test_resume_mid_epoch_in_epoch_mode_finishes_the_same_pass(dataset: Path) -> None:
    kwargs = dict(seed=4, rank=0, world_size=1, num_workers=2, shuffle_buffer=4, resampled=False)
    reference = list(LatentStream(dataset, 3, **kwargs))
    first = LatentStream(dataset, 3, **kwargs)
    _take(first, 5)
    resumed = LatentStream(dataset, 3, **kwargs)
    resumed.load_state_dict(first.state_dict())
    _assert_same_batches(list(resumed), reference[5:])


def test_state_with_other_canonical_streams_is_refused(dataset: Path) -> None:
    state = LatentStream(dataset, 4, seed=0, rank=0, world_size=1).state_dict()
    other = LatentStream(dataset, 4, seed=0, rank=0, world_size=2)  # default: one stream per rank
    with pytest.raises(ValueError, match="canonical_streams was 1 when saved but is 2"):
        other.load_state_dict(state)


def _global_order(manifest: Path, world: int, steps: int, global_batch: int = 8, **kwargs) -> list[list[int]]:
    """Per step, the labels (= sample numbers) in global-batch slot order: slot g is rank g % world's
    (g // world)-th sample of the step (the trainer's layout)."""
    per_rank = []
    for rank in range(world):
        stream = LatentStream(manifest, global_batch // world, seed=7, rank=rank, world_size=world, **kwargs)
        per_rank.append([y.tolist() for _, y in _take(stream, steps)])
    return [[per_rank[g % world][s][g // world] for g in range(global_batch)] for s in range(steps)]


def test_every_world_size_dividing_the_canonical_streams_sees_the_same_global_order(dataset: Path) -> None:
    common = dict(canonical_streams=4, shuffle_buffer=6, interleave=2)
    reference = _global_order(dataset, 1, 12, **common)  # 96 samples: several epochs of the 35
    for world, workers in ((1, 2), (2, 0), (2, 2), (4, 0)):
        assert _global_order(dataset, world, 12, num_workers=workers, **common) == reference, (world, workers)
    # round robin over the 4 streams: consecutive global samples come from different streams' shards
    assert sorted(sum(reference[:4], [])[:35]) != list(range(35))  # and each epoch is shuffled
    # within the first epoch of each stream no sample appears twice
    first = sum(reference, [])[:24]
    assert len(set(first)) == len(first)


def test_a_resharded_state_continues_the_same_global_order(dataset: Path) -> None:
    common = dict(seed=7, canonical_streams=4, shuffle_buffer=6, interleave=2, num_workers=2)
    reference = _global_order(dataset, 1, 10, canonical_streams=4, shuffle_buffer=6, interleave=2)
    for old_world, new_world in ((2, 1), (1, 2), (2, 4), (4, 2)):
        states = []
        for rank in range(old_world):
            stream = LatentStream(dataset, 8 // old_world, rank=rank, world_size=old_world, **common)
            _take(stream, 4)
            states.append(json.loads(json.dumps(stream.state_dict())))
        per_rank = []
        for rank in range(new_world):
            stream = LatentStream(dataset, 8 // new_world, rank=rank, world_size=new_world, **common)
            stream.load_state_dict(stream.reshard_states(states))
            assert stream.stats["samples"] == 4 * 8 // new_world
            per_rank.append([y.tolist() for _, y in _take(stream, 6)])
        resumed = [[per_rank[g % new_world][s][g // new_world] for g in range(8)] for s in range(6)]
        assert resumed == reference[4:], (old_world, new_world)


def test_a_world_size_that_does_not_divide_the_canonical_streams_is_refused_by_name(dataset: Path) -> None:
    with pytest.raises(
        ValueError, match=r"data.canonical_streams=4 cannot be split over 3 ranks.*multiple of 3"
    ):
        LatentStream(dataset, 4, seed=0, rank=0, world_size=3, canonical_streams=4)


def test_flips_and_posterior_noise_vary_per_sample_and_epoch(tmp_path: Path) -> None:
    manifest = _write_dataset(tmp_path / "noisy", std=0.25)
    stream = LatentStream(manifest, 5, seed=0, rank=0, world_size=1, shuffle_buffer=4)
    flips: dict[int, set[bool]] = {}
    residuals = []
    for latents, labels in _take(stream, 35):  # 5 passes over 35 samples
        for z, label in zip(latents / SCALE, labels.tolist()):
            flipped = bool(z.mean() < 0)
            flips.setdefault(label, set()).add(flipped)
            mean = -(label + 100) if flipped else label + 100
            residuals.append((z - mean).flatten())
    residuals = torch.stack(residuals) / 0.25  # should be standard normal draws
    assert sum(len(f) == 2 for f in flips.values()) >= 25  # most samples were seen both ways
    assert abs(residuals.mean()) < 0.1 and 0.85 < residuals.std() < 1.15
    assert len({tuple(r.tolist()) for r in residuals}) == len(residuals)  # never the same draw twice


def test_augmentation_does_not_depend_on_world_size_or_workers(dataset: Path) -> None:
    manifest = _write_dataset(dataset.parent / "noisy", std=1.0)

    def by_label(**kwargs) -> dict[int, torch.Tensor]:
        out = {}
        for rank in range(kwargs.pop("world_size")):
            stream = LatentStream(manifest, 4, seed=9, rank=rank, world_size=2, resampled=False, **kwargs)
            out.update({int(y): x for xs, ys in stream for x, y in zip(xs, ys)})
        return out

    a, b = by_label(world_size=2), by_label(world_size=2, num_workers=2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------- errors


def _truncate(path: Path, keep_fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])


def test_truncated_shard_is_named_counted_and_its_readable_samples_kept(dataset: Path) -> None:
    _truncate(dataset.parent / shard_name(4), 0.5)  # shard 4 holds labels 23..30
    stream = LatentStream(dataset, 4, seed=0, rank=0, world_size=1, resampled=False)
    with pytest.warns(ShardWarning, match=shard_name(4)):
        labels = torch.cat([y for _, y in stream]).tolist()
    lost = set(range(23, 31)) - set(labels)
    assert 0 < len(lost) < 8  # the first samples of the shard were read before the cut
    assert stream.skipped.by_shard == {shard_name(4): {"short_shard": len(lost)}}
    assert sorted(labels + sorted(lost)) == list(range(35))
    assert stream.stats["samples"] == len(labels)


def test_corrupt_member_is_named_counted_and_skipped(dataset: Path) -> None:
    path = dataset.parent / shard_name(0)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(5):
            members = encode_sample(_sample(i, 0.0))
            if i == 2:
                members["mean.npy"] = b"\x93NUMPY garbage"
            for ext, data in members.items():
                _add_member(tar, f"s{i:04d}.{ext}", data)
    stream = LatentStream(dataset, 4, seed=0, rank=0, world_size=1, resampled=False)
    with pytest.warns(ShardWarning, match=r"s0002\.mean\.npy: not a valid \.npy"):
        labels = torch.cat([y for _, y in stream]).tolist()
    assert sorted(labels) == [i for i in range(35) if i != 2]
    assert stream.skipped.by_shard == {shard_name(0): {"undecodable": 1}}


def test_on_error_raise_stops_at_a_truncated_shard(dataset: Path) -> None:
    _truncate(dataset.parent / shard_name(1), 0.3)
    stream = LatentStream(dataset, 4, seed=0, rank=0, world_size=1, resampled=False, on_error="raise")
    with pytest.raises(ShardError, match=shard_name(1)):
        list(stream)


def test_missing_shard_raises_before_training_when_asked(dataset: Path) -> None:
    (dataset.parent / shard_name(3)).unlink()
    with pytest.raises(ShardError, match=f"{shard_name(3)}: file is missing"):
        LatentStream(dataset, 4, seed=0, rank=0, world_size=1, on_error="raise")


def test_missing_shard_is_warned_counted_and_skipped(dataset: Path) -> None:
    (dataset.parent / shard_name(3)).unlink()  # labels 18..22
    with pytest.warns(ShardWarning, match=shard_name(3)):
        stream = LatentStream(dataset, 4, seed=0, rank=0, world_size=1, resampled=False)
        labels = torch.cat([y for _, y in stream]).tolist()
    assert sorted(labels) == [i for i in range(35) if not 18 <= i <= 22]
    assert stream.skipped.by_shard == {shard_name(3): {"unreadable_shard": 5}}


def test_latent_shape_mismatch_is_an_error_naming_the_manifest(dataset: Path) -> None:
    with pytest.raises(
        ValueError, match=rf"{dataset}: latent_shape \[1, 2, 2\] does not match .*\[4, 32, 32\]"
    ):
        LatentStream(dataset, 4, seed=0, rank=0, world_size=1, expected_latent_shape=(4, 32, 32))


def test_too_few_shards_for_the_ranks_in_epoch_mode_is_an_error(tmp_path: Path) -> None:
    manifest = _write_dataset(tmp_path / "one", sizes=(6,))
    with pytest.raises(ValueError, match="1 shards cannot give each of 2 canonical streams"):
        LatentStream(manifest, 2, seed=0, rank=0, world_size=2, resampled=False)
    # resampled mode shares the shard instead
    batches = _take(LatentStream(manifest, 2, seed=0, rank=1, world_size=2), 4)
    assert len(batches) == 4


def test_emission_order_is_a_permutation_that_respects_the_buffer() -> None:
    order = emission_order(50, 8, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(50))
    # an item can only leave after it arrived: the k-th emitted item arrived among the first k + 8
    assert all(item < k + 8 for k, item in enumerate(order.tolist()))
    assert order.tolist() != list(range(50))


# ------------------------------------------------------------------------------- class mixing and flips


def test_interleaved_arrival_takes_one_item_per_open_shard_in_turn() -> None:
    # Shards of 2, 3 and 1 items (numbered 0-1, 2-4, 5), two open at once: turns alternate between the
    # open shards; when shard 0 runs out, shard 2 takes its turn. Worked by hand.
    assert interleaved_arrival(np.array([2, 3, 1]), 2).tolist() == [0, 2, 1, 3, 5, 4]
    assert interleaved_arrival(np.array([2, 3, 1]), 1).tolist() == [0, 1, 2, 3, 4, 5]
    assert interleaved_arrival(np.array([0, 2, 0, 2]), 3).tolist() == [0, 2, 1, 3]  # empty shards skipped
    arrival = interleaved_arrival(np.array([5, 7, 6, 5, 8, 4]), 4)
    assert sorted(arrival.tolist()) == list(range(35))


def _class_sorted_dataset(directory: Path, classes: int = 10, per_class: int = 100) -> Path:
    """One shard per class, written class after class: the worst order another tool could write."""
    directory.mkdir(parents=True)
    zeros = np.zeros((2, *SHAPE), dtype=np.float16)
    shards = [
        write_shard(directory / shard_name(c), [LatentSample(f"c{c}_{i:03d}", c, zeros, zeros) for i in range(per_class)])
        for c in range(classes)
    ]  # fmt: skip
    labels = [str(c) for c in range(classes)]
    return write_manifest(directory, shards, latent_shape=SHAPE, scaling_factor=1.0, vae={"name": "test"},
                          image_size=4, labels=labels)  # fmt: skip


def _mean_classes_per_batch(manifest: Path, batches: int, **kwargs) -> float:
    stream = LatentStream(manifest, 32, seed=0, rank=0, world_size=1, shuffle_buffer=50, **kwargs)
    return float(np.mean([len(set(y.tolist())) for _, y in _take(stream, batches)]))


def test_interleaving_mixes_classes_from_class_sorted_shards(tmp_path: Path) -> None:
    # i.i.d. micro-batches of 32 over 10 equal classes hold 10 * (1 - 0.9**32) = 9.66 classes on average.
    manifest = _class_sorted_dataset(tmp_path / "sorted")
    sequential = _mean_classes_per_batch(manifest, 60, interleave=1)
    interleaved = _mean_classes_per_batch(manifest, 60, interleave=10)
    assert sequential < 4.0  # one shard at a time: the buffer only mixes neighbouring classes
    assert interleaved > 9.0  # all ten shards at once: close to i.i.d.


def test_hflip_follows_the_manifest_unless_overridden(tmp_path: Path) -> None:
    # Stored orientation is +(label + 100), the mirrored one -(label + 100) (see _sample).
    no_flip = _write_dataset(tmp_path / "digits")
    document = json.loads(no_flip.read_text())
    no_flip.write_text(json.dumps({**document, "hflip": False}))

    def signs(manifest: Path, **kwargs) -> set[float]:
        stream = LatentStream(manifest, 7, seed=0, rank=0, world_size=1, resampled=False, **kwargs)
        return {float(v) for x, _ in stream for v in torch.sign(x.flatten(1)[:, 0])}

    assert signs(no_flip) == {1.0}  # manifest says hflip false: never mirrored
    assert signs(no_flip, hflip=True) == {1.0, -1.0}
    natural = _write_dataset(tmp_path / "natural")  # no hflip field: natural images, flip on
    assert signs(natural) == {1.0, -1.0}
    assert signs(natural, hflip=False) == {1.0}


def test_interleaving_keeps_exact_resume_with_workers(dataset: Path) -> None:
    kwargs = dict(seed=2, rank=0, world_size=1, num_workers=2, shuffle_buffer=5, interleave=3)
    reference = _take(LatentStream(dataset, 3, **kwargs), 14)
    first = LatentStream(dataset, 3, **kwargs)
    _take(first, 5)
    resumed = LatentStream(dataset, 3, **kwargs)
    resumed.load_state_dict(first.state_dict())
    _assert_same_batches(_take(resumed, 9), reference[5:])


@pytest.mark.parametrize("bad_label", [10, 11, -1])
def test_label_outside_the_manifest_is_named_with_its_shard_and_key(tmp_path: Path, bad_label: int) -> None:
    # 10 labels: 10 is the CFG null class and 11 would index past the embedding; both are data errors.
    zeros = np.zeros((2, *SHAPE), dtype=np.float16)
    good = [LatentSample(f"g{i}", i % 10, zeros, zeros) for i in range(6)]
    bad = LatentSample("bad0", bad_label, zeros, zeros)
    shard = write_shard(tmp_path / shard_name(0), [*good[:3], bad, *good[3:]])
    manifest = write_manifest(tmp_path, [shard], latent_shape=SHAPE, scaling_factor=1.0, vae={"name": "t"},
                              image_size=4, labels=[str(c) for c in range(10)])  # fmt: skip
    stream = LatentStream(manifest, 2, seed=0, rank=0, world_size=1, resampled=False)
    with pytest.warns(
        ShardWarning,
        match=rf"{shard_name(0)}: 1 sample with a label outside 0\.\.9, first bad0 \(bad0\.cls: label {bad_label} is out",
    ):
        labels = torch.cat([y for _, y in stream]).tolist()
    assert sorted(labels) == sorted(s.label for s in good)
    strict = LatentStream(manifest, 2, seed=0, rank=0, world_size=1, resampled=False, on_error="raise")
    with pytest.raises(ShardError, match="bad0.cls"):
        list(strict)


# ------------------------------------------------------------------------------- epoch mode for training


def test_epoch_mode_for_training_takes_equal_full_batches_and_rolls_over(tmp_path: Path) -> None:
    # The failing input: 2 shards x 21 samples, micro-batch 16. One pass holds 42 samples = 2 full batches
    # (the 10 left over are dropped); batches() goes on into the next, reshuffled epoch instead of ending.
    manifest = _write_dataset(tmp_path / "d", sizes=(21, 21))
    stream = LatentStream(manifest, 16, seed=3, rank=0, world_size=1, resampled=False, drop_last=True)
    batches = stream.batches()
    epochs = [[next(batches)[1].tolist() for _ in range(2)] for _ in range(3)]
    assert all(len(b) == 16 for epoch in epochs for b in epoch)
    for epoch in epochs:
        flat = epoch[0] + epoch[1]
        assert len(set(flat)) == 32 and set(flat) <= set(range(42))  # no sample twice within an epoch
    assert epochs[0] != epochs[1]  # reshuffled
    # world size 2: each rank holds one shard of 21 -> one full batch each, the same count on both ranks
    for rank in range(2):
        ranked = LatentStream(manifest, 16, seed=3, rank=rank, world_size=2, resampled=False, drop_last=True)
        assert ranked.full_batches_per_epoch(0) == 1
        assert [len(y) for _, y in ranked] == [16]


def test_epoch_mode_takes_whole_steps_of_the_smallest_canonical_stream(tmp_path: Path) -> None:
    # Shards of 5, 7, 6, 5, 8, 4 over 2 canonical streams: the global order takes one sample of each stream in
    # turn, so a pass runs whole for 2 x (the smaller stream's count) samples, cut to whole steps of
    # world x micro-batch x accumulation samples. Worked from the same shard order by hand.
    from dtr_scale.data.stream_order import epoch_shard_list

    manifest = _write_dataset(tmp_path / "d")
    for world, batch, accumulation in ((2, 4, 1), (1, 4, 2), (1, 8, 1)):
        streams = [
            LatentStream(manifest, batch, seed=1, rank=r, world_size=world, resampled=False, drop_last=True,
                         canonical_streams=2, accumulation=accumulation)
            for r in range(world)
        ]  # fmt: skip
        for epoch in range(3):
            order = epoch_shard_list(6, 1, epoch, 2, resampled=False).tolist()
            smaller = min(sum(SHARD_SIZES[s] for s in order[0::2]), sum(SHARD_SIZES[s] for s in order[1::2]))
            steps = 2 * smaller // 8  # every case takes 8 samples per optimizer step
            assert streams[0].full_batches_per_epoch(epoch) == steps * accumulation
        counts = [len(list(s)) for s in streams]
        assert counts == [streams[0].full_batches_per_epoch(0)] * world


def test_epoch_mode_resume_mid_epoch_continues_the_same_batches(tmp_path: Path) -> None:
    manifest = _write_dataset(tmp_path / "d")
    kwargs = dict(
        seed=4, rank=0, world_size=1, num_workers=2, resampled=False, drop_last=True, shuffle_buffer=5
    )
    reference = _take_batches(LatentStream(manifest, 3, **kwargs), 20)  # ~2 epochs of 10 full batches
    first = LatentStream(manifest, 3, **kwargs)
    _take_batches(first, 13)
    resumed = LatentStream(manifest, 3, **kwargs)
    resumed.load_state_dict(first.state_dict())
    _assert_same_batches(_take_batches(resumed, 7), reference[13:])


def test_epoch_mode_without_a_full_batch_is_refused_by_name(tmp_path: Path) -> None:
    manifest = _write_dataset(tmp_path / "d", sizes=(5, 5))
    stream = LatentStream(manifest, 8, seed=0, rank=0, world_size=2, resampled=False, drop_last=True)
    with pytest.raises(
        ValueError, match=r"smallest of the 2 canonical streams holds 5 samples.*no full step of 16"
    ):
        next(stream.batches())


def _take_batches(stream: LatentStream, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches = stream.batches()
    return [next(batches) for _ in range(n)]


def test_epoch_mode_resume_right_after_an_epochs_last_batch_goes_on_to_the_next_epoch(tmp_path: Path) -> None:
    manifest = _write_dataset(tmp_path / "d", sizes=(21, 21))
    kwargs = dict(seed=3, rank=0, world_size=1, resampled=False, drop_last=True)
    reference = _take_batches(LatentStream(manifest, 16, **kwargs), 6)  # 3 epochs of 2 batches
    first = LatentStream(manifest, 16, **kwargs)
    _take_batches(first, 2)  # the epoch's last batch: checkpointed before the rollover
    resumed = LatentStream(manifest, 16, **kwargs)
    resumed.load_state_dict(first.state_dict())
    _assert_same_batches(_take_batches(resumed, 4), reference[2:])
