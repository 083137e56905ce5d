"""Profile a denoising loop that is not a diffusers pipeline (Open-Sora's STDiT3, research code, your own sampler).

Two small pieces:

* :func:`fused_qkv_sites` describes where K, V and A live when a model computes them with fused projections
  (one ``qkv`` Linear for self-attention, one ``kv`` Linear for cross-attention): K and V are slices of the
  fused output, A is the output projection's output. Hooks still only read module outputs.
* :class:`DenoisingLoop` is the contract a sampler implements so :func:`profile_loop` (and
  :func:`pytest_ditredundancy.profile_model`) can drive it: a ``transformer`` to hook, a ``branch_layout``
  telling how its batch maps to guidance branches, ``sites()`` and ``run(...)``, which calls
  ``end_step(t)`` after every denoising step. There is no scheduler to patch, so step boundaries come from
  the loop itself.

Example::

    class MyLoop:
        branch_layout = "batched-cond-uncond"          # the model sees [cond prompts, uncond prompts]

        def __init__(self, model):
            self.transformer = model

        def sites(self):
            return fused_qkv_sites(self.transformer, qkv="qkv", proj="proj", kv="kv_linear")

        def run(self, prompts, *, num_inference_steps, guidance_scale, generators, end_step, **kwargs):
            ...                                        # one transformer call per step, then
            end_step(t)                                # after every step

    profile = profile_loop(MyLoop(model), ["a red bus", "a cat"], steps=20, model_name="my-stdit")

Capture splits each captured tensor into the transformer call's batch rows, sample-major: a tensor whose
leading dimension folds frames or positions into the batch must fold them as ``(batch frames)`` /
``(batch positions)``, never the other way round.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from .hooks import capture_redundancy
from .profile import RedundancyProfile
from .sites import DEFAULT_KINDS, CaptureSite, validate_kinds


@dataclass(frozen=True)
class FusedSlice:
    """Selector for part ``part`` of ``parts`` stacked along the last dim of a fused projection's output.

    ``heads=None``: the output is ``[part 0 | part 1 | ...]`` (Open-Sora, timm, DiT: ``view(..., 3, heads,
    head_dim)``). ``heads=H``: parts are interleaved per head, ``(..., H, parts, head_dim)`` (Megatron style);
    the slice then comes back as ``(..., H, head_dim)``, which holds the same numbers as an unfused projection.
    A frozen dataclass rather than a lambda so sites stay picklable and print readably.
    """

    part: int
    parts: int
    heads: int | None = None

    def __call__(self, output: Any) -> torch.Tensor | None:
        if not isinstance(output, torch.Tensor):
            return None
        if self.heads is None:
            return output.unflatten(-1, (self.parts, -1)).select(-2, self.part)
        return output.unflatten(-1, (self.heads, self.parts, -1)).select(-2, self.part)


def fused_qkv_sites(model: nn.Module, *, qkv: str = "qkv", proj: str = "proj", kv: str | None = None,
                    heads: int | None = None, kinds: Iterable[str] = DEFAULT_KINDS) -> list[CaptureSite]:
    """Capture sites for attention modules with fused projections, in module registration order.

    A module with a child Linear named ``qkv`` (``dim -> 3*dim``) and a child ``proj`` is a self-attention
    layer: K is part 1 of 3 of ``qkv``'s output, V part 2, A is ``proj``'s output. With ``kv`` (e.g.
    ``"kv_linear"``) a module with that child (``dim -> 2*dim``) and ``proj`` is a cross-attention layer:
    K is part 0 of 2, V part 1 (text K/V: constant over steps, the profile flags them), A is ``proj``'s
    output. Layer names are module paths. Only kinds ``k``, ``v`` and ``a`` exist here.
    """
    wanted = validate_kinds(kinds)
    sites: list[CaptureSite] = []
    for name, module in model.named_modules():
        out = getattr(module, proj, None)
        if not isinstance(out, nn.Module):
            continue
        fused, parts, first = getattr(module, qkv, None), 3, 1
        if not isinstance(fused, nn.Linear) and kv is not None:
            fused, parts, first = getattr(module, kv, None), 2, 0
        if not isinstance(fused, nn.Linear):
            continue
        if fused.out_features % parts or (heads and fused.out_features % (parts * heads)):
            raise ValueError(f"{name}.{qkv if parts == 3 else kv} has {fused.out_features} outputs, which do not "
                             f"split into {parts} equal parts{f' over {heads} heads' if heads else ''}")
        candidates = [("k", fused, FusedSlice(first, parts, heads)), ("v", fused, FusedSlice(first + 1, parts, heads)),
                      ("a", out, None)]
        sites += [CaptureSite(name, kind, target, select) for kind, target, select in candidates if kind in wanted]
    if not sites:
        raise ValueError(f"{type(model).__name__} has no module with a fused {qkv!r}"
                         f"{f' or {kv!r}' if kv else ''} Linear next to a {proj!r} projection for kinds {wanted}")
    return sites


@runtime_checkable
class DenoisingLoop(Protocol):
    """A sampler :func:`profile_loop` can drive.

    ``transformer`` is hooked: its forward pre-hook reads the batch size from the first tensor argument, so
    call it with the (doubled, for guidance) latents first. ``branch_layout`` is one of
    :data:`pytest_ditredundancy.zoo.BRANCH_LAYOUTS`. ``run`` denoises ``prompts`` (prompt ``i`` draws its
    noise from ``generators[i]``) with ``num_inference_steps`` transformer steps, calls ``end_step(t)`` after
    each, and returns the final latents. ``guidance_scale`` ``None`` means the loop's default; ``<= 1`` means
    no unconditional branch. Extra keyword arguments (``height``, ``width``, ``num_frames``) size the sample.
    Optional attributes read when present: ``guidance_scale`` (the default), ``sampler`` (a name recorded as
    the profile's scheduler).
    """

    transformer: nn.Module
    branch_layout: str

    def sites(self) -> list[CaptureSite]: ...

    def run(self, prompts: list[str], *, num_inference_steps: int, guidance_scale: float | None,
            generators: list[torch.Generator], end_step: Callable[[Any], None], **kwargs: Any) -> Any: ...


def profile_loop(loop: DenoisingLoop, prompts: Sequence[str], *, steps: int, seed: int = 0, batch_size: int = 8,
                 guidance_scale: float | None = None, kinds: Iterable[str] = DEFAULT_KINDS,
                 model_name: str | None = None, progress: Callable[[int, int, float], None] | None = None,
                 prompt_offset: int = 0, run_kwargs: dict[str, Any] | None = None,
                 sites: Sequence[CaptureSite] | None = None, same_seed: bool = False, whole_batch: bool = False,
                 generator_device: str | torch.device = "cpu", memory: str | None = None,
                 **metadata: Any) -> RedundancyProfile:
    """Run ``prompts`` through ``loop`` in batches under a capture and return the profile.

    Prompt ``i`` gets ``torch.Generator("cpu").manual_seed(seed + prompt_offset + i)`` whatever its batch
    (``same_seed``: ``seed`` for every prompt, as the redundancy study ran; ``generator_device``: where the
    generators live). ``guidance_scale`` ``None`` uses the loop's default; ``<= 1`` profiles the single
    conditional branch. ``run_kwargs`` go to every ``loop.run`` call; ``sites`` replaces ``loop.sites()``;
    ``whole_batch`` and ``memory`` as in :func:`~pytest_ditredundancy.capture_redundancy`; ``metadata`` fills further
    :class:`~pytest_ditredundancy.capture.profile.ProfileMetadata` fields.
    """
    if not isinstance(loop, DenoisingLoop):
        raise TypeError(f"{type(loop).__name__} is not a DenoisingLoop: it needs `transformer`, `branch_layout`, "
                        "`sites()` and `run(...)` (see pytest_ditredundancy.capture.adapters)")
    prompts = list(prompts)
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty strings")
    if steps < 2:
        raise ValueError(f"steps must be at least 2 (a profile compares consecutive steps), got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    wanted = validate_kinds(kinds)
    sites = [site for site in (loop.sites() if sites is None else sites) if site.kind in wanted]
    if not sites:
        raise ValueError(f"{type(loop).__name__}.sites() has no site of kinds {wanted}")
    scale = guidance_scale if guidance_scale is not None else getattr(loop, "guidance_scale", None)
    guided = scale is None or scale > 1
    layout = loop.branch_layout if guided else "single"
    started, done = time.perf_counter(), 0
    with capture_redundancy(loop.transformer, sites=sites, branch_layout=layout, whole_batch=whole_batch,
                            memory=memory) as cap:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            generators = [torch.Generator(generator_device).manual_seed(seed if same_seed else seed + prompt_offset + start + i)
                          for i in range(len(batch))]
            cap.start_run()
            run = cap.runs[-1]  # the run start_run() opened: label its rows with this batch's prompts
            run.prompts, run.cfg = list(batch), guided
            loop.run(list(batch), num_inference_steps=steps, guidance_scale=guidance_scale, generators=generators,
                     end_step=cap.end_step, **(run_kwargs or {}))
            if run.step != steps:
                raise RuntimeError(f"{type(loop).__name__}.run called end_step {run.step} times for "
                                   f"num_inference_steps={steps}; it must call end_step(t) once after every step")
            done += len(batch)
            if progress is not None:
                progress(done, len(prompts), done * steps / max(time.perf_counter() - started, 1e-9))
    fields: dict[str, Any] = dict(model=model_name or type(loop).__name__, seed=seed, prompts=prompts,
                                  guidance_scale=scale, pipeline_class=type(loop).__name__)
    if getattr(loop, "sampler", None):
        fields["scheduler_class"] = str(loop.sampler)
    return cap.profile(**{**fields, **metadata})


__all__ = ["DenoisingLoop", "FusedSlice", "fused_qkv_sites", "profile_loop"]
