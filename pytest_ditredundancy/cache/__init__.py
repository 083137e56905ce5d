"""Cache gate and cache tuning: from a redundancy profile to a cache schedule, regression gates for caching
strategies, and the search for the fastest setting that keeps quality floors.

``spec`` parses ``--dit-cache``; ``schedule`` derives and stores profile schedules; ``apply`` runs a
pipeline with a strategy through its engine (``engines``: our schedule's reuse hooks in ``reuse``,
``diffusers_cache`` for diffusers' caches, ``cachedit`` for cache-dit); ``measure`` counts skipped compute and
times runs; ``quality`` compares outputs; ``floors``, ``tuning``, ``tune_runs``, ``tune_verdict`` and
``predict`` are the tuning.

The names below are imported on first use (PEP 562): the plugin parses ``--dit-cache`` and ``--dit-cache-tune``
at configure time through ``spec``, ``floors`` and ``tuning``, which must not pay for torch.
"""

from __future__ import annotations

from ..io import lazy_exports

#: public name -> the module that defines it
_EXPORTS = {
    "CacheBatchError": "base", "UnsupportedStrategy": "base", "CacheDependencyError": "base",
    "CacheParameterError": "base", "applied": "apply", "ENGINES": "engines", "CacheEngine": "engines",
    "engine_of": "engines", "CacheSchedule": "schedule", "ScheduleError": "schedule", "derive_mask": "schedule",
    "schedule_from_profile": "schedule", "STRATEGIES": "spec", "CacheSpec": "spec", "CacheSpecError": "spec",
    "parse_spec": "spec", "parse_specs": "spec", "Floors": "floors", "parse_floors": "floors", "TuneSpec": "tuning",
    "parse_tune": "tuning", "search": "tuning",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
