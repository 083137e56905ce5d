"""Run, step and call boundaries of a diffusers denoising loop: one hook class for the capture and the caches.

``scheduler.set_timesteps`` starts a run, ``scheduler.step`` ends a step, and a forward pre-hook on the
transformer numbers its calls within the step (pipelines such as Lumina2 and Wan call it twice per step, once
per CFG branch). The scheduler's methods are wrapped with ``functools.wraps``: pipelines inspect their
signatures.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import torch
from torch import nn


class StepTracker:
    """Counts runs, steps and transformer calls; what to do at each boundary is left to subclasses.

    Subclasses extend :meth:`start_run` / :meth:`end_step` and override :meth:`call_started`,
    :meth:`scheduler_stepped` and (with ``track_call_end``) :meth:`call_ended`. The hooks are looked up when
    they fire, so an instance may replace them before :meth:`install`. ``install`` puts everything on,
    ``remove`` takes all of it off again; the subclasses' context managers pair the two.
    """

    track_call_end = False  # a forward hook after every transformer call: off unless a subclass needs call_ended

    def __init__(self, transformer: nn.Module, scheduler: Any = None) -> None:
        self.transformer = transformer
        self.scheduler = scheduler
        self.step = 0  # steps ended in the running run
        self.calls_in_step = 0  # transformer calls begun in the running step
        self.call_index: int | None = None  # the step's latest call; None before it (and between, if track_call_end)
        self._undo: list[Callable[[], None]] = []

    def install(self) -> None:
        self._undo.append(self.transformer.register_forward_pre_hook(self._before_call, with_kwargs=True).remove)
        if self.track_call_end:
            self._undo.append(self.transformer.register_forward_hook(self._after_call, always_call=True).remove)
        if self.scheduler is not None:
            self.wrap(self.scheduler, "set_timesteps", before=lambda args, kwargs: self.start_run())
            self.wrap(self.scheduler, "step", after=self.scheduler_stepped)

    def remove(self) -> None:
        """Take off every hook and wrapper, the last installed first (idempotent)."""
        while self._undo:
            self._undo.pop()()

    def wrap(self, owner: Any, name: str, *, before: Callable[[tuple, dict], None] | None = None,
             after: Callable[[tuple, dict, Any], None] | None = None) -> None:
        """Wrap ``owner.name`` until :meth:`remove`: ``before(args, kwargs)`` runs before each call,
        ``after(args, kwargs, result)`` after it."""
        original = getattr(owner, name)
        was_own = name in getattr(owner, "__dict__", {})

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if before is not None:
                before(args, kwargs)
            result = original(*args, **kwargs)
            if after is not None:
                after(args, kwargs, result)
            return result

        setattr(owner, name, wrapper)
        self._undo.append(functools.partial(_restore, owner, name, original, was_own))

    # -- boundaries ---------------------------------------------------------------------------------------
    def start_run(self) -> None:
        """Begin a run (before ``scheduler.set_timesteps``, or called by a loop that reports its own steps)."""
        self.step, self.calls_in_step, self.call_index = 0, 0, None

    def end_step(self) -> None:
        """End the running step (after ``scheduler.step``, or called by a loop that reports its own steps)."""
        self.step += 1
        self.calls_in_step, self.call_index = 0, None

    def scheduler_stepped(self, args: tuple, kwargs: dict, result: Any) -> None:
        """``scheduler.step(*args, **kwargs)`` returned ``result``: the step is over."""
        self.end_step()

    def call_started(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """The transformer call number ``call_index`` of the step begins with these arguments."""

    def call_ended(self) -> None:
        """The running transformer call returned or raised (only with ``track_call_end``)."""

    def _before_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.call_index = self.calls_in_step
        self.calls_in_step += 1
        self.call_started(module, args, kwargs)

    def _after_call(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.call_ended()
        self.call_index = None


def first_tensor(args: tuple, kwargs: dict, name: str = "hidden_states") -> torch.Tensor | None:
    """The call's ``name`` argument, else its first tensor argument: where a module's batch size is read."""
    value = kwargs.get(name, args[0] if args else None)
    if isinstance(value, torch.Tensor):
        return value
    return next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)


def call_argument(function: Any, name: str, args: tuple, kwargs: dict) -> Any:
    """The value passed for parameter ``name`` (schedulers differ in where ``timestep`` sits)."""
    if name in kwargs:
        return kwargs[name]
    try:
        return _signature(function).bind_partial(*args, **kwargs).arguments.get(name)
    except (TypeError, ValueError):
        return None


def _signature(function: Any) -> inspect.Signature:
    """``inspect.signature`` once per underlying function (it costs about 0.2 ms; ``scheduler.step`` is asked
    every step). Keyed by the unwrapped function (a capture's wrapper is new each time) and whether it is
    bound, so the cache holds no instance."""
    unwrapped = inspect.unwrap(function)
    key = (getattr(unwrapped, "__func__", unwrapped), hasattr(unwrapped, "__self__"))
    signature = _SIGNATURES.get(key)
    if signature is None:
        signature = inspect.signature(function)
        if len(_SIGNATURES) < 256:
            _SIGNATURES[key] = signature
    return signature


_SIGNATURES: dict[Any, inspect.Signature] = {}


def _restore(owner: Any, name: str, original: Any, was_own: bool) -> None:
    """Put back what :meth:`StepTracker.wrap` replaced: the owner's own attribute, or none (the class's shows)."""
    if was_own:
        setattr(owner, name, original)
    else:
        try:
            delattr(owner, name)
        except AttributeError:
            pass
