"""Cache tuning in the report: per search, the summary ``--dit-json`` carries and what the page draws.

A tuning record (suite ``cache_tune``) carries the whole search: every measured setting, the cliffs, the
recommendation, the transfer checks and, on a gate run, the stored frontier. The summary keeps what a reader acts
on (the setting, its speed-up, skipped compute and quality, the floors, the line of code); the view is what the
page's script draws (the frontier, the predicted and measured skip patterns). Both are read from the record alone,
so a page rebuilt from the JSON document draws the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..cache.floors import FLOOR_METRICS
from ..cache.quality import PSNR_CAP

SUITE = "cache_tune"
#: how the page names each floored metric and its unit
METRIC_LABELS = {"psnr": ("PSNR", " dB"), "ssim": ("SSIM", ""), "adherence": ("adherence", ""),
                 "latent_mse": ("latent MSE", "")}


def floor_texts(floors: dict[str, float] | None, skip: Sequence[str] = ()) -> list[str]:
    """``{"psnr": 35, "latent_mse": 1e-3}`` -> ``["PSNR ≥ 35 dB", "latent MSE ≤ 0.001"]`` (a ceiling reads ≤)."""
    out = []
    for name in [*FLOOR_METRICS, *sorted(set(floors or {}) - set(FLOOR_METRICS))]:
        if name in skip or (floors or {}).get(name) is None:
            continue
        label, unit = METRIC_LABELS.get(name, (name, ""))
        sign = "≤" if FLOOR_METRICS.get(name, ("min",))[0] == "max" else "≥"
        out.append(f"{label} {sign} {floors[name]:g}{unit}")
    return out


def _shares(values: Any) -> list[float] | None:
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                               for v in values):
        return None
    return [float(v) for v in values]


def _flags(indices: Any, steps: int) -> list[float] | None:
    """Cached step indices -> per step 1.0 (cached) or 0.0."""
    if not isinstance(indices, list):
        return None
    chosen = {int(i) for i in indices}
    return [1.0 if s in chosen else 0.0 for s in range(steps)]


def _error(given: dict[str, Any] | None, predicted: list[float] | None, measured: list[float]) -> dict[str, Any] | None:
    """Steps predicted cached, measured cached and wrong (cached in exactly one of the two), from the prediction's
    own error where it states them, else counted from the two patterns."""
    if given is None and predicted is None:
        return None
    given = dict(given or {})
    counted = predicted is not None and len(predicted) == len(measured)
    want = [p > 0 for p in predicted] if counted else []
    have = [m > 0 for m in measured]
    steps = given.get("steps") if isinstance(given.get("steps"), int) else len(measured)
    wrong = given.get("wrong", given.get("steps_wrong"))
    if wrong is None and counted:
        wrong = sum(a != b for a, b in zip(want, have))
    out = {"steps": steps, "wrong": wrong,
           "predicted_cached": given.get("predicted_cached", sum(want) if counted else None),
           "measured_cached": given.get("measured_cached", sum(have)),
           "right_share": given.get("right_share", None if wrong is None or not steps else 1 - wrong / steps)}
    if given.get("fraction_error") is not None:
        out["fraction_error"] = given["fraction_error"]
    return out


def pattern(point: dict[str, Any] | None) -> dict[str, Any] | None:
    """The measured skip pattern of one point (per step, the share of attention calls skipped) beside the
    profile's prediction for it, raw and calibrated where the prediction was calibrated, with their errors.
    ``predicted`` is None where no prediction exists for the strategy."""
    if not point:
        return None
    measured = _shares(point.get("cached_steps")) or []
    given = point.get("predicted")
    out: dict[str, Any] = {"value": point.get("value"), "measured": measured, "predicted": None,
                           "calibrated": None, "error": None, "calibrated_error": None, "scale": None,
                           "calibrated_on": None, "in_sample": False, "mismatch": None}
    if not isinstance(given, dict):
        return out
    steps = given.get("steps") if _shares(given.get("steps")) is not None else given.get("fractions")
    predicted = _shares(steps)
    calibrated = _shares(given.get("calibrated_fractions")) or _flags(given.get("calibrated_steps"), len(measured))
    out.update(predicted=predicted, calibrated=calibrated if isinstance(given.get("calibrated"), dict) else None,
               error=_error(given.get("error") or given.get("raw"), predicted, measured),
               calibrated_error=_error(given.get("calibrated"), calibrated, measured)
               if isinstance(given.get("calibrated"), dict) else None,
               scale=given.get("scale"), calibrated_on=given.get("calibrated_on"))
    out["in_sample"] = out["calibrated_on"] is not None and out["calibrated_on"] == point.get("value")
    if predicted is not None and measured and len(predicted) != len(measured):
        out["mismatch"] = (f"the prediction has {len(predicted)} steps, the measured pattern {len(measured)}: they "
                           "cannot be compared step by step")
    return out


def _point(point: dict[str, Any] | None) -> dict[str, Any] | None:
    if not point:
        return None
    failures = list(point.get("failures") or [])
    return {"setting": point.get("setting"), "value": point.get("value"),
            "speedup_one_pass": point.get("speedup"), "skipped": dict(point.get("skipped") or {}),
            "quality": dict(point.get("quality") or {}), "failures": failures, "passes": not failures}


def mode(record: dict[str, Any]) -> str:
    """``gate``: the stored frontier re-measured; ``tuned``: searched and stored; ``searched``: searched, nothing
    stored (no setting met the floors)."""
    if record.get("stored_frontier") is not None:
        return "gate"
    return "tuned" if record.get("updated") else "searched"


def search_summary(record: dict[str, Any]) -> dict[str, Any]:
    """One search for ``--dit-json``: the recommendation (setting, value, timed speed-up, skipped compute,
    quality), the floors, runs, cliffs, transfer verdicts and the line of code; ``best`` names the closest setting
    when nothing met the floors."""
    chosen = record.get("recommendation")
    shown = chosen or record.get("best")
    seconds = record.get("seconds") or {}
    recommendation = _point(chosen)
    if recommendation is not None:
        recommendation.update(speedup=record.get("speedup"), repeats=len(seconds.get("cached") or []) or None)
    prediction = pattern(shown)
    return {
        "tune": record.get("tune"), "strategy": record.get("strategy"), "parameter": record.get("parameter"),
        "range": record.get("range"), "settings_key": record.get("settings_key"), "nodeid": record.get("nodeid"),
        "passed": bool(record.get("passed")), "mode": mode(record), "floors": dict(record.get("floors") or {}),
        "met_floors": recommendation is not None and recommendation["passes"],
        "recommendation": recommendation, "best": None if chosen else _point(record.get("best")),
        "code": record.get("code"), "runs": record.get("runs"), "points": len(record.get("frontier") or []),
        "monotone": record.get("monotone"), "notes": list(record.get("notes") or []),
        "cliffs": [dict(c) for c in record.get("cliffs") or []],
        "transfer": [_transfer(t) for t in record.get("transfer") or []],
        "prediction": None if prediction is None or prediction["error"] is None else
        {k: prediction[k] for k in ("value", "error", "calibrated_error", "scale", "calibrated_on", "in_sample")},
    }


def _transfer(check: dict[str, Any]) -> dict[str, Any]:
    """One transfer verdict: does the tuned value keep the floors at that variant, and what would tuning there pick."""
    keep = ("variant", "settings_key", "value", "holds", "failures", "skipped", "tuned_value", "tuned_skipped")
    return {**{k: check.get(k) for k in keep}, "psnr": (check.get("quality") or {}).get("psnr")}


def _drawn(point: dict[str, Any]) -> dict[str, Any]:
    quality, skipped = point.get("quality") or {}, point.get("skipped") or {}
    return {"value": point.get("value"), "setting": point.get("setting"), "x": skipped.get("transformer"),
            "attention": skipped.get("attention"), "psnr": quality.get("psnr"), "ssim": quality.get("ssim"),
            "latent_mse": quality.get("latent_mse"), "adherence": quality.get("adherence"),
            "speedup": point.get("speedup"), "failures": list(point.get("failures") or []),
            "passes": not point.get("failures")}


def search_view(record: dict[str, Any]) -> dict[str, Any]:
    """What the page draws for one search: the frontier (x: transformer compute skipped, y: PSNR), the floors,
    the recommended or closest point, the cliffs, the stored frontier (gate runs) and the shown point's skip
    patterns."""
    chosen = record.get("recommendation")
    shown = chosen or record.get("best") or {}
    return {"tune": record.get("tune"), "strategy": record.get("strategy"), "parameter": record.get("parameter"),
            "floors": dict(record.get("floors") or {}), "psnr_cap": PSNR_CAP,
            "points": [_drawn(p) for p in record.get("frontier") or []],
            "stored": [_drawn(p) for p in record["stored_frontier"]] if record.get("stored_frontier") else None,
            "recommended": None if chosen is None else chosen.get("value"),
            "closest": None if chosen is not None else shown.get("value"),
            "cliffs": [dict(c) for c in record.get("cliffs") or []], "pattern": pattern(shown)}


def headline(records: list[dict[str, Any]]) -> str:
    """The summary table's cell: per search, the recommended setting with its speed-up, or that nothing met."""
    parts = []
    for r in records:
        chosen = r.get("recommendation")
        if not chosen:
            parts.append(f"{r.get('tune')}: nothing met the floors")
            continue
        speedup = r.get("speedup") if r.get("speedup") is not None else chosen.get("speedup")
        skipped = (chosen.get("skipped") or {}).get("transformer")
        text = f"{chosen.get('setting')}"
        if speedup is not None:
            text += f" ×{speedup:.3g}"
        if skipped is not None:
            text += f", {skipped:.0%} skipped"
        parts.append(text + ("" if not chosen.get("failures") else " (breaks the floors)"))
    return " · ".join(parts)
