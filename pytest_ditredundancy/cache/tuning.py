"""Cache tuning: the fastest setting of one parameter whose quality stays inside the floors.

``--dit-cache-tune=fbcache:threshold=0.02..0.5`` names a strategy, the parameter to search and its range (other
parameters may follow and stay fixed: ``cachedit:rdt=0.02..0.4,Fn=1,Bn=0,warmup=2``). Every tunable parameter
skips more compute as it grows, so quality falls as it grows, and the search is a bisection over candidate
values: the values where the profile predicts the skip pattern changes (one per predicted pattern; see
:mod:`.predict`), else an even grid. Neighbouring measured settings whose PSNR differs by more than the cliff
size are bisected further until the drop sits between two settings one cached step apart (a **cliff**) or
spreads out into a slope. The result holds every measured point (the **frontier**), the cliffs and the
recommendation: the measured setting that skips the most transformer compute while keeping every floor.

The search is plain Python over an ``evaluate(value) -> TunePoint`` function, so it is tested without a model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from .floors import Floors, Quality
from .spec import STRATEGIES, CacheSpec, CacheSpecError, parse_each, parse_spec

#: the parameters a search may tune, per strategy: each skips more as it grows
TUNABLE: dict[str, tuple[str, ...]] = {
    "fbcache": ("threshold",), "cachedit": ("rdt",), "magcache": ("threshold",), "profile": ("budget", "threshold"),
}
#: a PSNR drop larger than this between neighbouring measured settings is bisected as a possible cliff (dB)
DEFAULT_CLIFF_DB = 6.0
#: settings tried when the profile predicts nothing for the strategy
DEFAULT_GRID = 9
#: bisections of one cliff at most (each is one run)
MAX_CLIFF_BISECTIONS = 4


class TuneSpecError(ValueError):
    """A ``--dit-cache-tune`` value that cannot be searched; the message says the fix."""


@dataclass(frozen=True)
class TuneSpec:
    """One search: ``strategy``'s ``param`` over ``[lo, hi]``, the other parameters fixed."""

    strategy: str
    param: str
    lo: float
    hi: float
    fixed: tuple[tuple[str, str], ...] = ()
    text: str = ""

    def __str__(self) -> str:
        return self.text

    def setting(self, value: float) -> CacheSpec:
        """The cache spec of one candidate value (parsed like any ``--dit-cache``)."""
        parts = [f"{self.param}={value:.6g}", *(f"{k}={v}" for k, v in self.fixed)]
        return parse_spec(f"{self.strategy}:{','.join(parts)}")


def parse_tune(text: str) -> TuneSpec:
    """``strategy:param=LO..HI[,key=value...]`` -> :class:`TuneSpec`; raises :class:`TuneSpecError`."""
    raw = str(text).strip()
    name, _, rest = raw.partition(":")
    name = name.strip().lower()
    if name not in TUNABLE:
        known = "; ".join(f"{s}:{'|'.join(p)}=LO..HI" for s, p in TUNABLE.items())
        hint = "" if name in STRATEGIES else " (no such strategy)"
        raise TuneSpecError(f"--dit-cache-tune={raw}: {name!r} cannot be tuned{hint}; tunable: {known}")
    searched: tuple[str, float, float] | None = None
    fixed: list[tuple[str, str]] = []
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = (s.strip() for s in part.partition("="))
        if not sep or not value:
            raise TuneSpecError(f"--dit-cache-tune={raw}: {part!r} needs a value (key=value or key=LO..HI)")
        if ".." not in value:
            fixed.append((key, value))
            continue
        if searched is not None:
            raise TuneSpecError(f"--dit-cache-tune={raw}: one parameter is searched at a time; "
                                f"{searched[0]} and {key} both have a range")
        if key not in TUNABLE[name]:
            raise TuneSpecError(f"--dit-cache-tune={raw}: {name} cannot tune {key!r}; it tunes "
                                f"{', '.join(TUNABLE[name])} (each skips more as it grows)")
        searched = (key, *_bounds(raw, key, value))
    if searched is None:
        raise TuneSpecError(f"--dit-cache-tune={raw}: give the searched parameter a range, e.g. "
                            f"{name}:{TUNABLE[name][0]}=LO..HI")
    param, lo, hi = searched
    spec = TuneSpec(name, param, lo, hi, tuple(sorted(fixed)))
    try:  # both ends must be valid settings (ranges, fixed parameters, conflicts such as profile's schedule=)
        spec.setting(lo), spec.setting(hi)
    except CacheSpecError as exc:
        raise TuneSpecError(f"--dit-cache-tune={raw}: {exc}") from None
    fixed_text = "".join(f",{k}={v}" for k, v in spec.fixed)
    return TuneSpec(name, param, lo, hi, spec.fixed, f"{name}:{param}={lo:g}..{hi:g}{fixed_text}")


def _bounds(raw: str, key: str, value: str) -> tuple[float, float]:
    low, _, high = value.partition("..")
    try:
        lo, hi = float(low), float(high)
    except ValueError:
        raise TuneSpecError(f"--dit-cache-tune={raw}: {key}={value} is not a range of two numbers LO..HI") from None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise TuneSpecError(f"--dit-cache-tune={raw}: {key}={value} must be finite numbers")
    if lo >= hi:
        raise TuneSpecError(f"--dit-cache-tune={raw}: the range {key}={value} is empty or reversed; give LO < HI")
    return lo, hi


def parse_tunes(values: Sequence[str]) -> list[TuneSpec]:
    """Every ``--dit-cache-tune`` value; a piece ``key=value`` without a strategy continues the one before it
    (option lists are split on commas before they reach us)."""
    return parse_each(values, parse_tune, lambda text: TuneSpecError(f"--dit-cache-tune={text} is given twice"))


@dataclass
class TunePoint:
    """One measured setting: its quality, the compute it skipped, its speed-up, and which steps it cached."""

    value: float
    setting: str
    quality: Quality
    skipped: dict[str, float]  # attention, attention_calls, transformer (fractions of the uncached run)
    speedup: float  # uncached seconds over cached seconds of one pass each
    cached_steps: list[float] = field(default_factory=list)  # per step: share of attention calls skipped
    failures: list[str] = field(default_factory=list)  # floors it breaks
    predicted: dict[str, Any] | None = None  # the profile's prediction for this value and its error

    @property
    def passes(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["quality"] = self.quality.as_dict()
        data["passes"] = self.passes
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TunePoint":
        fields_ = {k: v for k, v in data.items() if k != "passes"}
        fields_["quality"] = Quality(**fields_["quality"])
        return cls(**fields_)


@dataclass
class Cliff:
    """A quality drop larger than the cliff size between two neighbouring measured settings."""

    below: float  # the last value before the drop
    above: float  # the first value after it
    psnr_before: float
    psnr_after: float
    skipped_before: float
    skipped_after: float

    @property
    def drop_db(self) -> float:
        return self.psnr_before - self.psnr_after

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "drop_db": self.drop_db}


@dataclass
class TuneResult:
    """The whole search: every measured point, the cliffs, and the recommendation (None: nothing met the
    floors; ``best`` then names the closest one)."""

    tune: str
    floors: Floors
    points: list[TunePoint]
    cliffs: list[Cliff]
    recommendation: TunePoint | None
    best: TunePoint
    runs: int
    candidates: list[float]
    monotone: bool
    notes: list[str] = field(default_factory=list)

    @property
    def frontier(self) -> list[TunePoint]:
        return sorted(self.points, key=lambda p: p.value)

    def as_dict(self) -> dict[str, Any]:
        return {"tune": self.tune, "floors": self.floors.as_dict(), "runs": self.runs, "monotone": self.monotone,
                "candidates": list(self.candidates), "notes": list(self.notes),
                "frontier": [p.as_dict() for p in self.frontier], "cliffs": [c.as_dict() for c in self.cliffs],
                "recommendation": None if self.recommendation is None else self.recommendation.as_dict(),
                "best": self.best.as_dict()}


def grid(lo: float, hi: float, points: int = DEFAULT_GRID) -> list[float]:
    """``points`` values evenly spread over ``[lo, hi]``, both ends included."""
    return [lo + (hi - lo) * i / (points - 1) for i in range(points)]


def candidates_from_breakpoints(lo: float, hi: float, breakpoints: Sequence[float]) -> list[float]:
    """One value per predicted skip pattern: ``lo``, the midpoints between consecutive breakpoints, ``hi``."""
    edges = sorted({lo, hi, *(b for b in breakpoints if lo < b < hi)})
    middles = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
    values = sorted({lo, hi, *middles})
    return values


class _Runs:
    """Measured points by value, each measured once."""

    def __init__(self, evaluate: Callable[[float], TunePoint], floors: Floors) -> None:
        self.evaluate, self.floors = evaluate, floors
        self.points: dict[float, TunePoint] = {}

    def __call__(self, value: float) -> TunePoint:
        key = round(value, 12)
        if key not in self.points:
            point = self.evaluate(value)
            point.failures = self.floors.failures(point.quality)
            self.points[key] = point
        return self.points[key]


def search(evaluate: Callable[[float], TunePoint], tune: TuneSpec, floors: Floors, candidates: Sequence[float], *,
           cliff_db: float = DEFAULT_CLIFF_DB) -> TuneResult:
    """Bisect ``candidates`` (sorted, inside the range) for the last value that keeps the floors, then bisect the
    cliffs. Runs: 2 + log2(len(candidates)) for the boundary, at most :data:`MAX_CLIFF_BISECTIONS` per cliff."""
    if not floors:
        raise TuneSpecError(f"--dit-cache-tune={tune.text}: no quality floors to tune against; give them with "
                            "--dit-cache-floor (e.g. psnr:35,ssim:0.95)")
    values = sorted({float(v) for v in candidates if tune.lo <= v <= tune.hi} | {tune.lo, tune.hi})
    run = _Runs(evaluate, floors)
    good, bad = 0, len(values) - 1
    if run(values[good]).passes and not run(values[bad]).passes:
        while bad - good > 1:
            middle = (good + bad) // 2
            if run(values[middle]).passes:
                good = middle
            else:
                bad = middle
    elif run(values[bad]).passes:
        good = bad
    cliffs = _find_cliffs(run, cliff_db)
    points = sorted(run.points.values(), key=lambda p: p.value)
    passing = [p for p in points if p.passes]
    monotone = all(not (a.passes is False and b.passes) for a, b in zip(points, points[1:]))
    notes = []
    if not monotone:
        notes.append("quality is not monotone in the parameter here: a larger value kept the floors after a smaller "
                     "one broke them; the recommendation is the fastest measured setting that keeps them")
    recommendation = max(passing, key=lambda p: (p.skipped.get("transformer", 0.0), -p.value)) if passing else None
    best = recommendation or max(points, key=lambda p: floors.margin(p.quality))
    if recommendation is not None and recommendation.skipped.get("transformer", 0.0) <= 0.0:
        notes.append(f"the fastest setting that keeps the floors skips no compute: {tune.strategy} does not pay here "
                     "within these floors")
    return TuneResult(tune.text, floors, points, cliffs, recommendation, best, len(run.points), values, monotone, notes)


def _find_cliffs(run: _Runs, cliff_db: float) -> list[Cliff]:
    """Bisect every neighbouring pair whose PSNR drops by more than ``cliff_db`` until the drop lies between two
    settings one cached step apart (a cliff) or no single step of the bisection holds it (a slope)."""
    cliffs = []
    points = sorted(run.points.values(), key=lambda p: p.value)
    for a, b in zip(points, points[1:]):
        if not _drops(a, b, cliff_db):
            continue
        concentrated = True
        for _ in range(MAX_CLIFF_BISECTIONS):
            if _steps_apart(a, b) <= 1:
                break
            middle = run((a.value + b.value) / 2)
            left, right = _drops(a, middle, cliff_db), _drops(middle, b, cliff_db)
            if left and (not right or a.quality.psnr - middle.quality.psnr >= middle.quality.psnr - b.quality.psnr):
                b = middle
            elif right:
                a = middle
            else:
                concentrated = False  # the drop spreads over both halves: a slope, not a cliff
                break
        if concentrated and _drops(a, b, cliff_db):
            cliffs.append(Cliff(a.value, b.value, a.quality.psnr, b.quality.psnr,
                                a.skipped.get("transformer", 0.0), b.skipped.get("transformer", 0.0)))
    return cliffs


def _drops(a: TunePoint, b: TunePoint, cliff_db: float) -> bool:
    before, after = a.quality.psnr, b.quality.psnr
    if not (math.isfinite(before) and math.isfinite(after)):
        return False
    return before - after > cliff_db


def _steps_apart(a: TunePoint, b: TunePoint) -> int:
    """In how many steps the two settings' measured skip patterns differ (2 when a pattern is unknown)."""
    if not a.cached_steps or not b.cached_steps or len(a.cached_steps) != len(b.cached_steps):
        return 2
    return sum(1 for x, y in zip(a.cached_steps, b.cached_steps) if abs(x - y) > 1e-12)
