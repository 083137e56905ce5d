"""How far a re-run may move from its baseline before the regression checks call it a change.

Two levels, chosen with ``--dit-tolerance`` (ini ``dit_tolerance``):

``default``
    Wide enough for what legitimately moves a run on the same device class (thread count, batch size,
    prompt order, ``-n 2``, a save/load round trip, GPU kernel choice), narrow enough to catch a changed
    layer. Cells allow a quarter of the baseline's prompt-to-prompt spread plus a relative floor.
``strict``
    Calibrated on the measured run-to-run noise of the device class (``python -m benchmarks.gate_power``
    measures both the noise and what each level detects). On a CPU, where a re-run repeats to ~1e-6, it
    catches a bf16 round trip or 1e-3 relative weight noise; use it to gate quantised or re-exported
    checkpoints.

The numbers live here, in one table, and are written into every baseline file (``tolerances``), so a
file says which tolerances judged it and a reviewer can tighten or loosen one model's by editing it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

LEVELS = ("default", "strict")

#: level -> device class -> tolerance parameters.
#: cells: per cell of the mean profile, spread_factor * prompt spread + relative_floor * |baseline| + absolute_floor;
#: statistic_*: per suite statistic (CV across prompts), relative_floor * |stored| + absolute_floor;
#: correlation: per shape correlation, an absolute half-width.
TOLERANCE_TABLE: dict[str, dict[str, dict[str, float]]] = {
    "default": {
        "cpu": {"spread_factor": 0.25, "relative_floor": 1e-3, "absolute_floor": 1e-7,
                "statistic_relative": 0.01, "statistic_absolute": 1e-4, "correlation": 0.01},
        "cuda": {"spread_factor": 0.5, "relative_floor": 0.02, "absolute_floor": 1e-5,
                 "statistic_relative": 0.05, "statistic_absolute": 1e-3, "correlation": 0.05},
        "mps": {"spread_factor": 0.5, "relative_floor": 0.02, "absolute_floor": 1e-5,
                "statistic_relative": 0.05, "statistic_absolute": 1e-3, "correlation": 0.05},
    },
    "strict": {
        # CPU re-runs differ by <= ~2e-6 relative (thread count); 1e-5 leaves a 5x margin.
        "cpu": {"spread_factor": 0.0, "relative_floor": 1e-5, "absolute_floor": 1e-9,
                "statistic_relative": 1e-4, "statistic_absolute": 1e-6, "correlation": 1e-4},
        "cuda": {"spread_factor": 0.1, "relative_floor": 5e-3, "absolute_floor": 1e-6,
                 "statistic_relative": 0.01, "statistic_absolute": 1e-4, "correlation": 0.01},
        "mps": {"spread_factor": 0.1, "relative_floor": 5e-3, "absolute_floor": 1e-6,
                "statistic_relative": 0.01, "statistic_absolute": 1e-4, "correlation": 0.01},
    },
}
PARAMETERS = ("spread_factor", "relative_floor", "absolute_floor", "statistic_relative", "statistic_absolute",
              "correlation")
#: device classes without their own row are judged with the GPU row (the wider one)
FALLBACK_CLASS = "cuda"


class ToleranceError(ValueError):
    """An unknown tolerance level, or a tolerance table that cannot be used."""


@dataclass(frozen=True)
class Tolerance:
    """The tolerance parameters of one level on one device class."""

    level: str
    device_class: str
    spread_factor: float
    relative_floor: float
    absolute_floor: float
    statistic_relative: float
    statistic_absolute: float
    correlation: float

    def cells(self) -> dict[str, float]:
        """Keyword arguments of :func:`pytest_ditredundancy.judging.drift.compare_to_baseline`."""
        return {"spread_factor": self.spread_factor, "relative_floor": self.relative_floor,
                "absolute_floor": self.absolute_floor}

    def statistic_bounds(self, stored: float) -> list[float]:
        """Two-sided bounds around a stored suite statistic."""
        half = self.statistic_relative * abs(stored) + self.statistic_absolute
        return [stored - half, stored + half]

    def correlation_bounds(self, stored: float) -> list[float]:
        return [max(-1.0, stored - self.correlation), min(1.0, stored + self.correlation)]

    def describe(self) -> str:
        return f"{self.level} tolerance on {self.device_class}"


def default_table() -> dict[str, dict[str, dict[str, float]]]:
    """A copy of :data:`TOLERANCE_TABLE` (what a new baseline file stores)."""
    return copy.deepcopy(TOLERANCE_TABLE)


def check_level(level: str) -> str:
    if level not in LEVELS:
        raise ToleranceError(f"unknown tolerance level {level!r}: use one of {', '.join(LEVELS)} (--dit-tolerance)")
    return level


def resolve(table: dict[str, Any] | None, level: str, device_class: str) -> Tolerance:
    """The tolerance of ``level`` for ``device_class`` from a (validated) table, else from the built-in one."""
    check_level(level)
    table = table or TOLERANCE_TABLE
    rows = table.get(level) or TOLERANCE_TABLE[level]
    row = rows.get(device_class) or rows.get(FALLBACK_CLASS) or TOLERANCE_TABLE[level][FALLBACK_CLASS]
    cls = device_class if device_class in rows else FALLBACK_CLASS
    return Tolerance(level=level, device_class=cls, **{name: float(row[name]) for name in PARAMETERS})
