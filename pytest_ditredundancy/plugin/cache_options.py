"""The cache suites' settings (``--dit-cache*`` options and their ini twins, declared once as the fields of
:class:`CacheOptions`) and their pytest parametrization.

Read once at configure time, so a bad ``--dit-cache``, ``--dit-cache-tune`` or ``--dit-cache-floor`` is a
usage error before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pytest

from ..cache.floors import FloorError, Floors, parse_floors
from ..cache.spec import CacheSpec, CacheSpecError, parse_spec, parse_specs
from ..cache.tuning import DEFAULT_CLIFF_DB, TuneSpec, TuneSpecError, parse_tune, parse_tunes
from .declared import build, option


@dataclass(frozen=True, kw_only=True)
class CacheOptions:
    """The cache suites' settings, read by :func:`read_cache_options`."""

    specs: tuple[CacheSpec, ...] = option(
        "--dit-cache", ini="dit_caches", kind=list[str], default=(),
        help="cache suite: caching strategy to gate, repeatable: none, profile[:budget=0.3|threshold=0.05|"
             "schedule=FILE], fbcache[:threshold=0.05], pab, fastercache, magcache, taylorseer, "
             "cachedit[:Fn=1,Bn=0,rdt=0.08] (see docs/cache-gate.md)")
    repeats: int = option(
        "--dit-cache-repeats", ini="dit_cache_repeats", kind=int, default=3,
        help="cache suite: timed runs per strategy (uncached and cached interleaved; the speedup is the ratio of "
             "the medians)")
    budgets: tuple[float, ...] = option(
        "--dit-cache-budgets", ini="dit_cache_budgets", kind=list[float], default=(0.1, 0.3, 0.5),
        help="cache suite: budgets of the profile schedule's error sweep")
    min_psnr: float | None = option(
        "--dit-cache-min-psnr", ini="dit_cache_min_psnr", kind=float, default=None,
        help="cache suite: minimum PSNR (dB) used where no baseline exists")
    min_skipped: float | None = option(
        "--dit-cache-min-skipped", ini="dit_cache_min_skipped", kind=float, default=None,
        help="cache suite: minimum fraction of attention compute skipped, in [0, 1), used where no baseline exists")
    tunes: tuple[TuneSpec, ...] = option(
        "--dit-cache-tune", ini="dit_cache_tunes", kind=list[str], default=(),
        help="cache tuning: search one parameter for the fastest setting inside the floors, repeatable: "
             "STRATEGY:PARAM=LO..HI[,KEY=VALUE...], e.g. fbcache:threshold=0.02..0.5, cachedit:rdt=0.02..0.4,Fn=1,"
             "Bn=0, magcache:threshold=0.01..0.5, profile:budget=0.05..0.6 (see docs/cache-tuning.md)")
    floors: Floors = option(
        "--dit-cache-floor", ini="dit_cache_floor", kind=str, default=None,
        help="quality floors of cache tuning and of cache settings without a stored entry: METRIC:VALUE,... with "
             "psnr (dB), ssim, adherence (share of the uncached run's correct samples kept; trained models), "
             "latent_mse (a ceiling), e.g. psnr:35,ssim:0.95")
    cliff_db: float = option(
        "--dit-cache-cliff", ini="dit_cache_cliff", kind=float, default=DEFAULT_CLIFF_DB,
        help="cache tuning: a PSNR drop (dB) between neighbouring measured settings that is bisected and named a "
             "cliff")
    transfer: bool = option(
        "--dit-cache-transfer", ini="dit_cache_transfer", kind=bool, default=True,
        help="cache tuning: re-check the tuned setting (and tune again) at the --dit-step-factors step counts and "
             "the other schedulers")
    tune_dir: str = option(
        "--dit-cache-tune-dir", ini="dit_cache_tune_dir", kind=str, default="dit-cache-tune",
        help="cache tuning: folder (relative to the invocation directory) the recommendation files are written to")

CACHE_OPTIONS_KEY = pytest.StashKey["CacheOptions"]()

NO_STRATEGY_REASON = ("no caching strategy selected: pass --dit-cache=SPEC (repeatable; e.g. --dit-cache=none "
                      "--dit-cache=profile:budget=0.3 --dit-cache=fbcache) or set dit_caches in the ini file")


def _parse_specs(config: pytest.Config, values: dict[str, Any]) -> dict[str, Any]:
    """``--dit-cache``: each spec parsed strictly (unknown strategies and parameters list what exists)."""
    try:
        return {"specs": tuple(parse_specs(list(values["specs"])))}
    except CacheSpecError as exc:
        raise pytest.UsageError(str(exc)) from None


def _parse_tuning(config: pytest.Config, values: dict[str, Any]) -> dict[str, Any]:
    """``--dit-cache-tune`` and ``--dit-cache-floor``: each parsed strictly; a search needs floors."""
    try:
        tunes = tuple(parse_tunes(list(values["tunes"])))
        floors = parse_floors(values["floors"])
    except (TuneSpecError, FloorError) as exc:
        raise pytest.UsageError(str(exc)) from None
    if not values["cliff_db"] > 0:
        raise pytest.UsageError(f"--dit-cache-cliff must be a positive number of dB, got {values['cliff_db']}")
    if not str(values["tune_dir"]).strip():
        raise pytest.UsageError("--dit-cache-tune-dir is empty; give a folder for the recommendation files")
    return {"tunes": tunes, "floors": floors}


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
    return build(config, CacheOptions, (_parse_specs, _parse_tuning, _check_numbers))


def cache_options(config: pytest.Config) -> CacheOptions:
    if CACHE_OPTIONS_KEY not in config.stash:
        config.stash[CACHE_OPTIONS_KEY] = read_cache_options(config)
    return config.stash[CACHE_OPTIONS_KEY]


def _params(items: tuple, placeholder: str, reason: str) -> list:
    """One parameter per selected item (id = its canonical text), or one skipped placeholder saying how to select."""
    if not items:
        return [pytest.param(None, id=placeholder, marks=pytest.mark.skip(reason=reason))]
    return [pytest.param(item.text, id=item.text) for item in items]


def _value(request: pytest.FixtureRequest, reason: str, parse: Callable[[str], Any]) -> Any:
    """A parametrized fixture's value, parsed again from its text (xdist workers receive the text)."""
    text = getattr(request, "param", None)
    if text is None:
        pytest.skip(reason)
    return parse(text)


def parameters(config: pytest.Config) -> list:
    """``dit_cache`` parameters: one per selected spec (id = the spec), or one skipped placeholder."""
    return _params(cache_options(config).specs, "no-strategy", NO_STRATEGY_REASON)


def spec_of(request: pytest.FixtureRequest) -> CacheSpec:
    """The ``dit_cache`` fixture's value."""
    return _value(request, NO_STRATEGY_REASON, parse_spec)


NO_TUNE_REASON = ("no cache tuning selected: pass --dit-cache-tune=STRATEGY:PARAM=LO..HI (e.g. "
                  "--dit-cache-tune=fbcache:threshold=0.02..0.5) with --dit-cache-floor=psnr:35,... or set "
                  "dit_cache_tunes in the ini file")


def tune_parameters(config: pytest.Config) -> list:
    """``dit_cache_tune`` parameters: one per selected search (id = the search), or one skipped placeholder."""
    return _params(cache_options(config).tunes, "no-tuning", NO_TUNE_REASON)


def tune_of(request: pytest.FixtureRequest) -> TuneSpec:
    """The ``dit_cache_tune`` fixture's value."""
    return _value(request, NO_TUNE_REASON, parse_tune)
