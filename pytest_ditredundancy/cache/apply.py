"""Running a pipeline with a caching strategy: step tracking, the strategy's engine, cleanup.

:class:`~pytest_ditredundancy.cache.base.RunTracker` finds run, step and call boundaries with the capture's own
:class:`~pytest_ditredundancy.capture.tracking.StepTracker` (one count of calls per step for both) and keeps
the final latents. :func:`applied` resolves the strategy's engine once (:func:`~.engines.engine_of`), installs
the applier it makes (the profile schedule's reuse hooks in :mod:`.reuse`, diffusers' caches, cache-dit) and
removes every hook and wrapper on exit, also when the pipeline raises.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

from torch import nn

from ..capture.tracking import first_tensor
from .base import CacheBatchError, RunTracker, UnsupportedStrategy, attention_modules
from .engines import CacheEngine, engine_of
from .reuse import ScheduleApplier
from .schedule import CacheSchedule
from .spec import CacheSpec

# names other modules import from here
__all__ = ["Applied", "CacheBatchError", "RunTracker", "ScheduleApplier", "UnsupportedStrategy", "applied",
           "attention_modules", "first_tensor"]


@dataclass
class Applied:
    """What a run under a strategy exposes: the tracker, the engine and its applier's own record."""

    spec: CacheSpec | None
    tracker: RunTracker
    applier: Any = None
    engine: CacheEngine | None = None

    def counters(self) -> dict[str, Any]:
        """The applier's counters, plain builtins (``{}`` without a strategy)."""
        return self.applier.counters() if self.applier is not None else {}

    def skipped_steps(self) -> list[int] | None:
        """Steps at which the strategy says it reused cached work (``[]`` without one; ``None``: it cannot tell)."""
        return self.applier.skipped_steps() if self.applier is not None else []


@contextlib.contextmanager
def applied(pipe: Any, spec: CacheSpec | None, *, schedule: CacheSchedule | None = None,
            context: Any = None) -> Iterator[Applied]:
    """Run ``pipe`` calls inside the block with ``spec`` applied (``None``/``none``: tracking only).

    ``schedule`` is required for ``profile`` specs; ``context`` (a
    :class:`~pytest_ditredundancy.cache.diffusers_cache.StrategyContext`) for diffusers strategies (cache-dit
    uses it to check and describe how CFG reaches the transformer).
    Everything installed is removed on exit, whatever happens inside.
    """
    if not isinstance(getattr(pipe, "transformer", None), nn.Module) or getattr(pipe, "scheduler", None) is None:
        raise UnsupportedStrategy(f"{type(pipe).__name__} is not a diffusers pipeline with a transformer and a "
                                  "scheduler; caching strategies are applied to those only")
    engine = engine_of(spec)
    with RunTracker(pipe) as tracker:
        handle = Applied(spec, tracker, engine=engine)
        handle.applier = engine.applier(tracker, spec, schedule=schedule, context=context)
        if handle.applier is None:
            yield handle
            return
        try:
            handle.applier.install()
            yield handle
        finally:
            handle.applier.remove()
