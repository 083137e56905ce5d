"""A static cache schedule derived from a redundancy profile: which (layer, step) reuses the previous step.

The cost of reusing layer ``l``'s attention output at step ``s`` is the relative L1 change of that output
between steps ``s - 1`` and ``s`` (kind ``a``, metric ``rel_l1``, averaged over prompts and CFG branches).
Cells are taken cheapest first until the budget (fraction of attention calls skipped) or the error
threshold (sum of the skipped cells' costs, the *predicted error*) would be exceeded. Step 0 is never
skipped (there is nothing to reuse) and unmeasured cells are never skipped. Because the order is fixed
and the schedule is a prefix of it, a larger budget always skips a superset of a smaller one.

The schedule is data: it is saved as JSON, stored in baselines, validated against the model it runs on.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..capture.profile import RedundancyProfile
from ..io import FileReadError, atomic_write_text, read_json

SCHEMA = "pytest-ditredundancy/cache-schedule"
SCHEMA_VERSION = 1


class ScheduleError(ValueError):
    """A schedule that does not fit the model, run or request; the message says what differs."""


@dataclass
class CacheSchedule:
    """``mask[layer][step]`` True: at that step the layer returns its previous output instead of computing."""

    model: str
    layers: list[str]
    steps: int
    mask: list[list[bool]]
    budget: float | None = None
    threshold: float | None = None
    predicted_error: float = 0.0
    costs: list[list[float | None]] | None = None  # [layer][step]; step 0 is None (no previous step)
    kind: str = "a"
    metric: str = "rel_l1"
    order: str = "cheapest"  # "costliest": the inverse ranking, a contrast for the error sweep
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        mask = np.asarray(self.mask, dtype=bool)
        if mask.shape != (len(self.layers), self.steps):
            raise ScheduleError(f"schedule mask has shape {mask.shape}, expected (layers={len(self.layers)}, "
                                f"steps={self.steps})")
        if self.steps and mask[:, 0].any():
            raise ScheduleError("a schedule may not skip step 0: there is no previous output to reuse")
        self.mask = mask.tolist()

    # -- numbers -------------------------------------------------------------------------------------------
    @property
    def array(self) -> np.ndarray:
        return np.asarray(self.mask, dtype=bool)

    @property
    def skipped_cells(self) -> int:
        return int(self.array.sum())

    @property
    def total_cells(self) -> int:
        return len(self.layers) * self.steps

    @property
    def skipped_fraction(self) -> float:
        return self.skipped_cells / self.total_cells if self.total_cells else 0.0

    def cost_array(self) -> np.ndarray | None:
        if self.costs is None:
            return None
        return np.array([[np.nan if v is None else float(v) for v in row] for row in self.costs], dtype=np.float64)

    # -- checks ---------------------------------------------------------------------------------------------
    def validate(self, layers: Sequence[str], steps: int | None = None, model: str | None = None) -> None:
        """Refuse a schedule made for another model (layer names differ) or another step count."""
        layers = list(layers)
        if layers != self.layers:
            first = next((f"schedule {a!r}, model {b!r}" for a, b in zip(self.layers, layers) if a != b),
                         f"{len(self.layers)} vs {len(layers)} layers")
            raise ScheduleError(
                f"cache schedule was derived for {self.model!r} with {len(self.layers)} attention layers; "
                f"{model or 'this model'} has {len(layers)} (first difference: {first}). Derive a new schedule "
                "for this model (--dit-cache=profile:budget=...) or update its baseline.")
        if steps is not None and steps != self.steps:
            raise ScheduleError(f"cache schedule of {self.model!r} covers {self.steps} denoising steps, this run has "
                                f"{steps}; derive it again for --dit-steps={steps}")

    # -- persistence ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["predicted_error"] = _finite(self.predicted_error)
        if self.costs is not None:
            data["costs"] = [[_finite(v) for v in row] for row in self.costs]
        return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, **data}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n"

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(Path(path), self.to_json())

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> "CacheSchedule":
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise ScheduleError(f"{source} is not a pytest-ditredundancy cache schedule (schema {SCHEMA!r} missing)")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ScheduleError(f"{source} has cache-schedule version {data.get('schema_version')!r}; this version "
                                f"reads {SCHEMA_VERSION}")
        fields_ = {k: v for k, v in data.items() if k not in ("schema", "schema_version")}
        try:
            return cls(**fields_)
        except TypeError as exc:
            raise ScheduleError(f"{source} is a damaged cache schedule ({exc})") from None

    @classmethod
    def load(cls, path: str | Path) -> "CacheSchedule":
        path = Path(path)
        try:
            data = read_json(path, "cache schedule", fix="derive it again: schedule_from_profile(profile).save(path)",
                             path_fix="pass the file a schedule's save(path) wrote")
        except FileReadError as exc:
            raise ScheduleError(str(exc)) from None
        return cls.from_dict(data, source=str(path))


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


# -- derivation ----------------------------------------------------------------------------------------------
def profile_costs(profile: RedundancyProfile, kind: str = "a", metric: str = "rel_l1") -> np.ndarray:
    """``[layer, step]`` cost of reusing step ``s - 1``'s output at step ``s``; column 0 and unmeasured cells NaN."""
    if kind not in profile.kinds:
        raise ScheduleError(f"the profile has no kind {kind!r} (it has {', '.join(profile.kinds)}); a cache "
                            "schedule needs the attention output series")
    k = profile.kinds.index(kind)
    values = np.where(profile.computed[:, :, k], profile.values[metric][:, :, k], np.nan).astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cells stay NaN: never skipped
        pairs = np.nanmean(values, axis=(0, 1))  # [layer, step_pair]
    return np.concatenate([np.full((pairs.shape[0], 1), np.nan), pairs], axis=1)


def skip_order(costs: np.ndarray) -> list[tuple[int, int]]:
    """Cells that may be skipped, cheapest first (ties: earlier step, then earlier layer)."""
    layers, steps = costs.shape
    cells = [(float(costs[l, s]), s, l) for s in range(1, steps) for l in range(layers) if np.isfinite(costs[l, s])]
    return [(l, s) for _, s, l in sorted(cells)]


def derive_mask(costs: np.ndarray, *, budget: float | None = None, threshold: float | None = None,
                order: str = "cheapest") -> np.ndarray:
    """The greedy mask: cheapest cells first, stopping at the budget or the error threshold.

    ``order="costliest"`` takes the most-changing cells first: the same budget with a worse predicted error,
    which the error sweep uses to test whether the profile's ranking predicts the measured error."""
    costs = np.asarray(costs, dtype=np.float64)
    if budget is not None and not 0.0 <= budget < 1.0:
        raise ScheduleError(f"budget must lie in [0, 1) (fraction of attention calls skipped), got {budget}")
    if threshold is not None and threshold < 0:
        raise ScheduleError(f"threshold must be >= 0, got {threshold}")
    if budget is None and threshold is None:
        raise ScheduleError("give a budget or a threshold")
    if order not in ("cheapest", "costliest"):
        raise ScheduleError(f"order must be 'cheapest' or 'costliest', got {order!r}")
    cells = skip_order(costs)
    if order == "costliest":
        cells.reverse()
    limit = len(cells) if budget is None else min(len(cells), int(math.floor(budget * costs.size + 1e-9)))
    mask = np.zeros(costs.shape, dtype=bool)
    total = 0.0
    for l, s in cells[:limit]:
        if threshold is not None and total + costs[l, s] > threshold:
            break
        total += costs[l, s]
        mask[l, s] = True
    return mask


def predicted_error(costs: np.ndarray, mask: np.ndarray) -> float:
    """Sum of the skipped cells' costs: the first-order error the profile predicts for the schedule."""
    return float(np.nansum(np.where(mask, costs, 0.0)))


def schedule_from_costs(costs: np.ndarray, layers: Sequence[str], *, model: str, budget: float | None = None,
                        threshold: float | None = None, source: str = "", order: str = "cheapest") -> CacheSchedule:
    costs = np.asarray(costs, dtype=np.float64)
    mask = derive_mask(costs, budget=budget, threshold=threshold, order=order)
    return CacheSchedule(model=model, layers=list(layers), steps=int(costs.shape[1]), mask=mask.tolist(),
                         budget=budget, threshold=threshold, predicted_error=predicted_error(costs, mask),
                         costs=[[_finite(v) for v in row] for row in costs], source=source, order=order)


def schedule_from_profile(profile: RedundancyProfile, *, budget: float | None = None, threshold: float | None = None,
                          model: str | None = None) -> CacheSchedule:
    """Derive a schedule from a profile (``rel_l1`` of the attention output)."""
    return schedule_from_costs(profile_costs(profile), profile.layers, model=model or profile.metadata.model,
                               budget=budget, threshold=threshold, source="profile")


def with_budget(schedule: CacheSchedule, budget: float, order: str = "cheapest") -> CacheSchedule:
    """The same costs, another budget (the budget sweep re-derives from the stored costs)."""
    costs = schedule.cost_array()
    if costs is None:
        raise ScheduleError("this schedule carries no costs, so it cannot be re-derived for another budget")
    return schedule_from_costs(costs, schedule.layers, model=schedule.model, budget=budget, source=schedule.source,
                               order=order)


def probe_cells(schedule: CacheSchedule, count: int) -> list[tuple[int, int]]:
    """``count`` skippable cells spread evenly over the cost ranking, cheapest to costliest (deterministic).

    The premise test skips each alone and compares its cost with the error it causes. Spreading the probes
    over the whole ranking (not only the cheap cells a budget would pick) gives the rank correlation its
    full range; a profile whose costs carry no information about the errors then scores about 0."""
    costs = schedule.cost_array()
    if costs is None:
        raise ScheduleError("this schedule carries no costs, so there is nothing to test the premise with")
    if count < 3:
        raise ScheduleError(f"the premise test needs at least 3 probe cells, got {count}")
    ranked = skip_order(costs)
    if len(ranked) <= count:
        return ranked
    picks = np.unique(np.round(np.linspace(0, len(ranked) - 1, count)).astype(int))
    return [ranked[i] for i in picks]


def single_cell(schedule: CacheSchedule, cell: tuple[int, int]) -> CacheSchedule:
    """A schedule that skips only ``cell`` (layer, step), with that cell's cost as its predicted error."""
    costs = schedule.cost_array()
    mask = np.zeros((len(schedule.layers), schedule.steps), dtype=bool)
    mask[cell] = True
    return CacheSchedule(model=schedule.model, layers=list(schedule.layers), steps=schedule.steps, mask=mask.tolist(),
                         predicted_error=predicted_error(costs, mask), costs=schedule.costs, source=schedule.source)

