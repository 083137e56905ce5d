"""pytest-ditredundancy: the step-to-step redundancy of Diffusion Transformers as regression tests.

Public API::

    from pytest_ditredundancy import load_model, capture_redundancy, profile_model, RedundancyProfile
"""

from .capture import RedundancyCapture, capture_redundancy
from .metrics import METRICS
from .profile import ProfileFormatError, ProfileMetadata, RedundancyProfile
from .paper import PROTOCOLS, ProtocolError
from .prompts import PROMPT_SETS, PromptFileError, coco_prompts, default_prompts, load_prompts, named_prompts
from .runner import RunSettings, profile_model
from .sites import KINDS, CaptureSite, FusedProjectionError, discover_sites
from .zoo import ModelLoadError, ModelSpec, UnknownModelError, get_spec, load_model, register_model, registered_models

__version__ = "0.1.0"

__all__ = [
    "KINDS", "METRICS", "PROMPT_SETS", "PROTOCOLS", "CaptureSite", "FusedProjectionError", "ModelLoadError",
    "ModelSpec", "ProfileFormatError", "ProfileMetadata", "PromptFileError", "ProtocolError", "RedundancyCapture",
    "RedundancyProfile", "RunSettings", "UnknownModelError", "capture_redundancy", "coco_prompts",
    "default_prompts", "discover_sites", "get_spec", "load_model", "load_prompts", "named_prompts",
    "profile_model", "register_model", "registered_models",
]
