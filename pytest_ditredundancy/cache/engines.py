"""What runs a caching strategy: one :class:`CacheEngine` per kind, found through the strategy's ``engine``.

An engine makes the applier that :func:`~pytest_ditredundancy.cache.apply.applied` installs and removes (an
object with ``install()``, ``remove()``, ``counters()`` and ``skipped_steps()``), writes the line a user pastes
to apply the same setting to their own pipeline outside this harness (:meth:`CacheEngine.code_line`, with its
imports in :meth:`CacheEngine.code_imports`), and says whether an exception the cached pipeline raised is the
cache's limitation or a bug here (:meth:`CacheEngine.failure`). Behaviour that differs by engine lives here,
so nothing else compares strategy names.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Protocol

from . import cachedit
from .base import RunTracker
from .diffusers_cache import _APPLY, _BFCHW, DiffusersCacheApplier, _guidance, strategy_failure
from .reuse import ScheduleApplier
from .schedule import CacheSchedule, ScheduleError
from .spec import EXTRA_PARAMS, STRATEGIES, CacheSpec


class Applier(Protocol):
    """What an engine's applier offers ``applied``."""

    def install(self) -> None: ...

    def remove(self) -> None: ...

    def counters(self) -> dict[str, Any]: ...

    def skipped_steps(self) -> list[int] | None: ...


class CacheEngine(ABC):
    """Base of the engines; subclasses set ``name`` and override what differs."""

    name = ""

    @abstractmethod
    def applier(self, tracker: RunTracker, spec: CacheSpec, *, schedule: CacheSchedule | None = None,
                context: Any = None) -> Applier | None:
        """The applier for one ``applied`` block (``None``: nothing to install)."""

    def code_imports(self, spec: CacheSpec, **values: Any) -> list[str]:
        """The import lines :meth:`code_line` needs."""
        return []

    @abstractmethod
    def code_line(self, spec: CacheSpec, **values: Any) -> str:
        """The one line that applies ``spec`` to a pipeline named ``pipe`` outside this harness. ``values``
        carry what the spec alone does not say (each engine documents the ones it needs; others are ignored)."""

    def failure(self, exc: BaseException) -> str | None:
        """Where the strategy made a pipeline raise whose uncached run succeeded; ``None``: not the strategy's
        limitation (this package's own code raised, or the engine is ours)."""
        return None


class NoCacheEngine(CacheEngine):
    """``none``: tracking only, nothing installed."""

    name = "none"

    def applier(self, tracker: RunTracker, spec: CacheSpec, *, schedule: CacheSchedule | None = None,
                context: Any = None) -> None:
        return None

    def code_line(self, spec: CacheSpec, **values: Any) -> str:
        return "# no caching: call the pipeline as it is"


class ProfileEngine(CacheEngine):
    """``profile``: our static layer x step schedule (:mod:`.reuse`)."""

    name = "profile"

    def applier(self, tracker: RunTracker, spec: CacheSpec, *, schedule: CacheSchedule | None = None,
                context: Any = None) -> ScheduleApplier:
        if schedule is None:
            raise ScheduleError("the profile strategy needs a schedule")
        return ScheduleApplier(tracker, schedule)

    def code_imports(self, spec: CacheSpec, **values: Any) -> list[str]:
        return ["from pytest_ditredundancy.cache import CacheSchedule, applied, parse_spec"]

    def code_line(self, spec: CacheSpec, **values: Any) -> str:
        """``schedule_path``: where the schedule was saved (:meth:`CacheSchedule.save`), unless the spec names it."""
        path = spec.params.get("schedule", values.get("schedule_path"))
        if not path:
            raise ValueError("the profile strategy's code line applies a saved schedule: pass schedule_path= (the "
                             "file CacheSchedule.save wrote)")
        return (f"with applied(pipe, parse_spec('profile'), schedule=CacheSchedule.load({str(path)!r})): "
                "output = pipe(prompt)")


#: diffusers' documented way to give PAB and FasterCache the running timestep
_TIMESTEP = "lambda: pipe.current_timestep"


def _literal(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{value} has no Python literal")
    return repr(value)


class DiffusersEngine(CacheEngine):
    """diffusers' built-in caches (:mod:`.diffusers_cache`)."""

    name = "diffusers"

    def applier(self, tracker: RunTracker, spec: CacheSpec, *, schedule: CacheSchedule | None = None,
                context: Any = None) -> DiffusersCacheApplier:
        return DiffusersCacheApplier(tracker, spec, context)

    @staticmethod
    def _has_enable_cache(values: dict[str, Any]) -> bool:
        if values.get("has_enable_cache") is not None:
            return bool(values["has_enable_cache"])
        cls = values.get("transformer_class")
        if cls is None:
            raise ValueError("a diffusers cache's code line depends on the transformer: pass transformer_class= (the "
                             "class or its diffusers name) or has_enable_cache= (CacheMixin transformers take "
                             "pipe.transformer.enable_cache(config), the others diffusers.hooks.apply_*)")
        if isinstance(cls, str):
            import diffusers

            name, cls = cls, getattr(diffusers, cls, None)
            if cls is None:
                raise ValueError(f"diffusers has no class {name!r}; pass the transformer's class itself")
        return callable(getattr(cls, "enable_cache", None))

    def _arguments(self, spec: CacheSpec, values: dict[str, Any]) -> tuple[dict[str, str], list[str]]:
        """The config's keyword arguments as source text, and the extra imports they need. ``values``:
        FasterCache's layout (see :meth:`_faster_cache_layout`), ``steps`` and ``mag_ratios`` (MagCache: the
        run's step count and its calibrated ratios)."""
        extra = EXTRA_PARAMS.get(spec.strategy, set())
        args = {key: _literal(value) for key, value in spec.params.items() if key not in extra}
        imports: list[str] = []
        if spec.strategy == "pab":
            if not any(key.endswith("block_skip_range") for key in spec.params):
                args["spatial_attention_block_skip_range"] = "2"  # what the gate runs (diffusers sets none)
            args["current_timestep_callback"] = _TIMESTEP
        elif spec.strategy == "fastercache":
            args.update(self._faster_cache_layout(spec, values))
            args["current_timestep_callback"] = _TIMESTEP
            args["attention_weight_callback"] = f"lambda _: {_literal(spec.params.get('attention_weight', 0.5))}"
        elif spec.strategy == "magcache":
            if spec.params.get("mag_ratios") == "flux":
                args["mag_ratios"] = "FLUX_MAG_RATIOS"
                imports.append("from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS")
            elif values.get("mag_ratios") is not None:
                args["mag_ratios"] = _literal([float(v) for v in values["mag_ratios"]])
            else:
                raise ValueError("magcache:mag_ratios=calibrate: pass mag_ratios= (the calibrated ratios)")
            if values.get("steps") is None:
                raise ValueError("magcache's code line needs steps= (its ratios are per denoising step)")
            args["num_inference_steps"] = _literal(int(values["steps"]))
        elif spec.strategy == "taylorseer" and "taylor_factors_dtype" in spec.params:
            args["taylor_factors_dtype"] = f"torch.{spec.params['taylor_factors_dtype']}"
            imports.append("import torch")
        return args, imports

    @staticmethod
    def _faster_cache_layout(spec: CacheSpec, values: dict[str, Any]) -> dict[str, str]:
        """FasterCache's ``is_guidance_distilled`` and ``tensor_format`` as the gate detects them (diffusers'
        defaults, no CFG split and video layout, would be wrong for image models): given in the spec or in
        ``values``, else from ``context`` (the run's ``StrategyContext``) and ``transformer_class``."""
        context = values.get("context")
        distilled = spec.params.get("is_guidance_distilled", values.get("is_guidance_distilled"))
        if distilled is None and context is not None:
            distilled = _guidance(context) == "none"
        layout = spec.params.get("tensor_format", values.get("tensor_format"))
        if layout is None and context is not None and not distilled:
            cls = values.get("transformer_class")
            name = cls if isinstance(cls, str) else getattr(cls, "__name__", "")
            layout = "BCHW" if not context.model.is_video else "BFCHW" if name in _BFCHW else "BCFHW"
        if distilled is None or (layout is None and not distilled):
            raise ValueError("fastercache's code line needs is_guidance_distilled= and tensor_format= (or context=, "
                             "the run's StrategyContext, with transformer_class=)")
        return {"is_guidance_distilled": _literal(bool(distilled)),
                **({} if distilled else {"tensor_format": _literal(layout)})}

    def code_imports(self, spec: CacheSpec, **values: Any) -> list[str]:
        config = STRATEGIES[spec.strategy].diffusers_config
        names = [config] if self._has_enable_cache(values) else [config, _APPLY[spec.strategy]]
        return [f"from diffusers.hooks import {', '.join(names)}", *self._arguments(spec, values)[1]]

    def code_line(self, spec: CacheSpec, **values: Any) -> str:
        """``transformer_class`` or ``has_enable_cache`` (required), and the values :meth:`_arguments` names."""
        args, _ = self._arguments(spec, values)
        config = f"{STRATEGIES[spec.strategy].diffusers_config}({', '.join(f'{k}={v}' for k, v in args.items())})"
        if self._has_enable_cache(values):
            return f"pipe.transformer.enable_cache({config})"
        return f"{_APPLY[spec.strategy]}(pipe.transformer, {config})"

    def failure(self, exc: BaseException) -> str | None:
        return strategy_failure(exc)


class CacheDitEngine(CacheEngine):
    """cache-dit's DBCache (:mod:`.cachedit`)."""

    name = "cachedit"

    def applier(self, tracker: RunTracker, spec: CacheSpec, *, schedule: CacheSchedule | None = None,
                context: Any = None) -> cachedit.CacheDitApplier:
        return cachedit.CacheDitApplier(tracker, spec, context)

    def code_imports(self, spec: CacheSpec, **values: Any) -> list[str]:
        return cachedit.code_imports(spec)

    def code_line(self, spec: CacheSpec, **values: Any) -> str:
        return cachedit.code_line(spec)

    def failure(self, exc: BaseException) -> str | None:
        return cachedit.failure(exc)


ENGINES: dict[str, CacheEngine] = {engine.name: engine for engine in [
    NoCacheEngine(), ProfileEngine(), DiffusersEngine(), CacheDitEngine()]}


def engine_of(spec: CacheSpec | None) -> CacheEngine:
    """The engine that runs ``spec`` (``None``: no caching)."""
    if spec is None:
        return ENGINES["none"]
    strategy = STRATEGIES.get(spec.strategy)
    if strategy is None:
        raise ValueError(f"unknown caching strategy {spec.strategy!r}; strategies: {', '.join(STRATEGIES)}")
    if strategy.engine not in ENGINES:
        raise ValueError(f"strategy {spec.strategy!r} names engine {strategy.engine!r}, which is not one of "
                         f"{', '.join(ENGINES)}")
    return ENGINES[strategy.engine]


def merge_counters(total: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    """Counters of several ``applied`` blocks (one per prompt batch) as one: numbers add, lists (one item per
    run) concatenate, texts that differ are joined with `` | ``, other values are kept while they agree."""
    merged = dict(total)
    for key, value in more.items():
        if key not in merged:
            merged[key] = list(value) if isinstance(value, list) else value
            continue
        have = merged[key]
        numbers = (int, float)
        if isinstance(have, numbers) and isinstance(value, numbers) and not isinstance(have, bool) \
                and not isinstance(value, bool):
            merged[key] = have + value
        elif isinstance(have, list) and isinstance(value, list):
            merged[key] = have + value
        elif isinstance(have, str) and isinstance(value, str):
            merged[key] = have if value in have.split(" | ") else f"{have} | {value}"
        elif have != value:
            merged[key] = [have, value]
    return merged
