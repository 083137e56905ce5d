"""What a caching strategy buys and costs: compute actually skipped, wall time, and the runs behind them.

Compute is counted where it happens: the counters wrap each attention module's and each ``nn.Linear``'s
own ``forward`` *before* a strategy installs its hooks, so a call a strategy skips (returns a cached or
forecast output, skips a block, halves the CFG batch) is never counted. Attention compute is the number of
batch rows through attention modules; transformer compute is the multiply-accumulates of its linear
layers. Wall time is the pipeline call itself, uncached and cached runs interleaved, median of repeats.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..profiling.runner import RunSettings, batched, call_kwargs
from ..profiling.schedulers import apply_scheduler
from ..zoo.registry import ModelSpec
from .apply import applied, attention_modules, first_tensor
from .diffusers_cache import StrategyContext
from .engines import merge_counters
from .quality import as_images, latent_mse
from .schedule import CacheSchedule, probe_cells, single_cell, with_budget
from .spec import CacheSpec
from .undo import Reversible


class ComputeCounter(Reversible):
    """Counts attention rows/calls and linear MACs of a transformer while installed (a context manager)."""

    def __init__(self, transformer: nn.Module, step_of: Callable[[], int] | None = None) -> None:
        self.transformer = transformer
        self.attention_rows = 0
        self.attention_calls = 0
        self.linear_macs = 0
        self.step_of = step_of  # the running denoising step, for the per-step attention calls
        self.calls_per_step: list[int] = []
        super().__init__()

    def install(self) -> None:
        for _, module in attention_modules(self.transformer):
            self._wrap(module, self._count_attention)
        for module in self.transformer.modules():
            if isinstance(module, nn.Linear):
                self._wrap(module, self._count_linear)

    def _wrap(self, module: nn.Module, count: Callable[[nn.Module, tuple, dict], None]) -> None:
        original = module.forward
        was_own = "forward" in vars(module)

        def forward(*args: Any, **kwargs: Any) -> Any:
            count(module, args, kwargs)
            return original(*args, **kwargs)

        module.forward = forward
        self._undo.append(lambda: setattr(module, "forward", original) if was_own else delattr(module, "forward"))

    def _count_attention(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = first_tensor(args, kwargs)
        self.attention_calls += 1
        if self.step_of is not None:
            step = self.step_of()
            if step >= len(self.calls_per_step):
                self.calls_per_step.extend([0] * (step + 1 - len(self.calls_per_step)))
            self.calls_per_step[step] += 1
        self.attention_rows += int(hidden.shape[0]) if hidden is not None and hidden.dim() else 1

    def _count_linear(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("input")
        if isinstance(x, torch.Tensor):
            self.linear_macs += x.numel() * module.out_features  # rows x in x out


@dataclass
class RunResult:
    """One pass over the prompts: decoded outputs, final latents, time in pipeline calls, counts."""

    images: np.ndarray
    latents: torch.Tensor
    seconds: float
    attention_rows: int = 0
    attention_calls: int = 0
    linear_macs: int = 0
    strategy: dict[str, Any] = field(default_factory=dict)
    #: attention calls per denoising step, summed over prompt batches (counted runs only)
    attention_calls_per_step: list[int] = field(default_factory=list)


@dataclass
class RunPlan:
    """Everything that defines a pass: pipeline, model, settings, prompts, seeds, batching."""

    pipe: Any
    model: ModelSpec
    settings: RunSettings
    prompts: Sequence[str]
    seed: int
    batch_size: int

    def context(self, **overrides: Any) -> StrategyContext:
        return StrategyContext(self.model, self.settings, **overrides)

    # Everything the cache gate and the tuning ask of a plan goes through these methods, so a plan
    # whose pipeline lives elsewhere (another process, another machine) can stand in for this one.
    def run(self, spec: CacheSpec | None = None, *, schedule: CacheSchedule | None = None,
            context: StrategyContext | None = None, count: bool = False) -> "RunResult":
        """One pass over the prompts with ``spec`` applied (see :func:`run_once`)."""
        return run_once(self, spec, schedule=schedule, context=context, count=count)

    def layer_names(self) -> list[str]:
        """The attention layers a schedule addresses, in registration order."""
        return [name for name, _ in attention_modules(self.pipe.transformer)]

    def calibrate_magcache(self, spec: CacheSpec) -> list[float]:
        """MagCache's magnitude ratios for this plan (see :func:`calibrate_magcache`)."""
        return calibrate_magcache(self, spec)

    def transformer_class(self) -> type:
        """The class of the pipeline's transformer (what the line of code that applies a cache depends on)."""
        return type(self.pipe.transformer)

    def at(self, settings: RunSettings) -> "RunPlan":
        """The same plan at other settings (a step-count or scheduler variant)."""
        return replace(self, settings=settings)


def _decoded(output: Any) -> Any:
    for name in ("images", "frames", "videos"):
        if getattr(output, name, None) is not None:
            return getattr(output, name)
    return output[0]


def run_once(plan: RunPlan, spec: CacheSpec | None = None, *, schedule: CacheSchedule | None = None,
             context: StrategyContext | None = None, count: bool = False,
             on_applied: Callable[[Any], None] | None = None) -> RunResult:
    """Run every prompt (prompt ``i`` seeded ``seed + i``) with ``spec`` applied; decode to images."""
    images, latents, seconds = [], [], 0.0
    totals = {"attention_rows": 0, "attention_calls": 0, "linear_macs": 0}
    per_step: list[int] = []
    strategy: dict[str, Any] = {}
    context = context or plan.context()
    for start, batch in batched(list(plan.prompts), plan.batch_size):
        apply_scheduler(plan.pipe, plan.settings.scheduler)  # a fresh scheduler: no state from the last call
        generators = [torch.Generator("cpu").manual_seed(plan.seed + start + i) for i in range(len(batch))]
        kwargs = call_kwargs(plan.model, plan.settings, batch, plan.pipe, generators)
        kwargs["output_type"] = "np"
        counter = ComputeCounter(plan.pipe.transformer) if count else None
        with counter or contextlib.nullcontext(), applied(plan.pipe, spec, schedule=schedule, context=context) as handle:
            if counter is not None:  # installed first, so under the strategy's hooks: a skipped call is not counted
                counter.step_of = lambda: handle.tracker.step
            started = time.perf_counter()
            output = plan.pipe(**kwargs)
            seconds += time.perf_counter() - started
            if on_applied is not None:
                on_applied(handle)
        final = handle.tracker.final_latents[-1] if handle.tracker.final_latents else None
        if final is None:
            raise RuntimeError(f"{plan.model.name}: the scheduler never stepped, so there are no final latents")
        images.append(as_images(_decoded(output)))
        latents.append(final.float().cpu())
        strategy = merge_counters(strategy, handle.counters())  # numbers add; per-run lists concatenate
        if counter is not None:
            for name in totals:
                totals[name] += getattr(counter, name)
            for step, calls in enumerate(counter.calls_per_step):
                if step >= len(per_step):
                    per_step.append(0)
                per_step[step] += calls
    return RunResult(np.concatenate(images), torch.cat(latents), seconds, strategy=strategy,
                     attention_calls_per_step=per_step, **totals)


def skipped_fractions(reference: RunResult, cached: RunResult) -> dict[str, float]:
    """Fractions of attention rows, attention calls and linear MACs the cached run did not compute."""
    def fraction(done: int, full: int) -> float:
        return float(1.0 - done / full) if full else 0.0

    return {"attention": fraction(cached.attention_rows, reference.attention_rows),
            "attention_calls": fraction(cached.attention_calls, reference.attention_calls),
            "transformer": fraction(cached.linear_macs, reference.linear_macs)}


def time_interleaved(uncached: Callable[[], RunResult], cached: Callable[[], RunResult],
                     repeats: int) -> tuple[list[float], list[float]]:
    """Alternate uncached and cached passes ``repeats`` times (drifting machine load hits both alike)."""
    a, b = [], []
    for _ in range(repeats):
        a.append(uncached().seconds)
        b.append(cached().seconds)
    return a, b


def speedup(uncached_seconds: Sequence[float], cached_seconds: Sequence[float]) -> float:
    """Median uncached time over median cached time."""
    return float(statistics.median(uncached_seconds) / max(statistics.median(cached_seconds), 1e-12))


def calibrate_magcache(plan: RunPlan, spec: CacheSpec) -> list[float]:
    """MagCache's magnitude ratios from one calibrating (never skipping) pass over the first prompt batch."""
    first = RunPlan(plan.pipe, plan.model, plan.settings, list(plan.prompts)[:plan.batch_size], plan.seed,
                    plan.batch_size)
    found: list[list[float]] = []
    run_once(first, spec, context=plan.context(calibrate=True),
             on_applied=lambda handle: found.extend(handle.applier.calibration))
    if not found:
        raise RuntimeError(f"MagCache calibration on {plan.model.name} reported no ratios")
    length = min(len(r) for r in found)
    return [float(v) for v in np.mean([r[:length] for r in found], axis=0)]


@dataclass
class SweepPoint:
    budget: float
    order: str
    skipped_fraction: float
    predicted_error: float
    measured_error: float


def budget_sweep(plan: RunPlan, schedule: CacheSchedule, budgets: Sequence[float],
                 reference: RunResult) -> list[SweepPoint]:
    """For each budget and both rankings (cheapest cells first, as the schedule does, and costliest first as
    a contrast): the schedule re-derived from the same costs, its predicted error (sum of the skipped cells'
    relative L1) and the measured error (MSE of the final latents against the uncached run)."""
    spec = CacheSpec("profile", {}, "profile")
    points = []
    for order in ("cheapest", "costliest"):
        for budget in budgets:
            variant = with_budget(schedule, budget, order)
            result = plan.run(spec, schedule=variant)
            points.append(SweepPoint(budget, order, variant.skipped_fraction, variant.predicted_error,
                                     latent_mse(reference.latents, result.latents)))
    return points


@dataclass
class PremisePoint:
    """One probe of the premise test: a single skipped cell, its profile cost and the error it caused."""

    layer: str
    step: int
    predicted_error: float
    measured_error: float


def premise_test(plan: RunPlan, schedule: CacheSchedule, reference: RunResult, cells: int = 12) -> list[PremisePoint]:
    """Skip one (layer, step) cell at a time, for ``cells`` cells spread over the profile's cost ranking, and
    measure each one's error (MSE of the final latents against the uncached run).

    The rank correlation of cost and error across these probes tests the premise of profile-guided caching
    (the cheaper the cell in the profile, the smaller the error of reusing it) without the bias of nested
    budgets, which correlate with the error through their size alone: a profile whose costs were shuffled
    scores about 0 here (``tests/test_cache_gate.py``)."""
    spec = CacheSpec("profile", {}, "profile")
    points = []
    for layer, step in probe_cells(schedule, cells):
        probe = single_cell(schedule, (layer, step))
        result = plan.run(spec, schedule=probe)
        points.append(PremisePoint(schedule.layers[layer], step, probe.predicted_error,
                                   latent_mse(reference.latents, result.latents)))
    return points

