"""Scheduler names users can type (``--dit-scheduler=euler``) and which ones suit a model."""

from __future__ import annotations

import difflib
import math
import weakref
from typing import Any

#: alias -> (diffusers class name, config overrides)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "dpm-solver": ("DPMSolverMultistepScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "flow-euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "flow-heun": ("FlowMatchHeunDiscreteScheduler", {}),
    "flow-euler-karras": ("FlowMatchEulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "flow-dpm-solver": ("DPMSolverMultistepScheduler", {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}),
    "flow-unipc": ("UniPCMultistepScheduler", {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}),
    "cogvideox-dpm": ("CogVideoXDPMScheduler", {}),
    "cogvideox-ddim": ("CogVideoXDDIMScheduler", {}),
    "rectified-flow": ("FlowMatchEulerDiscreteScheduler", {}),
}

#: Schedulers the scheduler-stability suite compares, by what the model predicts.
COMPATIBLE: dict[str, tuple[str, ...]] = {
    "epsilon": ("dpm-solver", "euler", "ddim"),
    "v_prediction": ("dpm-solver", "euler", "ddim"),
    # Heun and DPM-Solver reject the custom sigmas some pipelines pass (Flux, LTX, Mochi, Lumina2):
    # Karras-spaced Euler still gives those a second schedule to compare.
    "flow": ("flow-euler", "flow-heun", "flow-dpm-solver", "flow-euler-karras"),
}


class UnknownSchedulerError(ValueError):
    pass


def scheduler_class_and_overrides(name: str) -> tuple[type, dict[str, Any]]:
    """Resolve an alias or a diffusers scheduler class name."""
    import diffusers

    if name in SCHEDULERS:
        class_name, overrides = SCHEDULERS[name]
        return getattr(diffusers, class_name), dict(overrides)
    cls = getattr(diffusers, name, None)
    if isinstance(cls, type) and name.endswith("Scheduler"):
        return cls, {}
    close = difflib.get_close_matches(name, list(SCHEDULERS), n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UnknownSchedulerError(
        f"unknown scheduler {name!r}.{hint} Use one of: default, {', '.join(SCHEDULERS)}, "
        "or a diffusers scheduler class name such as 'EulerAncestralDiscreteScheduler'."
    )


def make_scheduler(name: str, base: Any) -> Any:
    """A new scheduler of kind ``name`` configured from ``base``'s config (``default``: a copy of ``base``)."""
    if name in (None, "", "default"):
        return type(base).from_config(base.config)
    cls, overrides = scheduler_class_and_overrides(name)
    if type(base) is cls and not overrides:
        return cls.from_config(base.config)
    config = dict(base.config)
    if cls.__name__.startswith("FlowMatch") or overrides.get("use_flow_sigmas"):
        config.pop("prediction_type", None)  # flow schedulers predict velocity; keep the model's shift settings
    if overrides.get("use_flow_sigmas") and "shift" in config and "flow_shift" not in config:
        config["flow_shift"] = config["shift"]  # DPM-Solver/UniPC read the flow-matching shift as flow_shift
    return cls.from_config(config, **overrides)


#: The scheduler each pipeline came with: every swap starts from it, so a profile never depends on which
#: scheduler an earlier test left behind (e.g. Karras sigmas leaking into a later flow-euler run).
_ORIGINAL: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


def apply_scheduler(pipe: Any, name: str | None) -> Any:
    """Replace ``pipe.scheduler`` with a fresh ``name`` scheduler configured from the pipeline's original one
    (``None``/``default``: a fresh copy of the original)."""
    try:
        original = _ORIGINAL.setdefault(pipe, pipe.scheduler)
    except TypeError:  # not weak-referenceable
        original = pipe.scheduler
    scheduler = make_scheduler(name or "default", original)
    pipe.scheduler = scheduler
    return scheduler


def checkpoint_scheduler(pipe: Any) -> dict[str, Any]:
    """The class and config of the scheduler the pipeline was loaded with (before any swap).

    Profiles run with the scheduler the settings name, built from this one's config, so a checkpoint that
    ships another scheduler class would otherwise be invisible; baselines record it and the regression
    suite compares it.
    """
    from ..io import plain

    try:
        original = _ORIGINAL.get(pipe) or pipe.scheduler
    except TypeError:
        original = pipe.scheduler
    config = {k: v for k, v in dict(getattr(original, "config", {}) or {}).items() if not k.startswith("_")}
    return {"class": type(original).__name__, "config": plain(config)}


_NONFINITE_TEXT = {"inf", "-inf", "nan", "Infinity", "-Infinity", "NaN"}


def comparable_scheduler(recorded: Any) -> Any:
    """A recorded scheduler (see :func:`checkpoint_scheduler`) in the one form every store writes it: floats to 7
    significant digits and non-finite values (``lambda_min_clipped=-inf``; profile JSON writes them as text,
    baselines as null) as None, so a value that went through a file compares equal to one that did not."""
    from ..io import plain

    def normal(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: normal(v) for k, v in value.items()}
        if isinstance(value, list):
            return [normal(v) for v in value]
        if isinstance(value, float):
            return float(f"{value:.7g}") if math.isfinite(value) else None
        if isinstance(value, str) and value in _NONFINITE_TEXT:
            return None
        return value

    return normal(plain(recorded))


#: Words in the ValueError diffusers' ``retrieve_timesteps`` raises for a scheduler whose ``set_timesteps``
#: cannot take the custom sigmas/timesteps a pipeline passes (e.g. Heun with Flux).
_REJECTION = "set_timesteps` does not support custom"


def scheduler_rejection(exc: BaseException) -> str | None:
    """The reason when ``exc`` says the pipeline cannot run this scheduler at all, else None (a real error)."""
    if isinstance(exc, ValueError) and _REJECTION in str(exc):
        return str(exc).splitlines()[0]
    return None


def compatible_schedulers(prediction: str) -> tuple[str, ...]:
    return COMPATIBLE.get(prediction, COMPATIBLE["flow"])
