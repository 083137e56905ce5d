"""Compact, plain-builtin summaries of profiles: what the report draws, small enough to travel from xdist
workers in test reports and to embed 20 models × 60 layers in one HTML file.

Everything is a mean over prompts on the default (cond) branch, rounded to 4 significant digits; no
per-prompt arrays. The default-settings profile of a model carries its layer × step matrices; profiles of
other step counts / schedulers only carry their layer-mean curves (enough for the overlays).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from ..capture.profile import RedundancyProfile
from ..judging import drift, shapes
from ..judging.baselines import Baseline
from ..profiling.runner import RunSettings

SUMMARY_METRICS = ("abs_l1", "rel_l1")


def sig4(value: Any) -> float | None:
    """A float rounded to 4 significant digits; None for NaN/inf/None (strict JSON has no NaN)."""
    if value is None:
        return None
    value = float(value)
    return float(f"{value:.4g}") if math.isfinite(value) else None


def rounded(array: np.ndarray) -> list:
    """A nested list of :func:`sig4` values."""
    array = np.asarray(array, dtype=np.float64)
    if array.ndim == 0:
        return sig4(array)  # type: ignore[return-value]
    return [rounded(row) for row in array] if array.ndim > 1 else [sig4(v) for v in array]


def _quiet_nanmean(array: np.ndarray, axis: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(array, axis=axis)


def variant_label(settings: RunSettings, default: RunSettings) -> str:
    """``default``, ``12 steps``, ``euler``, or ``euler, 12 steps``."""
    parts = []
    if settings.scheduler != default.scheduler:
        parts.append(settings.scheduler)
    if settings.steps != default.steps:
        parts.append(f"{settings.steps} steps")
    return ", ".join(parts) or ("default" if settings == default else settings.key())


def profile_summary(profile: RedundancyProfile, *, model: str, family: str, in_paper: bool, settings: RunSettings,
                    settings_key: str, default: RunSettings, baseline: Baseline | None = None,
                    device_class: str | None = None, tolerance_level: str = "default") -> dict[str, Any]:
    """The report's view of one profile (see the module docstring)."""
    branch = profile.default_branch
    b = profile.branches.index(branch)
    constant = profile.constant[:, b].all(axis=0) if profile.num_prompts else np.zeros((len(profile.kinds), len(profile.layers)), bool)
    times = shapes.normalized_times(profile.metadata.timesteps, profile.metadata.num_train_timesteps,
                                   pairs=profile.num_step_pairs)
    is_default = settings == default
    meta = profile.metadata
    summary: dict[str, Any] = {
        "model": model, "family": family, "in_paper": bool(in_paper), "settings_key": settings_key,
        "protocol": getattr(settings, "protocol", "project"),
        "label": variant_label(settings, default), "is_default": is_default, "settings": dict(settings.__dict__),
        "branch": branch, "branches": list(profile.branches), "kinds": list(profile.kinds),
        "layers": list(profile.layers), "num_prompts": profile.num_prompts, "step_pairs": profile.num_step_pairs,
        "normalized_times": rounded(times),
        "constant_layers": {kind: [int(i) for i in np.nonzero(constant[k])[0]] for k, kind in enumerate(profile.kinds)},
        "curves": {}, "matrices": {},
        "metadata": {"pipeline_class": meta.pipeline_class, "transformer_class": meta.transformer_class,
                     "scheduler_class": meta.scheduler_class, "dtype": meta.dtype, "device": meta.device,
                     "seed": meta.seed, "height": meta.height, "width": meta.width, "num_frames": meta.num_frames,
                     "guidance_scale": meta.guidance_scale, "versions": dict(meta.versions),
                     "warnings": list(meta.warnings)[:20]},
    }
    for metric in SUMMARY_METRICS:
        mean = profile.mean_over_prompts(metric)[b]  # [kind, layer, step]
        varying = np.where(constant[:, :, None], np.nan, mean)
        summary["curves"][metric] = {kind: rounded(_quiet_nanmean(varying[k], axis=0)) for k, kind in enumerate(profile.kinds)}
        if is_default:
            summary["matrices"][metric] = {kind: rounded(mean[k]) for k, kind in enumerate(profile.kinds)}
    if is_default and baseline is not None:
        summary["baseline"] = baseline_diff(profile, baseline, device_class or "cpu", tolerance_level)
    return summary


def baseline_diff(profile: RedundancyProfile, baseline: Baseline, device_class: str,
                  tolerance_level: str = "default") -> dict[str, Any]:
    """Per cell |now − baseline| / tolerance (the regression suite's own tolerance), and the cells beyond 1."""
    out: dict[str, Any] = {"file": baseline.path.name}
    if baseline.profile is None:
        return {**out, "error": "the baseline has no profile section"}
    section = baseline.profile
    metric, branch = section.get("metric", "abs_l1"), section.get("branch", profile.default_branch)
    kinds, layers, base_mean, base_spread = baseline.profile_arrays()
    if layers != profile.layers or base_mean.shape[-1] != profile.num_step_pairs or branch not in profile.branches \
            or any(k not in profile.kinds for k in kinds):
        return {**out, "error": f"layout differs from the baseline ({len(layers)} layers × {base_mean.shape[-1]} "
                                f"step pairs there, {len(profile.layers)} × {profile.num_step_pairs} now)"}
    current = profile.mean_over_prompts(metric)[profile.branches.index(branch)][[profile.kinds.index(k) for k in kinds]]
    tolerance = baseline.tolerance(tolerance_level, device_class).cells()
    drifts = drift.compare_to_baseline(current, base_mean, base_spread, kinds=kinds, layers=layers, **tolerance)
    tol = drift.cell_tolerance(base_mean, base_spread, **tolerance)
    with np.errstate(invalid="ignore", divide="ignore"):
        excess = np.where(current == base_mean, 0.0, np.abs(current - base_mean)) / tol
    one_sided = np.isnan(current) != np.isnan(base_mean)
    excess = np.where(one_sided, 1e3, np.minimum(excess, 1e3))  # capped so it stays finite JSON
    index = {name: i for i, name in enumerate(layers)}
    return {**out, "metric": metric, "branch": branch, "kinds": kinds, "tolerance": tolerance,
            "excess": {kind: rounded(excess[k]) for k, kind in enumerate(kinds)},
            "out_of_tolerance": [[d.kind, index[d.layer], d.step_pair] for d in drifts],
            "cells": int(np.isfinite(base_mean).sum())}
