"""cache-dit's DBCache as the ``cachedit`` strategy, through cache-dit's public API only.

DBCache runs the first ``Fn`` transformer blocks at every step and compares the residual they add with the
previous step's (relative L1); below the threshold ``rdt`` it reuses the cached residual of the middle blocks
instead of running them, then runs the last ``Bn`` blocks. ``cache_dit.enable_cache`` installs it on a
pipeline and resets its state at every pipeline call; ``cache_dit.summary`` reports what each call cached;
``cache_dit.disable_cache`` takes it off. cache-dit leaves traces behind (its stats on the block list, the
transformer's ``forward`` re-bound as an instance attribute, Flux's patched forward), so the applier records
the pipeline's instance state before installing and puts every attribute back on removal.

Parameters are the short names of :data:`KNOBS` (``taylorseer`` is the TaylorSeer calibrator's order, 0 off).
Defaults are cache-dit's own, except ``Fn``: cache-dit's 8 exceeds the block stacks of the zoo's models, and
``Fn=1, Bn=0`` is First-Block-Cache's split. Every value is passed to cache-dit explicitly, so a change of
cache-dit's defaults cannot change what a baseline key means.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import logging
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

from torch import nn

from .base import CacheDependencyError, CacheParameterError, RunTracker, UnsupportedStrategy, raised_under
from .spec import CacheSpec

if TYPE_CHECKING:
    from .diffusers_cache import StrategyContext

INSTALL = "pip install 'pytest-ditredundancy[cache-dit]'"
#: the cache-dit versions this strategy was tested with: 1.5 <= version < 2 (the ``cache-dit`` extra's range)
TESTED = ((1, 5), (2, 0))


@dataclass(frozen=True)
class Knob:
    """One spec parameter: the ``DBCacheConfig`` field it sets, our default and cache-dit's."""

    field: str
    default: Any
    upstream: Any


KNOBS: dict[str, Knob] = {
    "Fn": Knob("Fn_compute_blocks", 1, 8),
    "Bn": Knob("Bn_compute_blocks", 0, 0),
    "rdt": Knob("residual_diff_threshold", 0.08, 0.08),
    "warmup": Knob("max_warmup_steps", 8, 8),
    "warmup_interval": Knob("warmup_interval", 1, 1),
    "max_cached_steps": Knob("max_cached_steps", -1, -1),
    "max_continuous_cached_steps": Knob("max_continuous_cached_steps", -1, -1),
    "max_accumulated_rdt": Knob("max_accumulated_residual_diff_threshold", None, None),
    "separate_cfg": Knob("enable_separate_cfg", None, None),  # None: cache-dit decides from the pipeline class
}
#: in the code line even where they equal cache-dit's defaults: they are what a reader tunes
SHOWN = ("Fn", "Bn", "rdt", "warmup")
_MISSING = object()


def require_cache_dit() -> Any:
    """The ``cache_dit`` module, or :class:`CacheDependencyError` naming the install command."""
    try:
        module = importlib.import_module("cache_dit")
    except ImportError as exc:
        raise CacheDependencyError(f"the cachedit strategy runs on cache-dit, which is not installed ({exc}): "
                                   f"{INSTALL}") from None
    try:
        version = importlib.metadata.version("cache-dit")
    except importlib.metadata.PackageNotFoundError:
        version = str(getattr(module, "__version__", "unknown"))
    found = re.match(r"(\d+)\.(\d+)", version)
    low, high = TESTED
    if found is None or not low <= (int(found[1]), int(found[2])) < high:
        raise CacheDependencyError(f"the cachedit strategy was tested with cache-dit >={low[0]}.{low[1]},"
                                   f"<{high[0]}; installed is {version}: {INSTALL}")
    return module


def resolved(spec: CacheSpec) -> dict[str, Any]:
    """Every knob's value for ``spec``: the value given, else this strategy's default; plus ``taylorseer``."""
    values = {name: spec.params.get(name, knob.default) for name, knob in KNOBS.items()}
    values["taylorseer"] = spec.params.get("taylorseer", 0)
    return values


def config_fields(values: dict[str, Any], *, all_fields: bool = True) -> dict[str, Any]:
    """``DBCacheConfig`` keyword arguments; with ``all_fields=False`` only those a reader needs to see (the
    :data:`SHOWN` four and those that differ from cache-dit's defaults)."""
    return {knob.field: values[name] for name, knob in KNOBS.items()
            if values[name] is not None and (all_fields or name in SHOWN or values[name] != knob.upstream)}


def code_line(spec: CacheSpec) -> str:
    """The line that applies this setting to a user's own pipeline (imports: :func:`code_imports`)."""
    values = resolved(spec)
    fields = ", ".join(f"{key}={value!r}" for key, value in config_fields(values, all_fields=False).items())
    calibrator = (f", calibrator_config=TaylorSeerCalibratorConfig(taylorseer_order={values['taylorseer']})"
                  if values["taylorseer"] else "")
    return f"cache_dit.enable_cache(pipe, cache_config=DBCacheConfig({fields}){calibrator})"


def code_imports(spec: CacheSpec) -> list[str]:
    names = "DBCacheConfig, TaylorSeerCalibratorConfig" if resolved(spec)["taylorseer"] else "DBCacheConfig"
    return ["import cache_dit", f"from cache_dit import {names}"]


def failure(exc: BaseException) -> str | None:
    """An exception cache-dit made the pipeline raise, with where (see :func:`~.base.raised_under`)."""
    return raised_under(exc, ("cache_dit",))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """cache-dit logs every install and removal at INFO/WARNING on its own handlers: keep them out of test output."""
    loggers = [logger for name, logger in list(logging.Logger.manager.loggerDict.items())
               if isinstance(logger, logging.Logger) and name.split(".")[0] in ("cache_dit", "CACHE_DIT")]
    saved = [(logger, logger.level) for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


class _InstanceState:
    """The instance attributes of some objects, to put back exactly: added ones removed, replaced ones reset.
    For modules also the registries of submodules, parameters and buffers, order included: cache-dit swaps
    block lists in and out with ``unittest.mock.patch.object`` at every forward, which re-registers them last
    (and the registration order is the order of the profile's layers)."""

    REGISTRIES = ("_modules", "_parameters", "_buffers")

    def __init__(self, objects: list[Any]) -> None:
        self.saved = [(obj, dict(vars(obj))) for obj in objects]
        self.registries = [(registry, list(registry.items())) for obj in objects if isinstance(obj, nn.Module)
                           for registry in (getattr(obj, name) for name in self.REGISTRIES)]

    def restore(self, only: set[str] | None = None) -> set[str]:
        """Undo every change since the snapshot (``only``: just these names); the names undone."""
        undone: set[str] = set()
        for obj, before in self.saved:
            now = vars(obj)
            for name in [n for n in now if n not in before and (only is None or n in only)]:
                delattr(obj, name)
                undone.add(name)
            for name, value in before.items():
                if (only is None or name in only) and (name not in now or now[name] is not value):
                    setattr(obj, name, value)
                    undone.add(name)
        for registry, items in self.registries:
            now = list(registry.items())
            if len(now) != len(items) or any(a[0] != b[0] or a[1] is not b[1] for a, b in zip(now, items)):
                registry.clear()
                registry.update(items)
        return undone

    def changed(self) -> set[str]:
        return {name for obj, before in self.saved for name, value in vars(obj).items()
                if name not in before or before[name] is not value}


def _block_stacks(adapter: Any) -> list[tuple[str, int]]:
    """(name, length) of each block list cache-dit splits into Fn / middle / Bn (one cache context each)."""
    dummies = "".join(f" + {name}" for name in (adapter.dummy_blocks_names or []) if isinstance(name, str))

    def flat(blocks: Any, names: Any) -> list[tuple[str, int]]:
        if isinstance(blocks, nn.ModuleList):
            return [(f"{names if isinstance(names, str) else 'blocks'}{dummies}", len(blocks))]
        names = names if isinstance(names, (list, tuple)) else [names] * len(blocks)
        return [stack for inner, name in zip(blocks, names) for stack in flat(inner, name)]

    return flat(adapter.blocks, adapter.blocks_name)


def check_blocks(spec: CacheSpec, values: dict[str, Any], transformer: nn.Module,
                 stacks: list[tuple[str, int]]) -> None:
    """Fn + Bn must leave middle blocks to cache: raised here, before cache-dit's own assertion (or, for
    Fn + Bn equal to the stack, before a cache that can never skip anything)."""
    fn, bn = values["Fn"], values["Bn"]
    model = type(transformer).__name__
    listing = ", ".join(f"{name}: {count} blocks" for name, count in stacks)
    fix = ("use fewer compute blocks, e.g. --dit-cache=cachedit:Fn=1,Bn=0 (First-Block-Cache's split), with "
           "Fn + Bn below the block count")
    over = [(name, count) for name, count in stacks if fn + bn > count]
    if over:
        name, count = over[0]
        raise CacheParameterError(f"{spec}: Fn={fn} + Bn={bn} = {fn + bn} compute blocks, but {model} has {count} "
                                  f"transformer blocks in {name} ({listing}); {fix}")
    if all(fn + bn == count for _, count in stacks):
        raise CacheParameterError(f"{spec}: Fn={fn} + Bn={bn} leaves no middle block of {model} to cache ({listing}): "
                                  f"every block is computed at every step; {fix}")


def _cfg_text(context: "StrategyContext | None", separate: bool | None) -> str:
    """How classifier-free guidance reaches the transformer, and what cache-dit does with it."""
    mode = ("enable_separate_cfg=True: the CFG calls alternate and get separate cache decisions" if separate else
            "enable_separate_cfg=False: one cache decision per step")
    if context is None or context.model.branch_layout == "auto":
        return f"as cache-dit detects from the pipeline class ({mode})"
    scale = context.settings.guidance_scale
    layout = context.model.branch_layout
    if layout == "single" or (scale is not None and scale <= 1):
        return f"no CFG: one call per step ({mode})"
    if layout.startswith("batched"):
        return f"batched in one call ({layout.split('-', 1)[1]}; {mode}, the same for both halves)"
    return f"separate calls ({layout.split('-', 1)[1]}; {mode})"


def _expected_separate(context: "StrategyContext | None") -> bool | None:
    """Whether the model runs its CFG branches as separate transformer calls (None: unknown)."""
    if context is None or context.model.branch_layout == "auto":
        return None
    scale = context.settings.guidance_scale
    if context.model.branch_layout == "single" or (scale is not None and scale <= 1):
        return False
    return context.model.branch_layout.startswith("sequential")


class CacheDitApplier:
    """Installs cache-dit on the tracker's pipeline; ``remove`` takes it off and restores every attribute."""

    def __init__(self, tracker: RunTracker, spec: CacheSpec, context: "StrategyContext | None") -> None:
        self.cache_dit = require_cache_dit()
        self.tracker, self.spec, self.context = tracker, spec, context
        self.pipe, self.transformer = tracker.pipe, tracker.transformer
        self.values = resolved(spec)
        self.separate_cfg: bool | None = None
        self.runs: list[dict[str, Any]] = []  # one record per completed pipeline run
        self._seen: Any = None  # the stats list cache-dit replaced at the end of the last recorded run
        self._installed = False
        self._state: _InstanceState | None = None
        self._pipe_state: _InstanceState | None = None
        self._class_state: dict[str, Any] | None = None
        self._pipe_keys: set[str] | None = None

    # -- install / remove ------------------------------------------------------------------------------------
    def install(self) -> None:
        from diffusers import DiffusionPipeline

        if not isinstance(self.pipe, DiffusionPipeline):
            raise UnsupportedStrategy(f"cache-dit applies to diffusers pipelines; {type(self.pipe).__name__} is not one")
        supported = self.cache_dit.supported_pipelines()[1]
        name = type(self.pipe).__name__
        if not any(name.startswith(prefix) for prefix in supported):
            raise UnsupportedStrategy(f"cache-dit {self.cache_dit.__version__} has no block adapter for {name} "
                                      f"(it has: {', '.join(supported)})")
        modules = list({id(m): m for m in [self.transformer, *self.transformer.modules()]}.values())
        self._state = _InstanceState(modules)
        self._pipe_state = _InstanceState([self.pipe])
        self._class_state = dict(vars(type(self.pipe)))
        with _quiet():
            try:
                stacks = _block_stacks(self.cache_dit.get_adapter(self.pipe))
            except (ValueError, TypeError, KeyError, AttributeError, AssertionError) as exc:
                raise UnsupportedStrategy(f"cache-dit's block adapter does not fit {name}: {type(exc).__name__}: "
                                          f"{exc}") from None
            check_blocks(self.spec, self.values, self.transformer, stacks)
            self._check_cfg(self.values["separate_cfg"], given=True)
            config = self.cache_dit.DBCacheConfig(**config_fields(self.values))
            calibrator = (self.cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=self.values["taylorseer"])
                          if self.values["taylorseer"] else None)
            try:
                self.cache_dit.enable_cache(self.pipe, cache_config=config, calibrator_config=calibrator)
            except (ValueError, TypeError, KeyError, AttributeError, AssertionError) as exc:
                raise UnsupportedStrategy(f"cache-dit could not apply DBCache to {name}: {type(exc).__name__}: "
                                          f"{exc}") from None
        self._installed = True
        self._pipe_keys = self._pipe_state.changed()  # what enable_cache set on the pipeline instance
        options = self._stats()[-1].cache_options
        self.separate_cfg = bool(options["cache_config"].enable_separate_cfg)
        self._check_cfg(self.separate_cfg, given=False)
        self.tracker.run_starts.append(self._record_finished_run)

    def _check_cfg(self, separate: bool | None, *, given: bool) -> None:
        """cache-dit's CFG mode must match how the model calls its transformer, or steps are miscounted."""
        expected = _expected_separate(self.context)
        if separate is None or expected is None or separate == expected:
            return
        how = ("runs its CFG branches as separate transformer calls" if expected else
               "makes one transformer call per step (CFG batched in it, or none)")
        whose = "separate_cfg" if given else "cache-dit's detected enable_separate_cfg"
        raise CacheParameterError(f"{self.spec}: {self.context.model.name} {how}, but {whose}={separate}: cache-dit "
                                  f"would count its calls as the wrong steps. Use cachedit:separate_cfg="
                                  f"{'true' if expected else 'false'}")

    def remove(self) -> None:
        if self._installed:
            self._record_finished_run()
            with _quiet():
                self.cache_dit.disable_cache(self.pipe)
            self._installed = False
        if self._state is None:
            return
        undone = self._state.restore()  # the modules: every change since install()
        # the pipeline: what cache-dit set on it, not what its own calls set (_guidance_scale, _num_timesteps, ...)
        keys = self._pipe_keys if self._pipe_keys is not None else self._pipe_state.changed()
        self._pipe_state.restore(only=keys | undone)
        cls, before = type(self.pipe), self._class_state
        for name in [n for n in vars(cls) if n not in before]:
            delattr(cls, name)
        for name, value in before.items():
            if vars(cls).get(name, _MISSING) is not value:
                setattr(cls, name, value)
        self._state = None

    # -- what it cached ----------------------------------------------------------------------------------------
    def _stats(self) -> list[Any]:
        return self.cache_dit.summary(self.pipe, logging=False)

    def _record_finished_run(self) -> None:
        """Record the last completed run (cache-dit replaces its stats lists at the end of every pipeline call)."""
        if not self._installed:
            return
        stats = self._stats()
        last = stats[-1]
        if last.accumulated_executed_steps <= 0 or last.cached_steps is self._seen:
            return
        self._seen = last.cached_steps
        cached = sorted({int(s) for entry in stats for s in [*entry.cached_steps, *entry.cfg_cached_steps]})
        steps = int(last.accumulated_executed_steps)
        diffs: list[float | None] = [None] * steps
        for step, diff in dict(last.residual_diffs).items():  # negative values are cache-dit's "not compared"
            if 0 <= int(step) < steps and isinstance(diff, (int, float)) and math.copysign(1.0, diff) > 0:
                diffs[int(step)] = float(diff)
        self.runs.append({"cached_steps": cached, "steps": steps, "residual_diffs": diffs})

    def counters(self) -> dict[str, Any]:
        """Plain builtins: per run the cached steps (of either CFG branch) and cache-dit's residual diff per step
        (the relative L1 change it held against ``rdt``; None where it compared none: warm-up steps, ``rdt=0``,
        ``rdt>=1``; with separate CFG calls, the conditional branch's), totals, and how CFG was handled."""
        self._record_finished_run()
        return {"cfg": _cfg_text(self.context, self.separate_cfg), "runs": len(self.runs),
                "cached": sum(len(run["cached_steps"]) for run in self.runs),
                "steps": sum(run["steps"] for run in self.runs),
                "cached_steps": [list(run["cached_steps"]) for run in self.runs],
                "residual_diffs": [list(run["residual_diffs"]) for run in self.runs]}

    def skipped_steps(self) -> list[int]:
        """The steps cache-dit cached in any run under this applier."""
        self._record_finished_run()
        return sorted({step for run in self.runs for step in run["cached_steps"]})
