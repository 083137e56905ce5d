"""diffusers' built-in caches (FBCache, PAB, FasterCache, MagCache, TaylorSeer) as cache-gate strategies.

Transformers with diffusers' ``CacheMixin`` get ``transformer.enable_cache(config)``; the others (PixArt,
SD3, ... in diffusers 0.42) get the same ``diffusers.hooks.apply_*`` function ``enable_cache`` calls. Each
strategy's needs are checked first and a model that cannot run one raises :class:`UnsupportedStrategy`
with the reason. What diffusers leaves to the pipeline is supplied here: the current timestep (PAB,
FasterCache: the scheduler's timestep of the running step), a cache context per transformer call for
pipelines that set none (FBCache, TaylorSeer and MagCache keep per-context state; ``call<i>`` keys it by
call index within the step, so CFG branches of separate calls keep separate state), MagCache's ratios
(calibrated on an uncached run), and a reset of every stateful hook at each run start.
"""

from __future__ import annotations

import ast
import contextlib
import io
import logging
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from ..profiling.runner import RunSettings
from ..zoo.registry import ModelSpec
from .base import RunTracker, UnsupportedStrategy, attention_modules, raised_under
from .spec import CacheSpec

#: diffusers' video transformers whose output is [B, F, C, H, W]; other 5-D outputs are [B, C, F, H, W]
_BFCHW = ("CogVideoXTransformer3DModel",)
#: transformers that return packed tokens [B, S, C], which FasterCache's frequency split cannot handle
_PACKED = ("FluxTransformer2DModel", "LTXVideoTransformer3DModel")


@dataclass
class StrategyContext:
    """What a diffusers strategy needs to know about the run (and MagCache's calibrated ratios)."""

    model: ModelSpec
    settings: RunSettings
    mag_ratios: list[float] | None = None
    calibrate: bool = False


def _hook_names(strategy: str) -> list[str]:
    from diffusers.hooks import faster_cache, first_block_cache, mag_cache, pyramid_attention_broadcast, taylorseer_cache

    return {
        "fbcache": [first_block_cache._FBC_LEADER_BLOCK_HOOK, first_block_cache._FBC_BLOCK_HOOK],
        "pab": [pyramid_attention_broadcast._PYRAMID_ATTENTION_BROADCAST_HOOK],
        "fastercache": [faster_cache._FASTER_CACHE_DENOISER_HOOK, faster_cache._FASTER_CACHE_BLOCK_HOOK],
        "magcache": [mag_cache._MAG_CACHE_LEADER_BLOCK_HOOK, mag_cache._MAG_CACHE_BLOCK_HOOK],
        "taylorseer": [taylorseer_cache._TAYLORSEER_CACHE_HOOK],
    }[strategy]


def _blocks(transformer: nn.Module) -> list[tuple[str, nn.Module]]:
    from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS

    return [(f"{name}.{i}", block) for name, child in transformer.named_children()
            if name in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS and isinstance(child, nn.ModuleList)
            for i, block in enumerate(child)]


def _check_blocks(strategy: str, transformer: nn.Module) -> None:
    """FBCache and MagCache split the block stack into head and tail: blocks must be known to diffusers."""
    from diffusers.hooks._helpers import TransformerBlockRegistry

    blocks = _blocks(transformer)
    if len(blocks) < 2:
        raise UnsupportedStrategy(f"{strategy} needs two or more transformer blocks in a ModuleList named like "
                                  f"diffusers' block lists; {type(transformer).__name__} has {len(blocks)}")
    for name, block in blocks:
        try:
            TransformerBlockRegistry.get(type(block))
        except ValueError:
            raise UnsupportedStrategy(f"{strategy} does not support {type(transformer).__name__}: its block "
                                      f"{name} ({type(block).__name__}) is not in diffusers' TransformerBlockRegistry"
                                      ) from None


def _tensor_format(spec: CacheSpec, context: StrategyContext, transformer: nn.Module) -> str:
    if "tensor_format" in spec.params:
        return spec.params["tensor_format"]
    name = type(transformer).__name__
    if name in _PACKED:
        raise UnsupportedStrategy(f"fastercache cannot split the unconditional branch of {name}: it returns packed "
                                  "tokens, and FasterCache handles BCHW/BFCHW/BCFHW outputs only")
    if not context.model.is_video:
        return "BCHW"
    return "BFCHW" if name in _BFCHW else "BCFHW"


def _guidance(context: StrategyContext) -> str:
    """``batched`` (one [uncond, cond] call per step), ``none`` (no CFG) or the layout FasterCache cannot use."""
    scale = context.settings.guidance_scale
    layout = context.model.branch_layout
    if layout == "single" or (scale is not None and scale <= 1):
        return "none"
    return "batched" if layout in ("batched-uncond-cond", "auto") else layout


def build_config(spec: CacheSpec, tracker: RunTracker, context: StrategyContext) -> Any:
    """The diffusers config object for ``spec`` (after checking that the model can run it)."""
    import diffusers.hooks as hooks

    transformer = tracker.transformer
    params = dict(spec.params)
    if spec.strategy == "fbcache":
        _check_blocks("fbcache", transformer)
        return hooks.FirstBlockCacheConfig(**params)
    if spec.strategy == "pab":
        if not any(k.endswith("block_skip_range") for k in params):
            params["spatial_attention_block_skip_range"] = 2
        return hooks.PyramidAttentionBroadcastConfig(current_timestep_callback=tracker.current_timestep, **params)
    if spec.strategy == "fastercache":
        guidance = _guidance(context)
        if guidance not in ("batched", "none") and not params.get("is_guidance_distilled"):
            raise UnsupportedStrategy(
                f"fastercache needs classifier-free guidance batched as [uncond, cond] in one call; "
                f"{context.model.name} runs it as {guidance}")
        params.setdefault("is_guidance_distilled", guidance == "none")
        if not params["is_guidance_distilled"]:
            params["tensor_format"] = _tensor_format(spec, context, transformer)
        weight = params.pop("attention_weight", 0.5)
        return hooks.FasterCacheConfig(current_timestep_callback=tracker.current_timestep,
                                       attention_weight_callback=lambda _module: weight, **params)
    if spec.strategy == "magcache":
        _check_blocks("magcache", transformer)
        source = params.pop("mag_ratios", "calibrate")
        steps = context.settings.steps
        if context.calibrate:
            return hooks.MagCacheConfig(calibrate=True, num_inference_steps=steps, **params)
        if source == "flux":
            from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

            ratios = FLUX_MAG_RATIOS
        elif context.mag_ratios is not None:
            ratios = torch.tensor(context.mag_ratios)
        else:
            raise UnsupportedStrategy("magcache:mag_ratios=calibrate needs a calibration run first")
        return hooks.MagCacheConfig(mag_ratios=ratios, num_inference_steps=steps, **params)
    if spec.strategy == "taylorseer":
        if "taylor_factors_dtype" in params:
            params["taylor_factors_dtype"] = getattr(torch, params["taylor_factors_dtype"])
        return hooks.TaylorSeerCacheConfig(**params)
    raise UnsupportedStrategy(f"{spec.strategy} is not a diffusers cache")


_APPLY = {"fbcache": "apply_first_block_cache", "pab": "apply_pyramid_attention_broadcast",
          "fastercache": "apply_faster_cache", "magcache": "apply_mag_cache", "taylorseer": "apply_taylorseer_cache"}


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """FasterCache/PAB log 'experimental'/default warnings at every install: keep them out of test output."""
    logger = logging.getLogger("diffusers.hooks")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class DiffusersCacheApplier:
    """Installs one diffusers cache on the tracker's transformer; ``remove`` takes every hook off again."""

    def __init__(self, tracker: RunTracker, spec: CacheSpec, context: StrategyContext | None) -> None:
        if context is None:
            raise UnsupportedStrategy(f"{spec.strategy} needs the run's settings (StrategyContext)")
        self.tracker, self.spec, self.context = tracker, spec, context
        self.transformer = tracker.transformer
        self.managers: list[Any] = []
        self._context_set = False
        self.calibration: list[list[float]] = []
        self.via = ""

    def install(self) -> None:
        import diffusers.hooks as hooks
        from diffusers.hooks.hooks import StateManager

        config = build_config(self.spec, self.tracker, self.context)
        with _quiet_diffusers():
            try:
                if callable(getattr(self.transformer, "enable_cache", None)):
                    self.via = "transformer.enable_cache"
                    self.transformer.enable_cache(config)
                else:
                    self.via = f"diffusers.hooks.{_APPLY[self.spec.strategy]}"
                    getattr(hooks, _APPLY[self.spec.strategy])(self.transformer, config)
            except (ValueError, TypeError, KeyError, IndexError, AttributeError, AssertionError) as exc:
                raise UnsupportedStrategy(f"diffusers could not apply {self.spec.strategy} to "
                                          f"{type(self.transformer).__name__}: {type(exc).__name__}: {exc}") from None
        if not self._registries():
            names = [name for name, _ in attention_modules(self.transformer)][:2]
            raise UnsupportedStrategy(f"{self.spec.strategy} found no module of {type(self.transformer).__name__} "
                                      f"that its default name patterns match (attention modules: {', '.join(names)}, "
                                      "...)")
        self.managers = [v for _, hook in self._hooks() for v in vars(hook).values() if isinstance(v, StateManager)]
        self.tracker.run_starts.append(self.reset)
        self.tracker.call_listeners.append(self)
        if self.context.calibrate:
            self._start_calibration_capture()

    def _registries(self) -> list[Any]:
        names = set(_hook_names(self.spec.strategy))
        return [m._diffusers_hook for m in self.transformer.modules()
                if hasattr(m, "_diffusers_hook") and names & set(m._diffusers_hook.hooks)]

    def _hooks(self) -> list[tuple[str, Any]]:
        names = set(_hook_names(self.spec.strategy))
        return [(n, h) for r in self._registries() for n, h in r.hooks.items() if n in names]

    def before_call(self, index: int) -> None:
        """Give each transformer call its own cache context where the pipeline set none."""
        from diffusers.hooks.hooks import CacheContext

        if self.managers and all(getattr(m, "_context", None) is None for m in self.managers):
            context = CacheContext(f"call{index}", step_index=self.tracker.step,
                                   num_inference_steps=self.context.settings.steps)
            for manager in self.managers:
                manager.set_context(context)
            self._context_set = True

    def after_call(self) -> None:
        if self._context_set:
            for manager in self.managers:
                manager.set_context(None)
            self._context_set = False

    def reset(self) -> None:
        from diffusers.hooks import HookRegistry

        HookRegistry.check_if_exists_or_initialize(self.transformer).reset_stateful_hooks(recurse=True)

    def counters(self) -> dict[str, Any]:
        return {}  # diffusers' hooks count nothing; the gate's compute counters measure what they skip

    def skipped_steps(self) -> None:
        return None  # diffusers' hooks keep no record of the steps they skipped

    def remove(self) -> None:
        from diffusers.hooks import HookRegistry

        self._stop_calibration_capture()
        if getattr(self.transformer, "is_cache_enabled", False):
            with _quiet_diffusers():
                self.transformer.disable_cache()
        registry = HookRegistry.check_if_exists_or_initialize(self.transformer)
        for name in _hook_names(self.spec.strategy):
            registry.remove_hook(name, recurse=True)
        if hasattr(registry, "invalidate_child_registries_cache"):
            registry.invalidate_child_registries_cache()
        self.managers = []

    # -- MagCache calibration: diffusers logs the ratios at the end of a calibrating run ------------------------
    def _start_calibration_capture(self) -> None:
        applier = self

        class Capture(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                text = record.getMessage()
                if text.startswith("MagCache Calibration Results:"):
                    applier.calibration.append([float(v) for v in ast.literal_eval(text.split(":", 1)[1].strip())])

        self._logger = logging.getLogger("diffusers.hooks.mag_cache")
        self._saved = (self._logger.level, self._logger.propagate)
        self._handler = Capture()
        self._logger.addHandler(self._handler)
        self._logger.setLevel(logging.INFO)
        self._logger.propagate = False
        self._stdout = contextlib.redirect_stdout(io.StringIO())  # it also prints them
        self._stdout.__enter__()

    def _stop_calibration_capture(self) -> None:
        if getattr(self, "_handler", None) is None:
            return
        self._stdout.__exit__(None, None, None)
        self._logger.removeHandler(self._handler)
        self._logger.setLevel(self._saved[0])
        self._logger.propagate = self._saved[1]
        self._handler = None


def strategy_failure(exc: BaseException) -> str | None:
    """Describe an exception raised while a diffusers cache ran a pipeline whose uncached run succeeded: the
    cache does not handle this model (FBCache on SD3's last block, PAB sharing one state across Lumina2's CFG
    calls of different lengths, ...). ``None`` when it was raised in this package's own code (a bug here)."""
    return raised_under(exc, ("diffusers", "hooks"), skip_files=("hooks.py",))
