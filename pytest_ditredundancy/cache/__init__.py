"""Cache gate: from a redundancy profile to a cache schedule, and regression gates for caching strategies.

``spec`` parses ``--dit-cache``; ``schedule`` derives and stores profile schedules; ``apply`` runs a
pipeline with a strategy through its engine (``engines``: our schedule's reuse hooks in ``reuse``,
``diffusers_cache`` for diffusers' caches, ``cachedit`` for cache-dit);
``measure`` counts skipped compute and times runs; ``quality`` compares outputs; ``check`` is the suite.
"""

from .apply import CacheBatchError, UnsupportedStrategy, applied
from .base import CacheDependencyError, CacheParameterError
from .engines import ENGINES, CacheEngine, engine_of
from .schedule import CacheSchedule, ScheduleError, derive_mask, schedule_from_profile
from .spec import STRATEGIES, CacheSpec, CacheSpecError, parse_spec, parse_specs

__all__ = ["ENGINES", "STRATEGIES", "CacheBatchError", "CacheDependencyError", "CacheEngine", "CacheParameterError",
           "CacheSchedule", "CacheSpec", "CacheSpecError", "ScheduleError", "UnsupportedStrategy", "applied",
           "derive_mask", "engine_of", "parse_spec", "parse_specs", "schedule_from_profile"]
