"""The shape of a redundancy profile: curves over normalized time, their comparison, and model fingerprints.

The paper's second and third claims: a model's redundancy keeps its shape across step counts and schedulers
(:func:`compare_shapes` on :func:`step_curves`, over :func:`normalized_times`), and differs between models
(:func:`signature`, :func:`distinctness`). Plain numpy; NaN means "not measured" and is left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..capture.profile import RedundancyProfile
from .statistics import kind_cells, prompt_mean

#: Relative std (std / mean) under which a normalized curve counts as constant: far above float64
#: rounding, so scaling the input cannot flip a curve between "constant" and "varying".
_FLAT = 1e-7


def normalized_times(timesteps: Sequence[float], num_train_timesteps: int | None, *,
                     pairs: int | None = None) -> np.ndarray:
    """Step-pair midpoints as t/T in [0, 1], decreasing with the step index (noise -> data).

    Profiles with different step counts or schedulers are compared on this axis. Timesteps already in
    [0, 1] are used as they are. Without usable timesteps (empty, non-finite, or not ``pairs + 1`` of
    them when ``pairs`` is given) the steps are taken as evenly spaced from 1 to 0.
    """
    t = np.asarray(list(timesteps), dtype=np.float64).ravel()
    if pairs is None:
        pairs = max(t.size - 1, 0)
    if t.size != pairs + 1 or t.size < 2 or not np.isfinite(t).all():
        t = np.linspace(1.0, 0.0, pairs + 1)
    elif t.max() > 1.0:
        t = t / float(num_train_timesteps or 1000)
    t = np.clip(t, 0.0, 1.0)
    return (t[:-1] + t[1:]) / 2.0


@dataclass
class ShapeComparison:
    """How alike two per-layer step curves are in shape. ``points``: layer x grid values compared."""

    correlation: float
    distance: float
    points: int


def _normalize(curves: np.ndarray) -> np.ndarray:
    """Divide each row by its mean absolute value (rows that are all zero stay zero)."""
    scale = np.abs(curves).mean(axis=-1, keepdims=True)
    return np.divide(curves, scale, out=np.zeros_like(curves), where=scale > 0)


def _interp(at: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """np.interp over the finite points of ``y``, with ``x`` in any order (np.interp needs it increasing)."""
    ok = np.isfinite(y)
    order = np.argsort(x[ok], kind="stable")
    return np.interp(at, x[ok][order], y[ok][order])


def compare_shapes(a: np.ndarray, times_a: np.ndarray, b: np.ndarray, times_b: np.ndarray, *,
                   grid: int = 32) -> ShapeComparison:
    """Compare ``[layer, step_pair]`` curves on their common normalized-time range, magnitude removed.

    Fewer steps means a bigger change per step, so each layer curve is divided by its mean first.
    Correlation: mean Pearson r over layers whose curves both vary; distance: mean absolute difference.
    Layers not fully measured in both, or zero in both (series that never change), are skipped.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    times_a, times_b = np.asarray(times_a, np.float64).ravel(), np.asarray(times_b, np.float64).ravel()
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"curves must be [layer, step_pair], got shapes {a.shape} and {b.shape}")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"layer counts differ: {a.shape[0]} layers against {b.shape[0]} layers")
    for name, curves, times in (("a", a, times_a), ("b", b, times_b)):
        if times.size != curves.shape[1] or times.size == 0:
            raise ValueError(f"{name} has {curves.shape[1]} step pairs but {times.size} times")
    lo, hi = max(times_a.min(), times_b.min()), min(times_a.max(), times_b.max())
    if lo > hi:
        raise ValueError(f"time ranges [{times_a.min():.3g}, {times_a.max():.3g}] and "
                         f"[{times_b.min():.3g}, {times_b.max():.3g}] do not overlap")
    measured = np.isfinite(a).all(axis=1) & np.isfinite(b).all(axis=1)
    keep = measured & ((a != 0).any(axis=1) | (b != 0).any(axis=1))
    if not keep.any():  # nothing measured, or only series that never change (identical, trivially)
        return ShapeComparison(1.0, 0.0, 0) if measured.any() else ShapeComparison(float("nan"), float("nan"), 0)
    points = np.unique(np.linspace(lo, hi, max(int(grid), 1)))
    na = _normalize(np.stack([_interp(points, times_a, row) for row in a[keep]]))
    nb = _normalize(np.stack([_interp(points, times_b, row) for row in b[keep]]))
    distance = float(np.mean(np.abs(na - nb)))
    varying = (na.std(axis=1) > _FLAT) & (nb.std(axis=1) > _FLAT)
    if varying.any():
        ca = na[varying] - na[varying].mean(axis=1, keepdims=True)
        cb = nb[varying] - nb[varying].mean(axis=1, keepdims=True)
        r = (ca * cb).sum(axis=1) / np.sqrt((ca**2).sum(axis=1) * (cb**2).sum(axis=1))
        correlation = float(np.clip(r, -1.0, 1.0).mean())
    else:
        correlation = 1.0 if distance < 1e-9 else 0.0
    return ShapeComparison(correlation, distance, int(na.size))


def step_curves(profile: RedundancyProfile, kind: str, *, metric: str = "abs_l1",
                branch: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Prompt-mean ``[layer, step_pair]`` curves of one kind and the profile's normalized times."""
    return prompt_mean(kind_cells(profile, kind, metric, branch)[0]), _profile_times(profile)


def _profile_times(profile: RedundancyProfile) -> np.ndarray:
    meta = profile.metadata
    return normalized_times(meta.timesteps, meta.num_train_timesteps, pairs=profile.num_step_pairs)


# -- model fingerprints -----------------------------------------------------------------------------------

@dataclass
class Signature:
    """Fixed-length, scale-free fingerprint of a model's redundancy (per kind: time curve, depth curve)."""

    model: str
    mean: np.ndarray
    per_prompt: np.ndarray


def _fingerprint(cells: np.ndarray, times: np.ndarray, grid: int) -> np.ndarray:
    """``[layer, step]`` (NaN = unmeasured) -> time curve and depth curve, each ``grid`` points, mean 1."""
    axis = np.linspace(0.0, 1.0, grid)
    over_time, over_depth = prompt_mean(cells), prompt_mean(cells.T)  # [step], [layer]
    parts = [_normalize(_interp(axis, x, y)) if np.isfinite(y).any() else np.zeros(grid)
             for y, x in ((over_time, times), (over_depth, np.linspace(0.0, 1.0, over_depth.size)))]
    return np.concatenate(parts)


def signature(profile: RedundancyProfile, *, metric: str = "abs_l1", grid: int = 16,
              kinds: Sequence[str] = ("k", "v", "a"), branch: str | None = None) -> Signature:
    """Per kind: the layer-averaged curve over normalized time and the per-layer mean over normalized
    depth, each resampled to ``grid`` points over [0, 1] and divided by its mean, concatenated.

    Layer and step counts drop out, so models of any size compare. Layers constant for every prompt
    (cross-attention K/V) are left out; a kind the profile lacks gives zeros to keep vectors aligned.
    """
    times = _profile_times(profile)
    mean_parts, prompt_parts = [], []
    for kind in kinds:
        if kind not in profile.kinds:
            mean_parts.append(np.zeros(2 * grid))
            prompt_parts.append(np.zeros((profile.num_prompts, 2 * grid)))
            continue
        cells, constant = kind_cells(profile, kind, metric, branch)
        cells = cells[:, ~constant]
        mean_parts.append(_fingerprint(prompt_mean(cells), times, grid))
        prompt_parts.append(np.stack([_fingerprint(c, times, grid) for c in cells])
                            if len(cells) else np.zeros((0, 2 * grid)))
    per_prompt = np.concatenate(prompt_parts, axis=1) if prompt_parts else np.zeros((profile.num_prompts, 0))
    mean = np.concatenate(mean_parts) if mean_parts else np.zeros(0)
    return Signature(profile.metadata.model, mean, per_prompt)


@dataclass
class Distinctness:
    """How far apart two models' signatures are, relative to how much each varies across prompts."""

    model_a: str
    model_b: str
    between: float
    within_a: float
    within_b: float
    ratio: float


def distinctness(a: Signature, b: Signature) -> Distinctness:
    """``ratio`` > 1: the models differ by more than prompts move either of them (symmetric in a, b)."""
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"signatures have {a.mean.size} and {b.mean.size} features; use the same grid and kinds")
    between = float(np.mean(np.abs(a.mean - b.mean))) if a.mean.size else 0.0

    def within(s: Signature) -> float:
        if not s.per_prompt.size:
            return 0.0
        return float(np.mean(np.abs(s.per_prompt - s.mean[None, :]).mean(axis=1)))

    wa, wb = within(a), within(b)
    spread = max(wa, wb)
    ratio = between / spread if spread > 0 else (float("inf") if between > 0 else 0.0)
    return Distinctness(a.model, b.model, between, wa, wb, ratio)
