"""What a baseline file must contain, checked when it is read.

A gate must not trust a file it reads: a hand edit, a merge conflict or a file of another plugin version
can put a string where a number belongs, drop a field, or write ``Infinity`` into a tolerance, which would
silently disable the check it feeds. :func:`validate_baseline` walks every section the suites read and
returns the first problem as a path into the document (``profile.mean.k[3]``), so the error names the spot.
Sections this version does not know are left alone (a newer plugin may have written them).
"""

from __future__ import annotations

import math
from typing import Any, Callable

from .tolerances import LEVELS, PARAMETERS

SHAPE_SUITES = ("step_stability", "scheduler_stability")


class SchemaProblem(ValueError):
    """One problem in a baseline document; ``where`` is the path of the offending value."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where, self.problem = where, problem


def _fail(where: str, problem: str) -> None:
    raise SchemaProblem(where, problem)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _dict(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        _fail(where, f"expected an object, found {_type_name(value)}")
    return value


def _list(value: Any, where: str, length: int | None = None) -> list:
    if not isinstance(value, list):
        _fail(where, f"expected a list, found {_type_name(value)}")
    if length is not None and len(value) != length:
        _fail(where, f"expected {length} entries, found {len(value)}")
    return value


def _field(data: dict, name: str, where: str) -> Any:
    if name not in data:
        _fail(f"{where}.{name}" if where else name, "missing")
    return data[name]


def _number(value: Any, where: str, *, minimum: float | None = None, maximum: float | None = None,
            nullable: bool = False) -> float | None:
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(where, f"expected a number, found {_type_name(value)} {value!r}")
    if not math.isfinite(value):
        _fail(where, f"expected a finite number, found {value!r}")
    if minimum is not None and value < minimum:
        _fail(where, f"{value!r} is below {minimum}")
    if maximum is not None and value > maximum:
        _fail(where, f"{value!r} is above {maximum}")
    return float(value)


def _strings(value: Any, where: str) -> list[str]:
    items = _list(value, where)
    if not items:
        _fail(where, "is empty")
    for i, item in enumerate(items):
        if not isinstance(item, str):
            _fail(f"{where}[{i}]", f"expected a string, found {_type_name(item)}")
    if len(set(items)) != len(items):
        _fail(where, "has duplicate names")
    return items


def _bounds(value: Any, where: str, *, open_ends: bool = False) -> None:
    """``[low, high]``; with ``open_ends`` either side may be null (no limit on that side)."""
    low, high = (_number(v, f"{where}[{i}]", nullable=open_ends) for i, v in enumerate(_list(value, where, 2)))
    if low is not None and high is not None and low > high:
        _fail(where, f"low bound {low} is above high bound {high}")


def validate_tolerances(table: Any, where: str = "tolerances") -> None:
    for level, rows in _dict(table, where).items():
        if level not in LEVELS:
            _fail(f"{where}.{level}", f"unknown tolerance level (known: {', '.join(LEVELS)})")
        for device_class, row in _dict(rows, f"{where}.{level}").items():
            row = _dict(row, f"{where}.{level}.{device_class}")
            for name in PARAMETERS:
                _number(_field(row, name, f"{where}.{level}.{device_class}"),
                        f"{where}.{level}.{device_class}.{name}", minimum=0.0)


def validate_profile_section(section: Any, where: str = "profile") -> None:
    section = _dict(section, where)
    kinds = _strings(_field(section, "kinds", where), f"{where}.kinds")
    layers = _strings(_field(section, "layers", where), f"{where}.layers")
    steps = _field(section, "step_pairs", where)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        _fail(f"{where}.step_pairs", f"expected a whole number >= 1, found {steps!r}")
    for name in ("metric", "branch"):
        if not isinstance(_field(section, name, where), str):
            _fail(f"{where}.{name}", f"expected a string, found {_type_name(section[name])}")
    for part, minimum in (("mean", 0.0), ("spread", 0.0)):
        table = _dict(_field(section, part, where), f"{where}.{part}")
        for kind in kinds:
            rows = _list(_field(table, kind, f"{where}.{part}"), f"{where}.{part}.{kind}", len(layers))
            for l, row in enumerate(rows):
                for s, value in enumerate(_list(row, f"{where}.{part}.{kind}[{l}]", steps)):
                    _number(value, f"{where}.{part}.{kind}[{l}][{s}]", minimum=minimum, nullable=True)
        extra = sorted(set(table) - set(kinds))
        if extra:
            _fail(f"{where}.{part}", f"has kinds {extra} that {where}.kinds does not list")
    if "normalized_times" in section:
        for i, value in enumerate(_list(section["normalized_times"], f"{where}.normalized_times", steps)):
            _number(value, f"{where}.normalized_times[{i}]", minimum=0.0, maximum=1.0, nullable=True)


def _prompt_stability(section: Any, where: str) -> None:
    for kind, entry in _dict(section, where).items():
        entry = _dict(entry, f"{where}.{kind}")
        _number(_field(entry, "robust_cv", f"{where}.{kind}"), f"{where}.{kind}.robust_cv", minimum=0.0)
        if "paper_cv" in entry:
            _number(entry["paper_cv"], f"{where}.{kind}.paper_cv", minimum=0.0, nullable=True)


def _shape_suite(section: Any, where: str) -> None:
    for name, entry in _dict(section, where).items():
        if "/" not in name:
            _fail(f"{where}.{name}", "expected a 'variant/kind' name")
        entry = _dict(entry, f"{where}.{name}")
        _number(_field(entry, "correlation", f"{where}.{name}"), f"{where}.{name}.correlation",
                minimum=-1.0, maximum=1.0)


def _cache_gate(section: Any, where: str) -> None:
    for strategy, entry in _dict(section, where).items():
        here = f"{where}.{strategy}"
        entry = _dict(entry, here)
        bounds = _dict(_field(entry, "bounds", here), f"{here}.bounds")
        for name in ("psnr", "skipped"):
            _bounds(_field(bounds, name, f"{here}.bounds"), f"{here}.bounds.{name}", open_ends=True)
        for name in ("spearman", "adherence"):
            if name in bounds:
                _bounds(bounds[name], f"{here}.bounds.{name}", open_ends=True)
        for name in ("psnr", "skipped_attention"):
            _number(_field(entry, name, here), f"{here}.{name}", minimum=0.0)
        for name in ("ssim", "latent_mse", "skipped_transformer", "speedup", "spearman", "adherence"):
            if name in entry:
                _number(entry[name], f"{here}.{name}", nullable=True)
        if entry.get("schedule") is not None:
            _dict(entry["schedule"], f"{here}.schedule")


SUITE_VALIDATORS: dict[str, Callable[[Any, str], None]] = {
    "prompt_stability": _prompt_stability, "step_stability": _shape_suite, "scheduler_stability": _shape_suite,
    "cache_gate": _cache_gate,
}


def validate_baseline(data: dict[str, Any]) -> None:
    """Raise :class:`SchemaProblem` for the first value the suites could not use safely."""
    for name in ("model", "settings_key"):
        if not isinstance(_field(data, name, ""), str) or not data[name]:
            _fail(name, f"expected a non-empty string, found {_type_name(data[name])} {data[name]!r}")
    _dict(data.get("metadata", {}), "metadata")
    validate_tolerances(_field(data, "tolerances", ""))
    if data.get("profile") is not None:
        validate_profile_section(data["profile"])
    for suite, section in _dict(data.get("suites", {}), "suites").items():
        if suite in SUITE_VALIDATORS:
            SUITE_VALIDATORS[suite](section, f"suites.{suite}")
