"""What every caching strategy builds on: the run tracker, the attention modules a cache may skip, the errors.

Both appliers (the profile schedule in :mod:`.apply`, diffusers' hooks in :mod:`.diffusers_cache`) import it,
so neither imports the other.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..capture.sites import is_attention_module
from ..capture.tracking import StepTracker
from .undo import Reversible


class CacheBatchError(RuntimeError):
    """A cached attention output would be reused for a call with another batch size."""


class UnsupportedStrategy(Exception):
    """The model cannot run this strategy; the message says why (the suite skips with it)."""


def attention_modules(transformer: nn.Module) -> list[tuple[str, nn.Module]]:
    """Attention modules in registration order: the layer names of profiles and schedules."""
    return [(name, m) for name, m in transformer.named_modules() if name and is_attention_module(m)]


class RunTracker(StepTracker, Reversible):
    """Run/step/call boundaries of a pipeline, final latents, and the current timestep for callbacks."""

    track_call_end = True  # listeners close each call's cache context; no call is current between calls

    def __init__(self, pipe: Any) -> None:
        super().__init__(pipe.transformer, pipe.scheduler)
        self.pipe = pipe
        self.final_latents: list[torch.Tensor | None] = []
        self.run_starts: list[Callable[[], None]] = []
        self.call_listeners: list[Any] = []  # objects with before_call(index) / after_call()

    def start_run(self) -> None:
        super().start_run()
        self.final_latents.append(None)
        for callback in self.run_starts:
            callback()

    def scheduler_stepped(self, args: tuple, kwargs: dict, result: Any) -> None:
        latents = getattr(result, "prev_sample", None)
        if latents is None and isinstance(result, (tuple, list)) and result:
            latents = result[0]
        if isinstance(latents, torch.Tensor) and self.final_latents:
            self.final_latents[-1] = latents.detach().clone()
        self.end_step()

    def call_started(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        for listener in self.call_listeners:
            listener.before_call(self.call_index)

    def call_ended(self) -> None:
        for listener in self.call_listeners:
            listener.after_call()

    def current_timestep(self) -> float:
        """The scheduler's timestep of the running step (0..1000 for the zoo's schedulers)."""
        timesteps = getattr(self.scheduler, "timesteps", None)
        if timesteps is None or len(timesteps) == 0:
            return 0.0
        return float(timesteps[min(self.step, len(timesteps) - 1)])
