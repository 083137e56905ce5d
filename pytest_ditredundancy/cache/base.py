"""What every caching strategy builds on: the run tracker, the attention modules a cache may skip, the errors.

Every engine's applier (the profile schedule in :mod:`.reuse`, diffusers' hooks in :mod:`.diffusers_cache`,
cache-dit in :mod:`.cachedit`) imports it, so none imports another.
"""

from __future__ import annotations

import traceback
from pathlib import PurePath
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


class CacheParameterError(ValueError):
    """A strategy parameter the user gave that does not fit this model (more compute blocks than it has, a CFG
    mode it does not run): unlike :class:`UnsupportedStrategy` the request itself is wrong, so the gate fails."""


class CacheDependencyError(ImportError):
    """The package a requested strategy runs on is missing, or its version is outside the tested range; the
    message names the install command."""


def raised_under(exc: BaseException, package: tuple[str, ...], skip_files: tuple[str, ...] = ()) -> str | None:
    """Where ``exc`` was raised, for an exception a cache made the pipeline raise: ``"Type: message (raised
    under <package path>:line)"`` when a frame lies in ``package`` (path parts, e.g. ``("diffusers", "hooks")``;
    files named in ``skip_files`` do not count), else ``"... (at <file>:line)"`` of the innermost frame.
    ``None`` when the innermost frame is this package's own code: a bug here, never the cache's limitation."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames or "pytest_ditredundancy" in PurePath(frames[-1].filename).parts:
        return None

    def inside(filename: str) -> bool:
        parts = PurePath(filename.replace("\\", "/")).parts
        width = len(package)
        return (PurePath(filename).name not in skip_files
                and any(parts[i:i + width] == package for i in range(len(parts) - width + 1)))

    matched = [f for f in frames if inside(f.filename)]
    where = (matched or frames)[-1]
    parts = PurePath(where.filename).parts
    root = package[0]
    short = "/".join(parts[parts.index(root):]) if root in parts else PurePath(where.filename).name
    return f"{type(exc).__name__}: {exc} ({'raised under' if matched else 'at'} {short}:{where.lineno})"


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
