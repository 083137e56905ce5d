"""The profile schedule's reuse hooks: where the mask says so, an attention module returns its cached output.

:class:`ScheduleApplier` puts a diffusers ``ModelHook`` with ``new_forward`` on every attention module: where
the schedule says so it returns the cached output *without calling the module* (the work is really skipped).
Caches are keyed by (layer, call index within the step), so CFG branches run as separate calls never share an
entry; they are dropped at every run start and on removal, so nothing leaks from one prompt batch into the
next. It is the ``profile`` engine's applier (:mod:`.engines`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..capture.tracking import first_tensor
from .base import CacheBatchError, RunTracker, attention_modules
from .schedule import CacheSchedule


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

    def counters(self) -> dict[str, Any]:
        return {"skipped_calls": self.skipped, "total_calls": self.total_calls}

    def skipped_steps(self) -> list[int]:
        """Steps at which at least one layer returned its cached output (the schedule reuses per layer)."""
        return [int(step) for step in np.flatnonzero(self.skipped_cells.sum(axis=0))]

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
