"""Judging a tuning against its stored baseline, and a cache setting without a stored entry against the floors.

A stored tuning holds its floors, its measured frontier and its recommendation. A later run re-measures the
frontier's settings: the recommendation must still keep the floors, and every point must stay within the
tolerance of its stored quality and skipped compute, both ways (a setting that suddenly skips more, or
suddenly matches better, means the model or the cache changed). Each failure names the numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from .floors import Floors, Quality
from .tuning import TunePoint


@dataclass(frozen=True)
class FrontierTolerance:
    """How far a re-measured point may move: PSNR by ``max(psnr_db, psnr_relative * PSNR)``, skipped compute by
    ``skipped`` (fraction), SSIM by ``ssim``."""

    psnr_db: float
    psnr_relative: float
    skipped: float
    ssim: float = 0.02

    @classmethod
    def from_gate(cls, tolerance: dict[str, float]) -> "FrontierTolerance":
        return cls(tolerance["psnr_db"], tolerance["psnr_relative"], tolerance["skipped"])


def _f(value: float | None, unit: str = "") -> str:
    if value is None or not math.isfinite(value):
        return "nan"
    return f"{value:.4g}{unit}"


def frontier_moves(stored: Sequence[TunePoint], measured: Sequence[TunePoint], tol: FrontierTolerance) -> list[str]:
    """One line per stored setting whose re-measured quality, skipped compute or floor verdict moved."""
    by_value = {round(p.value, 12): p for p in measured}
    lines = []
    for old in stored:
        new = by_value.get(round(old.value, 12))
        if new is None:
            lines.append(f"  {old.setting}: not re-measured")
            continue
        changes = []
        a, b = old.quality.psnr, new.quality.psnr
        if not math.isfinite(b) or abs(a - b) > max(tol.psnr_db, tol.psnr_relative * abs(a)):
            changes.append(f"PSNR {_f(a, ' dB')} -> {_f(b, ' dB')}")
        if not math.isfinite(new.quality.ssim) or abs(old.quality.ssim - new.quality.ssim) > tol.ssim:
            changes.append(f"SSIM {_f(old.quality.ssim)} -> {_f(new.quality.ssim)}")
        was, now = old.skipped.get("transformer", 0.0), new.skipped.get("transformer", 0.0)
        if abs(was - now) > tol.skipped:
            changes.append(f"compute skipped {was:.1%} -> {now:.1%}")
        if old.passes != new.passes:
            changes.append("now keeps the floors" if new.passes else "now breaks the floors (" + "; ".join(new.failures)
                           + ")")
        if changes:
            lines.append(f"  {old.setting}: " + ", ".join(changes))
    return lines


def recommendation_failure(stored: TunePoint | None, measured: Sequence[TunePoint], floors: Floors) -> str | None:
    """The failure line when the stored recommendation no longer keeps the floors."""
    if stored is None:
        return None
    now = next((p for p in measured if round(p.value, 12) == round(stored.value, 12)), None)
    if now is None:
        return f"  the stored recommendation {stored.setting} was not re-measured"
    broken = floors.failures(now.quality)
    if not broken:
        return None
    return (f"  the stored recommendation {stored.setting} no longer keeps the floors ({floors}): "
            + "; ".join(broken) + f" (stored: PSNR {_f(stored.quality.psnr, ' dB')}, SSIM {_f(stored.quality.ssim)}"
            + (f", adherence {_f(stored.quality.adherence)}" if stored.quality.adherence is not None else "") + ")")


def interpolated(points: Sequence[TunePoint], value: float, metric: str) -> float | None:
    """``metric`` of the stored frontier at ``value``, linear between the two measured neighbours; None outside."""
    ordered = sorted(points, key=lambda p: p.value)
    for a, b in zip(ordered, ordered[1:]):
        if a.value <= value <= b.value:
            va, vb = getattr(a.quality, metric), getattr(b.quality, metric)
            if va is None or vb is None:
                return None
            share = 0.0 if b.value == a.value else (value - a.value) / (b.value - a.value)
            return va + share * (vb - va)
    exact = [getattr(p.quality, metric) for p in ordered if p.value == value]
    return exact[0] if exact else None


def judge_unstored(setting: str, quality: Quality, skipped: float, floors: Floors, floors_from: str,
                   stored_entries: dict[str, dict[str, Any]], frontier: tuple[str, float, Sequence[TunePoint]] | None
                   ) -> tuple[list[str], str]:
    """A setting with no stored entry of its own: the floors decide; the message compares it with the stored
    settings (and with the stored tuning's frontier at its value, when one covers it).

    Returns (failures, comparison text)."""
    failures = [f"  {line}" for line in floors.failures(quality)]
    lines = [f"{setting} has no stored entry of its own; judged against the floors {floors} ({floors_from}): "
             f"PSNR {_f(quality.psnr, ' dB')}, SSIM {_f(quality.ssim)}, latent MSE {_f(quality.latent_mse)}"
             + (f", adherence {_f(quality.adherence)}" if quality.adherence is not None else "")
             + f", attention compute skipped {skipped:.1%}"]
    for text, entry in sorted(stored_entries.items()):
        lines.append(f"  stored {text}: PSNR {_f(entry.get('psnr'), ' dB')}, SSIM {_f(entry.get('ssim'))}, "
                     f"skipped {_percent(entry.get('skipped_attention'))}")
    if frontier is not None:
        tune_text, value, points = frontier
        expected = interpolated(points, value, "psnr")
        if expected is not None:
            lines.append(f"  the stored tuning {tune_text} measured PSNR {_f(expected, ' dB')} at this value")
    return failures, "\n".join(lines)


def _percent(value: Any) -> str:
    return f"{value:.1%}" if isinstance(value, (int, float)) and math.isfinite(value) else "nan"
