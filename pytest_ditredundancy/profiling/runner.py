"""``profile_model``: load (or take) a pipeline, run prompts through it in batches, return the profile.

Two protocols (``protocol=``): ``project`` (the default; this package's definitions: every attention layer,
CFG halves as separate branches, prompt ``i`` seeded ``seed + i``, batched calls) and ``paper`` (the redundancy
study's, exactly: see :mod:`pytest_ditredundancy.profiling.paper`).
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch

from ..capture.adapters import DenoisingLoop, profile_loop
from ..capture.hooks import capture_redundancy
from .paper import PAPER_KINDS, PAPER_NUM_PROMPTS, PAPER_PROMPTS, ProtocolError, check_protocol, paper_setup, paper_sites, paper_spec
from ..capture.profile import RedundancyProfile
from .prompts import default_prompts, named_prompts, select_prompts
from .schedulers import apply_scheduler, checkpoint_scheduler
from ..capture.sites import DEFAULT_KINDS
from ..zoo.loading import load_model, resolve_device, resolve_spec, spec_of
from ..zoo.registry import ModelSpec


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
        protocol = "" if self.protocol == "project" else f"{self.protocol}-"
        return f"{protocol}steps{self.steps}-{self.scheduler}-seed{self.seed}-p{self.num_prompts}-{size}{frames}{guidance}"


def protocol_spec(spec: ModelSpec, protocol: str) -> ModelSpec:
    """The spec a protocol runs: unchanged for ``project``, the study's settings for ``paper``."""
    return paper_spec(spec) if check_protocol(protocol) == "paper" else spec


def default_seed(spec: ModelSpec, protocol: str) -> int:
    """0 for the project's protocol (prompt ``i`` then uses ``i``); the study's seed of the family for ``paper``."""
    return paper_setup(spec.family, spec.name).seed if protocol == "paper" else 0


def settings_for(spec: ModelSpec, *, steps: int | None = None, scheduler: str | None = None, seed: int | None = 0,
                 num_prompts: int = 8, height: int | None = None, width: int | None = None,
                 num_frames: int | None = None, guidance_scale: float | None = None,
                 protocol: str = "project") -> RunSettings:
    spec = protocol_spec(spec, protocol)
    steps = spec.steps if steps is None else int(steps)
    if steps < 2:
        raise ValueError(f"steps must be at least 2 (a profile compares consecutive steps), got {steps}")
    seed = default_seed(spec, protocol) if seed is None else int(seed)
    return RunSettings(steps=steps, scheduler=scheduler or spec.scheduler, seed=seed, num_prompts=num_prompts,
                       height=height or spec.height, width=width or spec.width,
                       num_frames=num_frames or spec.num_frames,
                       guidance_scale=spec.guidance_scale if guidance_scale is None else guidance_scale,
                       protocol=protocol)


def class_labels_for(prompts: Sequence[str], pipe: Any) -> list[int]:
    """Class-conditional models (DiT) take ImageNet labels: a prompt naming a class uses it, any other prompt
    maps to a stable class id derived from its text."""
    labels = getattr(pipe, "labels", None) or {}
    classes = int(getattr(getattr(pipe.transformer, "config", None), "num_embeds_ada_norm", 1000) or 1000)
    return [labels[p] if p in labels else zlib.crc32(p.encode("utf-8")) % classes for p in prompts]


def call_kwargs(spec: ModelSpec, settings: RunSettings, prompts: Sequence[str], pipe: Any,
                generators: list[torch.Generator]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"num_inference_steps": settings.steps, "generator": generators, "output_type": "latent"}
    if spec.conditioning == "class":
        kwargs["class_labels"] = class_labels_for(prompts, pipe)
    else:
        kwargs["prompt"] = list(prompts)
        if settings.height:
            kwargs["height"], kwargs["width"] = settings.height, settings.width
        if settings.num_frames:
            kwargs[spec.frames_argument] = settings.num_frames
    if settings.guidance_scale is not None:
        kwargs["guidance_scale"] = settings.guidance_scale
    kwargs.update(spec.call_kwargs)
    return kwargs


def batched(items: Sequence[Any], size: int) -> Iterable[tuple[int, Sequence[Any]]]:
    if size < 1:
        raise ValueError(f"batch size must be at least 1, got {size}")
    for start in range(0, len(items), size):
        yield start, items[start:start + size]


def profile_model(model: str | ModelSpec | Any, *, prompts: Sequence[str] | None = None,
                  num_prompts: int | None = None, steps: int | None = None, scheduler: str | None = None,
                  seed: int | None = None, batch_size: int | None = None, device: str | torch.device | None = "auto",
                  dtype: str | torch.dtype | None = None, guidance_scale: float | None = None,
                  height: int | None = None, width: int | None = None, num_frames: int | None = None,
                  kinds: Iterable[str] = DEFAULT_KINDS, prompt_offset: int = 0,
                  progress: Callable[[int, int, float], None] | None = None,
                  protocol: str = "project") -> RedundancyProfile:
    """Profile ``model`` (a name, HF id, directory, spec, an already loaded pipeline, or an adapter
    :class:`~pytest_ditredundancy.capture.adapters.DenoisingLoop`).

    ``protocol="project"`` (default): every attention layer, each CFG half its own branch, prompt ``i`` seeded
    ``seed + prompt_offset + i`` (``seed`` 0 by default; it also seeds a tiny model's weights), so the profile
    of a prompt does not depend on its batch or shard; ``batch_size`` prompts per call (8); 8 prompts of the
    shipped set by default.

    ``protocol="paper"``: the redundancy study exactly (:mod:`pytest_ditredundancy.profiling.paper`; one of its seven
    model families): its steps, guidance and scheduler; its self-attention layers and K/V/A tensors; every
    prompt seeded with the same ``seed`` (the study's, e.g. 42, by default; given, it also seeds a tiny model's
    weights), one prompt per call, each measured over the whole batch (branch ``batch``); the first 10 of
    its ``coco1000`` captions by default. The protocol is recorded in ``profile.metadata.protocol`` and in the
    settings key.

    ``progress(done, total, steps_per_second)`` is called after each batch.

    Example::

        profile = profile_model("tiny-sd3-medium", prompts=["a red bus"], steps=28, scheduler="flow-euler")
        study = profile_model("tiny-pixart-alpha", protocol="paper")   # 10 COCO captions, seed 42, 20 steps
    """
    check_protocol(protocol)
    paper = protocol == "paper"
    if isinstance(model, (str, ModelSpec)) or hasattr(model, "__fspath__"):
        spec = protocol_spec(resolve_spec(model), protocol)
        pipe = load_model(spec, device=device, dtype=dtype, seed=0 if seed is None else seed)
    else:
        pipe = model
        spec = protocol_spec(spec_of(pipe) or _spec_name_for(pipe), protocol)
    if paper and batch_size not in (None, 1):
        raise ProtocolError(f"protocol 'paper' runs one prompt per pipeline call, as the study did; got "
                            f"batch_size={batch_size}")
    batch_size = (1 if paper else 8) if batch_size is None else batch_size
    if prompts is not None:
        chosen = list(prompts)
    else:
        chosen = named_prompts(PAPER_PROMPTS) if paper else default_prompts()
    default_count = (PAPER_NUM_PROMPTS if paper else 8) if prompts is None else None
    chosen = select_prompts(chosen, num_prompts if num_prompts is not None else default_count)
    if any(not isinstance(p, str) or not p.strip() for p in chosen) or not chosen:
        raise ValueError("prompts must be a non-empty list of non-empty strings")
    settings = settings_for(spec, steps=steps, scheduler=scheduler, seed=seed, num_prompts=len(chosen),
                            height=height, width=width, num_frames=num_frames, guidance_scale=guidance_scale,
                            protocol=protocol)
    seed = settings.seed
    extra = {"settings_key": settings.key(), "scheduler_alias": settings.scheduler, "batch_size": batch_size,
             "prompt_offset": prompt_offset, "family": spec.family}
    sites = None
    if paper:
        kinds = [k for k in kinds if k in PAPER_KINDS]
        if not kinds:
            raise ProtocolError(f"protocol 'paper' measures kinds {', '.join(PAPER_KINDS)} only")
        transformer = pipe.transformer
        sites = [site for site in paper_sites(transformer, spec.family) if site.kind in kinds]
        extra["seed_rule"] = f"every prompt uses seed {seed}"
    if isinstance(pipe, DenoisingLoop):  # not a diffusers pipeline: it brings its own sampler and step boundaries
        return _profile_denoising_loop(pipe, spec, settings, chosen, scheduler=scheduler, batch_size=batch_size,
                                       kinds=kinds, prompt_offset=prompt_offset, progress=progress, sites=sites,
                                       extra=extra)
    apply_scheduler(pipe, scheduler)  # a fresh scheduler every run: no state leaks between profiles
    started, done = time.perf_counter(), 0
    layout = "single" if settings.guidance_scale is not None and settings.guidance_scale <= 1 else spec.branch_layout
    device_of_noise = _execution_device(pipe) if paper else "cpu"
    with capture_redundancy(pipe, kinds=kinds, sites=sites, branch_layout=layout, whole_batch=paper) as cap:
        for start, batch in batched(chosen, batch_size):
            generators = [torch.Generator(device_of_noise).manual_seed(seed if paper else seed + prompt_offset + start + i)
                          for i in range(len(batch))]
            pipe(**call_kwargs(spec, settings, batch, pipe, generators))
            done += len(batch)
            if progress is not None:
                elapsed = max(time.perf_counter() - started, 1e-9)
                progress(done, len(chosen), done * settings.steps / elapsed)
    return cap.profile(
        model=spec.name, model_id=spec.checkpoint, seed=seed, height=settings.height, width=settings.width,
        num_frames=settings.num_frames, guidance_scale=settings.guidance_scale, prompts=list(chosen),
        protocol=protocol, extra={**extra, "checkpoint_scheduler": checkpoint_scheduler(pipe)},
    )


def _execution_device(pipe: Any) -> torch.device:
    """Where the pipeline draws its latents (the study seeded a generator on that device)."""
    device = getattr(pipe, "_execution_device", None) or getattr(pipe, "device", None)
    return torch.device(device) if device is not None else torch.device("cpu")


def _profile_denoising_loop(loop: DenoisingLoop, spec: ModelSpec, settings: RunSettings, prompts: list[str], *,
                            scheduler: str | None, batch_size: int, kinds: Iterable[str], prompt_offset: int,
                            progress: Callable[[int, int, float], None] | None, sites: Any,
                            extra: dict[str, Any]) -> RedundancyProfile:
    """``profile_model`` for an adapter loop (:mod:`pytest_ditredundancy.capture.adapters`): same settings, same metadata."""
    if scheduler not in (None, "default", spec.scheduler):
        raise ValueError(f"{spec.name} samples with its own loop ({spec.scheduler}); it cannot switch to scheduler "
                         f"{scheduler!r}")
    paper = settings.protocol == "paper"
    sizes = {"height": settings.height, "width": settings.width, "num_frames": settings.num_frames}
    run_kwargs = {k: v for k, v in sizes.items() if v}
    if paper:
        run_kwargs.update(paper_setup(spec.family, spec.name).run_kwargs)
    device = getattr(loop, "device", None)
    return profile_loop(
        loop, prompts, steps=settings.steps, seed=settings.seed, batch_size=batch_size,
        guidance_scale=settings.guidance_scale, kinds=kinds, model_name=spec.name, progress=progress,
        prompt_offset=prompt_offset, run_kwargs=run_kwargs, model_id=spec.checkpoint, sites=sites,
        same_seed=paper, whole_batch=paper, generator_device=device if paper and device is not None else "cpu",
        protocol=settings.protocol, **sizes, extra=extra,
    )


def _spec_name_for(pipe: Any) -> ModelSpec:
    from ..zoo.loading import _spec_for_checkpoint

    name_or_path = getattr(getattr(pipe, "config", None), "_name_or_path", None) or type(pipe).__name__
    return _spec_for_checkpoint(str(name_or_path), str(name_or_path).rstrip("/").split("/")[-1], type(pipe).__name__)


__all__ = ["RunSettings", "profile_model", "settings_for", "resolve_device"]
