"""Cache tuning on a model: each candidate value measured against the uncached run, and the tuned value re-checked
at other step counts and schedulers (does it transfer, or must it be recalibrated?).

:class:`Tuner` turns a :class:`~pytest_ditredundancy.cache.measure.RunPlan` into the ``evaluate(value)`` function
the search in :mod:`.tuning` bisects; everything it runs goes through the plan's ``run`` method, so a plan whose
pipeline lives elsewhere can stand in. The uncached reference run is measured once and shared with the caller.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from ..capture.profile import RedundancyProfile
from . import adherence
from .diffusers_cache import StrategyContext
from .floors import Floors, Quality
from .measure import RunPlan, RunResult, skipped_fractions, speedup, time_interleaved
from .quality import latent_mse, nonfinite_share, psnr, ssim
from .schedule import CacheSchedule, schedule_from_profile
from .spec import CacheSpec
from .tuning import DEFAULT_CLIFF_DB, DEFAULT_GRID, TunePoint, TuneResult, TuneSpec, candidates_from_breakpoints, grid, search


class NonFiniteRun(RuntimeError):
    """A run's output held NaN or inf: nothing can be measured from it."""


def cached_shares(reference: RunResult, cached: RunResult) -> list[float]:
    """Per denoising step, the share of the uncached run's attention calls the cached run did not make."""
    full, done = reference.attention_calls_per_step, cached.attention_calls_per_step
    return [float(1.0 - (done[i] if i < len(done) else 0) / full[i]) if full[i] else 0.0 for i in range(len(full))]


def require_finite(label: str, run: RunResult) -> None:
    for what, values in (("decoded output", run.images), ("final latents", run.latents)):
        share = nonfinite_share(values)
        if share:
            raise NonFiniteRun(f"the {label} run's {what} are non-finite ({share:.1%} NaN/inf); nothing can be "
                               "judged or stored from it")


def quality_of(plan: RunPlan, reference: RunResult, cached: RunResult, *, with_adherence: bool) -> Quality:
    score = adherence.retention(plan.prompts, reference.images, cached.images) if with_adherence else None
    return Quality(psnr(reference.images, cached.images), ssim(reference.images, cached.images),
                   latent_mse(reference.latents, cached.latents), score)


@dataclass
class Tuner:
    """Measures candidate settings of one :class:`TuneSpec` on one plan.

    ``context_for`` gives a strategy its run context (MagCache's calibrated ratios); ``profile`` is the uncached
    run's redundancy profile (the profile strategy derives its schedule from it, and the prediction reads it);
    ``predictor`` (from :mod:`.predict`) proposes the candidate values and predicts each one's skip pattern."""

    plan: RunPlan
    tune: TuneSpec
    floors: Floors
    reference: RunResult
    with_adherence: bool
    profile: RedundancyProfile | None = None
    context_for: Callable[[CacheSpec], StrategyContext] | None = None
    predictor: Any = None
    runs: list[str] = field(default_factory=list)

    def schedule_for(self, setting: CacheSpec) -> CacheSchedule | None:
        if setting.strategy != "profile":
            return None
        if self.profile is None:
            raise ValueError("tuning the profile schedule needs the model's redundancy profile")
        schedule = schedule_from_profile(self.profile, model=self.plan.model.name, budget=setting.get("budget"),
                                         threshold=setting.get("threshold"))
        schedule.validate(self.plan.layer_names(), steps=self.plan.settings.steps, model=self.plan.model.name)
        return schedule

    def cached_run(self, setting: CacheSpec) -> RunResult:
        context = self.context_for(setting) if self.context_for else self.plan.context()
        return self.plan.run(setting, schedule=self.schedule_for(setting), context=context, count=True)

    def evaluate(self, value: float) -> TunePoint:
        setting = self.tune.setting(value)
        cached = self.cached_run(setting)
        self.runs.append(setting.text)
        require_finite(f"cached ({setting.text})", cached)
        shares = cached_shares(self.reference, cached)
        point = TunePoint(value, setting.text, quality_of(self.plan, self.reference, cached,
                                                          with_adherence=self.with_adherence),
                          skipped_fractions(self.reference, cached),
                          speedup([self.reference.seconds], [cached.seconds]), shares)
        if self.predictor is not None:
            point.predicted = self.predictor.predicted(self.tune.param, value, shares)
        return point

    def candidates(self) -> tuple[list[float], str]:
        """The values to bisect, and where they came from."""
        if self.predictor is not None:
            breakpoints = self.predictor.breakpoints(self.tune.param, self.tune.lo, self.tune.hi)
            if breakpoints:
                return candidates_from_breakpoints(self.tune.lo, self.tune.hi, breakpoints), "prediction"
        return grid(self.tune.lo, self.tune.hi, DEFAULT_GRID), "grid"

    def search(self, cliff_db: float = DEFAULT_CLIFF_DB) -> TuneResult:
        candidates, source = self.candidates()
        result = search(self.evaluate, self.tune, self.floors, candidates, cliff_db=cliff_db)
        result.notes.insert(0, f"candidates from the {source}: {len(candidates)} values")
        return result

    def timed_speedup(self, value: float, repeats: int) -> tuple[float, dict[str, list[float]]]:
        """Wall speed-up of one setting: uncached and cached passes interleaved ``repeats`` times, medians."""
        setting = self.tune.setting(value)
        schedule = self.schedule_for(setting)
        context = self.context_for(setting) if self.context_for else self.plan.context()
        uncached, cached = time_interleaved(lambda: self.plan.run(),
                                            lambda: self.plan.run(setting, schedule=schedule, context=context),
                                            repeats)
        return speedup(uncached, cached), {"uncached": uncached, "cached": cached}


@dataclass
class Transfer:
    """The tuned value at another step count or scheduler: does it keep the floors, and what would tuning there
    choose instead?"""

    variant: str  # e.g. "steps x0.5 (10)" or "scheduler euler"
    settings_key: str
    value: float
    holds: bool
    quality: dict[str, Any]
    skipped: float
    failures: list[str]
    tuned_value: float | None  # None: nothing met the floors there
    tuned_skipped: float | None
    runs: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def transfer(value: float, variants: Sequence[tuple[str, Tuner]], cliff_db: float) -> list[Transfer]:
    """Re-check ``value`` with each variant's tuner (its own uncached reference, profile and prediction), and tune
    there too over the same range and floors."""
    out = []
    for label, there in variants:
        result = there.search(cliff_db)
        point = next((p for p in result.points if round(p.value, 12) == round(value, 12)), None)
        if point is None:  # the search there did not try this value: one more run
            point = there.evaluate(value)
            point.failures = there.floors.failures(point.quality)
        chosen = result.recommendation
        out.append(Transfer(label, there.plan.settings.key(), value, point.passes, point.quality.as_dict(),
                            point.skipped.get("transformer", 0.0), point.failures,
                            None if chosen is None else chosen.value,
                            None if chosen is None else chosen.skipped.get("transformer", 0.0),
                            len(there.runs)))
    return out
