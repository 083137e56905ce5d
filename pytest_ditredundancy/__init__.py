"""pytest-ditredundancy: the step-to-step redundancy of Diffusion Transformers as regression tests.

Public API, imported from the package itself: ``load_model``, ``capture_redundancy``, ``profile_model``,
``RedundancyProfile``, ``register_model``, ``register_protocol`` and the other names of ``__all__``.

The names are imported on first use (PEP 562): pytest imports this package for its plugin entry point in
every test run of the environment, and a run that does not use the plugin must not pay for torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .io import lazy_exports

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    "RedundancyCapture": "capture.hooks", "capture_redundancy": "capture.hooks",
    "METRICS": "capture.metrics",
    "ProfileFormatError": "capture.profile", "ProfileMetadata": "capture.profile", "RedundancyProfile": "capture.profile",
    "PROTOCOLS": "profiling.protocol_registry", "get_protocol": "profiling.protocol_registry",
    "register_protocol": "profiling.protocol_registry", "Protocol": "profiling.protocols",
    "ProtocolError": "profiling.protocols", "RunRequest": "profiling.settings", "resolve_run": "profiling.settings",
    "PROMPT_SETS": "profiling.prompts", "PromptFileError": "profiling.prompts", "coco_prompts": "profiling.prompts", "default_prompts": "profiling.prompts",
    "load_prompts": "profiling.prompts", "named_prompts": "profiling.prompts",
    "RunSettings": "profiling.runner", "profile_model": "profiling.runner",
    "KINDS": "capture.sites", "CaptureSite": "capture.sites", "FusedProjectionError": "capture.sites", "discover_sites": "capture.sites",
    "ModelLoadError": "zoo", "ModelSpec": "zoo", "UnknownModelError": "zoo", "get_spec": "zoo", "load_model": "zoo",
    "register_model": "zoo", "registered_models": "zoo",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)


if TYPE_CHECKING:  # what type checkers and IDEs see
    from .capture.hooks import RedundancyCapture, capture_redundancy
    from .capture.metrics import METRICS
    from .profiling.protocol_registry import PROTOCOLS, get_protocol, register_protocol
    from .profiling.protocols import Protocol, ProtocolError
    from .profiling.settings import RunRequest, resolve_run
    from .capture.profile import ProfileFormatError, ProfileMetadata, RedundancyProfile
    from .profiling.prompts import PROMPT_SETS, PromptFileError, coco_prompts, default_prompts, load_prompts, named_prompts
    from .profiling.runner import RunSettings, profile_model
    from .capture.sites import KINDS, CaptureSite, FusedProjectionError, discover_sites
    from .zoo import ModelLoadError, ModelSpec, UnknownModelError, get_spec, load_model, register_model, registered_models
