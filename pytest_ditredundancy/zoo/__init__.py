"""The model zoo: named specs, tiny offline variants, and loading by name, HF id or local directory.

Importing the package registers the built-in zoo (:mod:`.catalog`); models of other packages come from the
``pytest_ditredundancy.models`` entry points on first lookup.
"""

from . import catalog  # noqa: F401  (registers the built-in zoo)
from .loading import ModelLoadError, load_model, resolve_spec
from .registry import (BRANCH_LAYOUTS, ENTRY_POINT_GROUP, ModelSpec, UnknownModelError, get_spec, register_model,
                       registered_models, tiny_model_names)

__all__ = [
    "BRANCH_LAYOUTS", "ENTRY_POINT_GROUP", "ModelLoadError", "ModelSpec", "UnknownModelError", "get_spec",
    "load_model", "register_model", "registered_models", "resolve_spec", "tiny_model_names",
]
