"""The cache suite's settings (``--dit-cache*`` options and their ini twins) and its pytest parametrization.

Read once at configure time, so a bad ``--dit-cache`` is a usage error before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from .options import OPTIONS, _raw
from ..cache.spec import CacheSpec, CacheSpecError, parse_spec, parse_specs

CACHE_OPTIONS_KEY = pytest.StashKey["CacheOptions"]()

NO_STRATEGY_REASON = ("no caching strategy selected: pass --dit-cache=SPEC (repeatable; e.g. --dit-cache=none "
                      "--dit-cache=profile:budget=0.3 --dit-cache=fbcache) or set dit_caches in the ini file")


@dataclass(frozen=True)
class CacheOptions:
    specs: tuple[CacheSpec, ...]
    repeats: int
    budgets: tuple[float, ...]
    min_psnr: float | None
    min_skipped: float | None


def _value(config: pytest.Config, ini: str):
    for flag, name, _help, kind, default in OPTIONS:
        if name == ini:
            return _raw(config, flag, name, kind, default)
    raise KeyError(ini)


def read_cache_options(config: pytest.Config) -> CacheOptions:
    """Parse and check the cache options; every problem is a :class:`pytest.UsageError`."""
    try:
        specs = parse_specs(_value(config, "dit_caches"))
    except CacheSpecError as exc:
        raise pytest.UsageError(str(exc)) from None
    repeats = _value(config, "dit_cache_repeats")
    if repeats < 1:
        raise pytest.UsageError(f"--dit-cache-repeats must be at least 1, got {repeats}")
    budgets = tuple(_value(config, "dit_cache_budgets"))
    if not budgets or any(not 0.0 <= b < 1.0 for b in budgets):
        raise pytest.UsageError(f"--dit-cache-budgets must be fractions in [0, 1), got {list(budgets)}")
    min_skipped = _value(config, "dit_cache_min_skipped")  # None: not given; 0 is a floor like any other
    if min_skipped is not None and not 0.0 <= min_skipped < 1.0:
        raise pytest.UsageError(f"--dit-cache-min-skipped must lie in [0, 1), got {min_skipped}")
    min_psnr = _value(config, "dit_cache_min_psnr")
    if min_psnr is not None and min_psnr < 0:
        raise pytest.UsageError(f"--dit-cache-min-psnr must be at least 0 dB, got {min_psnr}")
    return CacheOptions(specs=tuple(specs), repeats=repeats, budgets=budgets, min_psnr=min_psnr,
                        min_skipped=min_skipped)


def cache_options(config: pytest.Config) -> CacheOptions:
    if CACHE_OPTIONS_KEY not in config.stash:
        config.stash[CACHE_OPTIONS_KEY] = read_cache_options(config)
    return config.stash[CACHE_OPTIONS_KEY]


def parameters(config: pytest.Config) -> list:
    """``dit_cache`` parameters: one per selected spec (id = the spec), or one skipped placeholder."""
    specs = cache_options(config).specs
    if not specs:
        return [pytest.param(None, id="no-strategy", marks=pytest.mark.skip(reason=NO_STRATEGY_REASON))]
    return [pytest.param(spec.text, id=spec.text) for spec in specs]


def spec_of(request: pytest.FixtureRequest) -> CacheSpec:
    """The ``dit_cache`` fixture's value."""
    text = getattr(request, "param", None)
    if text is None:
        pytest.skip(NO_STRATEGY_REASON)
    return parse_spec(text)
