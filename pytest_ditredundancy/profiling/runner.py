"""``profile_model``: load (or take) a pipeline, run prompts through it in batches, return the profile.

Two protocols (``protocol=``): ``project`` (the default; this package's definitions: every attention layer,
CFG halves as separate branches, prompt ``i`` seeded ``seed + i``, batched calls) and ``paper`` (the redundancy
study's, exactly: see :mod:`pytest_ditredundancy.profiling.paper`).
"""

from __future__ import annotations

import time
import zlib
from typing import Any, Callable, Iterable, Sequence

import torch

from ..capture.adapters import DenoisingLoop, profile_loop
from ..capture.hooks import capture_redundancy
from ..capture.profile import RedundancyProfile
from ..capture.sites import DEFAULT_KINDS
from ..zoo.loading import load_model, resolve_device, resolve_spec, spec_as, spec_of
from ..zoo.registry import ModelSpec
from .protocol_registry import get_protocol
from .protocols import Protocol
from .schedulers import apply_scheduler, checkpoint_scheduler
from .settings import RunRequest, RunSettings, resolve_run, settings_for


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
                  protocol: str | Protocol = "project", prompt_set: str | None = None,
                  as_model: str | ModelSpec | None = None) -> RedundancyProfile:
    """Profile ``model`` (a name, HF id, directory, spec, an already loaded pipeline, or an adapter
    :class:`~pytest_ditredundancy.capture.adapters.DenoisingLoop`).

    ``protocol="project"`` (default): every attention layer, each CFG half its own branch, prompt ``i`` seeded
    ``seed + prompt_offset + i`` (``seed`` 0 by default; it also seeds a tiny model's weights), so the profile
    of a prompt does not depend on its batch or shard; ``batch_size`` prompts per call (8); 8 prompts of the
    model's prompt set by default (the shipped set; ``shapes`` for the trained models; ``prompt_set=`` names
    another).

    ``protocol="paper"``: the redundancy study exactly (:mod:`pytest_ditredundancy.profiling.paper`; one of its
    seven model families): its steps, guidance and scheduler; its self-attention layers and K/V/A tensors;
    every prompt seeded with the same ``seed`` (the study's, e.g. 42, by default; given, it also seeds a tiny
    model's weights), one prompt per call, each measured over the whole batch (branch ``batch``); the first 10
    of its ``coco1000`` captions by default. The protocol is recorded in ``profile.metadata.protocol`` and in
    the settings key.

    ``as_model`` (a registered name): ``model`` is a saved copy of that model (a directory written by
    ``save_pretrained``, a fine-tune, a re-export), profiled with its settings: steps, size, guidance, scheduler,
    call arguments (e.g. ``trained-sd3``'s ``max_sequence_length=16``), prompt set; the plugin's
    ``--dit-baseline-name`` borrows the same (:meth:`~pytest_ditredundancy.zoo.ModelSpec.with_settings_of`).
    Without it, a checkpoint the zoo does not name runs with settings inferred from its pipeline class, and an
    :class:`~pytest_ditredundancy.zoo.loading.InferredSettingsWarning` names them.

    ``progress(done, total, steps_per_second)`` is called after each batch.

    Example::

        profile = profile_model("tiny-sd3-medium", prompts=["a red bus"], steps=28, scheduler="flow-euler")
        study = profile_model("tiny-pixart-alpha", protocol="paper")   # 10 COCO captions, seed 42, 20 steps
    """
    chosen = get_protocol(protocol)
    if isinstance(model, (str, ModelSpec)) or hasattr(model, "__fspath__"):
        spec = spec_as(resolve_spec(model), as_model)
        chosen.check_model(spec)
        pipe = load_model(chosen.spec(spec), device=device, dtype=dtype, seed=0 if seed is None else seed)
    else:
        pipe = model
        spec = spec_as(spec_of(pipe) or _spec_name_for(pipe), as_model)
    request = resolve_run(spec, protocol=chosen, prompts=prompts, prompt_set=prompt_set, num_prompts=num_prompts,
                          steps=steps, scheduler=scheduler, seed=seed, batch_size=batch_size, height=height,
                          width=width, num_frames=num_frames, guidance_scale=guidance_scale, kinds=kinds,
                          prompt_offset=prompt_offset)
    return run_profile(pipe, request, progress=progress)


def run_profile(pipe: Any, request: RunRequest, *,
                progress: Callable[[int, int, float], None] | None = None) -> RedundancyProfile:
    """Profile ``request`` on an already loaded pipeline (or adapter loop): the one path every profile takes."""
    spec, settings, protocol = request.spec, request.settings, request.protocol
    extra = {"settings_key": settings.key(), "scheduler_alias": settings.scheduler, "batch_size": request.batch_size,
             "prompt_offset": request.prompt_offset, "family": spec.family, **protocol.metadata(settings.seed)}
    sites = protocol.sites(pipe.transformer, spec, request.kinds)
    if isinstance(pipe, DenoisingLoop):  # not a diffusers pipeline: it brings its own sampler and step boundaries
        return _profile_denoising_loop(pipe, request, progress=progress, sites=sites, extra=extra)
    apply_scheduler(pipe, settings.scheduler)  # a fresh scheduler every run: no state leaks between profiles
    started, done = time.perf_counter(), 0
    layout = "single" if settings.guidance_scale is not None and settings.guidance_scale <= 1 else spec.branch_layout
    noise_device = protocol.generator_device(_execution_device(pipe))
    prompts = request.prompts
    with capture_redundancy(pipe, kinds=request.kinds, sites=sites, branch_layout=layout,
                            whole_batch=protocol.whole_batch, memory=request.capture_memory) as cap:
        for start, batch in batched(prompts, request.batch_size):
            generators = [torch.Generator(noise_device).manual_seed(seed) for seed in request.seeds(start, len(batch))]
            pipe(**call_kwargs(spec, settings, batch, pipe, generators))
            done += len(batch)
            if progress is not None:
                elapsed = max(time.perf_counter() - started, 1e-9)
                progress(done, len(prompts), done * settings.steps / elapsed)
    return cap.profile(
        model=spec.name, model_id=spec.checkpoint, seed=settings.seed, height=settings.height, width=settings.width,
        num_frames=settings.num_frames, guidance_scale=settings.guidance_scale, prompts=list(prompts),
        protocol=protocol.name, extra={**extra, "checkpoint_scheduler": checkpoint_scheduler(pipe)},
    )


def _execution_device(pipe: Any) -> torch.device:
    """Where the pipeline draws its latents (the study seeded a generator on that device)."""
    device = getattr(pipe, "_execution_device", None) or getattr(pipe, "device", None)
    return torch.device(device) if device is not None else torch.device("cpu")


def _profile_denoising_loop(loop: DenoisingLoop, request: RunRequest, *,
                            progress: Callable[[int, int, float], None] | None, sites: Any,
                            extra: dict[str, Any]) -> RedundancyProfile:
    """``run_profile`` for an adapter loop (:mod:`pytest_ditredundancy.capture.adapters`): same settings, same
    metadata."""
    spec, settings, protocol = request.spec, request.settings, request.protocol
    if settings.scheduler not in ("default", spec.scheduler):
        raise ValueError(f"{spec.name} samples with its own loop ({spec.scheduler}); it cannot switch to scheduler "
                         f"{settings.scheduler!r}")
    sizes = {"height": settings.height, "width": settings.width, "num_frames": settings.num_frames}
    run_kwargs = {**{k: v for k, v in sizes.items() if v}, **protocol.loop_run_kwargs(spec)}
    device = getattr(loop, "device", None)
    return profile_loop(
        loop, list(request.prompts), steps=settings.steps, seed=settings.seed, batch_size=request.batch_size,
        guidance_scale=settings.guidance_scale, kinds=request.kinds, model_name=spec.name, progress=progress,
        prompt_offset=request.prompt_offset, run_kwargs=run_kwargs, model_id=spec.checkpoint, sites=sites,
        same_seed=protocol.same_seed, whole_batch=protocol.whole_batch,
        generator_device=protocol.generator_device(torch.device(device)) if device is not None else "cpu",
        memory=request.capture_memory, protocol=protocol.name, **sizes, extra=extra,
    )


def _spec_name_for(pipe: Any) -> ModelSpec:
    from ..zoo.loading import _spec_for_checkpoint

    name_or_path = getattr(getattr(pipe, "config", None), "_name_or_path", None) or type(pipe).__name__
    return _spec_for_checkpoint(str(name_or_path), str(name_or_path).rstrip("/").split("/")[-1], type(pipe).__name__)


__all__ = ["RunRequest", "RunSettings", "profile_model", "resolve_device", "run_profile", "settings_for"]
