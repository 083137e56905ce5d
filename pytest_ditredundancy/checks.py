"""The suites' checks, shared by ``suites/`` and by users' own tests through the ``dit_check`` fixture.

Each check computes its statistic, compares it with the bound stored in the model's baseline (or the ini
bound where no baseline exists), records the result for the report, and fails with a message that reads
well in a CI log. With ``--dit-update-baselines`` it stores the statistic and new bounds instead.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from . import statistics as stats
from .baselines import Baseline, BaselineError, profile_section
from .runner import RunSettings
from .schedulers import compatible_schedulers
from .session import BASELINE_USED_KEY, RECORD_KEY, DitSession
from .zoo.registry import ModelSpec

PAPER_CV_RANGE = (0.10, 0.15)  # CV over prompts reported by the paper for its seven models
SHAPE_TOLERANCE = 0.1  # half-width of stored shape-correlation bounds


class DitBaselineWarning(UserWarning):
    """The baseline was recorded on another device class or dtype than this run."""


def _cv_bounds(value: float, ci_low: float, ci_high: float) -> list[float]:
    half = max(0.25 * value, ci_high - ci_low if np.isfinite(ci_high - ci_low) else 0.0, 0.01)
    return [max(0.0, value - half), value + half]


def _fmt(value: float) -> str:
    return "nan" if value is None or not np.isfinite(value) else f"{value:.4g}"


@dataclass
class SuiteCheck:
    """The checks for one model. Obtained from the ``dit_check`` fixture::

        def test_prompt_stability(dit_check):
            dit_check.prompt_stability()
    """

    session: DitSession
    spec: ModelSpec
    item: pytest.Item

    # -- plumbing -----------------------------------------------------------------------------------------
    @property
    def settings(self) -> RunSettings:
        return self.session.settings(self.spec)

    @property
    def key(self) -> str:
        return self.session.settings_key(self.settings)

    def profile(self, **overrides: Any):
        return self.session.profile(self.spec, **overrides)

    def record(self, suite: str, statistic: str, value: float, bounds: list[float] | None, passed: bool,
               **details: Any) -> None:
        entry = {"model": self.spec.name, "family": self.spec.family, "suite": suite, "statistic": statistic,
                 "value": None if value is None or not np.isfinite(value) else float(value),
                 "bounds": bounds, "passed": bool(passed), "nodeid": self.item.nodeid, **details}
        self.item.user_properties.append((RECORD_KEY, entry))

    def baseline(self) -> Baseline | None:
        try:
            baseline = self.session.store.load(self.spec.name, self.key)
        except BaselineError as exc:
            if self.session.config.update_baselines:
                return None
            pytest.fail(str(exc), pytrace=False)
        if baseline is not None:
            self.item.user_properties.append((BASELINE_USED_KEY, str(baseline.path)))
            self._warn_on_device_mismatch(baseline)
        return baseline

    def _warn_on_device_mismatch(self, baseline: Baseline) -> None:
        stored_class, stored_dtype = baseline.metadata.get("device_class"), baseline.metadata.get("dtype")
        profile_dtype = self.profile().metadata.dtype
        if stored_class != self.session.device_class or stored_dtype != profile_dtype:
            warnings.warn(DitBaselineWarning(
                f"{baseline.path.name} of {self.spec.name} was recorded on {stored_class}/{stored_dtype}, this run is "
                f"{self.session.device_class}/{profile_dtype}: using the {self.session.device_class} tolerances stored "
                "in the baseline"), stacklevel=2)

    def missing(self, suite: str) -> None:
        command = self.session.config.command(self.spec.name, "--dit-update-baselines", f"-k {suite}")
        pytest.fail(f"no {suite} baseline for {self.spec.name} with settings {self.key} in "
                    f"{self.session.store.path_for(self.spec.name, self.key)}.\nCreate it with:\n    {command}",
                    pytrace=False)

    def update(self, section: str, value: Any) -> None:
        profile = self.profile()
        path = self.session.store.update(self.spec.name, self.key, sections={section: value},
                                         metadata=self.session.baseline_metadata(profile, self.settings))
        self.item.user_properties.append((BASELINE_USED_KEY, str(path)))

    # -- suite 1: prompt stability --------------------------------------------------------------------------
    def prompt_stability(self) -> list[stats.PromptStability]:
        """CV across prompts for every kind: the paper's statistic and a robust, mean-weighted one."""
        profile = self.profile()
        if profile.num_prompts < 2:
            pytest.skip("prompt stability needs at least 2 prompts (--dit-num-prompts)")
        results = stats.prompt_stability(profile, resamples=self.session.config.bootstrap, seed=self.session.config.seed)
        if self.session.config.update_baselines:
            self.update("suites.prompt_stability", {r.kind: {
                "robust_cv": r.robust_cv, "paper_cv": r.paper_cv, "ci": [r.ci_low, r.ci_high],
                "bounds": _cv_bounds(r.robust_cv, r.ci_low, r.ci_high)} for r in results})
            stored = {r.kind: {"bounds": _cv_bounds(r.robust_cv, r.ci_low, r.ci_high)} for r in results}
        else:
            baseline = self.baseline()
            stored = baseline.suite("prompt_stability") if baseline else None
            if stored is None and self.session.config.cv_bounds is None:
                self.missing("prompt_stability")
        failures = []
        for r in results:
            if stored is not None and r.kind not in stored:
                self.record("prompt_stability", f"robust_cv[{r.kind}]", r.robust_cv, None, False, kind=r.kind)
                failures.append(f"  {r.kind:7s} robust CV {_fmt(r.robust_cv)}: no bound in the baseline (a kind the "
                                "baseline did not capture); update the baseline to include it")
                continue
            bounds = stored[r.kind]["bounds"] if stored is not None else list(self.session.config.cv_bounds)
            ok = bool(np.isfinite(r.robust_cv)) and bounds[0] <= r.robust_cv <= bounds[1]
            self.record("prompt_stability", f"robust_cv[{r.kind}]", r.robust_cv, bounds or None, ok, kind=r.kind,
                        paper_cv=r.paper_cv, ci=[r.ci_low, r.ci_high], paper_reference=list(PAPER_CV_RANGE))
            if not ok:
                failures.append(f"  {r.kind:7s} robust CV {_fmt(r.robust_cv)} (95% CI {_fmt(r.ci_low)}–{_fmt(r.ci_high)}, "
                                f"paper's statistic {_fmt(r.paper_cv)}) outside [{_fmt(bounds[0])}, {_fmt(bounds[1])}]")
        if failures:
            pytest.fail(f"prompt stability of {self.spec.name} changed ({self.key}; the paper reports CV "
                        f"{PAPER_CV_RANGE[0]:.0%}–{PAPER_CV_RANGE[1]:.0%}):\n" + "\n".join(failures), pytrace=False)
        return results

    # -- suites 2 and 3: shape stability across step counts and schedulers --------------------------------------
    def step_stability(self) -> dict[str, dict[str, stats.ShapeComparison]]:
        base = self.settings.steps
        variants = {f"steps{max(3, round(base * f))}": {"steps": max(3, round(base * f))}
                    for f in self.session.config.step_factors}
        variants.pop(f"steps{base}", None)
        return self._shape_suite("step_stability", variants)

    def scheduler_stability(self) -> dict[str, dict[str, stats.ShapeComparison]]:
        if self.spec.family == "open-sora":
            pytest.skip(f"{self.spec.name} samples with its own rectified-flow loop; it has no scheduler to swap")
        names = self.session.config.schedulers or compatible_schedulers(self.spec.prediction)
        variants = {name: {"scheduler": name} for name in names if name != self.settings.scheduler}
        return self._shape_suite("scheduler_stability", variants)

    def _shape_suite(self, suite: str, variants: dict[str, dict[str, Any]]) -> dict[str, dict[str, stats.ShapeComparison]]:
        if not variants:
            pytest.skip(f"{suite}: nothing to compare against the default settings")
        reference = self.profile()
        results: dict[str, dict[str, stats.ShapeComparison]] = {}
        unsupported: dict[str, str] = {}
        for label, overrides in variants.items():
            try:
                other = self.profile(**overrides)
            except (ValueError, TypeError) as exc:
                if "scheduler" not in str(exc).lower() or "scheduler" not in overrides:
                    raise
                unsupported[label] = str(exc).splitlines()[0]  # e.g. the pipeline passes sigmas Heun can't take
                continue
            results[label] = {}
            for kind in reference.kinds:
                if kind not in other.kinds:
                    continue
                a, ta = stats.step_curves(reference, kind)
                b, tb = stats.step_curves(other, kind)
                results[label][kind] = stats.compare_shapes(a, ta, b, tb)
        for label, reason in unsupported.items():
            self.record(suite, f"unsupported[{label}]", None, None, True, variant=label, reason=reason)
        if not results:
            pytest.skip(f"{suite}: no variant runs with this pipeline: " + "; ".join(f"{k}: {v}" for k, v in unsupported.items()))
        values = {f"{label}/{kind}": c.correlation for label, per in results.items() for kind, c in per.items()}
        update = self.session.config.update_baselines
        if update:
            stored = {name: {"correlation": v, "bounds": [max(-1.0, v - SHAPE_TOLERANCE), min(1.0, v + SHAPE_TOLERANCE)]}
                      for name, v in values.items()}
            self.update(f"suites.{suite}", stored)
        else:
            baseline = self.baseline()
            stored = baseline.suite(suite) if baseline else None
            if stored is None and self.session.config.min_shape_correlation is None:
                self.missing(suite)
        failures = []
        for name, value in values.items():
            label, kind = name.split("/")
            if stored is None:
                bounds = [self.session.config.min_shape_correlation, 1.0]
            elif name in stored:
                bounds = stored[name]["bounds"]
            else:
                self.record(suite, f"correlation[{name}]", value, None, False, variant=label, kind=kind)
                failures.append(f"  {name:22s} correlation {_fmt(value)}: no bound in the baseline (a new variant?); "
                                "update the baseline to include it")
                continue
            ok = bool(np.isfinite(value)) and bounds[0] - 1e-9 <= value <= bounds[1] + 1e-9
            self.record(suite, f"correlation[{name}]", value, bounds, ok, variant=label, kind=kind,
                        distance=results[label][kind].distance)
            if not ok:
                failures.append(f"  {name:22s} shape correlation {_fmt(value)} outside [{_fmt(bounds[0])}, "
                                f"{_fmt(bounds[1])}] (normalized distance {_fmt(results[label][kind].distance)})")
        if failures:
            pytest.fail(f"{suite.replace('_', ' ')} of {self.spec.name} changed ({self.key}); per-layer curves on "
                        "normalized time vs the default settings:\n" + "\n".join(failures), pytrace=False)
        return results

    # -- suite 4: baseline regression ---------------------------------------------------------------------------
    def baseline_regression(self, metric: str = "abs_l1") -> list[stats.CellDrift]:
        """The mean profile against the stored one, cell by cell, two-sided."""
        profile = self.profile()
        branch = profile.default_branch
        b = profile.branches.index(branch)
        mean = profile.mean_over_prompts(metric)[b]
        data = np.where(profile.computed, profile.values[metric], np.nan)[:, b].astype(np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            spread = np.nanstd(data, axis=0)
        times = stats.normalized_times(profile.metadata.timesteps, profile.metadata.num_train_timesteps)
        if self.session.config.update_baselines:
            self.update("profile", profile_section(profile.kinds, profile.layers, mean, spread, metric=metric,
                                                   branch=branch, times=list(times)))
            self.record("baseline_regression", "cells_out_of_tolerance", 0, [0, 0], True, updated=True)
            return []
        baseline = self.baseline()
        if baseline is None or baseline.profile is None:
            self.missing("baseline_regression")
        kinds, layers, base_mean, base_spread = baseline.profile_arrays()
        self._check_layout(baseline, kinds, layers, base_mean.shape[-1], profile)
        tolerance = baseline.tolerances(self.session.device_class)
        order = [profile.kinds.index(k) for k in kinds]
        drifts = stats.compare_to_baseline(mean[order], base_mean, base_spread, kinds=kinds, layers=layers, **tolerance)
        self.record("baseline_regression", "cells_out_of_tolerance", len(drifts), [0, 0], not drifts,
                    cells=int(np.isfinite(base_mean).sum()), worst=[d.__dict__ for d in drifts[:20]],
                    tolerance=tolerance)
        if drifts:
            pytest.fail(f"{self.spec.name} drifted from its baseline {baseline.path.name} ({metric}, branch {branch}):\n"
                        + stats.summarize_drift(drifts, layers), pytrace=False)
        return drifts

    def _check_layout(self, baseline: Baseline, kinds: list[str], layers: list[str], steps: int, profile) -> None:
        fix = f"if the model changed on purpose, re-create it:\n    {self.session.config.command(self.spec.name, '--dit-update-baselines')}"
        if len(layers) != len(profile.layers) or layers != profile.layers:
            pytest.fail(f"baseline {baseline.path} has {len(layers)} attention layers, {self.spec.name} now has "
                        f"{len(profile.layers)} (first difference: "
                        f"{next((f'{a} vs {b}' for a, b in zip(layers, profile.layers) if a != b), 'count')}); {fix}",
                        pytrace=False)
        if steps != profile.num_step_pairs:
            pytest.fail(f"baseline {baseline.path} has {steps} step pairs, this run has {profile.num_step_pairs}; {fix}",
                        pytrace=False)
        missing = [k for k in kinds if k not in profile.kinds]
        if missing:
            pytest.fail(f"baseline {baseline.path} has kinds {missing} that this run did not capture; {fix}", pytrace=False)
        extra = [k for k in profile.kinds if k not in kinds]
        if extra:
            pytest.fail(f"this run captured kinds {extra} that baseline {baseline.path} does not have; {fix}", pytrace=False)


# -- suite 5: model distinctness (across models) ------------------------------------------------------------
def model_distinctness(session: DitSession, item: pytest.Item) -> list[stats.Distinctness]:
    """Paper finding 1: different models have different redundancy distributions."""
    models = session.selected_models()
    if len(models) < 2:
        pytest.skip("model distinctness needs two or more models (--dit-model=a,b)")
    signatures = [stats.signature(session.profile(session.spec(name))) for name in models]
    results, failures = [], []
    for i, a in enumerate(signatures):
        for b in signatures[i + 1:]:
            result = stats.distinctness(a, b)
            ok = result.ratio > 1.0
            item.user_properties.append((RECORD_KEY, {
                "model": f"{result.model_a} vs {result.model_b}", "family": "", "suite": "model_distinctness",
                "statistic": "between/within", "value": float(result.ratio) if np.isfinite(result.ratio) else None,
                "bounds": [1.0, None], "passed": ok, "nodeid": item.nodeid, "between": result.between,
                "within": [result.within_a, result.within_b]}))
            results.append(result)
            if not ok:
                failures.append(f"  {result.model_a} vs {result.model_b}: distance {_fmt(result.between)} <= prompt "
                                f"spread {_fmt(max(result.within_a, result.within_b))}")
    if failures:
        pytest.fail("models are not distinguishable from their prompt-to-prompt spread:\n" + "\n".join(failures),
                    pytrace=False)
    return results
