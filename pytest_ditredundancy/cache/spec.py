"""``--dit-cache=SPEC``: which caching strategy a cache-gate test runs, parsed strictly.

A spec is ``name`` or ``name:key=value,key=value``. Unknown strategies, unknown parameters and values of
the wrong type or range are errors that list what exists, so a typo never silently tests the wrong thing.
The parameter tables are static (parsing happens at configure time, before diffusers is imported); the
diffusers-backed names are the fields of diffusers' config classes, and a test keeps them in step. Each
strategy names the engine that runs it (``engine``: a key of :data:`~pytest_ditredundancy.cache.engines.ENGINES`).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence


class CacheSpecError(ValueError):
    """A ``--dit-cache`` value that cannot be parsed; the message lists the valid choices."""


def _float(text: str) -> float:
    """A finite number: a NaN passes every range check and would become part of the baseline key."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"expected a whole number, got {text!r}") from None


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def _range(text: str) -> tuple[float, float]:
    """``lo..hi`` (timestep ranges of PAB/FasterCache, e.g. ``100..800`` or ``-1..681``)."""
    lo, sep, hi = text.partition("..")
    if not sep:
        raise ValueError(f"expected a range LO..HI, got {text!r}")
    low, high = _float(lo), _float(hi)
    if low >= high:
        raise ValueError(f"range {text!r} is empty (LO must be below HI)")
    return (int(low) if low.is_integer() else low, int(high) if high.is_integer() else high)


def _choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {text!r}")
        return text

    parse.__name__ = "|".join(options)
    return parse


def _at_least(minimum: float, kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value < minimum:
            raise ValueError(f"must be at least {minimum:g}, got {value}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _budget(text: str) -> float:
    value = _float(text)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"budget is the fraction of attention calls skipped and must lie in [0, 1), got {value:g}")
    return value


def _limit(text: str) -> int:
    """cache-dit's step limits: -1 for no limit, else a count of steps (0: never cache)."""
    value = _int(text)
    if value < -1:
        raise ValueError(f"expected -1 (no limit) or a number of steps >= 0, got {value}")
    return value


@dataclass(frozen=True)
class Strategy:
    name: str
    summary: str
    params: dict[str, Callable[[str], Any]]
    diffusers_config: str | None = None  # the diffusers config class it builds, if any
    engine: str = ""  # what runs it: a key of cache.engines.ENGINES

    def __post_init__(self) -> None:
        if not self.engine:
            raise ValueError(f"strategy {self.name!r} names no engine (none, profile, diffusers, cachedit, ...)")


_POSITIVE_INT = _at_least(1, _int)
_NON_NEGATIVE = _at_least(0.0, _float)
_PAB_FASTER_COMMON = {
    "spatial_attention_block_skip_range": _POSITIVE_INT,
    "temporal_attention_block_skip_range": _POSITIVE_INT,
    "spatial_attention_timestep_skip_range": _range,
    "temporal_attention_timestep_skip_range": _range,
}

STRATEGIES: dict[str, Strategy] = {s.name: s for s in [
    Strategy("none", "no caching: the uncached run against itself (a sanity check of the gate)", {}, engine="none"),
    Strategy("profile", "ours: a static layer x step reuse schedule derived from the redundancy profile",
             {"budget": _budget, "threshold": _NON_NEGATIVE, "schedule": str}, engine="profile"),
    Strategy("fbcache", "diffusers First Block Cache", {"threshold": _NON_NEGATIVE}, "FirstBlockCacheConfig",
             engine="diffusers"),
    Strategy("pab", "diffusers Pyramid Attention Broadcast", {
        **_PAB_FASTER_COMMON, "cross_attention_block_skip_range": _POSITIVE_INT,
        "cross_attention_timestep_skip_range": _range}, "PyramidAttentionBroadcastConfig", engine="diffusers"),
    Strategy("fastercache", "diffusers FasterCache (attention reuse plus CFG-cache of the unconditional branch)", {
        **_PAB_FASTER_COMMON, "low_frequency_weight_update_timestep_range": _range,
        "high_frequency_weight_update_timestep_range": _range, "alpha_low_frequency": _float,
        "alpha_high_frequency": _float, "unconditional_batch_skip_range": _POSITIVE_INT,
        "unconditional_batch_timestep_skip_range": _range, "tensor_format": _choice("BCHW", "BFCHW", "BCFHW"),
        "is_guidance_distilled": _bool, "attention_weight": _float}, "FasterCacheConfig", engine="diffusers"),
    Strategy("magcache", "diffusers MagCache (magnitude ratios calibrated on the uncached run, or Flux's)", {
        "threshold": _NON_NEGATIVE, "max_skip_steps": _POSITIVE_INT, "retention_ratio": _at_least(0.0, _float),
        "mag_ratios": _choice("calibrate", "flux")}, "MagCacheConfig", engine="diffusers"),
    Strategy("taylorseer", "diffusers TaylorSeer (Taylor-series forecast of attention outputs)", {
        "cache_interval": _POSITIVE_INT, "disable_cache_before_step": _at_least(0, _int),
        "disable_cache_after_step": _at_least(0, _int), "max_order": _at_least(0, _int),
        "taylor_factors_dtype": _choice("float32", "float16", "bfloat16"), "use_lite_mode": _bool},
        "TaylorSeerCacheConfig", engine="diffusers"),
    Strategy("cachedit", "cache-dit's DBCache: the first Fn blocks decide from their residual's change (rdt) whether "
             "the middle blocks are reused; optional TaylorSeer forecast", {
        "Fn": _POSITIVE_INT, "Bn": _at_least(0, _int), "rdt": _NON_NEGATIVE, "warmup": _at_least(0, _int),
        "warmup_interval": _POSITIVE_INT, "max_cached_steps": _limit, "max_continuous_cached_steps": _limit,
        "max_accumulated_rdt": _NON_NEGATIVE, "taylorseer": _at_least(0, _int), "separate_cfg": _bool},
        engine="cachedit"),
]}

#: parameters we add on top of a diffusers config's fields (mapped to callbacks or ratio tables)
EXTRA_PARAMS = {"fastercache": {"attention_weight"}, "magcache": {"mag_ratios"}}


@dataclass(frozen=True)
class CacheSpec:
    """One parsed strategy. ``text`` is the canonical form: test id and baseline key."""

    strategy: str
    params: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    text: str = ""

    def __str__(self) -> str:
        return self.text

    def get(self, name: str, default: Any = None) -> Any:
        return self.params.get(name, default)


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "..".join(_fmt(v) for v in value)
    return str(value)


def parse_spec(text: str) -> CacheSpec:
    """``name[:key=value,...]`` -> :class:`CacheSpec`; raises :class:`CacheSpecError` naming the fix."""
    raw = text.strip()
    name, _, rest = raw.partition(":")
    name = name.strip().lower()
    if name not in STRATEGIES:
        close = difflib.get_close_matches(name, list(STRATEGIES), n=2, cutoff=0.5)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise CacheSpecError(f"unknown caching strategy {name!r} in --dit-cache={raw}.{hint} Strategies: "
                             + "; ".join(f"{s.name} ({s.summary})" for s in STRATEGIES.values()))
    strategy = STRATEGIES[name]
    params: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not value.strip():
            raise CacheSpecError(f"--dit-cache={raw}: parameter {part!r} needs a value (key=value)")
        if key not in strategy.params:
            known = ", ".join(sorted(strategy.params)) or "none"
            close = difflib.get_close_matches(key, list(strategy.params), n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]}?" if close else ""
            raise CacheSpecError(f"--dit-cache={raw}: {name} has no parameter {key!r}.{hint} Its parameters: {known}")
        if key in params:
            raise CacheSpecError(f"--dit-cache={raw}: parameter {key!r} is given twice")
        try:
            params[key] = strategy.params[key](value.strip())
        except ValueError as exc:
            raise CacheSpecError(f"--dit-cache={raw}: bad value for {key}: {exc}") from None
    if name == "profile" and "schedule" in params and ({"budget", "threshold"} & set(params)):
        raise CacheSpecError(f"--dit-cache={raw}: a schedule file fixes the mask; give either schedule= or "
                             "budget=/threshold=, not both")
    if name == "profile" and not params:
        params["budget"] = 0.3
    canonical = name + (":" + ",".join(f"{k}={_fmt(v)}" for k, v in sorted(params.items())) if params else "")
    return CacheSpec(strategy=name, params=params, text=canonical)


def join_continued(values: Sequence[str]) -> list[str]:
    """Option lists are split on commas before we see them: a piece ``key=value`` without a strategy name
    continues the value before it (``profile:budget=0.3``, ``threshold=0.05`` -> one spec)."""
    joined: list[str] = []
    for value in values:
        piece = str(value).strip()
        if not piece:
            continue
        if joined and "=" in piece and ":" not in piece.split("=", 1)[0]:
            joined[-1] += "," + piece
        else:
            joined.append(piece)
    return joined


def parse_specs(values: list[str]) -> list[CacheSpec]:
    """Parse every ``--dit-cache`` value. Option lists are split on commas before we see them, so a piece
    ``key=value`` without a strategy name continues the spec before it (``profile:budget=0.3,threshold=0.05``)."""
    return parse_each(values, parse_spec, lambda text: CacheSpecError(f"--dit-cache={text} is given twice"))


def parse_each(values: Sequence[str], parse: Callable[[str], Any], twice: Callable[[str], Exception]) -> list[Any]:
    """Each value of a repeatable option parsed (continued pieces joined first); one whose canonical ``text`` was
    seen already raises ``twice(text)``."""
    parsed, seen = [], set()
    for text in join_continued(values):
        item = parse(text)
        if item.text in seen:
            raise twice(item.text)
        seen.add(item.text)
        parsed.append(item)
    return parsed
