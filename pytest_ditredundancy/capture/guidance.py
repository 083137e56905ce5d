"""What a running pipeline call says about classifier-free guidance: read by the capture at the transformer's
first call of a run, so ``branch_layout="auto"`` splits the batch by the call's own settings (prompt strings or
``prompt_embeds`` alike) instead of guessing from row counts."""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

#: Pipelines whose guidance batch is ``[cond, uncond]`` (class labels, then the null class), not diffusers' usual
#: ``[uncond, cond]``.
COND_FIRST_PIPELINES = ("DiTPipeline",)
#: Flags a pipeline's ``__call__`` keeps in local variables when it has no property for them: PixArt, Latte and
#: AuraFlow compute ``do_classifier_free_guidance``, Flux ``do_true_cfg`` (negative prompt, separate calls).
_GUIDANCE_FLAGS = ("do_classifier_free_guidance", "do_true_cfg")
_PER_PROMPT = ("num_images_per_prompt", "num_videos_per_prompt")


def pipeline_call_locals(pipeline: Any, depth: int = 64) -> dict[str, Any]:
    """The local variables of ``pipeline.__call__`` while it runs (read from a hook inside the call): its
    arguments (``guidance_scale``, ``prompt_embeds``...) and the flags it computed. Empty outside a call."""
    frame = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            break
        if frame.f_code.co_name == "__call__" and frame.f_locals.get("self") is pipeline:
            return dict(frame.f_locals)
        frame = frame.f_back
    return {}


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, torch.Tensor):
        return bool(value) if value.numel() == 1 else None
    try:
        return bool(value) if value is not None and not isinstance(value, (str, bytes)) else None
    except (TypeError, ValueError):
        return None


def call_guidance(pipeline: Any, transformer: nn.Module | None = None) -> tuple[bool | None, int | None]:
    """Whether the running pipeline call batches classifier-free guidance, and how many samples it makes.

    Guidance, in order: the pipeline's ``do_classifier_free_guidance`` property; the same flag (or Flux's
    ``do_true_cfg``) computed in its ``__call__``; the call's ``guidance_scale`` (> 1 means guidance, except
    for guidance-distilled transformers, whose ``guidance_scale`` is an input, not CFG). ``None`` when none of
    them is there. Samples: the call's ``batch_size`` times images/videos per prompt, when it has them (it
    counts prompts or ``prompt_embeds`` rows alike). Called from the transformer's first forward pre-hook.
    """
    local = pipeline_call_locals(pipeline)
    samples = None
    batch = local.get("batch_size")
    if isinstance(batch, int) and not isinstance(batch, bool) and batch > 0:
        per = next((local[n] for n in _PER_PROMPT if isinstance(local.get(n), int) and local[n] > 0), 1)
        samples = batch * per
    try:
        flag = _as_bool(getattr(pipeline, "do_classifier_free_guidance"))
    except Exception:  # no such property, or it reads call state this pipeline does not set
        flag = None
    if flag is not None:
        return flag, samples
    for name in _GUIDANCE_FLAGS:
        flag = _as_bool(local.get(name))
        if flag is not None:
            return flag, samples
    scale = local.get("guidance_scale", getattr(pipeline, "_guidance_scale", None))
    distilled = bool(getattr(getattr(transformer, "config", None), "guidance_embeds", False))
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return (False if distilled else scale > 1), samples
    return None, samples
