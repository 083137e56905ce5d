"""Drift against a stored baseline: which ``[kind, layer, step_pair]`` cells left their tolerance, and how
to say so in a few lines. Two-sided: a cell that became more redundant drifted as much as one that became less.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np


@dataclass
class CellDrift:
    """One ``[kind, layer, step_pair]`` cell whose value left its baseline tolerance."""

    kind: str
    layer: str
    step_pair: int
    baseline: float
    current: float
    tolerance: float

    @property
    def excess(self) -> float:
        """|current - baseline| in units of tolerance (inf when only one side was measured)."""
        if np.isnan(self.baseline) or np.isnan(self.current):
            return 0.0 if np.isnan(self.baseline) and np.isnan(self.current) else float("inf")
        diff = 0.0 if self.current == self.baseline else abs(self.current - self.baseline)
        return diff / self.tolerance if self.tolerance > 0 else (0.0 if diff == 0 else float("inf"))


def cell_tolerance(baseline_mean: np.ndarray, baseline_spread: np.ndarray, *, spread_factor: float,
                   relative_floor: float, absolute_floor: float) -> np.ndarray:
    """Per cell: ``spread_factor * spread + relative_floor * |baseline| + absolute_floor`` (unmeasured cells
    contribute no spread or magnitude)."""
    return (spread_factor * np.nan_to_num(np.asarray(baseline_spread, np.float64), nan=0.0, posinf=0.0)
            + relative_floor * np.nan_to_num(np.abs(np.asarray(baseline_mean, np.float64)), nan=0.0, posinf=0.0)
            + absolute_floor)


def compare_to_baseline(current_mean: np.ndarray, baseline_mean: np.ndarray, baseline_spread: np.ndarray, *,
                        kinds: list[str], layers: list[str], spread_factor: float, relative_floor: float,
                        absolute_floor: float) -> list[CellDrift]:
    """Cells outside ``spread_factor * spread + relative_floor * |baseline| + absolute_floor``, worst first.

    The spread term allows the prompt-to-prompt noise the baseline itself showed; the floors keep a
    zero-spread cell from failing on rounding. Measured on one side only: drift with infinite excess.
    """
    cur, base = np.asarray(current_mean, np.float64), np.asarray(baseline_mean, np.float64)
    spread = np.asarray(baseline_spread, np.float64)
    names = ("kind", "layer", "step pair")
    if cur.ndim != 3 or base.ndim != 3 or spread.ndim != 3:
        raise ValueError(f"arrays must be [kind, layer, step_pair], got current {cur.shape}, baseline "
                         f"{base.shape}, spread {spread.shape}")
    for label, arr in (("current", cur), ("baseline spread", spread)):
        for dim, (x, y) in enumerate(zip(arr.shape, base.shape)):
            if x != y:
                raise ValueError(f"{label} has {x} {names[dim]}s but the baseline has {y} (dimension {names[dim]})")
    for dim, labels in ((0, kinds), (1, layers)):
        if len(labels) != base.shape[dim]:
            raise ValueError(f"{len(labels)} {names[dim]} names for {base.shape[dim]} {names[dim]}s")
    tolerance = cell_tolerance(base, spread, spread_factor=spread_factor, relative_floor=relative_floor,
                               absolute_floor=absolute_floor)
    cur_nan, base_nan = np.isnan(cur), np.isnan(base)
    with np.errstate(invalid="ignore"):
        diff = np.where(cur == base, 0.0, np.abs(cur - base))
    bad = (cur_nan != base_nan) | (~cur_nan & ~base_nan & (diff > tolerance))
    drifts = [CellDrift(kinds[k], layers[l], int(s), float(base[k, l, s]), float(cur[k, l, s]),
                        float(tolerance[k, l, s])) for k, l, s in zip(*np.nonzero(bad))]
    return sorted(drifts, key=lambda d: -d.excess)


def _fmt(x: float) -> str:
    return "n/a" if np.isnan(x) else f"{x:.4g}"


def summarize_drift(drifts: list[CellDrift], layers: list[str], max_rows: int = 12) -> str:
    """A plain-text report for CI logs: how many cells drifted, where drift starts, the worst cells."""
    if not drifts:
        return "all cells within tolerance of the baseline"
    depth = {name: i for i, name in enumerate(layers)}
    per_kind, per_layer = Counter(d.kind for d in drifts), Counter(d.layer for d in drifts)
    first = min(per_layer, key=lambda name: depth.get(name, len(layers)))
    where = f" (layer {depth[first] + 1} of {len(layers)})" if first in depth else ""
    ranked = sorted(per_layer, key=lambda name: (-per_layer[name], depth.get(name, len(layers))))
    largest = drifts[0].layer  # drifts are sorted by excess
    lines = [
        f"{len(drifts)} cell{'s' if len(drifts) != 1 else ''} out of tolerance "
        f"({', '.join(f'{k}: {n}' for k, n in per_kind.items())})",
        f"largest drift at layer {largest}",
        f"drift starts at layer {first}{where} (a changed layer alters the trajectory, so later steps of "
        "earlier layers drift too)",
        "layers by drifting cells: " + ", ".join(f"{name} ({per_layer[name]})" for name in ranked[:8])
        + (f", ... ({len(ranked) - 8} more layers)" if len(ranked) > 8 else ""),
        f"worst {min(max_rows, len(drifts))}:",
    ]
    rows = [("kind", "layer", "step", "baseline", "now", "change", "tolerance")]
    for d in drifts[:max_rows]:
        if np.isnan(d.baseline) or np.isnan(d.current):
            change = "unmeasured" if np.isnan(d.current) else "new"
        elif d.baseline != 0:
            ratio = d.current / abs(d.baseline)  # a ratio: never a percentage hundreds of digits long
            change = f"{(ratio - 1) * 100:+.1f}%" if 1e-3 <= abs(ratio) <= 1e3 else f"x{ratio:.3g}"
        else:
            change = "from 0"
        rows.append((d.kind, d.layer, str(d.step_pair), _fmt(d.baseline), _fmt(d.current), change,
                     _fmt(d.tolerance)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  " + "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
              .rstrip() for r in rows]
    if len(drifts) > max_rows:
        lines.append(f"  ... and {len(drifts) - max_rows} more")
    return "\n".join(lines)
