"""Weights on the cluster losses from the Gram matrix G of the global per-cluster gradients alone.

PCGrad's projected sum (Yu et al. 2020) and NashMTL's bargaining solution (Navon et al. 2022) are both
sum_m w_m g_m for a weight vector w computable from G alone (docs/ant-and-dtr.md). `pcgrad_weights` and `nash_weights` are
public through `dtr_scale.mtl.balancers` as well; both take G as a (k, k) tensor or array and return float64
(k,) tensors.
"""

from __future__ import annotations

import numpy as np
import torch


def _gram_numpy(G: torch.Tensor | np.ndarray) -> np.ndarray:
    G = G.detach().cpu().numpy() if isinstance(G, torch.Tensor) else np.asarray(G)
    G = G.astype(np.float64)
    if G.ndim != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"Gram matrix must be square (k, k), got shape {G.shape}")
    if not np.all(np.isfinite(G)):
        raise ValueError("Gram matrix contains NaN or infinity (a per-cluster gradient overflowed?)")
    return G


def pcgrad_weights(
    G: torch.Tensor | np.ndarray, order: torch.Tensor | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """PCGrad (Yu et al. 2020, Algorithm 1) as weights on the original gradients, float64 (k,).

    Each projected gradient is a combination g~_i = sum_m C[i, m] g_m, starting from C = I. For j
    in row i of ``order``: if <g~_i, g_j> < 0 then g~_i -= <g~_i, g_j> / |g_j|^2 g_j (the projection
    onto the normal plane of g_j, Eq. 1), which on C is C[i, j] -= (C[i] @ G[:, j]) / G[j, j]. The
    entry j = i is skipped (Algorithm 1 projects onto the other tasks only), as are zero gradients.
    Returns w = sum_i C[i], so that sum_i g~_i = sum_m w_m g_m.

    ``order``: (k, k) integers, row i a permutation of 0..k-1; None draws each row with
    ``torch.randperm(k, generator=generator)`` (use the same seed on every rank).
    """
    G = _gram_numpy(G)
    k = G.shape[0]
    if order is None:
        order = torch.stack([torch.randperm(k, generator=generator) for _ in range(k)])
    order_np = np.asarray(order.cpu() if isinstance(order, torch.Tensor) else order)
    if order_np.shape != (k, k) or any(sorted(row.tolist()) != list(range(k)) for row in order_np):
        raise ValueError(
            f"order must be a ({k}, {k}) integer array whose rows are permutations of 0..{k - 1}"
        )
    coefs = np.eye(k)
    for i in range(k):
        for j in order_np[i]:
            if j == i or G[j, j] <= 0.0:
                continue
            dot = coefs[i] @ G[:, j]
            if dot < 0.0:
                coefs[i, j] -= dot / G[j, j]
    return torch.from_numpy(coefs.sum(axis=0))


def nash_weights(
    G: torch.Tensor | np.ndarray,
    prev: torch.Tensor | np.ndarray | None = None,
    tol: float = 1e-10,
    max_iter: int = 500,
) -> torch.Tensor:
    """Nash-MTL bargaining weights (Navon et al. 2022, Eq. 3 / Sec. 3.2), float64 (k,), w > 0.

    Solves (G / |G|_F) w = 1 / w, G normalised by its Frobenius norm as in the paper's code. The
    solution is the unique minimiser of the strictly convex, self-concordant
    f(w) = 0.5 w^T Ghat w - sum_i log w_i (its gradient is Ghat w - 1/w), found by damped Newton
    (Nesterov & Nemirovski): step 1/(1 + lambda) while the Newton decrement lambda > 1/4, which keeps
    w > 0 without a line search, then full steps (quadratic convergence). The Hessian
    Ghat + diag(1/w^2) is positive definite even for a singular G, so near-singular G is fine.
    Warm-started from ``prev`` (the last weights) when given.

    Degenerate inputs: clusters with a zero gradient (G[i, i] = 0) cannot satisfy the equation and
    do not move the update; they get the mean weight of the others. If no solution exists (some
    non-negative combination of gradients is zero, e.g. two exactly opposite gradients) the iteration
    cannot converge and ``prev`` (or ones) is returned.
    """
    G = _gram_numpy(G)
    k = G.shape[0]
    fallback = np.ones(k) if prev is None else _as_positive(prev, k)
    scale = np.linalg.norm(G)
    if scale == 0.0:
        return torch.from_numpy(fallback.copy())
    G_hat = G / scale
    active = np.diag(G_hat) > 1e-12
    sub = G_hat[np.ix_(active, active)]
    w = fallback[active].copy()
    converged = False
    for _ in range(max_iter):
        grad = sub @ w - 1.0 / w
        if np.max(np.abs(w * (sub @ w) - 1.0)) <= tol:
            converged = True
            break
        try:
            step = np.linalg.solve(sub + np.diag(1.0 / w**2), grad)
        except np.linalg.LinAlgError:
            break
        decrement = float(np.sqrt(max(grad @ step, 0.0)))
        if decrement <= 1e-7:
            # f(w) - f* <= decrement^2 (self-concordance): optimal to rounding, which for an
            # ill-conditioned G (large w) is above `tol` in the residual
            converged = True
            break
        w = w - (step / (1.0 + decrement) if decrement > 0.25 else step)
        if not np.all(np.isfinite(w)) or w.max() > 1e12:
            break  # diverging along a direction with G w = 0: no solution
    if not converged or not np.all(w > 0):
        return torch.from_numpy(fallback.copy())
    out = np.empty(k)
    out[active] = w
    out[~active] = w.mean()
    return torch.from_numpy(out)


def _as_positive(prev: torch.Tensor | np.ndarray, k: int) -> np.ndarray:
    prev = np.asarray(prev.detach().cpu() if isinstance(prev, torch.Tensor) else prev, dtype=np.float64)
    if prev.shape != (k,) or not np.all(np.isfinite(prev)) or not np.all(prev > 0):
        return np.ones(k)
    return prev
