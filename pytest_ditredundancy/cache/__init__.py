"""Cache gate: from a redundancy profile to a cache schedule, and regression gates for caching strategies.

``spec`` parses ``--dit-cache``; ``schedule`` derives and stores profile schedules; ``apply`` runs a
pipeline with a strategy (our schedule's reuse hooks, or ``diffusers_cache`` for diffusers' caches);
``measure`` counts skipped compute and times runs; ``quality`` compares outputs; ``check`` is the suite.
"""

from .apply import CacheBatchError, UnsupportedStrategy, applied
from .schedule import CacheSchedule, ScheduleError, derive_mask, schedule_from_profile
from .spec import STRATEGIES, CacheSpec, CacheSpecError, parse_spec, parse_specs

__all__ = ["STRATEGIES", "CacheBatchError", "CacheSchedule", "CacheSpec", "CacheSpecError", "ScheduleError",
           "UnsupportedStrategy", "applied", "derive_mask", "parse_spec", "parse_specs", "schedule_from_profile"]
