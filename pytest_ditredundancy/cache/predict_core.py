"""The machinery behind :mod:`.predict`: predictions and their errors, the kinds of parameters, the replay-based
breakpoint search and the calibration. It knows nothing of a particular cache or of what a profile holds.

A :class:`Predictor` replays a cache's decision rule on a per-step quantity estimated from the profile. The rule's
threshold is compared with values that depend on the earlier decisions (the reference is only refreshed on a
computed step), so the breakpoints of a threshold are found by replaying the run: between two values the replay
compared, nothing can change. Plain numpy.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from ..capture.profile import RedundancyProfile


class PredictInputError(ValueError):
    """A profile, parameter or measured pattern the prediction cannot use; the message names the fix."""


# -- results ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PredictionError:
    """Predicted against measured cached steps (a step counts as cached when any of its attention calls was skipped)."""

    steps: int
    predicted_cached: int
    measured_cached: int
    wrong: int  # steps in exactly one of the two sets
    missed: list[int]  # measured cached, predicted computed
    extra: list[int]  # predicted cached, measured computed
    fraction_error: float  # mean |predicted - measured| share of attention calls skipped, over steps

    @property
    def right_share(self) -> float:
        return 1.0 - self.wrong / self.steps if self.steps else 1.0

    @property
    def count_error(self) -> int:
        """Signed: more steps predicted cached than measured is positive."""
        return self.predicted_cached - self.measured_cached

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "right_share": self.right_share, "count_error": self.count_error}


@dataclass
class Prediction:
    """One strategy setting's predicted pattern: per step, the share of attention calls skipped (0 = computed)."""

    strategy: str
    params: dict[str, Any]
    fractions: list[float]
    indicator: list[float | None]
    scale: float = 1.0  # cache units per profile unit of the threshold (1: uncalibrated)

    @property
    def cached(self) -> list[bool]:
        return [f > 0 for f in self.fractions]

    @property
    def cached_steps(self) -> list[int]:
        return [s for s, f in enumerate(self.fractions) if f > 0]

    def compare(self, measured: Sequence[float]) -> PredictionError:
        """``measured[s]``: the share of the uncached run's attention calls the cached run skipped at step ``s``."""
        got = _measured(measured, len(self.fractions))
        want, have = np.asarray(self.cached), got > 0
        return PredictionError(len(got), int(want.sum()), int(have.sum()), int((want != have).sum()),
                               np.flatnonzero(have & ~want).tolist(), np.flatnonzero(want & ~have).tolist(),
                               float(np.mean(np.abs(np.asarray(self.fractions) - got))))

    def as_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "params": dict(self.params), "fractions": list(self.fractions),
                "cached_steps": self.cached_steps, "indicator": list(self.indicator), "scale": self.scale}


def _measured(measured: Sequence[float], steps: int) -> np.ndarray:
    got = np.asarray(measured, dtype=np.float64)
    if got.ndim != 1 or len(got) != steps:
        raise PredictInputError(f"the measured pattern has {got.size} steps, the profile {steps}; measure the cached "
                                "run at the profile's step count (one share per denoising step)")
    if not np.isfinite(got).all() or (got < -1e-9).any() or (got > 1 + 1e-9).any():
        raise PredictInputError(f"measured shares must be finite numbers in [0, 1] (share of attention calls "
                                f"skipped per step), got {got.tolist()}")
    return got


# -- parameters: how each kind of parameter moves the pattern -------------------------------------------------------
@dataclass(frozen=True)
class Param(ABC):
    """A strategy parameter the prediction reads. Subclasses say where the predicted pattern can change."""

    name: str
    default: Any
    minimum: float = 0.0
    below: float = math.inf  # values must stay under this (the profile schedule's budget: < 1)
    doc: str = ""

    def check(self, strategy: str, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise PredictInputError(f"{strategy}: {self.name} must be a number, got {value!r}")
        if not math.isfinite(value) or value < self.minimum or value >= self.below:
            upper = f" and < {self.below:g}" if math.isfinite(self.below) else ""
            raise PredictInputError(f"{strategy}: {self.name} must be a finite number >= {self.minimum:g}{upper}, "
                                    f"got {value}")
        return float(value)

    @abstractmethod
    def breakpoints(self, predictor: "Predictor", ctx: Any, values: dict[str, Any], lo: float, hi: float) -> list[float]:
        """The values in ``(lo, hi)`` where this parameter changes the predicted pattern."""


@dataclass(frozen=True)
class Threshold(Param):
    """Compared with a quantity accumulated along the run: the pattern changes where the threshold crosses a
    compared value, which depends on the earlier decisions, so the run is replayed piece by piece."""

    special: tuple[float, ...] = ()  # values where the cache's rule itself switches (cache-dit: >= 1 caches always)

    def breakpoints(self, predictor, ctx, values, lo, hi):
        def pattern(value: float) -> np.ndarray:
            return predictor.pattern(ctx, {**values, self.name: value})

        edges = [lo, *sorted(b for b in self.special if lo < b < hi), hi]
        ranges = list(zip(edges, edges[1:]))
        parts = [[e * predictor.scale for e in predictor.pieces(ctx, {**values, self.name: (a + b) / 2},
                                                                a / predictor.scale, b / predictor.scale)]
                 for a, b in ranges]
        found: list[float] = []
        for i, (a, b) in enumerate(ranges):
            found += parts[i]
            if i + 1 < len(ranges):  # the rule's own switch at b: compare the pieces on either side
                left, right = (parts[i] or [a])[-1], (parts[i + 1] or [ranges[i + 1][1]])[0]
                if not _same(pattern((left + b) / 2), pattern((b + right) / 2)):
                    found.append(b)
        return found


@dataclass(frozen=True)
class Fixed(Param):
    """The pattern can change only at values the profile fixes in advance (``predictor.candidates``)."""

    def breakpoints(self, predictor, ctx, values, lo, hi):
        cands = sorted({float(c) for c in predictor.candidates(ctx, self.name, values) if lo < c < hi})
        edges = [lo, *cands, hi]
        pats = [predictor.pattern(ctx, {**values, self.name: (a + b) / 2}) for a, b in zip(edges, edges[1:])]
        return [c for c, x, y in zip(cands, pats, pats[1:]) if not _same(x, y)]


@dataclass(frozen=True)
class Count(Param):
    """A whole number; each value from ``lo`` up to where it stops mattering is tried."""

    def check(self, strategy, value):
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise PredictInputError(f"{strategy}: {self.name} must be a whole number, got {value!r}")
        if value < self.minimum:
            raise PredictInputError(f"{strategy}: {self.name} must be >= {self.minimum:g}, got {value}")
        return int(value)

    def breakpoints(self, predictor, ctx, values, lo, hi):
        first = max(math.ceil(lo), int(self.minimum))
        last = min(math.floor(hi), predictor.count_cap(ctx, self.name, values))
        pats = {k: predictor.pattern(ctx, {**values, self.name: k}) for k in range(first, last + 1)}
        return [float(k) for k in range(first + 1, last + 1) if not _same(pats[k - 1], pats[k])]


@dataclass(frozen=True)
class Inert(Param):
    """A whole number the strategy has that does not change which steps are cached."""

    def check(self, strategy, value):
        return Count.check(self, strategy, value)  # type: ignore[arg-type]

    def breakpoints(self, predictor, ctx, values, lo, hi):
        return []


@dataclass(frozen=True)
class Choice(Inert):
    """One of a few named values."""

    choices: tuple[str, ...] = ()

    def check(self, strategy, value):
        if value not in self.choices:
            raise PredictInputError(f"{strategy}: {self.name} must be one of {', '.join(self.choices)}, got {value!r}")
        return value


@dataclass(frozen=True)
class Unmodelled(Param):
    """A parameter the replay does not model: accepted only at a value that leaves the rule as replayed."""

    allowed: tuple[Any, ...] = (None,)
    why: str = ""

    def check(self, strategy, value):
        if value not in self.allowed:
            raise PredictInputError(f"{strategy}: the prediction does not model {self.name}={value!r} ({self.why}); "
                                    f"leave it unset to predict")
        return value

    def breakpoints(self, predictor, ctx, values, lo, hi):
        raise PredictInputError(f"{predictor.strategy}: the prediction does not model {self.name}; "
                                "search another parameter")


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.array_equal(a, b))


def _right(x: float) -> float:
    """The pattern just above ``x``: no float lies between, so no compared value either."""
    return float(np.nextafter(x, math.inf))


# -- the predictors ---------------------------------------------------------------------------------------------
class Predictor(ABC):
    """Predicts one strategy family's skip pattern from a profile; ``scale`` rescales its threshold (calibration)."""

    strategy: ClassVar[str]
    params: ClassVar[tuple[Param, ...]]
    threshold: ClassVar[str | None] = None  # the parameter compared with the indicator (rescaled by calibration)

    def __init__(self, *, scale: float = 1.0) -> None:
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise PredictInputError(f"the calibration scale must be a finite number > 0, got {scale!r}")
        self.scale = float(scale)

    def _options(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.scale:g})"

    # what a family defines
    @abstractmethod
    def context(self, profile: RedundancyProfile) -> Any:
        """What the replay needs from the profile, whatever the parameters (built once per prediction or search;
        it has ``steps``)."""

    @abstractmethod
    def series(self, ctx: Any, values: dict[str, Any]) -> np.ndarray:
        """Per step, the quantity the cache thresholds, as the profile estimates it (NaN at step 0)."""

    @abstractmethod
    def trace(self, ctx: Any, values: dict[str, Any], eff: float | None) -> tuple[np.ndarray, list[float]]:
        """Replay the cache's rule: per-step skipped share, and the values compared with the threshold ``eff``
        (the threshold in profile units; ``values`` holds the parameters as given)."""

    def candidates(self, ctx: Any, name: str, values: dict[str, Any]) -> list[float]:
        raise PredictInputError(f"{self.strategy}: {name} has no fixed change points")

    def count_cap(self, ctx: Any, name: str, values: dict[str, Any]) -> int:
        """Beyond this value a whole-number parameter changes nothing (default: the step count)."""
        return ctx.steps + 1

    # the shared API
    def pattern(self, ctx: Any, values: dict[str, Any]) -> np.ndarray:
        """Per step, the predicted share of attention calls skipped at these (checked) parameter values."""
        return self.trace(ctx, values, None if self.threshold is None else values[self.threshold] / self.scale)[0]

    def values(self, params: Mapping[str, Any] | None) -> dict[str, Any]:
        """``params`` checked and completed with the strategy's defaults."""
        known = {p.name: p for p in self.params}
        given = dict(params or {})
        for name in given:
            if name not in known:
                raise PredictInputError(f"{self.strategy} has no parameter {name!r}; its parameters: "
                                        f"{', '.join(known)}")
        return {name: p.check(self.strategy, given[name]) if name in given else p.default for name, p in known.items()}

    def indicator(self, profile: RedundancyProfile, params: Mapping[str, Any] | None = None) -> np.ndarray:
        """Per step, the quantity the cache thresholds, as the profile estimates it (NaN where undefined)."""
        return self.series(self.context(profile), self.values(params))

    def predict(self, profile: RedundancyProfile, params: Mapping[str, Any] | None = None) -> Prediction:
        values = self.values(params)
        ctx = self.context(profile)
        fractions = self.pattern(ctx, values)
        return Prediction(self.strategy, values, [float(f) for f in fractions],
                          [float(v) if np.isfinite(v) else None for v in self.series(ctx, values)], self.scale)

    def breakpoints(self, profile: RedundancyProfile, param: str, lo: float, hi: float,
                    fixed_params: Mapping[str, Any] | None = None) -> list[float]:
        """Values strictly inside ``(lo, hi)`` where the predicted pattern changes, sorted: the pattern is the same
        everywhere between two consecutive ones (at a breakpoint itself it may be either neighbour's)."""
        spec = self._param(param)
        values = self.values({k: v for k, v in (fixed_params or {}).items() if k != param})
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
            raise PredictInputError(f"{self.strategy}: the range of {param} must be finite with lo < hi, got "
                                    f"[{lo}, {hi}]")
        if lo < spec.minimum:
            raise PredictInputError(f"{self.strategy}: {param} starts at {spec.minimum:g}, the range starts at {lo}")
        values[param] = spec.check(self.strategy, lo if not isinstance(spec, Count) else math.ceil(lo))
        return sorted(float(b) for b in spec.breakpoints(self, self.context(profile), values, lo, hi) if lo < b < hi)

    def value_for(self, profile: RedundancyProfile, cached_steps: int, param: str, lo: float, hi: float,
                  fixed_params: Mapping[str, Any] | None = None) -> float:
        """A value of ``param`` in ``[lo, hi]`` whose predicted number of cached steps is closest to
        ``cached_steps`` (ties: the smaller value, which caches less): a start for a search."""
        points = self.breakpoints(profile, param, lo, hi, fixed_params)
        edges = [lo, *points, hi]
        if isinstance(self._param(param), Count):
            tries = [float(math.ceil(lo))] + points
        else:
            tries = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
        fixed = dict(fixed_params or {})
        counts = [len(self.predict(profile, {**fixed, param: v}).cached_steps) for v in tries]
        return min(zip(tries, counts), key=lambda tc: (abs(tc[1] - cached_steps), tc[0]))[0]

    def calibrated(self, profile: RedundancyProfile, measured: Sequence[float],
                   params: Mapping[str, Any] | None = None) -> Predictor:
        """A predictor whose threshold is rescaled to fit one measured run: the profile's attention outputs and the
        cache's block residuals may differ in scale. The scale fits the *number* of cached steps first, then which
        steps (a scale moves the level of the indicator, not the order of its steps; fitting the positions of one
        run chases its noise: on the trained models that made other thresholds worse). A family without a
        threshold (the profile schedule: exact by construction) comes back unchanged."""
        if self.threshold is None:
            return type(self)(scale=1.0, **self._options())
        values = self.values(params)
        given = values[self.threshold]
        if not given > 0:
            raise PredictInputError(f"{self.strategy}: calibrate on a run with {self.threshold} > 0 (at 0 the cache "
                                    "skips nothing, whatever the scale)")
        ctx = self.context(profile)
        got = _measured(measured, ctx.steps) > 0
        edges = [0.0, *self.pieces(ctx, values, 0.0, math.inf)]
        tries = [(a + b) / 2 if a > 0 else b / 2 for a, b in zip(edges, edges[1:])] + [2 * edges[-1] or 1.0]
        current = given / self.scale

        def misfit(eff: float) -> tuple[int, int]:
            cached = self.trace(ctx, values, eff)[0] > 0
            return abs(int(cached.sum()) - int(got.sum())), int((cached != got).sum())

        best = min(tries, key=lambda eff: (misfit(eff), abs(math.log(eff / current))))
        return type(self)(scale=self.scale if misfit(current) <= misfit(best) else given / best, **self._options())

    def pieces(self, ctx: Any, values: dict[str, Any], lo: float, hi: float) -> list[float]:
        """Threshold values (profile units) in ``(lo, hi)`` where the replayed pattern changes."""
        x, found = lo, []
        pattern, compared = self.trace(ctx, values, _right(x))
        for _ in range(100_000):
            above = [c for c in compared if c > x]
            nxt = min(above) if above else math.inf
            if nxt >= hi:
                return found
            new, compared = self.trace(ctx, values, _right(nxt))
            if not _same(new, pattern):
                found.append(nxt)
            x, pattern = nxt, new
        raise RuntimeError(f"{self.strategy}: the breakpoint search did not end; report this with the profile")

    def _param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise PredictInputError(f"{self.strategy} has no parameter {name!r}; its parameters: "
                                f"{', '.join(p.name for p in self.params)}")
