"""What the cache gate and the cache tuning share in a test: the run plan, the uncached reference run (measured
once per model and settings in a session), MagCache's calibrated ratios, and the reasons a cache test cannot run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import pytest

from ..cache.base import UnsupportedStrategy
from ..cache.diffusers_cache import StrategyContext
from ..cache.measure import RunPlan, RunResult
from ..cache.remote_plan import plan_on
from ..cache.quality import QualityDependencyError, require_scikit_image
from ..cache.spec import CacheSpec
from ..profiling.settings import RunRequest
from ..zoo.registry import ModelSpec
from .cache_options import CacheOptions, cache_options
from .checks import SuiteCheck
from .session import DitSession


def memo(session: DitSession) -> dict[tuple, Any]:
    """Per-session memo of uncached reference runs, MagCache ratios and sweeps (shared by every cache test)."""
    return vars(session).setdefault("_cache_gate_memo", {})


@dataclass
class CacheInputs:
    """The model-side inputs of a cache test (``suite`` answers the run's request, profile and baseline)."""

    session: DitSession
    spec: ModelSpec
    item: pytest.Item
    suite: SuiteCheck = field(init=False)
    options: CacheOptions = field(init=False)

    def __post_init__(self) -> None:
        self.suite = SuiteCheck(self.session, self.spec, self.item)
        self.options = cache_options(self.item.config)

    def runnable_plan(self, what: str) -> RunPlan:
        """The plan of this model's run, or a skip naming why ``what`` cannot run here."""
        if getattr(self.session.config, "shard", None):
            pytest.skip(f"the {what} runs every prompt: run it without --dit-shard")
        protocol = self.suite.request.protocol
        if not protocol.runs_cache_gate:
            pytest.skip(f"the {what} runs on the project's protocol (every attention layer, prompt i seeded "
                        f"seed + i): run it without --dit-protocol={protocol.name}")
        try:
            require_scikit_image()
        except QualityDependencyError as exc:
            pytest.skip(str(exc))
        plan = self.plan()
        if plan.pipe is not None and (not hasattr(plan.pipe, "transformer")
                                      or getattr(plan.pipe, "scheduler", None) is None):
            pytest.skip(f"{self.spec.name} is not a diffusers pipeline with a transformer and a scheduler "
                        f"({type(plan.pipe).__name__}); caching strategies are applied to those only")
        return plan

    def plan(self, request: RunRequest | None = None) -> RunPlan:
        """The run plan of ``request`` (default: the model's run), where the executor keeps the pipeline: here
        (``local``), or on a pool worker (``--dit-executor=ray``: every pass runs there)."""
        return plan_on(self.session.executor, self.spec, request or self.suite.request)

    def reference(self, plan: RunPlan) -> RunResult:
        """The uncached run of ``plan``'s settings, counted, measured once per session."""
        key = ("reference", self.spec.name, plan.settings.key(), tuple(plan.prompts))
        state = memo(self.session)
        if key not in state:
            try:
                state[key] = plan.run(count=True)
            except UnsupportedStrategy as exc:  # not a pipeline a cache applies to (seen where the pipeline lives)
                pytest.skip(str(exc))
        return state[key]

    def context_for(self, plan: RunPlan) -> Callable[[CacheSpec], StrategyContext]:
        """A strategy's run context on ``plan``: MagCache with ``mag_ratios=calibrate`` gets the ratios of one
        calibrating pass (measured once per settings and spec parameters other than the threshold)."""
        def context(strategy: CacheSpec) -> StrategyContext:
            if strategy.strategy != "magcache" or strategy.get("mag_ratios", "calibrate") != "calibrate":
                return plan.context()
            key = ("magcache", self.spec.name, plan.settings.key(), tuple(plan.prompts))
            state = memo(self.session)
            if key not in state:  # the ratios are the uncached run's: no MagCache parameter changes them
                state[key] = plan.calibrate_magcache(strategy)
            return plan.context(mag_ratios=state[key])

        return context
