"""The suites as verdicts: statistics in, a :class:`Verdict` out, no pytest.

Each suite computes its statistics, has :mod:`pytest_ditredundancy.judging.verdicts` judge them against the
model's baseline (*regression*) and against the paper's stability bounds (*claim*), and returns one
:class:`Verdict`: the outcome and its message (worded for a CI log), every finding as a record for the report,
the warnings to raise and the baseline files used. With ``update_baselines`` it stores the statistics instead.
A non-finite profile fails every suite before anything is judged or stored.

The plugin turns a verdict into a test outcome (:mod:`pytest_ditredundancy.plugin.checks`); a merge of shard
runs replays the same suites on merged profiles and reads the verdicts directly.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from ..io import plain
from ..profiling.schedulers import compatible_schedulers, scheduler_rejection
from ..profiling.settings import RunRequest, RunSettings
from ..zoo.registry import ModelSpec
from . import baseline_checks, drift, shapes, verdicts
from . import statistics as stats
from .baselines import Baseline, BaselineError, BaselineStore, _rounded, profile_section
from .tolerances import Tolerance, resolve
from .verdicts import PAPER_CV_RANGE, Finding, fmt

__all__ = ["DitBaselineWarning", "DitClaimWarning", "PAPER_CV_RANGE", "SUITES", "SuiteFailed", "SuiteJudge",
           "SuiteSkipped", "Verdict", "judge_distinctness"]

#: the per-model suites a :class:`SuiteJudge` runs by name
SUITES = ("prompt_stability", "step_stability", "scheduler_stability", "baseline_regression")


class DitBaselineWarning(UserWarning):
    """The baseline was recorded on another device class or dtype than this run."""


class DitClaimWarning(UserWarning):
    """A model breaks one of the paper's stability claims (reported; fails only with --dit-enforce-claims)."""


class SuiteFailed(Exception):
    """Ends a suite as failed (the message is the test's failure text)."""


class SuiteSkipped(Exception):
    """Ends a suite as skipped, with the reason."""


@dataclass
class Verdict:
    """What one suite concluded: ``outcome`` is ``passed``, ``failed`` or ``skipped``."""

    outcome: str
    message: str = ""
    records: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[Warning] = field(default_factory=list)
    baselines_used: list[str] = field(default_factory=list)
    result: Any = None  # the suite's statistics (what ``dit_check.prompt_stability()`` returns)


class JudgingSession(Protocol):
    """What the suites need from a session: the plugin's, or a merge's."""

    config: Any
    store: BaselineStore
    device_class: str

    def request(self, spec: ModelSpec, *, steps: int | None = None, scheduler: str | None = None) -> RunRequest: ...
    def profile(self, request: RunRequest) -> Any: ...
    def spec(self, model: str) -> ModelSpec: ...
    def selected_models(self) -> list[str]: ...
    def baseline_name_for(self, spec: ModelSpec) -> str: ...
    def command(self, spec: ModelSpec, *extra: str) -> str: ...
    def baseline_metadata(self, profile: Any, request: RunRequest) -> dict[str, Any]: ...


def _concluded(run: Callable[[], Any], verdict: Verdict) -> Verdict:
    """Run a suite into ``verdict``: its return value, or the failure / skip it ended with."""
    try:
        verdict.result = run()
    except SuiteFailed as exc:
        verdict.outcome, verdict.message = "failed", str(exc)
    except SuiteSkipped as exc:
        verdict.outcome, verdict.message = "skipped", str(exc)
    return verdict


@dataclass
class SuiteJudge:
    """The suites of one model, judged into :class:`Verdict` objects::

        verdict = SuiteJudge(session, spec, "suites/test_x.py::test_prompt_stability[m]").run("prompt_stability")
    """

    session: JudgingSession
    spec: ModelSpec
    nodeid: str
    records: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[Warning] = field(default_factory=list)
    baselines_used: list[str] = field(default_factory=list)

    def run(self, suite: str, *args: Any, **kwargs: Any) -> Verdict:
        """Run ``suite`` (one of :data:`SUITES`); what it recorded, warned and used goes into the verdict."""
        if suite not in SUITES:
            raise ValueError(f"unknown suite {suite!r}; the suites are {', '.join(SUITES)}")
        return self.call(lambda: getattr(self, suite)(*args, **kwargs))

    def call(self, work: Callable[[], Any]) -> Verdict:
        """Run ``work`` (a suite, or a piece of one that another check shares, like :meth:`baseline`) into a
        verdict holding what it recorded, warned and used."""
        self.records, self.warnings, self.baselines_used = [], [], []
        verdict = Verdict("passed", records=self.records, warnings=self.warnings,
                          baselines_used=self.baselines_used)
        _concluded(work, verdict)
        self.records, self.warnings, self.baselines_used = [], [], []  # the verdict keeps them
        return verdict

    @property
    def request(self) -> RunRequest:
        return self.session.request(self.spec)

    @property
    def settings(self) -> RunSettings:
        return self.request.settings

    @property
    def key(self) -> str:
        return self.request.key

    @property
    def baseline_name(self) -> str:
        """The name the model's baselines are stored under (``--dit-baseline-name`` when given)."""
        return self.session.baseline_name_for(self.spec)

    def profile(self, **overrides: Any):
        """The session's profile; a non-finite one fails the test (naming where NaN first appeared)."""
        profile = self.session.profile(self.session.request(self.spec, **overrides))
        try:
            stats.require_finite(profile)
        except stats.NonFiniteProfileError as exc:
            raise SuiteFailed(f"{self.spec.name}: {exc}") from None
        return profile

    def record(self, suite: str, statistic: str, value: float | None, bounds: list | None, passed: bool,
               **details: Any) -> None:
        entry = {"model": self.spec.name, "family": self.spec.family, "suite": suite, "statistic": statistic,
                 "value": None if value is None or not np.isfinite(value) else float(value),
                 "bounds": bounds, "passed": bool(passed), "nodeid": self.nodeid,
                 "protocol": self.settings.protocol, **details}
        self.records.append(entry)

    def _whose(self) -> str:
        return "" if self.baseline_name == self.spec.name else f" (the baseline of {self.baseline_name})"

    def tolerance(self, baseline: Baseline | None) -> Tolerance:
        level, device_class = self.session.config.tolerance, self.session.device_class
        return baseline.tolerance(level, device_class) if baseline is not None else resolve(None, level, device_class)

    def baseline(self) -> Baseline | None:
        try:
            baseline = self.session.store.load(self.baseline_name, self.key)
        except BaselineError as exc:
            raise SuiteFailed(str(exc)) from None
        if baseline is not None:
            self.baselines_used.append(str(baseline.path))
            self._fail_on(baseline_checks.settings_mismatch(baseline, self.settings))
            self._warn_on_device_mismatch(baseline)
        return baseline

    def _fail_on(self, mismatch: str | None) -> None:
        """A baseline that does not fit this run fails the suite, with the command that re-creates it."""
        if mismatch is not None:
            fix = self.session.command(self.spec, "--dit-update-baselines")
            raise SuiteFailed(mismatch.replace(baseline_checks.FIX, fix))

    def _warn_on_device_mismatch(self, baseline: Baseline) -> None:
        stored_class, stored_dtype = baseline.metadata.get("device_class"), baseline.metadata.get("dtype")
        profile_dtype = self.profile().metadata.dtype
        if stored_class != self.session.device_class or stored_dtype != profile_dtype:
            self.warnings.append(DitBaselineWarning(
                f"{baseline.path.name} of {self.baseline_name} was recorded on {stored_class}/{stored_dtype}, this "
                f"run is {self.session.device_class}/{profile_dtype}: using the {self.session.device_class} "
                "tolerances stored in the baseline"))

    def missing(self, suite: str) -> None:
        command = self.session.command(self.spec, "--dit-update-baselines", f"-k {suite}")
        raise SuiteFailed(f"no {suite} baseline for {self.spec.name}{self._whose()} with settings {self.key} in "
                          f"{self.session.store.path_for(self.baseline_name, self.key)}.\nCreate it with:\n    {command}\n"
                          "(or judge the model by the paper's stability claims alone with --dit-enforce-claims)")

    def update(self, section: str, value: Any) -> None:
        profile = self.profile()
        metadata = {**self.session.baseline_metadata(profile, self.request),
                    "checkpoint_scheduler": profile.metadata.extra.get("checkpoint_scheduler")}
        try:
            path = self.session.store.update(self.baseline_name, self.key, sections={section: value}, metadata=metadata)
        except BaselineError as exc:
            raise SuiteFailed(str(exc)) from None
        self.baselines_used.append(str(path))

    def _stored(self, suite: str) -> tuple[dict | None, Tolerance]:
        """The stored section of ``suite`` (None: no baseline, and the claims judge alone) and the tolerance."""
        baseline = self.baseline()
        stored = baseline.suite(suite) if baseline else None
        if stored is None and not self.session.config.enforce_claims:
            self.missing(suite)
        return stored, self.tolerance(baseline)

    def conclude(self, suite: str, findings: list[Finding], headline: str) -> None:
        """Record every finding; fail on regressions (and on claims when enforced); warn on unmet claims."""
        enforce = self.session.config.enforce_claims
        failures, broken = [], []
        for f in findings:
            passed = f.passed or (f.question == "claim" and not enforce)
            self.record(f.suite, f.statistic, f.value, f.bounds, passed, question=f.question,
                        met=f.passed if f.question == "claim" else None, **f.details)
            if not f.passed and f.question == "claim":
                broken.append(f.message)
            elif not f.passed:
                failures.append(f.message)
        if broken and not enforce:
            self.warnings.append(DitClaimWarning(
                f"{self.spec.name} breaks the paper's {suite.replace('_', ' ')} claim (reported, not failing; "
                "--dit-enforce-claims makes it fail):\n" + "\n".join(broken)))
        if failures or (broken and enforce):
            parts = []
            if failures:
                parts.append(f"changed from its baseline ({self.session.config.tolerance} tolerance):\n" + "\n".join(failures))
            if broken and enforce:
                parts.append("breaks the paper's stability claim (--dit-enforce-claims):\n" + "\n".join(broken))
            raise SuiteFailed(f"{headline} of {self.spec.name} ({self.key}) " + "\nand ".join(parts))

    # -- suite 1: prompt stability --------------------------------------------------------------------------
    def prompt_stability(self) -> list[stats.PromptStability]:
        """CV across prompts for every kind: the paper's statistic and a robust, mean-weighted one."""
        profile = self.profile()
        if profile.num_prompts < 2:
            raise SuiteFailed(f"prompt stability needs at least 2 prompts, this run has {profile.num_prompts}: raise "
                              "--dit-num-prompts or deselect the suite")
        results = stats.prompt_stability(profile)
        if self.session.config.update_baselines:
            self.update("suites.prompt_stability", verdicts.prompt_section(results))
            stored, tolerance = plain(verdicts.prompt_section(results), _rounded), self.tolerance(None)
        else:
            stored, tolerance = self._stored("prompt_stability")
        findings = verdicts.judge_prompt_stability(results, stored, tolerance, self.session.config.cv_bounds)
        self.conclude("prompt_stability", findings, "prompt stability")
        return results

    # -- suites 2 and 3: shape stability across step counts and schedulers --------------------------------------
    def step_variants(self) -> dict[str, dict[str, Any]]:
        """The step-count suite's variants: label -> ``request`` overrides (also what a pool profiles early)."""
        base = self.settings.steps
        variants = {f"steps{max(3, round(base * f))}": {"steps": max(3, round(base * f))}
                    for f in self.session.config.step_factors}
        variants.pop(f"steps{base}", None)
        return variants

    def scheduler_variants(self) -> dict[str, dict[str, Any]]:
        """The scheduler suite's variants: label -> ``request`` overrides."""
        if self.spec.family == "open-sora":
            raise SuiteSkipped(f"{self.spec.name} samples with its own rectified-flow loop; it has no scheduler to swap")
        names = self.session.config.schedulers or compatible_schedulers(self.spec.prediction)
        return {name: {"scheduler": name} for name in names if name != self.settings.scheduler}

    def step_stability(self) -> dict[str, dict[str, shapes.ShapeComparison]]:
        variants = self.step_variants()
        requested = set(variants) if "--dit-step-factors" in self.session.config.given else set()
        return self._shape_suite("step_stability", variants, requested)

    def scheduler_stability(self) -> dict[str, dict[str, shapes.ShapeComparison]]:
        variants = self.scheduler_variants()
        return self._shape_suite("scheduler_stability", variants,
                                 set(variants) if self.session.config.schedulers else set())

    def _shape_suite(self, suite: str, variants: dict[str, dict[str, Any]],
                     requested: set[str]) -> dict[str, dict[str, shapes.ShapeComparison]]:
        reference = self.profile()
        results: dict[str, dict[str, shapes.ShapeComparison]] = {}
        unsupported: dict[str, str] = {}
        for label, overrides in variants.items():
            try:
                other = self.profile(**overrides)
            except (ValueError, TypeError) as exc:
                reason = scheduler_rejection(exc) if "scheduler" in overrides else None
                if reason is None:
                    raise
                unsupported[label] = reason  # e.g. the pipeline passes sigmas Heun cannot take
                continue
            results[label] = {}
            for kind in reference.kinds:
                if kind not in other.kinds:
                    continue
                a, ta = shapes.step_curves(reference, kind)
                b, tb = shapes.step_curves(other, kind)
                results[label][kind] = shapes.compare_shapes(a, ta, b, tb)
        values = {f"{label}/{kind}": c.correlation for label, per in results.items() for kind, c in per.items()}
        distances = {f"{label}/{kind}": c.distance for label, per in results.items() for kind, c in per.items()}
        if self.session.config.update_baselines:
            if not values and not variants:
                raise SuiteSkipped(f"{suite}: nothing to compare against the default settings")
            self.update(f"suites.{suite}", verdicts.shape_section(values))
            stored, tolerance = plain(verdicts.shape_section(values), _rounded), self.tolerance(None)
        else:
            stored, tolerance = self._stored(suite)
            if not variants and not stored:
                raise SuiteSkipped(f"{suite}: nothing to compare against the default settings")
        findings = verdicts.judge_shapes(suite, values, stored, tolerance, self.session.config.min_shape_correlation,
                                         unsupported=unsupported, requested=requested, distances=distances)
        if not values and not any(not f.passed for f in findings):
            raise SuiteSkipped(f"{suite}: no variant runs with this pipeline: "
                               + "; ".join(f"{k}: {v}" for k, v in unsupported.items()))
        self.conclude(suite, findings, suite.replace("_", " "))
        return results

    # -- suite 4: baseline regression ---------------------------------------------------------------------------
    def baseline_regression(self, metric: str = "abs_l1") -> list[drift.CellDrift]:
        """The mean profile against the stored one, cell by cell, two-sided."""
        profile = self.profile()
        branch = profile.default_branch
        b = profile.branches.index(branch)
        mean = profile.mean_over_prompts(metric)[b]
        data = np.where(profile.computed, profile.values[metric], np.nan)[:, b].astype(np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            spread = np.nanstd(data, axis=0)  # NaN only where no prompt measured the cell (finite checked above)
        times = shapes.normalized_times(profile.metadata.timesteps, profile.metadata.num_train_timesteps)
        if self.session.config.update_baselines:
            self.update("profile", profile_section(profile.kinds, profile.layers, mean, spread, metric=metric,
                                                   branch=branch, times=list(times)))
            self.record("baseline_regression", "cells_out_of_tolerance", 0, [0, 0], True, updated=True)
            return []
        baseline = self.baseline()
        if baseline is None or baseline.profile is None:
            self.missing("baseline_regression")
        self._fail_on(baseline_checks.scheduler_mismatch(baseline, profile, self.spec.name, self.settings.scheduler))
        kinds, layers, base_mean, base_spread = baseline.profile_arrays()
        self._fail_on(baseline_checks.layout_mismatch(baseline, kinds, layers, base_mean.shape[-1], profile,
                                                      self.spec.name))
        order = [profile.kinds.index(k) for k in kinds]
        finding, drifts = verdicts.judge_cells(mean[order], kinds, layers, base_mean, base_spread,
                                               self.tolerance(baseline))
        self.record(finding.suite, finding.statistic, finding.value, finding.bounds, finding.passed, **finding.details)
        if drifts:
            whose = "its baseline" if self.baseline_name == self.spec.name else f"the baseline of {self.baseline_name}"
            fix = self.session.command(self.spec, "--dit-update-baselines", "-k baseline_regression")
            raise SuiteFailed(f"{self.spec.name} drifted from {whose} {baseline.path.name} ({metric}, branch {branch}, "
                              f"{self.session.config.tolerance} tolerance):\n" + finding.message
                              + f"\nIf the change is intended, update the baseline:\n    {fix}")
        return drifts



# -- suite 5: model distinctness (across models) ------------------------------------------------------------
def judge_distinctness(session: JudgingSession, nodeid: str) -> Verdict:
    """Paper finding 1: different models have different redundancy distributions."""
    verdict = Verdict("passed")
    return _concluded(lambda: _distinctness(session, nodeid, verdict.records), verdict)


def _distinctness(session: JudgingSession, nodeid: str, records: list[dict[str, Any]]) -> list[shapes.Distinctness]:
    models = session.selected_models()
    if len(models) < 2:
        raise SuiteSkipped("model distinctness needs two or more models (--dit-model=a,b)")
    signatures = []
    for name in models:
        profile = session.profile(session.request(session.spec(name)))
        try:
            stats.require_finite(profile)
        except stats.NonFiniteProfileError as exc:
            raise SuiteFailed(f"{name}: {exc}") from None
        signatures.append(shapes.signature(profile))
    results, failures = [], []
    for i, a in enumerate(signatures):
        for b in signatures[i + 1:]:
            result = shapes.distinctness(a, b)
            ok = result.ratio > 1.0
            records.append({
                "model": f"{result.model_a} vs {result.model_b}", "family": "", "suite": "model_distinctness",
                "statistic": "between/within", "value": float(result.ratio) if np.isfinite(result.ratio) else None,
                "bounds": [1.0, None], "passed": ok, "nodeid": nodeid, "between": result.between,
                "within": [result.within_a, result.within_b], "protocol": session.config.protocol})
            results.append(result)
            if not ok:
                failures.append(f"  {result.model_a} vs {result.model_b}: distance {fmt(result.between)} <= prompt "
                                f"spread {fmt(max(result.within_a, result.within_b))}")
    if failures:
        raise SuiteFailed("models are not distinguishable from their prompt-to-prompt spread:\n" + "\n".join(failures))
    return results
