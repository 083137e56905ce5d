"""Load a pipeline by registered name, HF repo id, or a local directory written by ``save_pretrained``."""

from __future__ import annotations

import json
import os
import warnings
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .registry import ModelSpec, UnknownModelError, get_spec, registered_models

_SPECS: "weakref.WeakKeyDictionary[Any, ModelSpec]" = weakref.WeakKeyDictionary()


class ModelLoadError(RuntimeError):
    """A model that could not be loaded; the message says why and what to do."""


class InferredSettingsWarning(UserWarning):
    """A checkpoint the zoo does not name is profiled with settings inferred from its pipeline class."""


def _family_spec(pipeline_class: str) -> ModelSpec | None:
    for spec in registered_models().values():
        if spec.pipeline_class == pipeline_class and not spec.is_tiny:
            return spec
    return None


def resolve_spec(model: str | os.PathLike | ModelSpec) -> ModelSpec:
    """The spec for a registered name, a local pipeline directory, or an HF repo id.

    Directories and repo ids of a known pipeline class take that family's settings (steps, resolution,
    guidance, scheduler); unknown classes get the pipeline's own defaults and 20 steps.
    """
    if isinstance(model, ModelSpec):
        return model
    text = os.fspath(model)
    if text in registered_models():
        return get_spec(text)
    path = Path(text).expanduser()
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise ModelLoadError(f"{path} is a directory but has no model_index.json; save the pipeline there "
                                 "with pipe.save_pretrained(path) (or pass a registered model name)")
        try:
            pipeline_class = json.loads(index.read_text(encoding="utf-8"))["_class_name"]
        except (ValueError, KeyError) as exc:
            raise ModelLoadError(f"{index} is not a diffusers model index ({exc}); re-save the pipeline") from None
        return _spec_for_checkpoint(str(path.resolve()), path.name, pipeline_class)
    if text.count("/") == 1 and not text.startswith((".", "/")) and all(text.split("/")):
        for spec in registered_models().values():
            if spec.checkpoint == text:
                return spec
        return _spec_for_checkpoint(text, text.split("/")[1].lower(), "DiffusionPipeline")
    return get_spec(text)  # raises UnknownModelError with close names


def _spec_for_checkpoint(checkpoint: str, name: str, pipeline_class: str) -> ModelSpec:
    """A spec for a checkpoint the zoo does not name: its family's steps, guidance and scheduler, but the
    pipeline's own default size (a saved tiny or fine-tuned model knows its size better than the family)."""
    family = _family_spec(pipeline_class)
    if family is not None:
        return replace(family, name=name, checkpoint=checkpoint, build=None, in_paper=False, height=None, width=None,
                       num_frames=None, inferred=True)
    return ModelSpec(name=name, family="custom", pipeline_class=pipeline_class, checkpoint=checkpoint, steps=20,
                     height=None, width=None, guidance_scale=None, scheduler="default", inferred=True)


def spec_as(spec: ModelSpec, as_model: str | ModelSpec | None = None) -> ModelSpec:
    """``spec`` as it is profiled: with the settings of ``as_model`` (a registered name or a spec) when given,
    as that model's saved copy (:meth:`ModelSpec.with_settings_of`). Without it, a spec whose settings were
    inferred from its pipeline class gives an :class:`InferredSettingsWarning` that names them."""
    if as_model is not None:
        return spec.with_settings_of(as_model if isinstance(as_model, ModelSpec) else get_spec(as_model))
    if spec.inferred:
        warnings.warn(inferred_settings_message(spec), InferredSettingsWarning, stacklevel=3)
    return spec


def inferred_settings_message(spec: ModelSpec) -> str:
    """What an inferred spec runs with, and how to run a saved copy of a registered model with that model's."""
    source = f"the {spec.family} family's" if spec.family != "custom" else "generic defaults"
    size = f"{spec.width}x{spec.height}" if spec.height and spec.width else "the pipeline's default size"
    frames = f", {spec.num_frames} frames" if spec.num_frames else ""
    guidance = f"guidance {spec.guidance_scale:g}" if spec.guidance_scale is not None else "the pipeline's guidance"
    same = [name for name, other in registered_models().items() if other.pipeline_class == spec.pipeline_class]
    example = same[0] if same else "NAME"
    candidates = f" (registered {spec.pipeline_class} models: {', '.join(same)})" if same else ""
    return (f"{spec.checkpoint} is not a registered model: it is profiled with settings inferred from its pipeline "
            f"class {spec.pipeline_class} ({source}): {spec.steps} steps, {guidance}, scheduler {spec.scheduler}, "
            f"{size}{frames}, call arguments {spec.call_kwargs or 'none'}, prompt set {spec.prompt_set or 'default'}. "
            f"If it is a saved copy of a registered model, pass as_model={example!r}{candidates} to profile it with "
            "that model's settings (the plugin: --dit-baseline-name).")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was requested but torch sees no CUDA GPU; use --dit-device=cpu or auto")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, spec: ModelSpec, device: torch.device) -> torch.dtype:
    """Explicit dtype, else the model's own dtype on GPU and float32 on CPU (CPU half precision is slow)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype if dtype not in (None, "auto") else (spec.dtype if device.type != "cpu" else "float32")
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
    name = aliases.get(name, name)
    value = getattr(torch, str(name), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16")
    return value


def load_model(model: str | os.PathLike | ModelSpec, *, device: str | torch.device | None = "auto",
               dtype: str | torch.dtype | None = None, seed: int = 0) -> Any:
    """Load a DiT pipeline, ready to run: on ``device``, in ``dtype``, progress bar off.

    ``model`` is a registered name (``pixart-alpha``, ``tiny-pixart-alpha``), an HF repo id, or a local
    directory saved with ``save_pretrained`` (the pipeline class is read from its ``model_index.json``).
    ``seed`` seeds the random weights of tiny models.
    """
    spec = resolve_spec(model)
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, spec, target)
    if spec.build is not None:
        pipe = spec.build(seed)
    elif spec.family == "open-sora":
        raise ModelLoadError(
            f"{spec.name} is not a diffusers pipeline. Load its STDiT3 transformer with the Open-Sora package and "
            "profile its sampling loop through pytest_ditredundancy.capture.adapters (see docs/capture.md, 'Adapters'); "
            "`tiny-open-sora-1.2` shows the same path offline."
        )
    else:
        pipe = _from_pretrained(spec, torch_dtype)
    if hasattr(pipe, "to"):
        pipe = pipe.to(target) if getattr(pipe, "dtype", None) == torch_dtype else pipe.to(target, torch_dtype)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    _SPECS[pipe] = spec
    return pipe


def _from_pretrained(spec: ModelSpec, torch_dtype: torch.dtype) -> Any:
    import diffusers

    cls = getattr(diffusers, spec.pipeline_class, None) or diffusers.DiffusionPipeline
    try:
        source = spec.checkpoint
        if spec.trained:  # a package-relative name, so profiles and baselines do not carry one machine's path
            from .trained import shipped_weights

            source = str(shipped_weights(spec))
        return cls.from_pretrained(source, torch_dtype=torch_dtype)
    except Exception as exc:  # OSError, ValueError, and the HTTP client's own errors
        raise ModelLoadError(
            f"could not load {spec.name!r} from {spec.checkpoint!r}: {_first_line(exc)}\n"
            "An HF repo id needs hub access or a local cache (with HF_HUB_OFFLINE=1 only the cache is used); "
            "a directory must hold a pipeline written by save_pretrained(). Offline, use a tiny model such as "
            "'tiny-pixart-alpha'."
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def hub_problem(spec: ModelSpec) -> str | None:
    """Why ``spec`` cannot be loaded from the Hugging Face Hub, or None (cached, reachable, or not a hub model).

    Reads the local cache first; offline (``HF_HUB_OFFLINE=1``) that is the answer. Online it asks the Hub for
    the metadata of the model's ``model_index.json``: one request, not retried, which tells a missing, gated
    or unreachable repository apart before any test runs (instead of one failed download per test)."""
    if spec.build is not None or spec.trained or not spec.checkpoint or spec.family == "open-sora" \
            or Path(spec.checkpoint).is_dir():
        return None  # built, shipped with the package, not a diffusers pipeline, or a local directory
    from huggingface_hub import constants, errors, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache

    repo = spec.checkpoint
    if isinstance(try_to_load_from_cache(repo, "model_index.json"), str):
        return None
    if constants.HF_HUB_OFFLINE:
        return (f"{repo} is not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it: "
                f"download it first (hf download {repo}) or unset HF_HUB_OFFLINE")
    try:
        get_hf_file_metadata(hf_hub_url(repo, "model_index.json"))
    except errors.GatedRepoError:
        return f"{repo} is gated: accept its licence on the Hugging Face Hub and set HF_TOKEN"
    except errors.RepositoryNotFoundError:
        return f"{repo} does not exist on the Hugging Face Hub (or it is private: set HF_TOKEN)"
    except errors.RemoteEntryNotFoundError:
        return f"{repo} has no model_index.json: it is not a diffusers pipeline"
    except Exception as exc:  # no network, DNS, proxy, TLS, timeouts (the HTTP client's own error types)
        return (f"the Hugging Face Hub is unreachable ({_first_line(exc)}) and {repo} is not cached: check the "
                "network, or download it where there is one and run with HF_HUB_OFFLINE=1")
    return None


def spec_of(pipe: Any) -> ModelSpec | None:
    """The spec a pipeline was loaded from by :func:`load_model` (``None`` for pipelines built elsewhere)."""
    try:
        return _SPECS.get(pipe)
    except TypeError:
        return None


__all__ = ["InferredSettingsWarning", "ModelLoadError", "UnknownModelError", "hub_problem", "load_model",
           "resolve_device", "resolve_dtype", "resolve_spec", "spec_as", "spec_of"]
