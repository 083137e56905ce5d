"""The cache gate: one model x one caching strategy, measured, compared with its baseline, recorded.

Per strategy the gate asserts the output quality (PSNR against the uncached run, same seeds and prompts)
and the fraction of attention compute skipped, each within ``[low, high]`` bounds stored in the model's
baseline (``suites.cache_gate.<spec>``). Below ``low`` is a regression; above ``high`` is an unexplained
jump, flagged too (a cache that suddenly skips more, or an output that suddenly matches better, means the
mechanism changed). Wall-time speedup, SSIM, latent MSE and, for the profile schedule, the predicted-vs-
measured error sweep and its Spearman correlation are recorded for the report; the Spearman correlation
is also held to a floor below its stored value (the profile must keep predicting the error).

The profile strategy's schedule is data: with ``--dit-update-baselines`` it is derived from the session's
profile and stored with the bounds; later runs replay the stored schedule, so the gate measures the model
and the mechanism, not profile drift (the baseline-regression suite gates that).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import pytest

from ..cache import adherence
from ..cache.base import CacheBatchError, CacheDependencyError, CacheParameterError, UnsupportedStrategy
from ..cache.engines import engine_of
from ..cache.measure import RunPlan, RunResult, budget_sweep, premise_test, skipped_fractions, speedup, time_interleaved
from ..cache.quality import PSNR_CAP, latent_mse, psnr, spearman, ssim
from ..cache.schedule import CacheSchedule, ScheduleError, schedule_from_profile
from ..cache.spec import CacheSpec
from ..judging.baselines import BaselineError
from ..cache.floors import FloorError, Floors, Quality
from ..cache.tune_runs import NonFiniteRun, require_finite
from ..cache.tune_verdict import judge_unstored
from ..cache.tuning import TunePoint
from .cache_runs import CacheInputs, memo
from .relay import emit
from .session import BASELINE_USED_KEY

SUITE = "cache_gate"
TUNE_SUITE = "cache_tune"  # the tuning's section: its floors and frontier judge settings without an entry
#: Half-widths of stored bounds per device class. CPU runs repeat to ~1e-6; on GPUs a cache's skip decisions
#: (FBCache's threshold test) can flip with kernel noise, so skipped fractions move by whole steps.
#: latent MSE is held within a relative band (CPU runs repeat it to ~1e-6; GPU kernels move it by up to 2x).
TOLERANCES: dict[str, dict[str, float]] = {
    "cpu": {"psnr_db": 0.5, "psnr_relative": 0.01, "skipped": 0.02, "spearman": 0.2, "mse_relative": 0.05,
            "mse_absolute": 1e-12},
    "cuda": {"psnr_db": 3.0, "psnr_relative": 0.05, "skipped": 0.1, "spearman": 0.4, "mse_relative": 1.0,
             "mse_absolute": 1e-9},
}
#: single-cell probes of the premise test (skip one layer at one step, measure the error it causes)
PREMISE_CELLS = 12


def _fmt(value: float | None) -> str:
    return "nan" if value is None or not math.isfinite(value) else f"{value:.4g}"


def _tolerance(device_class: str) -> dict[str, float]:
    return TOLERANCES.get(device_class, TOLERANCES["cuda"])


@dataclass
class CacheCheck(CacheInputs):
    """The gate for one model and one strategy; obtained from the ``dit_cache_check`` fixture::

        def test_cache_gate(dit_cache_check):
            dit_cache_check.gate()
    """

    strategy: CacheSpec = None  # type: ignore[assignment]  # always given by the fixture

    def schedule(self, stored: dict | None) -> CacheSchedule | None:
        """The profile strategy's schedule: a file, else the baseline's, else derived from the profile."""
        if self.strategy.strategy != "profile":
            return None
        try:
            if "schedule" in self.strategy.params:
                schedule = CacheSchedule.load(self.strategy.params["schedule"])
                schedule.source = f"file {self.strategy.params['schedule']}"
            elif stored and stored.get("schedule") and not self.session.config.update_baselines:
                schedule = CacheSchedule.from_dict(stored["schedule"], source=f"baseline of {self.spec.name}")
                schedule.source = "baseline"
                self._check_replayed(schedule)
            else:
                schedule = schedule_from_profile(self.session.profile(self.suite.request), model=self.spec.name,
                                                 budget=self.strategy.get("budget"),
                                                 threshold=self.strategy.get("threshold"))
            schedule.validate(self.plan().layer_names(), steps=self.suite.settings.steps, model=self.spec.name)
        except ScheduleError as exc:
            problem = str(exc)
        else:
            return schedule
        pytest.fail(f"cache gate {self.strategy} on {self.spec.name}: {problem}", pytrace=False)

    def _check_replayed(self, schedule: CacheSchedule) -> None:
        """A stored schedule is replayed only for the spec that made it (same budget / threshold)."""
        for name in ("budget", "threshold"):
            wanted, stored = self.strategy.get(name), getattr(schedule, name)
            if wanted != stored:
                raise ScheduleError(
                    f"the baseline's schedule was derived with {name}={stored}, but the strategy asks for "
                    f"{name}={wanted}; replaying it would gate another schedule. Update the baseline:\n    "
                    f"{self._update_command()}")

    # -- the gate -------------------------------------------------------------------------------------------
    def gate(self) -> dict[str, Any]:
        """Measure, compare with the baseline (or store it with ``--dit-update-baselines``), record."""
        plan = self.runnable_plan("cache gate")
        baseline = None if self.session.config.update_baselines else self.suite.baseline()
        stored = ((baseline.suite(SUITE) or {}) if baseline else {}).get(self.strategy.text)
        schedule = self.schedule(stored)
        reference = self.reference(plan)
        outcome, message = None, ""
        try:
            context = self.context_for(plan)(self.strategy)
            cached = plan.run(self.strategy, schedule=schedule, context=context, count=True)
        except UnsupportedStrategy as exc:
            if stored:  # the baseline holds an entry: it ran when the baseline was recorded
                outcome, message = pytest.fail, (f"{self.strategy} on {self.spec.name} no longer runs ({exc}), but its "
                                                 "baseline holds an entry for it")
            else:
                outcome, message = pytest.skip, f"{self.strategy} on {self.spec.name}: {exc}"
        except (CacheBatchError, CacheParameterError, CacheDependencyError) as exc:  # the user's setting or install
            outcome, message = pytest.fail, f"cache gate {self.strategy} on {self.spec.name}: {exc}"
        except Exception as exc:
            where = engine_of(self.strategy).failure(exc)
            if where is None:
                raise
            if stored:  # it ran when the baseline was recorded: a regression, not a missing feature
                outcome, message = pytest.fail, f"{self.strategy} on {self.spec.name} now fails: {where}"
            else:
                outcome, message = pytest.skip, f"{self.strategy} does not support {self.spec.name}: {where}"
        if outcome is pytest.skip:
            pytest.skip(message)
        if outcome is pytest.fail:
            pytest.fail(message, pytrace=False)
        self._require_finite(reference, cached)
        try:  # an update is held to the floors stored so far too: it never accepts a setting below them
            self.floors, self.floors_from = self.model_floors(baseline if baseline is not None
                                                              else self.suite.baseline())
            self.floors.require_measurable(adherence.applies_to(self.spec), self.spec.name)
        except FloorError as exc:
            pytest.fail(f"cache gate {self.strategy} on {self.spec.name}: {exc}", pytrace=False)
        fallback = self.options.min_psnr is not None or self.options.min_skipped is not None
        if not self.session.config.update_baselines and stored is None and not fallback and not self.floors:
            self._missing()  # after the support check (unsupported skips), before timing and the sweep
        result = self.measure(plan, reference, cached, schedule, context)
        return self.judge(result, stored, schedule, baseline)

    def model_floors(self, baseline: Any) -> tuple[Floors, str]:
        """The model's quality floors and where they come from: ``--dit-cache-floor``, else the floors stored with
        a tuning of this strategy (or of any strategy), else those stored with another cache-gate entry."""
        if self.options.floors:
            return self.options.floors, "--dit-cache-floor"
        if baseline is None:
            return Floors(), ""
        tunes = baseline.suite(TUNE_SUITE) or {}
        ordered = sorted(tunes.items(), key=lambda item: item[1].get("strategy") != self.strategy.strategy)
        for text, entry in ordered:
            if entry.get("floors"):
                return Floors.from_dict(entry["floors"]), f"stored with the tuning {text}"
        for text, entry in sorted((baseline.suite(SUITE) or {}).items()):
            if isinstance(entry, dict) and entry.get("floors"):
                return Floors.from_dict(entry["floors"]), f"stored with {text}"
        return Floors(), ""

    def _require_finite(self, reference: RunResult, cached: RunResult) -> None:
        try:
            require_finite("uncached", reference)
            require_finite(f"cached ({self.strategy})", cached)
        except NonFiniteRun as exc:
            pytest.fail(f"cache gate {self.strategy} on {self.spec.name}: {exc}", pytrace=False)

    def measure(self, plan: RunPlan, reference: RunResult, cached: RunResult, schedule: CacheSchedule | None,
                context: Any) -> dict[str, Any]:
        uncached_s, cached_s = time_interleaved(
            lambda: plan.run(), lambda: plan.run(self.strategy, schedule=schedule, context=context),
            self.options.repeats)
        result = {
            "psnr": psnr(reference.images, cached.images), "ssim": ssim(reference.images, cached.images),
            "latent_mse": latent_mse(reference.latents, cached.latents),
            "skipped": skipped_fractions(reference, cached), "speedup": speedup(uncached_s, cached_s),
            "seconds": {"uncached": uncached_s, "cached": cached_s}, "strategy_counters": cached.strategy,
            "sweep": None, "premise": None, "spearman": None, "adherence": None,
        }
        if adherence.applies_to(self.spec):
            try:
                result["adherence"] = adherence.measure(plan.prompts, reference.images, cached.images)
                if self.floors.adherence is not None:
                    result["retention"] = adherence.retention(plan.prompts, reference.images, cached.images)
            except adherence.AdherenceError as exc:
                pytest.fail(f"cache gate {self.strategy} on {self.spec.name}: {exc}", pytrace=False)
        if schedule is not None and schedule.costs is not None:
            result["sweep"] = self.sweep(plan, schedule, reference)
            result["premise"], result["spearman"] = self.premise(plan, schedule, reference)
        return result

    def _memo_key(self, what: str, schedule: CacheSchedule, *extra: Any) -> tuple:
        digest = hashlib.sha256(json.dumps(schedule.costs).encode()).hexdigest()[:12]
        return (what, self.spec.name, self.suite.key, digest, *extra)

    def sweep(self, plan: RunPlan, schedule: CacheSchedule, reference: RunResult) -> list[dict]:
        """Budget sweep (cheapest-first and costliest-first) for the report's quality/skip frontier."""
        key, state = self._memo_key("sweep", schedule, self.options.budgets), memo(self.session)
        if key not in state:
            state[key] = [p.__dict__ for p in budget_sweep(plan, schedule, self.options.budgets, reference)]
        return state[key]

    def premise(self, plan: RunPlan, schedule: CacheSchedule, reference: RunResult) -> tuple[list[dict], float | None]:
        """Single-cell probes and the Spearman correlation of profile cost with measured error."""
        key, state = self._memo_key("premise", schedule, PREMISE_CELLS), memo(self.session)
        if key not in state:
            points = premise_test(plan, schedule, reference, PREMISE_CELLS)
            value = spearman([p.predicted_error for p in points], [p.measured_error for p in points])
            state[key] = ([p.__dict__ for p in points], value)
        return state[key]

    def quality(self, result: dict[str, Any]) -> Quality:
        return Quality(result["psnr"], result["ssim"], result["latent_mse"], result.get("retention"))

    def judge(self, result: dict[str, Any], stored: dict | None, schedule: CacheSchedule | None,
              baseline: Any = None) -> dict[str, Any]:
        tol = _tolerance(self.session.device_class)
        scored = result["adherence"]
        values = {"psnr": result["psnr"], "skipped": result["skipped"]["attention"], "spearman": result["spearman"],
                  "latent_mse": result["latent_mse"], "adherence": scored.cached if scored else None}
        if self.strategy.strategy != "none" and values["skipped"] <= 0.0:
            pytest.fail(f"cache gate {self.strategy} on {self.spec.name} skipped no attention compute: it would only "
                        "gate a cache that does nothing. Choose settings under which it skips (e.g. a higher "
                        "fbcache:threshold=...), or deselect it for this model", pytrace=False)
        update = self.session.config.update_baselines
        broken = self.floors.failures(self.quality(result)) if self.floors else []
        unstored = None
        if update and broken:  # a setting below the model's floors is a regression to fix, not a baseline to accept
            pytest.fail(f"cache gate {self.strategy} on {self.spec.name} breaks the floors {self.floors} "
                        f"({self.floors_from}): " + "; ".join(broken) + ". Nothing was stored. Choose a setting that "
                        "keeps them (--dit-cache-tune finds the fastest one), or change the floors", pytrace=False)
        if update:
            bounds = self._new_bounds(values, tol)
            entry = {"psnr": values["psnr"], "ssim": result["ssim"], "latent_mse": values["latent_mse"],
                     "skipped_attention": values["skipped"], "skipped_transformer": result["skipped"]["transformer"],
                     "speedup": result["speedup"], "spearman": values["spearman"], "bounds": bounds}
            if scored is not None:
                bounds["adherence"] = adherence.new_bounds(scored, self.session.device_class)
                entry["adherence"] = scored.cached
            if schedule is not None:
                entry["schedule"] = schedule.to_dict()
            if self.floors:
                entry["floors"] = self.floors.as_dict()
            self._store(entry)
        elif stored is not None:
            bounds = stored.get("bounds", {})
        elif self.floors:
            bounds = {}
            unstored = self._judge_unstored(values, result, baseline)
        elif self.options.min_psnr is not None or self.options.min_skipped is not None:
            bounds = {"psnr": [self.options.min_psnr, None], "skipped": [self.options.min_skipped, None]}
        else:
            self._missing()
        failures = self._failures(values, bounds, stored) if unstored is None else unstored[0]
        if unstored is None and broken:
            failures += [f"  {line} (floors {self.floors}, {self.floors_from})" for line in broken]
        lost_prompt = adherence.drop_failure(scored, self.session.device_class) if scored else None
        if lost_prompt:
            failures.append(lost_prompt)
        record = self._record(result, values, bounds, schedule, passed=not failures, updated=update)
        if unstored is not None:
            record["floors"], record["unstored"] = self.floors.as_dict(), unstored[1]
        if failures and unstored is not None:
            pytest.fail(f"cache gate of {self.spec.name} with {self.strategy} breaks the floors:\n" + unstored[1]
                        + "\n" + "\n".join(failures), pytrace=False)
        if failures:
            fix = self._update_command()
            pytest.fail(f"cache gate of {self.spec.name} with {self.strategy} changed ({self.suite.key}):\n"
                        + "\n".join(failures) + f"\nIf the change is intended, update the baseline:\n    {fix}",
                        pytrace=False)
        return record

    def _judge_unstored(self, values: dict[str, Any], result: dict[str, Any], baseline: Any) -> tuple[list[str], str]:
        """A setting without its own entry: the floors decide, compared with the stored settings of the strategy
        and with a stored tuning's frontier where one covers its value."""
        entries = {text: entry for text, entry in ((baseline.suite(SUITE) or {}) if baseline else {}).items()
                   if isinstance(entry, dict) and text.split(":", 1)[0] == self.strategy.strategy}
        frontier = None
        for text, entry in ((baseline.suite(TUNE_SUITE) or {}) if baseline else {}).items():
            param = entry.get("parameter")
            if entry.get("strategy") == self.strategy.strategy and param in self.strategy.params:
                points = [TunePoint.from_dict(p) for p in entry.get("frontier", [])]
                frontier = (text, float(self.strategy.params[param]), points)
        return judge_unstored(self.strategy.text, self.quality(result), values["skipped"], self.floors, self.floors_from, entries,
                              frontier)

    def _update_command(self) -> str:
        """The command that rewrites this model's cache-gate entries (for every strategy the run selects)."""
        return self.session.command(self.spec, "--dit-update-baselines", f"-k {SUITE}")

    def _missing(self) -> None:
        pytest.fail(f"no cache_gate baseline for {self.spec.name} with {self.strategy} (settings {self.suite.key}) in "
                    f"{self.session.store.path_for(self.suite.baseline_name, self.suite.key)}, and no quality floors to "
                    "judge a new setting by.\nCreate the entry with:\n    "
                    f"{self._update_command()}\nor judge the setting against floors: --dit-cache-floor=psnr:35,ssim:0.95 "
                    "(a stored --dit-cache-tune keeps its floors for every later setting)", pytrace=False)

    @staticmethod
    def _new_bounds(values: dict[str, Any], tol: dict[str, float]) -> dict[str, list]:
        p, s, mse = values["psnr"], values["skipped"], values["latent_mse"]
        half = max(tol["psnr_db"], tol["psnr_relative"] * p)
        spread = tol["mse_relative"] * mse + tol["mse_absolute"]
        bounds = {"psnr": [max(0.0, p - half), min(PSNR_CAP, p + half)],
                  "skipped": [max(0.0, s - tol["skipped"]), min(1.0, s + tol["skipped"])],
                  "latent_mse": [max(0.0, mse - spread), mse + spread]}
        if values["spearman"] is not None:
            bounds["spearman"] = [max(-1.0, values["spearman"] - tol["spearman"]), None]
        return bounds

    def _failures(self, values: dict[str, Any], bounds: dict[str, list], stored: dict | None) -> list[str]:
        labels = {"psnr": ("PSNR", "dB", "output quality regressed"),
                  "skipped": ("attention compute skipped", "", "the cache skips less: it got slower"),
                  "spearman": ("Spearman(predicted, measured error)", "", "the profile no longer predicts the error"),
                  "latent_mse": ("latent MSE", "", "the final latents moved less than before: the cache changed"),
                  "adherence": ("prompt adherence", "", "the cached images follow their prompts less often")}
        stored_values = {"psnr": (stored or {}).get("psnr"), "skipped": (stored or {}).get("skipped_attention"),
                         "spearman": (stored or {}).get("spearman"), "latent_mse": (stored or {}).get("latent_mse"),
                         "adherence": (stored or {}).get("adherence")}
        failures = []
        for name, (label, unit, below) in labels.items():
            lo, hi = (list(bounds.get(name) or []) + [None, None])[:2]
            value = values.get(name)
            if lo is None and hi is None:
                continue
            if value is None or not math.isfinite(value):
                failures.append(f"  {label} could not be measured ({_fmt(value)}) but the baseline bounds it "
                                f"[{_fmt(lo)}, {_fmt(hi)}]")
                continue
            if name == "latent_mse" and hi is not None and value > hi + 1e-15:
                failures.append(f"  {label} {_fmt(value)} above its bound {_fmt(hi)} (baseline "
                                f"{_fmt(stored_values[name])}): output quality regressed")
                continue
            was = f" (baseline {_fmt(stored_values[name])})" if stored_values[name] is not None else ""
            if lo is not None and value < lo - 1e-9:
                failures.append(f"  {label} {_fmt(value)}{unit and ' ' + unit} below its bound {_fmt(lo)}{was}: {below}")
            elif hi is not None and value > hi + 1e-9:
                failures.append(f"  {label} {_fmt(value)}{unit and ' ' + unit} above its bound {_fmt(hi)}{was}: an "
                                "unexplained jump (the caching mechanism or the model changed); find out why")
        return failures

    def _store(self, entry: dict[str, Any]) -> None:
        try:
            path = self.session.store.update(
                self.suite.baseline_name, self.suite.key, sections={f"suites.{SUITE}": {self.strategy.text: entry}},
                merge=True, metadata=self.session.baseline_metadata(self.suite.profile(), self.suite.request))
        except BaselineError as exc:
            pytest.fail(str(exc), pytrace=False)
        emit(self.item, BASELINE_USED_KEY, str(path))

    def _record(self, result: dict[str, Any], values: dict[str, Any], bounds: dict[str, list],
                schedule: CacheSchedule | None, *, passed: bool, updated: bool) -> dict[str, Any]:
        """One record per model x strategy, plain builtins only (the HTML report reads these)."""
        details = {
            "strategy": self.strategy.text, "strategy_name": self.strategy.strategy, "updated": updated,
            "psnr": values["psnr"], "ssim": result["ssim"], "latent_mse": result["latent_mse"],
            "speedup": result["speedup"], "seconds": result["seconds"], "skipped": result["skipped"],
            "skipped_bounds": bounds.get("skipped"), "spearman": values["spearman"],
            "spearman_bounds": bounds.get("spearman"), "latent_mse_bounds": bounds.get("latent_mse"),
            "sweep": result["sweep"], "premise": result["premise"],
            "adherence": result["adherence"].as_dict() if result["adherence"] else None,
            "adherence_bounds": bounds.get("adherence"),
            "strategy_counters": result["strategy_counters"], "psnr_cap": PSNR_CAP,
            "schedule": None if schedule is None else {
                "layers": list(schedule.layers), "steps": schedule.steps, "mask": schedule.mask,
                "budget": schedule.budget, "threshold": schedule.threshold,
                "predicted_error": schedule.predicted_error, "skipped_fraction": schedule.skipped_fraction,
                "source": schedule.source},
        }
        self.suite.record(SUITE, "psnr", values["psnr"], bounds.get("psnr"), passed, **details)
        return {"model": self.spec.name, **details, "passed": passed}
