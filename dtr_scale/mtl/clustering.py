"""ANT interval clustering of the diffusion timesteps (Go et al., "Addressing Negative Transfer in
Diffusion Models", NeurIPS 2023, Sec. 4.1).

The T denoising tasks are grouped into k contiguous, inclusive, 0-indexed intervals [l, r] that
minimise a sum of interval costs. The optimum is found exactly by dynamic programming:

    D[j, i] = min_{L < i} D[j - 1, L] + cost(L + 1, i)          (ANT, Eq. 6)

with D[0, i] = cost(0, i). Objectives:

- ``"timestep"``: the uniform split of 0..T-1, sizes differing by at most one, boundaries
  floor(T * j / k) as in the official training code. Its cost is the sum of squared interval sizes,
  whose minimisers are exactly the splits with sizes differing by at most one.
- ``"snr"`` / ``"log_snr"``: 1-D feature v (SNR or log SNR per timestep); cost of [l, r] is
  sum_{t=l..r} |v_t - v_c| with centre c = round_half_even((l + r + 1) / 2) clipped to r
  (the official code's Python-3 ``round``).
- ``"affinity"``: a T x T task-affinity matrix A; cost of [l, r] is -sum_{t=l..r} A[c, t] with
  c = floor((l + r + 1) / 2).

Every cost is a row sum ``sum_{t=l..r} M[c, t]`` of a T x T matrix M (|v_t - v_c|, or -A), so one
prefix sum along the rows gives all T^2 interval costs in O(T^2) and the DP is O(k T^2) in
vectorised numpy (about 0.1 s for T = 1000, k = 8).

The CLI, ``dtr-scale cluster --objective snr --k 5`` (train/cluster.py), prints the intervals, their costs
and shares of the timesteps and writes them as JSON that ``load_clusters`` (and a training config) reads back.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

OBJECTIVES = ("timestep", "snr", "log_snr", "affinity")

Interval = tuple[int, int]


# ----------------------------------------------------------------------------- centres and costs


def interval_centre(left: int, right: int, objective: str) -> int:
    """Centre timestep c of [left, right] under the official code's rule for ``objective``."""
    if objective == "affinity":
        return (left + right + 1) // 2
    # Python's round() is round-half-even, which is what the official SNR clustering uses.
    return min(round((left + right + 1) / 2), right)


def _as_feature(values: np.ndarray | list[float], objective: str) -> np.ndarray:
    """Validated float64 feature for ``objective``: 1-D for snr/log_snr/timestep, T x T for affinity."""
    if objective not in OBJECTIVES:
        raise ValueError(
            f"unknown clustering objective {objective!r}; expected one of {', '.join(OBJECTIVES)}"
        )
    arr = np.asarray(values, dtype=np.float64)
    if objective == "affinity":
        if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
            raise ValueError(f"objective 'affinity' needs a square T x T matrix, got shape {arr.shape}")
    elif arr.ndim != 1:
        raise ValueError(
            f"objective {objective!r} needs a 1-D array of per-timestep SNR, got shape {arr.shape}"
        )
    if arr.shape[0] < 1:
        raise ValueError("cannot cluster zero timesteps")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"objective {objective!r}: values contain NaN or infinity")
    if objective == "log_snr":
        if np.any(arr <= 0):
            raise ValueError("objective 'log_snr' needs strictly positive SNR values")
        arr = np.log(arr)
    return arr


def _row_matrix(feature: np.ndarray, objective: str) -> np.ndarray:
    """M with cost(l, r) = sum_{t=l..r} M[c(l, r), t]."""
    if objective == "affinity":
        return -feature
    return np.abs(feature[None, :] - feature[:, None])


def interval_cost(values: np.ndarray | list[float], left: int, right: int, objective: str) -> float:
    """Cost of the single inclusive interval [left, right], computed directly from the definition."""
    feature = _as_feature(values, objective)
    if not 0 <= left <= right < feature.shape[0]:
        raise ValueError(f"interval [{left}, {right}] is not inside 0..{feature.shape[0] - 1}")
    if objective == "timestep":
        return float((right - left + 1) ** 2)
    c = interval_centre(left, right, objective)
    if objective == "affinity":
        return float(-feature[c, left : right + 1].sum())
    return float(np.abs(feature[left : right + 1] - feature[c]).sum())


def clustering_cost(values: np.ndarray | list[float], intervals: list[Interval], objective: str) -> float:
    """Sum of the interval costs of a clustering."""
    return float(sum(interval_cost(values, left, right, objective) for left, right in intervals))


def _all_interval_costs(feature: np.ndarray, objective: str) -> np.ndarray:
    """T x T matrix C[l, r] = cost(l, r) for l <= r and +inf below the diagonal."""
    T = feature.shape[0]
    left, right = np.triu_indices(T)
    if objective == "timestep":
        costs = (right - left + 1).astype(np.float64) ** 2
    else:
        rows = _row_matrix(feature, objective)
        prefix = np.zeros((T, T + 1))
        np.cumsum(rows, axis=1, out=prefix[:, 1:])
        if objective == "affinity":
            centre = (left + right + 1) // 2
        else:
            # np.rint rounds half to even, like Python's round().
            centre = np.minimum(np.rint((left + right + 1) / 2).astype(np.int64), right)
        costs = prefix[centre, right + 1] - prefix[centre, left]
    table = np.full((T, T), np.inf)
    table[left, right] = costs
    return table


# ----------------------------------------------------------------------------- the clustering


def uniform_intervals(num_timesteps: int, k: int) -> list[Interval]:
    """Uniform split with boundaries floor(T * j / k): the official code's clusters (``"timestep"``)."""
    _check_k(num_timesteps, k)
    bounds = [num_timesteps * j // k for j in range(k + 1)]
    return [(bounds[j], bounds[j + 1] - 1) for j in range(k)]


def _check_k(num_timesteps: int, k: int) -> None:
    if not 1 <= k <= num_timesteps:
        raise ValueError(f"number of clusters k must be in 1..{num_timesteps} (the timesteps), got {k}")


def interval_clustering(values: np.ndarray | list[float], k: int, objective: str) -> list[Interval]:
    """k contiguous inclusive intervals covering 0..T-1 that minimise the summed interval cost.

    ``values``: per-timestep SNR abar/(1-abar) (length T) for "timestep", "snr", "log_snr"; a T x T
    task-affinity matrix for "affinity". Ties are broken towards the earliest split point.
    """
    feature = _as_feature(values, objective)
    T = feature.shape[0]
    _check_k(T, k)
    if objective == "timestep":
        return uniform_intervals(T, k)
    cost = _all_interval_costs(feature, objective)
    # best[j][i]: optimal cost of splitting 0..i into j + 1 intervals (inf where i < j);
    # split[j][i]: the end L of the j-th interval in that optimum (ANT, Eq. 6).
    best = np.full((k, T), np.inf)
    split = np.zeros((k, T), dtype=np.int64)
    best[0] = cost[0]
    for j in range(1, k):
        # candidates[L, i] = best[j-1][L] + cost(L + 1, i), for L = 0..T-2
        candidates = best[j - 1, :-1, None] + cost[1:, :]
        split[j, 1:] = np.argmin(candidates[:, 1:], axis=0)
        best[j, 1:] = candidates[split[j, 1:], np.arange(1, T)]
    intervals: list[Interval] = []
    right = T - 1
    for j in range(k - 1, 0, -1):
        end = int(split[j, right])
        intervals.append((end + 1, right))
        right = end
    intervals.append((0, right))
    return intervals[::-1]


# ----------------------------------------------------------------------------- files


def validate_intervals(
    intervals: list[Interval], num_timesteps: int | None = None, source: str = "clusters"
) -> list[Interval]:
    """Check that ``intervals`` are contiguous, inclusive and cover 0..T-1; return them as int tuples.

    ``source`` names where they came from (a file path) in the error message.
    """
    try:
        pairs = [(int(a), int(b)) for a, b in intervals]
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{source}: intervals must be a list of [left, right] integer pairs ({err})"
        ) from None
    if not pairs:
        raise ValueError(f"{source}: no intervals")
    expected_left = 0
    for j, (left, right) in enumerate(pairs):
        if left != expected_left or right < left:
            raise ValueError(
                f"{source}: interval {j} is [{left}, {right}]; expected contiguous inclusive intervals, "
                f"this one starting at {expected_left} and ending at or after its start"
            )
        expected_left = right + 1
    if num_timesteps is not None and expected_left != num_timesteps:
        raise ValueError(
            f"{source}: intervals cover 0..{expected_left - 1}, expected 0..{num_timesteps - 1} "
            f"({num_timesteps} timesteps)"
        )
    return pairs


def load_clusters(
    path: str | Path,
    num_timesteps: int | None = None,
    diffusion_objective: str | None = None,
    noise_schedule: str | None = None,
) -> list[Interval]:
    """Intervals from a JSON file written by ``dtr-scale cluster`` (key ``"intervals"``), validated.

    If ``num_timesteps`` is given the intervals must cover exactly 0..num_timesteps-1; the file's own
    ``"num_timesteps"`` entry, when present, is checked too, and so is its ``"diffusion_objective"`` (ddpm |
    flow: DDPM timesteps and flow's bins of t have different SNRs) against ``diffusion_objective``, and for
    SNR clusters its DDPM ``"schedule"`` against ``noise_schedule`` (linear | cosine).
    Errors: FileNotFoundError, ValueError naming the file.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"cluster file {path} does not exist (write one with `dtr-scale cluster`)"
        ) from None
    except json.JSONDecodeError as err:
        raise ValueError(f"cluster file {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or "intervals" not in data:
        raise ValueError(f"cluster file {path}: expected a JSON object with key 'intervals'")
    file_timesteps = data.get("num_timesteps")
    if file_timesteps is not None and num_timesteps is not None and int(file_timesteps) != num_timesteps:
        raise ValueError(
            f"cluster file {path}: written for num_timesteps={file_timesteps}, but the diffusion has {num_timesteps}"
        )
    # SNR clusters depend on the objective's SNR; equal intervals and affinity clusters are judged by their T only.
    # A file from before `--diffusion` names a DDPM schedule: it was written for DDPM.
    snr_based = data.get("objective") in ("snr", "log_snr")
    written_for = data.get("diffusion_objective") or ("ddpm" if data.get("schedule") else None)
    if snr_based and None not in (written_for, diffusion_objective) and written_for != diffusion_objective:
        raise ValueError(
            f"cluster file {path}: written for diffusion.objective={written_for}, but the run trains "
            f"{diffusion_objective} (write one with `dtr-scale cluster --diffusion {diffusion_objective}`)"
        )
    schedule = {"squaredcos_cap_v2": "cosine"}.get(data.get("schedule"), data.get("schedule"))
    if snr_based and schedule is not None and noise_schedule is not None and schedule != noise_schedule:
        raise ValueError(
            f"cluster file {path}: SNR clusters of the {schedule} schedule, but the run's diffusion.noise_schedule "
            f"is {noise_schedule} (write them with `dtr-scale cluster --schedule {noise_schedule}`)"
        )
    expected = num_timesteps if num_timesteps is not None else file_timesteps
    return validate_intervals(
        data["intervals"], None if expected is None else int(expected), source=f"cluster file {path}"
    )


def expand_group_intervals(intervals: list[Interval], group_size: int) -> list[Interval]:
    """Map intervals over timestep groups of size G back to timesteps: group g is [gG, (g+1)G - 1]."""
    return [(left * group_size, (right + 1) * group_size - 1) for left, right in intervals]
