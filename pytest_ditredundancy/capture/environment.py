"""Facts about the run's software and hardware, recorded in every profile and baseline."""

from __future__ import annotations

import functools
import platform
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch

from ..io import plain


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


@functools.lru_cache(maxsize=1)
def _versions() -> tuple[tuple[str, str], ...]:
    return tuple({
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": package_version("diffusers"),
        "transformers": package_version("transformers"),
        "pytest-ditredundancy": package_version("pytest-ditredundancy"),
    }.items())


def versions() -> dict[str, str]:
    """Versions of the software that produced a profile (looked up once per process: metadata is slow)."""
    return dict(_versions())


def device_name(device: torch.device | str) -> str:
    """A human name for the device: the GPU model on CUDA, the processor on CPU."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def device_class(device: torch.device | str) -> str:
    """The coarse class tolerances are stored per: ``cpu``, ``cuda``, ``mps``…"""
    return torch.device(device).type


def describe_components(meta: Any, pipeline: Any, transformer: Any, scheduler: Any) -> None:
    """Fill the class names, scheduler config, sigmas, dtype and device of ``meta`` from live objects."""
    if pipeline is not None:
        meta.pipeline_class = type(pipeline).__name__
        name_or_path = getattr(getattr(pipeline, "config", None), "_name_or_path", None)
        if name_or_path:
            meta.model_id = str(name_or_path)
    meta.transformer_class = type(transformer).__name__
    try:
        parameter = next(transformer.parameters())
        meta.dtype, meta.device = str(parameter.dtype).replace("torch.", ""), str(parameter.device)
    except StopIteration:
        pass
    if scheduler is not None:
        meta.scheduler_class = type(scheduler).__name__
        config = getattr(scheduler, "config", None)
        if config is not None:
            meta.scheduler_config = {k: plain(v) for k, v in dict(config).items() if not k.startswith("_")}
            meta.num_train_timesteps = meta.scheduler_config.get("num_train_timesteps")
        sigmas = getattr(scheduler, "sigmas", None)
        if isinstance(sigmas, torch.Tensor):
            meta.sigmas = [float(s) for s in sigmas.detach().float().cpu().tolist()]
