"""pytest-ditredundancy: the step-to-step redundancy of Diffusion Transformers as regression tests.

Public API::

    from pytest_ditredundancy import load_model, capture_redundancy, profile_model, RedundancyProfile

The names are imported on first use (PEP 562): pytest imports this package for its plugin entry point in
every test run of the environment, and a run that does not use the plugin must not pay for torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    "RedundancyCapture": "capture", "capture_redundancy": "capture",
    "METRICS": "metrics",
    "ProfileFormatError": "profile", "ProfileMetadata": "profile", "RedundancyProfile": "profile",
    "PROTOCOLS": "paper", "ProtocolError": "paper",
    "PROMPT_SETS": "prompts", "PromptFileError": "prompts", "coco_prompts": "prompts", "default_prompts": "prompts",
    "load_prompts": "prompts", "named_prompts": "prompts",
    "RunSettings": "runner", "profile_model": "runner",
    "KINDS": "sites", "CaptureSite": "sites", "FusedProjectionError": "sites", "discover_sites": "sites",
    "ModelLoadError": "zoo", "ModelSpec": "zoo", "UnknownModelError": "zoo", "get_spec": "zoo", "load_model": "zoo",
    "register_model": "zoo", "registered_models": "zoo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # what type checkers and IDEs see
    from .capture import RedundancyCapture, capture_redundancy
    from .metrics import METRICS
    from .paper import PROTOCOLS, ProtocolError
    from .profile import ProfileFormatError, ProfileMetadata, RedundancyProfile
    from .prompts import PROMPT_SETS, PromptFileError, coco_prompts, default_prompts, load_prompts, named_prompts
    from .runner import RunSettings, profile_model
    from .sites import KINDS, CaptureSite, FusedProjectionError, discover_sites
    from .zoo import (ModelLoadError, ModelSpec, UnknownModelError, get_spec, load_model, register_model,
                      registered_models)
