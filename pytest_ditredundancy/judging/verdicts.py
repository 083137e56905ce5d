"""The suites' verdicts as plain functions: statistics in, findings out, no pytest.

Every suite answers two separate questions, and names which one a line answers:

*regression* — did the model change? The run's statistic against the value stored in its baseline, with
a tolerance from measured run-to-run noise (:mod:`pytest_ditredundancy.judging.tolerances`). Everything the
baseline holds and the run lacks (a kind, a scheduler variant, a cache strategy that stopped running) is a
failure, and so is everything the run has that the baseline lacks.

*claim* — is it stable, as the paper says? Absolute bounds (CV across prompts, shape correlation), always
computed and reported; they fail the test only when the user asks (``--dit-enforce-claims``).

``checks.py`` turns findings into pytest outcomes; ``benchmarks/gate_power.py`` calls these functions
directly to measure what each suite detects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import drift
from . import statistics as stats
from .tolerances import Tolerance

PAPER_CV_RANGE = (0.10, 0.15)  # CV over prompts reported by the paper for its seven models


def fmt(value: float | None) -> str:
    return "nan" if value is None or math.isnan(value) else f"{value:.4g}"


#: beyond this factor between a run and its baseline a percentage says nothing a reader can use
_FACTOR = 1000.0


def change_text(now: float, was: float) -> str:
    """How ``now`` differs from the stored ``was``, computed without overflow (``now / was``, never
    ``now - was`` of two huge numbers): a percentage, or the factor when it is beyond any tolerance."""
    if was == 0:
        return "a change from zero"
    ratio = now / was
    if not math.isfinite(ratio) or ratio <= 0 or not 1 / _FACTOR <= ratio <= _FACTOR:
        return f"a change by more than a factor of {_FACTOR:g}"
    return f"{100 * (ratio - 1):+.3g}% change"


def interval_text(low: float, high: float) -> str:
    """The run's 95% CI, or why there is none (fewer than three prompts, or no spread to bound)."""
    if math.isnan(low) or math.isnan(high):
        return "no 95% CI: fewer than three prompts, or no spread once one is left out"
    return f"95% CI {fmt(low)}-{fmt(high)}"


@dataclass
class Finding:
    """One judged statistic. ``question``: ``regression`` or ``claim``; ``message``: the CI-log line when it
    did not pass (regressions) or was not met (claims)."""

    suite: str
    statistic: str
    value: float | None
    bounds: list[float | None] | None
    passed: bool
    question: str = "regression"
    message: str = ""
    details: dict[str, Any] = field(default_factory=dict)


def _ok(value: float | None, bounds: list[float | None]) -> bool:
    if value is None or not math.isfinite(value):
        return False
    low, high = bounds
    return (low is None or value >= low - 1e-12) and (high is None or value <= high + 1e-12)


# -- suite 1: prompt stability -------------------------------------------------------------------------------
def prompt_section(results: list[stats.PromptStability]) -> dict[str, Any]:
    """What ``--dit-update-baselines`` stores: the statistics themselves (bounds come from the tolerances)."""
    return {r.kind: {"robust_cv": r.robust_cv, "paper_cv": r.paper_cv, "ci": [r.ci_low, r.ci_high]} for r in results}


def judge_prompt_stability(results: list[stats.PromptStability], stored: dict[str, Any] | None,
                           tolerance: Tolerance, claim_bounds: tuple[float, float]) -> list[Finding]:
    suite, findings = "prompt_stability", []
    for r in results:
        details = {"kind": r.kind, "paper_cv": r.paper_cv, "ci": [r.ci_low, r.ci_high],
                   "paper_reference": list(PAPER_CV_RANGE)}
        if stored is not None:
            if r.kind not in stored:
                findings.append(Finding(suite, f"robust_cv[{r.kind}]", r.robust_cv, None, False, message=(
                    f"  {r.kind:7s} robust CV {fmt(r.robust_cv)}: the baseline has no {r.kind!r} (a kind it did not "
                    "capture); update the baseline to include it"), details=details))
            else:
                was = stored[r.kind]["robust_cv"]
                bounds = tolerance.statistic_bounds(was)
                ok = _ok(r.robust_cv, bounds)
                measured = math.isfinite(r.robust_cv)
                now, change = ((fmt(r.robust_cv), change_text(r.robust_cv, was)) if measured
                               else ("not measured", "no cell with signal now"))
                findings.append(Finding(suite, f"robust_cv[{r.kind}]", r.robust_cv, bounds, ok, details={
                    **details, "baseline": was}, message="" if ok else (
                    f"  {r.kind:7s} robust CV {now} (baseline {fmt(was)}, {change}; {interval_text(r.ci_low, r.ci_high)}"
                    f") outside [{fmt(bounds[0])}, {fmt(bounds[1])}]")))
        claim = list(claim_bounds)
        met = _ok(r.robust_cv, claim)
        findings.append(Finding(suite, f"claim_cv[{r.kind}]", r.robust_cv, claim, met, question="claim",
                                details=details, message="" if met else (
            f"  {r.kind:7s} robust CV {fmt(r.robust_cv)} (paper's statistic {fmt(r.paper_cv)}) breaks the stability "
            f"claim [{fmt(claim[0])}, {fmt(claim[1])}]")))
    if stored is not None:
        for kind in stored:
            if kind not in {r.kind for r in results}:
                findings.append(Finding(suite, f"robust_cv[{kind}]", None, None, False, details={"kind": kind}, message=(
                    f"  {kind:7s} is in the baseline but this run did not capture it (a kind the model lost?)")))
    return findings


# -- suites 2 and 3: shape stability ----------------------------------------------------------------------------
def shape_section(values: dict[str, float]) -> dict[str, Any]:
    return {name: {"correlation": value} for name, value in values.items()}


def judge_shapes(suite: str, values: dict[str, float], stored: dict[str, Any] | None, tolerance: Tolerance,
                 min_correlation: float, *, unsupported: dict[str, str], requested: set[str],
                 distances: dict[str, float] | None = None) -> list[Finding]:
    """``values``: ``variant/kind`` -> correlation; ``unsupported``: variant -> why the pipeline cannot run it;
    ``requested``: variants the user named explicitly (an unsupported one of those fails)."""
    findings = []
    for name, value in values.items():
        variant, kind = name.split("/", 1)
        details = {"variant": variant, "kind": kind, "distance": (distances or {}).get(name)}
        if stored is not None:
            if name not in stored:
                findings.append(Finding(suite, f"correlation[{name}]", value, None, False, details=details, message=(
                    f"  {name:22s} correlation {fmt(value)}: the baseline has no {name!r} (a new variant or kind); "
                    "update the baseline to include it")))
            else:
                was = stored[name]["correlation"]
                bounds = tolerance.correlation_bounds(was)
                ok = _ok(value, bounds)
                findings.append(Finding(suite, f"correlation[{name}]", value, bounds, ok, details={**details, "baseline": was},
                                        message="" if ok else (
                    f"  {name:22s} shape correlation {fmt(value)} (baseline {fmt(was)}) outside [{fmt(bounds[0])}, "
                    f"{fmt(bounds[1])}] (normalized distance {fmt(details['distance'])})")))
        met = _ok(value, [min_correlation, None])
        findings.append(Finding(suite, f"claim_correlation[{name}]", value, [min_correlation, 1.0], met,
                                question="claim", details=details, message="" if met else (
            f"  {name:22s} shape correlation {fmt(value)} is below the stability claim {fmt(min_correlation)}: the "
            "profile's shape changes with this variant")))
    for variant, reason in unsupported.items():
        stored_names = [n for n in (stored or {}) if n.split("/", 1)[0] == variant]
        if stored_names or variant in requested:
            why = "the baseline holds it" if stored_names else "it was asked for explicitly"
            findings.append(Finding(suite, f"unsupported[{variant}]", None, None, False, details={"variant": variant,
                                    "reason": reason}, message=f"  {variant:22s} no longer runs ({why}): {reason}"))
        else:
            findings.append(Finding(suite, f"unsupported[{variant}]", None, None, True, question="info",
                                    details={"variant": variant, "reason": reason}))
    ran = {n.split("/", 1)[0] for n in values} | set(unsupported)
    for name in stored or {}:
        variant = name.split("/", 1)[0]
        if variant not in ran:
            findings.append(Finding(suite, f"correlation[{name}]", None, None, False, details={"variant": variant},
                                    message=f"  {name:22s} is in the baseline but this run did not compare it (the "
                                            "selected variants changed: select it again, or update the baseline)"))
        elif variant not in unsupported and name not in values:
            findings.append(Finding(suite, f"correlation[{name}]", None, None, False, details={"variant": variant},
                                    message=f"  {name:22s} is in the baseline but this run did not capture that kind"))
    return findings


# -- suite 4: baseline regression ---------------------------------------------------------------------------------
def judge_cells(current_mean: np.ndarray, kinds: list[str], layers: list[str], base_mean: np.ndarray,
                base_spread: np.ndarray, tolerance: Tolerance) -> tuple[Finding, list[drift.CellDrift]]:
    """``current_mean``: ``[kind, layer, step]`` in the baseline's kind order."""
    drifts = drift.compare_to_baseline(current_mean, base_mean, base_spread, kinds=kinds, layers=layers,
                                       **tolerance.cells())
    worst = max((d.excess for d in drifts), default=0.0)
    finding = Finding("baseline_regression", "cells_out_of_tolerance", len(drifts), [0, 0], not drifts, details={
        "cells": int(np.isfinite(base_mean).sum()), "worst": [d.__dict__ for d in drifts[:20]],
        "tolerance": {"level": tolerance.level, "device_class": tolerance.device_class, **tolerance.cells()},
        "max_excess": worst if math.isfinite(worst) else None},
        message="" if not drifts else drift.summarize_drift(drifts, layers))
    return finding, drifts


def max_excess(current_mean: np.ndarray, base_mean: np.ndarray, base_spread: np.ndarray, tolerance: Tolerance) -> float:
    """The largest |current - baseline| / tolerance over all cells: how close a run came to failing."""
    tol = drift.cell_tolerance(base_mean, base_spread, **tolerance.cells())
    with np.errstate(invalid="ignore"):
        excess = np.abs(np.asarray(current_mean, np.float64) - base_mean) / tol
    one_sided = np.isnan(current_mean) != np.isnan(base_mean)
    if one_sided.any():
        return math.inf
    return float(np.nanmax(excess)) if np.isfinite(excess).any() else 0.0
