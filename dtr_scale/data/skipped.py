"""Accounting of skipped samples: what was lost, where, of which kind, and whether too much was.

A large run that quietly trains on part of its data is the failure users of big trainers fear most, so
every sample the stream (or `preprocess`) cannot use is *counted* by kind and shard, *reported* once per
shard and kind with a count and the first key, and *bounded*: past `data.max_skipped_fraction` of the
samples seen in a window the run stops (docs/reliability.md states the policy).

Kinds (the `data/skipped_<kind>` scalars in TensorBoard and metrics.jsonl):

    undecodable       a member is missing or cannot be decoded (.cls not an integer, .npy corrupt, NaN/inf)
    wrong_shape       the latents are not float16 of the manifest's latent_shape
    label             the class index is outside 0..len(labels)-1
    corrupt_tar       the tar broke partway (a corrupt member header): the rest of the shard is lost
    unreadable_shard  the shard could not be read at all (missing, not a tar, no permission)
    short_shard       the tar ends before the manifest's count (a file cut short, fewer samples, or a corrupt
                      member header, which Python's tarfile reads as the end of the archive)

`surplus` (a shard holding more samples than the manifest lists) is reported the same way but loses nothing.
"""

from __future__ import annotations

from typing import Any

SKIP_KINDS = ("undecodable", "wrong_shape", "label", "corrupt_tar", "unreadable_shard", "short_shard")
NOTICE_KINDS = ("surplus",)  # reported, never counted as skipped

_WHAT = {
    "undecodable": "samples that could not be decoded",
    "wrong_shape": "samples with latents of the wrong shape or dtype",
    "label": "samples with a label outside 0..{top}",
    "corrupt_tar": "samples lost to a corrupt or cut tar",
    "unreadable_shard": "samples lost because the shard could not be read",
    "short_shard": "samples missing (the tar ends early: cut short, or a corrupt header)",
}


def describe(kind: str, count: int, first: str, detail: str, num_labels: int) -> str:
    """One line for one shard and kind, e.g. '32 samples with a label outside 0..9, first mnist01861 (...)'."""
    if kind == "surplus":
        return f"{detail}; the samples past that are ignored"
    what = _WHAT[kind].format(top=num_labels - 1)
    if count == 1:
        what = what.replace("samples", "sample", 1)
    return f"{count} {what}, first {first} ({detail})"


def record(shard: str, kind: str, first: str, detail: str, count: int = 1) -> dict[str, Any]:
    """A skip record as the loader workers send it: shard file name, kind, count, first key, detail."""
    if kind not in SKIP_KINDS and kind not in NOTICE_KINDS:
        raise ValueError(f"unknown skip kind {kind!r}; expected one of {SKIP_KINDS + NOTICE_KINDS}")
    return {"shard": shard, "kind": kind, "count": int(count), "first": str(first), "detail": str(detail)}


class SkipLedger:
    """Per-rank counts of skipped samples by kind and shard, the window the threshold is judged over, and the
    one-warning-per-shard-and-kind bookkeeping. Plain ints and strings: its state_dict goes into checkpoints.

    add(rec): count a record (pending its warning until the shard is finished). delivered(n): n samples
    reached the trainer. finish(shard): the lines to warn now for a shard whose samples were all handed out.
    """

    def __init__(self) -> None:
        self.totals = dict.fromkeys(SKIP_KINDS, 0)
        self.by_shard: dict[str, dict[str, int]] = {}
        self.window_seen = 0  # samples delivered + skipped since the window began
        self.window_by_shard: dict[str, int] = {}
        self.window_first: dict[str, str] = {}  # shard -> "kind, first KEY" of its first skip in the window
        self._pending: dict[tuple[str, str], dict[str, Any]] = {}
        self._warned: set[tuple[str, str]] = set()

    @property
    def window_skipped(self) -> int:
        return sum(self.window_by_shard.values())

    def add(self, rec: dict[str, Any]) -> None:
        shard, kind, count = rec["shard"], rec["kind"], rec["count"]
        pending = self._pending.setdefault((shard, kind), {**rec, "count": 0})
        pending["count"] += count
        if kind in NOTICE_KINDS:
            return
        self.totals[kind] += count
        per_shard = self.by_shard.setdefault(shard, {})
        per_shard[kind] = per_shard.get(kind, 0) + count
        self.window_seen += count
        self.window_by_shard[shard] = self.window_by_shard.get(shard, 0) + count
        self.window_first.setdefault(shard, f"{kind}, first {rec['first']}")

    def mark_warned(self, shard: str, kind: str) -> None:
        """Count (shard, kind) as already reported (e.g. a missing file, named up front)."""
        self._warned.add((shard, kind))

    def delivered(self, n: int) -> None:
        self.window_seen += int(n)

    def finish(self, shard: str | None, num_labels: int) -> list[tuple[str, str]]:
        """(shard, line) to warn for `shard` (None: every shard with pending records), each (shard, kind)
        at most once per run; later occurrences are only counted."""
        keys = [k for k in self._pending if shard is None or k[0] == shard]
        lines = []
        for key in keys:
            rec = self._pending.pop(key)
            if key not in self._warned:
                self._warned.add(key)
                lines.append(
                    (key[0], describe(key[1], rec["count"], rec["first"], rec["detail"], num_labels))
                )
        return lines

    def window(self) -> dict[str, Any]:
        """This rank's window: samples seen, skipped, and the shards that lost the most (name, count, what)."""
        worst = sorted(self.window_by_shard.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
        worst = [(name, count, self.window_first[name]) for name, count in worst]
        return {"seen": self.window_seen, "skipped": self.window_skipped, "worst": worst}

    def reset_window(self) -> None:
        self.window_seen, self.window_by_shard, self.window_first = 0, {}, {}

    def state_dict(self) -> dict[str, Any]:
        return {
            "totals": dict(self.totals),
            "by_shard": {s: dict(k) for s, k in self.by_shard.items()},
            "window_seen": self.window_seen,
            "window_by_shard": dict(self.window_by_shard),
            "window_first": dict(self.window_first),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.totals = {**dict.fromkeys(SKIP_KINDS, 0), **{k: int(v) for k, v in state["totals"].items()}}
        self.by_shard = {s: {k: int(v) for k, v in kinds.items()} for s, kinds in state["by_shard"].items()}
        self.window_seen = int(state["window_seen"])
        self.window_by_shard = {s: int(v) for s, v in state["window_by_shard"].items()}
        self.window_first = {s: str(v) for s, v in state["window_first"].items()}


def merge_ledger_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One SkipLedger state holding the counts of several (every rank's, for a resharding resume): totals,
    per-shard counts and windows summed; a shard's first skip is kept from the first state naming it."""
    merged = SkipLedger()
    for state in states:
        ledger = SkipLedger()
        ledger.load_state_dict(state)
        for kind, count in ledger.totals.items():
            merged.totals[kind] += count
        for shard, kinds in ledger.by_shard.items():
            into = merged.by_shard.setdefault(shard, {})
            for kind, count in kinds.items():
                into[kind] = into.get(kind, 0) + count
        merged.window_seen += ledger.window_seen
        for shard, count in ledger.window_by_shard.items():
            merged.window_by_shard[shard] = merged.window_by_shard.get(shard, 0) + count
        for shard, first in ledger.window_first.items():
            merged.window_first.setdefault(shard, first)
    return merged.state_dict()


def judge_windows(windows: list[dict[str, Any]], max_fraction: float, where: str) -> str | None:
    """The stop message when some rank's window skipped more than `max_fraction` of the samples it saw,
    naming that rank, its fraction and its worst shards; None when every rank is within bounds.

    windows: one `SkipLedger.window()` per rank (index = global rank). max_fraction in [0, 1]; 1 = never stop.
    """
    worst_rank, worst_fraction = None, -1.0
    for rank, w in enumerate(windows):
        fraction = w["skipped"] / w["seen"] if w["seen"] else 0.0
        if fraction > max_fraction and fraction > worst_fraction:
            worst_rank, worst_fraction = rank, fraction
    if worst_rank is None:
        return None
    w = windows[worst_rank]
    shards = ", ".join(f"{name} ({count}: {what})" for name, count, what in w["worst"])
    return (
        f"{where}: rank {worst_rank} skipped {w['skipped']} of the {w['seen']} samples it saw since the last "
        f"check ({worst_fraction:.2%} > data.max_skipped_fraction={max_fraction:g}); worst shards: {shards}"
    )
