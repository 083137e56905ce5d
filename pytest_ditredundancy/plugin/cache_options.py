"""The cache suite's settings (``--dit-cache*`` options and their ini twins, declared in
:class:`~pytest_ditredundancy.plugin.options.CacheOptions`) and its pytest parametrization.

Read once at configure time, so a bad ``--dit-cache`` is a usage error before anything runs.
"""

from __future__ import annotations

from typing import Any

import pytest

from ..cache.spec import CacheSpec, CacheSpecError, parse_spec, parse_specs
from .options import CacheOptions, build

CACHE_OPTIONS_KEY = pytest.StashKey["CacheOptions"]()

NO_STRATEGY_REASON = ("no caching strategy selected: pass --dit-cache=SPEC (repeatable; e.g. --dit-cache=none "
                      "--dit-cache=profile:budget=0.3 --dit-cache=fbcache) or set dit_caches in the ini file")


def _parse_specs(config: pytest.Config, values: dict[str, Any]) -> dict[str, Any]:
    """``--dit-cache``: each spec parsed strictly (unknown strategies and parameters list what exists)."""
    try:
        return {"specs": tuple(parse_specs(list(values["specs"])))}
    except CacheSpecError as exc:
        raise pytest.UsageError(str(exc)) from None


def _check_numbers(config: pytest.Config, values: dict[str, Any]) -> dict[str, Any]:
    """Counts and ranges that a number's type alone does not check."""
    if values["repeats"] < 1:
        raise pytest.UsageError(f"--dit-cache-repeats must be at least 1, got {values['repeats']}")
    budgets = values["budgets"]
    if any(not 0.0 <= b < 1.0 for b in budgets):
        raise pytest.UsageError(f"--dit-cache-budgets must be fractions in [0, 1), got {list(budgets)}")
    min_skipped = values["min_skipped"]  # None: not given; 0 is a floor like any other
    if min_skipped is not None and not 0.0 <= min_skipped < 1.0:
        raise pytest.UsageError(f"--dit-cache-min-skipped must lie in [0, 1), got {min_skipped}")
    min_psnr = values["min_psnr"]
    if min_psnr is not None and min_psnr < 0:
        raise pytest.UsageError(f"--dit-cache-min-psnr must be at least 0 dB, got {min_psnr}")
    return {}


def read_cache_options(config: pytest.Config) -> CacheOptions:
    """Parse and check the cache options; every problem is a :class:`pytest.UsageError`."""
    return build(config, CacheOptions, (_parse_specs, _check_numbers))


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
