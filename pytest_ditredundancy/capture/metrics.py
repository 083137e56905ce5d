"""Step-to-step distance metrics, in streaming form.

Capture never keeps more than the previous step's tensor. For every captured tensor it reduces the current
step to four float32 numbers per sample (:data:`STAT_FIELDS`), on the tensor's own device and without any
host synchronisation; the three metrics are derived from two consecutive steps' numbers at the very end:

* ``abs_l1``  — ``mean|X_t - X_{t-1}|``, the paper's ΔX, exactly as DiTCacheAnalysis computes it;
* ``rel_l1``  — ``sum|X_t - X_{t-1}| / sum|X_{t-1}|``, scale-free, what caches (TeaCache, FBCache) threshold;
* ``cosine``  — ``1 - <X_t, X_{t-1}> / (|X_t| |X_{t-1}|)``, the angle change, blind to scale.

The plain, non-streaming definitions (:func:`abs_l1`, :func:`rel_l1`, :func:`cosine_distance`) are the
reference the streaming path is tested against.
"""

from __future__ import annotations

import numpy as np
import torch

METRICS = ("abs_l1", "rel_l1", "cosine")
#: Per-sample reductions kept per step: sum|X_t - X_{t-1}|, ||X_t - X_{t-1}||_2, <X_t, X_{t-1}>, sum|X_t|,
#: ||X_t||_2. For the tiny angles between consecutive steps, 1 - <x,p>/(|x||p|) in float32 is all rounding
#: error; 1 - cos = (||d||^2 - (|x| - |p|)^2) / (2 |x| |p|) from the difference's norm is accurate there,
#: and the dot product form is accurate for large angles or very different magnitudes. Each cell uses the
#: form with the smaller float32 rounding bound: ~eps (d^2 + (|x|-|p|)^2) / (2|x||p|) versus ~eps.
STAT_FIELDS = ("diff_l1", "diff_l2", "dot", "abs_sum", "l2_norm")
DIFF, DIFF_L2, DOT, ABS_SUM, NORM = range(5)


def step_stats(current: torch.Tensor, previous: torch.Tensor | None, rows: int) -> torch.Tensor:
    """Reduce one step's tensor to a ``(5, rows)`` float32 tensor on its device.

    ``current`` is viewed as ``rows`` samples (sample-major: row ``r`` of a folded batch belongs to sample
    ``r // (batch / rows)``). With no ``previous`` the difference fields are zero. No host sync happens here.
    """
    x = current.detach().reshape(rows, -1)
    if x.dtype != torch.float32:
        x = x.float()
    if previous is None:
        zeros = torch.zeros(rows, dtype=torch.float32, device=x.device)
        return torch.stack((zeros, zeros, zeros, _abs_sums(x), torch.linalg.vector_norm(x, ord=2, dim=1)))
    p = previous.detach().reshape(rows, -1)
    if p.dtype != torch.float32:
        p = p.float()
    # The reads of x and p come first, together, while both are in cache; delta is then reused as scratch.
    delta = x - p
    dot = _row_dots(x, p)
    l2 = torch.linalg.vector_norm(x, ord=2, dim=1)
    diff_l2 = torch.linalg.vector_norm(delta, ord=2, dim=1)
    diff = _abs_sums(delta, scratch=delta)
    abs_sum = _abs_sums(x, scratch=delta)
    return torch.stack((diff, diff_l2, dot, abs_sum, l2))


def _abs_sums(t: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """``sum|t|`` per row. On CPU ``vector_norm(ord=1)`` is not vectorised (about 4x slower than ``abs`` then
    ``sum``), so there the absolute values go through ``scratch`` (``t``'s shape; may be ``t`` itself)."""
    if t.device.type != "cpu":
        return torch.linalg.vector_norm(t, ord=1, dim=1)
    return torch.abs(t, out=scratch).sum(1) if scratch is not None else torch.abs(t).sum(1)


def _row_dots(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``<x_r, p_r>`` per row. On CPU ``vecdot`` materialises ``x * p`` and ``bmm`` is slow for several rows:
    one BLAS dot per row reads each operand once."""
    if x.device.type != "cpu":
        return torch.linalg.vecdot(x, p, dim=1)
    if x.shape[0] == 1:
        return torch.mv(x, p[0])
    return torch.stack([torch.dot(a, b) for a, b in zip(x, p)])


def metrics_from_stats(stats: np.ndarray, numel: int) -> dict[str, np.ndarray]:
    """Turn per-step stats ``(..., steps, 5)`` into metrics ``(..., steps - 1)`` (float64 arithmetic).

    ``numel`` is the number of elements per sample. Degenerate cases are defined, not NaN: two all-zero
    steps have distance 0; a change away from an all-zero step has relative L1 ``inf`` and cosine 1.
    """
    stats = np.asarray(stats, dtype=np.float64)
    diff = stats[..., 1:, DIFF]
    diff_l2 = stats[..., 1:, DIFF_L2]
    prev_abs = stats[..., :-1, ABS_SUM]
    now, before = stats[..., 1:, NORM], stats[..., :-1, NORM]
    norms = now * before
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(prev_abs > 0, diff / prev_abs, np.where(diff == 0, 0.0, np.inf))
        by_norms = np.clip((diff_l2**2 - (now - before) ** 2) / (2 * norms), 0.0, 2.0)
        by_dot = np.clip(1.0 - stats[..., 1:, DOT] / norms, 0.0, 2.0)
        norms_error_scale = (diff_l2**2 + (now - before) ** 2) / (2 * norms)
        angular = np.where(norms_error_scale < 1.0, by_norms, by_dot)
        cos = np.where(diff == 0, 0.0, np.where(norms > 0, angular, 1.0))
    rel = np.where(np.isnan(diff), np.nan, rel)
    cos = np.where(np.isnan(diff_l2) | np.isnan(stats[..., 1:, DOT]) | np.isnan(norms), np.nan, cos)
    return {"abs_l1": diff / numel, "rel_l1": rel, "cosine": cos}


def _pair(current, previous) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(current).detach().to(torch.float64).flatten()
    p = torch.as_tensor(previous).detach().to(torch.float64).flatten()
    if x.shape != p.shape:
        raise ValueError(f"cannot compare tensors of {x.numel()} and {p.numel()} elements")
    return x, p


def abs_l1(current, previous) -> float:
    """Reference ``mean|X_t - X_{t-1}|`` (the paper's ΔX)."""
    x, p = _pair(current, previous)
    return float((x - p).abs().mean())


def rel_l1(current, previous) -> float:
    """Reference ``sum|X_t - X_{t-1}| / sum|X_{t-1}|``."""
    x, p = _pair(current, previous)
    diff, base = float((x - p).abs().sum()), float(p.abs().sum())
    if base == 0:
        return 0.0 if diff == 0 else float("inf")
    return diff / base


def cosine_distance(current, previous) -> float:
    """Reference ``1 - cos(X_t, X_{t-1})``."""
    x, p = _pair(current, previous)
    norms = float(x.norm() * p.norm())
    if norms == 0:
        return 0.0 if torch.equal(x, p) else 1.0
    return 1.0 - float(x @ p) / norms
