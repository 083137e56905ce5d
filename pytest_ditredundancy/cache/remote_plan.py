"""A run plan whose pipeline lives in a pool worker (``--dit-executor=ray``), for the cache gate and tuning.

Everything the gate and the tuning ask of a :class:`~pytest_ditredundancy.cache.measure.RunPlan` goes through
``run``, ``layer_names``, ``calibrate_magcache`` and ``transformer_class``; :class:`RemotePlan` runs each of them
on an actor that holds the model (a plain local plan is built there around its pipeline) and gets back plain data: a ``RunResult`` (images
as numpy arrays, final latents, seconds timed on the actor, counts), layer names, ratios. Nothing holds a
pipeline in the pytest process. :func:`plan_on` picks the plan for where the executor keeps its pipelines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..profiling.executors import Executor
from ..profiling.settings import RunRequest
from ..zoo.registry import ModelSpec
from .diffusers_cache import StrategyContext
from .measure import RunPlan, RunResult
from .schedule import CacheSchedule
from .spec import CacheSpec


@dataclass
class RemotePlan(RunPlan):
    """A plan without a pipeline here: ``executor`` runs each pass where ``model``'s pipeline is loaded."""

    executor: Executor | None = None

    def run(self, spec: CacheSpec | None = None, *, schedule: CacheSchedule | None = None,
            context: StrategyContext | None = None, count: bool = False) -> RunResult:
        return self._call(_run, spec, schedule, context, count)

    def layer_names(self) -> list[str]:
        return self._call(_layer_names)

    def calibrate_magcache(self, spec: CacheSpec) -> list[float]:
        return self._call(_calibrate_magcache, spec)

    def transformer_class(self) -> type:
        return self._call(_transformer_class)

    def _call(self, function: Any, *args: Any) -> Any:
        if self.executor is None:
            raise ValueError("a RemotePlan needs the executor that holds its pipeline")
        fields = {"model": self.model, "settings": self.settings, "prompts": list(self.prompts), "seed": self.seed,
                  "batch_size": self.batch_size}
        return self.executor.call(self.model, function, fields, *args)


def plan_on(executor: Executor, spec: ModelSpec, request: RunRequest) -> RunPlan:
    """The plan of ``request``: around the loaded pipeline when the executor keeps pipelines in this process,
    else a :class:`RemotePlan` whose passes run where it keeps them."""
    fields = (spec, request.settings, list(request.prompts), request.settings.seed, request.batch_size)
    if executor.pipelines_here:
        return RunPlan(executor.load(spec), *fields)
    return RemotePlan(None, *fields, executor=executor)


# -- what runs in the worker (importable by name there) --------------------------------------------------------------
def _run(pipe: Any, fields: dict[str, Any], spec: CacheSpec | None, schedule: CacheSchedule | None,
         context: StrategyContext | None, count: bool) -> RunResult:
    return RunPlan(pipe, **fields).run(spec, schedule=schedule, context=context, count=count)


def _layer_names(pipe: Any, fields: dict[str, Any]) -> list[str]:
    return RunPlan(pipe, **fields).layer_names()


def _calibrate_magcache(pipe: Any, fields: dict[str, Any], spec: CacheSpec) -> list[float]:
    return RunPlan(pipe, **fields).calibrate_magcache(spec)


def _transformer_class(pipe: Any, fields: dict[str, Any]) -> type:
    return RunPlan(pipe, **fields).transformer_class()


__all__ = ["RemotePlan", "plan_on"]
