"""Running a pipeline with a caching strategy: step tracking, the profile schedule's reuse hooks, cleanup.

:class:`RunTracker` finds run, step and call boundaries the way capture does (``scheduler.set_timesteps``
starts a run, ``scheduler.step`` ends a step, a pre-hook on the transformer numbers the calls within a
step) and keeps the final latents. :class:`ScheduleApplier` puts a diffusers ``ModelHook`` with
``new_forward`` on every attention module: where the schedule says so it returns the cached output
*without calling the module* (the work is really skipped). Caches are keyed by (layer, call index within
the step), so CFG branches run as separate calls never share an entry; they are dropped at every run start
and on exit, so nothing leaks from one prompt batch into the next. :func:`applied` installs a strategy and
removes every hook and wrapper on exit, also when the pipeline raises.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from ..capture.sites import is_attention_module
from .schedule import CacheSchedule, ScheduleError
from .spec import CacheSpec
from .undo import Reversible


class CacheBatchError(RuntimeError):
    """A cached attention output would be reused for a call with another batch size."""


class UnsupportedStrategy(Exception):
    """The model cannot run this strategy; the message says why (the suite skips with it)."""


def attention_modules(transformer: nn.Module) -> list[tuple[str, nn.Module]]:
    """Attention modules in registration order: the layer names of profiles and schedules."""
    return [(name, m) for name, m in transformer.named_modules() if name and is_attention_module(m)]


def first_tensor(args: tuple, kwargs: dict, name: str = "hidden_states") -> torch.Tensor | None:
    value = kwargs.get(name, args[0] if args else None)
    if isinstance(value, torch.Tensor):
        return value
    return next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)


class RunTracker(Reversible):
    """Run/step/call boundaries of a pipeline, final latents, and the current timestep for callbacks."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.transformer: nn.Module = pipe.transformer
        self.scheduler = pipe.scheduler
        self.step = 0
        self.calls_in_step = 0
        self.call_index: int | None = None
        self.final_latents: list[torch.Tensor | None] = []
        self.run_starts: list[Callable[[], None]] = []
        self.call_listeners: list[Any] = []  # objects with before_call(index) / after_call()
        super().__init__()

    def install(self) -> None:
        self._patch(self.scheduler, "set_timesteps", before=self._start_run)
        self._patch(self.scheduler, "step", after=self._end_step)
        pre = self.transformer.register_forward_pre_hook(self._before_call, with_kwargs=True)
        self._undo.append(pre.remove)
        post = self.transformer.register_forward_hook(self._after_call, always_call=True)
        self._undo.append(post.remove)

    def _patch(self, owner: Any, name: str, *, before: Callable[[], None] | None = None,
               after: Callable[[Any], None] | None = None) -> None:
        original = getattr(owner, name)
        was_own = name in vars(owner)

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if before is not None:
                before()
            result = original(*args, **kwargs)
            if after is not None:
                after(result)
            return result

        setattr(owner, name, wrapper)
        self._undo.append(lambda: setattr(owner, name, original) if was_own else delattr(owner, name))

    def _start_run(self) -> None:
        self.step, self.calls_in_step, self.call_index = 0, 0, None
        self.final_latents.append(None)
        for callback in self.run_starts:
            callback()

    def _end_step(self, result: Any) -> None:
        latents = getattr(result, "prev_sample", None)
        if latents is None and isinstance(result, (tuple, list)) and result:
            latents = result[0]
        if isinstance(latents, torch.Tensor) and self.final_latents:
            self.final_latents[-1] = latents.detach().clone()
        self.step += 1
        self.calls_in_step = 0
        self.call_index = None

    def _before_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.call_index = self.calls_in_step
        self.calls_in_step += 1
        for listener in self.call_listeners:
            listener.before_call(self.call_index)

    def _after_call(self, module: nn.Module, args: tuple, output: Any) -> None:
        for listener in self.call_listeners:
            listener.after_call()
        self.call_index = None

    def current_timestep(self) -> float:
        """The scheduler's timestep of the running step (0..1000 for the zoo's schedulers)."""
        timesteps = getattr(self.scheduler, "timesteps", None)
        if timesteps is None or len(timesteps) == 0:
            return 0.0
        return float(timesteps[min(self.step, len(timesteps) - 1)])


def _clone(output: Any) -> Any:
    if isinstance(output, tuple):
        return tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in output)
    return output.clone() if isinstance(output, torch.Tensor) else output


@dataclass
class _Entry:
    """A cached output. By reference (no copy) unless the model was seen to modify outputs in place; then a
    private copy is kept and each reuse hands out a fresh clone of it."""

    output: Any
    batch: int
    versions: list[tuple[torch.Tensor, int]]
    copy: bool = False

    @classmethod
    def of(cls, output: Any, batch: int, copy: bool) -> "_Entry":
        if copy:
            output = _clone(output)
        tensors = output if isinstance(output, tuple) else (output,)
        return cls(output, batch, [(t, t._version) for t in tensors if isinstance(t, torch.Tensor)], copy)

    def intact(self) -> bool:
        return all(t._version == v for t, v in self.versions)

    def reuse(self) -> Any:
        return _clone(self.output) if self.copy else self.output


class ScheduleApplier:
    """Applies a :class:`CacheSchedule`: skipped (layer, step) cells return the previous step's output."""

    HOOK = "ditredundancy_cache_schedule"

    def __init__(self, tracker: RunTracker, schedule: CacheSchedule) -> None:
        self.tracker = tracker
        self.schedule = schedule
        self.modules = attention_modules(tracker.transformer)
        schedule.validate([name for name, _ in self.modules])
        self.mask = schedule.array
        self.cache: dict[tuple[int, int], _Entry] = {}
        self.copies: set[int] = set()
        self.skipped = 0
        self.computed = 0
        self.skipped_cells = np.zeros(self.mask.shape, dtype=np.int64)

    def install(self) -> None:
        from diffusers.hooks import HookRegistry, ModelHook

        applier = self

        class ReuseHook(ModelHook):
            """Returns the cached output instead of calling the attention module where the mask says so."""

            def __init__(self, index: int) -> None:
                super().__init__()
                self.index = index

            def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
                return applier.forward(self.index, self.fn_ref.original_forward, args, kwargs)

        self.tracker.run_starts.append(self.reset)
        for index, (_, module) in enumerate(self.modules):
            HookRegistry.check_if_exists_or_initialize(module).register_hook(ReuseHook(index), self.HOOK)

    def remove(self) -> None:
        for _, module in self.modules:
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None and registry.get_hook(self.HOOK) is not None:
                registry.remove_hook(self.HOOK, recurse=False)
        self.reset()

    def reset(self) -> None:
        self.cache.clear()

    @property
    def total_calls(self) -> int:
        return self.skipped + self.computed

    def forward(self, index: int, original: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        step, call = self.tracker.step, self.tracker.call_index
        hidden = first_tensor(args, kwargs)
        batch = int(hidden.shape[0]) if hidden is not None and hidden.dim() else 1
        entry = self.cache.get((index, call)) if call is not None else None
        if entry is not None and step < self.mask.shape[1] and self.mask[index, step]:
            if entry.batch != batch:
                raise CacheBatchError(
                    f"cache schedule: layer {self.modules[index][0]} (call {call} of step {step}) has batch {batch}, "
                    f"its cached output has batch {entry.batch}; a cached attention output is never reused across "
                    "batch sizes (does the pipeline change its CFG batching within a run?)")
            if entry.intact():
                self.skipped += 1
                self.skipped_cells[index, step] += 1
                return entry.reuse()
            self.copies.add(index)  # the model modified the output in place: keep copies from now on
        output = original(*args, **kwargs)
        self.computed += 1
        if call is not None:
            self.cache[(index, call)] = _Entry.of(output, batch, copy=index in self.copies)
        return output


@dataclass
class Applied:
    """What a run under a strategy exposes: the tracker and the strategy's own counters."""

    spec: CacheSpec | None
    tracker: RunTracker
    applier: Any = None

    def counters(self) -> dict[str, Any]:
        if isinstance(self.applier, ScheduleApplier):
            return {"skipped_calls": self.applier.skipped, "total_calls": self.applier.total_calls}
        return {}


@contextlib.contextmanager
def applied(pipe: Any, spec: CacheSpec | None, *, schedule: CacheSchedule | None = None,
            context: Any = None) -> Iterator[Applied]:
    """Run ``pipe`` calls inside the block with ``spec`` applied (``None``/``none``: tracking only).

    ``schedule`` is required for ``profile`` specs; ``context`` (a
    :class:`~pytest_ditredundancy.cache.diffusers_cache.StrategyContext`) for diffusers strategies.
    Everything installed is removed on exit, whatever happens inside.
    """
    if not isinstance(getattr(pipe, "transformer", None), nn.Module) or getattr(pipe, "scheduler", None) is None:
        raise UnsupportedStrategy(f"{type(pipe).__name__} is not a diffusers pipeline with a transformer and a "
                                  "scheduler; caching strategies are applied to those only")
    with RunTracker(pipe) as tracker:
        handle = Applied(spec, tracker)
        if spec is None or spec.strategy == "none":
            yield handle
            return
        if spec.strategy == "profile":
            if schedule is None:
                raise ScheduleError("the profile strategy needs a schedule")
            handle.applier = ScheduleApplier(tracker, schedule)
        else:
            from .diffusers_cache import DiffusersCacheApplier

            handle.applier = DiffusersCacheApplier(tracker, spec, context)
        try:
            handle.applier.install()
            yield handle
        finally:
            handle.applier.remove()
