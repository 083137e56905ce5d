"""What one profiling run is, resolved once: :class:`RunSettings` (what the numbers depend on, the key of
profiles and baselines) and :class:`RunRequest` (settings plus the spec, protocol, prompts, batch size and
kinds).

A request is built once per (model, variant) from the spec and the caller's choices (``profile_model``'s
keywords, or the plugin's options) and passed along unchanged to the runner, the suites and the cache gate,
so nothing downstream re-derives a seed, a prompt list or a step count.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Sequence

from ..capture.sites import DEFAULT_KINDS
from ..zoo.registry import ModelSpec
from .prompts import named_prompts, select_prompts
from .protocol_registry import get_protocol
from .protocols import Protocol


@dataclass(frozen=True)
class RunSettings:
    """Everything that decides what a profile measures (the key of cached profiles and baselines)."""

    steps: int
    scheduler: str
    seed: int
    num_prompts: int
    height: int | None
    width: int | None
    num_frames: int | None
    guidance_scale: float | None
    protocol: str = "project"

    def key(self) -> str:
        """A file-name-safe key, e.g. ``steps20-dpm-solver-seed0-p8-32x32`` (``paper-steps20-...`` for the
        study's protocol, whose seed is the one every prompt uses)."""
        size = f"{self.width}x{self.height}" if self.width and self.height else "default-size"
        frames = f"-f{self.num_frames}" if self.num_frames else ""
        guidance = f"-g{self.guidance_scale:g}" if self.guidance_scale is not None else ""
        prefix = get_protocol(self.protocol).key_prefix
        return f"{prefix}steps{self.steps}-{self.scheduler}-seed{self.seed}-p{self.num_prompts}-{size}{frames}{guidance}"


def settings_for(spec: ModelSpec, *, steps: int | None = None, scheduler: str | None = None, seed: int | None = 0,
                 num_prompts: int = 8, height: int | None = None, width: int | None = None,
                 num_frames: int | None = None, guidance_scale: float | None = None,
                 protocol: str | Protocol = "project") -> RunSettings:
    """The settings of ``spec`` under ``protocol`` with the given overrides (``None``: the spec's own value;
    ``seed=None``: the protocol's default seed)."""
    chosen = get_protocol(protocol)
    spec = chosen.spec(spec)
    steps = spec.steps if steps is None else int(steps)
    if steps < 2:
        raise ValueError(f"steps must be at least 2 (a profile compares consecutive steps), got {steps}")
    seed = chosen.default_seed(spec) if seed is None else int(seed)
    return RunSettings(steps=steps, scheduler=scheduler or spec.scheduler, seed=seed, num_prompts=num_prompts,
                       height=height or spec.height, width=width or spec.width,
                       num_frames=num_frames or spec.num_frames,
                       guidance_scale=spec.guidance_scale if guidance_scale is None else guidance_scale,
                       protocol=chosen.name)


@dataclass(frozen=True)
class RunRequest:
    """One profiling run, resolved: the spec as the protocol runs it, its settings and its prompts.

    ``prompts`` are the run's prompts; a shard profiles ``prompts[start:end]`` (:meth:`shard`) with
    ``prompt_offset = start``, so prompt ``i`` keeps seed ``seed + i`` and the settings (and key) stay the
    whole run's. ``prompt_tag`` is what the key says about a prompt set other than the shipped one."""

    spec: ModelSpec
    protocol: Protocol
    settings: RunSettings
    prompts: tuple[str, ...]
    batch_size: int
    kinds: tuple[str, ...] = DEFAULT_KINDS
    prompt_offset: int = 0
    prompt_tag: str | None = None
    prompt_source: str = "shipped"
    #: the capture's memory mode (capture.batched_stats; None: the capture's default): how, not what, it
    #: measures, so not in the key
    capture_memory: str | None = None

    @property
    def key(self) -> str:
        """The settings key of profiles and baselines, e.g. ``steps20-dpm-solver-seed0-p4-32x32-g4.5-shapes``."""
        return self.settings.key() + (f"-{self.prompt_tag}" if self.prompt_tag else "")

    def shard(self, start: int, end: int) -> "RunRequest":
        """The part of this run that profiles prompts ``start..end-1`` (same settings, same seeds)."""
        return replace(self, prompts=self.prompts[start:end], prompt_offset=self.prompt_offset + start)

    def variant(self, *, steps: int | None = None, scheduler: str | None = None) -> "RunRequest":
        """The same run at another step count or scheduler (the stability suites' variants)."""
        settings = replace(self.settings, steps=int(steps) if steps else self.settings.steps,
                           scheduler=scheduler or self.settings.scheduler)
        if settings.steps < 2:
            raise ValueError(f"steps must be at least 2 (a profile compares consecutive steps), got {settings.steps}")
        return replace(self, settings=settings)

    def seeds(self, start: int, count: int) -> list[int]:
        """Generator seeds of the ``count`` prompts from run position ``start`` (the protocol's rule)."""
        return [self.protocol.seed_of(self.settings.seed, self.prompt_offset + start + i) for i in range(count)]


def resolve_run(spec: ModelSpec, *, protocol: str | Protocol = "project", prompts: Sequence[str] | None = None,
                prompt_set: str | None = None, num_prompts: int | None = None, prompt_tag: str | None = None,
                prompt_source: str | None = None,
                steps: int | None = None, scheduler: str | None = None, seed: int | None = None,
                batch_size: int | None = None, height: int | None = None, width: int | None = None,
                num_frames: int | None = None, guidance_scale: float | None = None,
                kinds: Iterable[str] = DEFAULT_KINDS, prompt_offset: int = 0,
                capture_memory: str | None = None) -> RunRequest:
    """Build the :class:`RunRequest` of ``spec``: the protocol checks the model and transforms the spec, then
    picks what was not given (prompt set and count, seed, batch size, kinds).

    ``prompts`` given are used as they are (the first ``num_prompts`` when that is given too); otherwise the
    named ``prompt_set`` (default: the protocol's choice for the spec, e.g. ``shapes`` for the trained models)
    supplies the first ``num_prompts`` (default: the protocol's count). ``prompt_tag`` and ``prompt_source`` say
    in the key and the baseline's metadata where given prompts came from (a named set, a file)."""
    chosen = get_protocol(protocol)
    chosen.check_model(spec)
    spec = chosen.spec(spec)
    if prompts is not None:
        pool, source = list(prompts), prompt_source or "given"
        count = num_prompts
    else:
        source = prompt_set or chosen.prompt_set(spec)
        pool = named_prompts(source)
        count = chosen.num_prompts(source) if num_prompts is None else num_prompts
        if prompt_tag is None and source != "default":
            prompt_tag = source
    chosen_prompts = select_prompts(pool, count)
    if not chosen_prompts or any(not isinstance(p, str) or not p.strip() for p in chosen_prompts):
        raise ValueError("prompts must be a non-empty list of non-empty strings")
    settings = settings_for(spec, steps=steps, scheduler=scheduler, seed=seed, num_prompts=len(chosen_prompts),
                            height=height, width=width, num_frames=num_frames, guidance_scale=guidance_scale,
                            protocol=chosen)
    return RunRequest(spec=spec, protocol=chosen, settings=settings, prompts=tuple(chosen_prompts),
                      batch_size=chosen.batch_size(batch_size), kinds=chosen.kinds(kinds),
                      prompt_offset=prompt_offset, prompt_tag=prompt_tag,
                      prompt_source="shipped" if source == "default" else source, capture_memory=capture_memory)


__all__ = ["RunRequest", "RunSettings", "resolve_run", "settings_for"]
