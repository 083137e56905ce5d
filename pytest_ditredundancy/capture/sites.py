"""Where K, V and A live in a transformer: the capture sites.

A :class:`CaptureSite` names one attention layer (its module path) and one kind, and points at the module
whose forward output *is* that tensor. Capture reads outputs with forward hooks only, so the model's code
path (processors, rotary embeddings, kwargs) is never touched.

For diffusers attention modules (anything with ``to_k`` and ``to_v`` children, e.g. ``Attention``,
``FluxAttention``, ``WanAttention``, ``MochiAttention``):

======== ===================================================================================
kind     tensor
======== ===================================================================================
k        output of ``to_k`` (key projection of the image/video tokens, before norm and RoPE)
v        output of ``to_v``
a        first output of the attention module: after ``to_out`` where the module has one; for
         modules without an output projection (Flux single blocks) the attention result itself
k_text   output of ``add_k_proj`` (joint attention: SD3, Flux double blocks, AuraFlow MMDiT, Mochi)
v_text   output of ``add_v_proj``
a_text   second output of a joint attention module, after ``to_add_out`` (CogVideoX: the text part of its
         joint output; its ``to_k``/``to_v`` project the joint [text, video] sequence, so its k/v cover both)
======== ===================================================================================

In cross-attention layers ``to_k``/``to_v`` project the text, so their K/V do not change with the step; the
profile keeps those series and flags them constant. Models that are not diffusers pipelines describe their
sites themselves (see :mod:`pytest_ditredundancy.capture.adapters`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

KINDS = ("k", "v", "a", "k_text", "v_text", "a_text")
DEFAULT_KINDS = KINDS

#: Picks the captured tensor out of a module's forward output (``None``: the output itself). A site with a
#: ``context`` module is called as ``select(output, call)`` with that module's running :class:`ModuleCall`.
Selector = Callable[..., "torch.Tensor | None"]


class FusedProjectionError(RuntimeError):
    """The transformer computes Q, K and V in one fused projection, so a K or V hook would never fire."""


@dataclass(frozen=True)
class ModuleCall:
    """The arguments of a module call in progress (read by a forward pre-hook), e.g. the rotary embedding and
    the text states an attention module was called with, for sites whose tensor depends on them."""

    module: nn.Module
    args: tuple
    kwargs: dict

    def argument(self, name: str) -> Any:
        """The value passed for parameter ``name`` of the module's ``forward`` (``None`` when not passed)."""
        if name in self.kwargs:
            return self.kwargs[name]
        if not self.args:
            return None
        import inspect

        try:
            bound = inspect.signature(self.module.forward).bind_partial(*self.args, **self.kwargs)
        except (TypeError, ValueError):
            return None
        return bound.arguments.get(name)


@dataclass(frozen=True, eq=False)
class CaptureSite:
    """One (layer, kind) series: ``module``'s output (``read="input"``: its first positional input), through
    ``select`` if given. With ``context``, ``select`` also receives that module's running call
    (:class:`ModuleCall`), e.g. an attention module's ``image_rotary_emb`` for a site on its ``norm_k``."""

    layer: str
    kind: str
    module: nn.Module
    select: Selector | None = None
    read: str = "output"
    context: nn.Module | None = None

    def __post_init__(self) -> None:
        if self.read not in ("output", "input"):
            raise ValueError(f"CaptureSite.read must be 'output' or 'input', got {self.read!r}")

    def tensor(self, output: Any, call: ModuleCall | None = None) -> torch.Tensor | None:
        if self.select is None:
            value = output
        elif self.context is not None:
            value = self.select(output, call)
        else:
            value = self.select(output)
        return value if isinstance(value, torch.Tensor) else None


def first_output(output: Any) -> Any:
    """The image stream of an attention module that may return ``(image, text)``."""
    return output[0] if isinstance(output, (tuple, list)) else output


def second_output(output: Any) -> Any:
    """The text stream of a joint attention module (``None`` when it returned a single tensor)."""
    if isinstance(output, (tuple, list)) and len(output) > 1:
        return output[1]
    return None


def is_attention_module(module: nn.Module) -> bool:
    return isinstance(getattr(module, "to_k", None), nn.Module) and isinstance(getattr(module, "to_v", None), nn.Module)


def uses_fused_projections(module: nn.Module) -> bool:
    """Whether the module's forward computes Q/K/V through a fused projection right now.

    Legacy ``Attention`` fuses by switching to a ``Fused*`` processor (and keeps ``to_qkv`` after unfusing);
    ``AttentionModuleMixin`` modules (Flux, Wan, ...) fuse by setting ``fused_projections``.
    """
    processor = getattr(module, "processor", None)
    if processor is not None and type(processor).__name__.startswith("Fused"):
        return True
    return bool(getattr(module, "_supports_qkv_fusion", False) and getattr(module, "fused_projections", False))


def _check_not_fused(name: str, module: nn.Module) -> None:
    if uses_fused_projections(module):
        raise FusedProjectionError(
            f"attention layer {name!r} ({type(module).__name__}) uses fused QKV projections, so its K and V are "
            "never computed by to_k/to_v and cannot be captured. Call `transformer.unfuse_qkv_projections()` "
            "(or build the pipeline without `fuse_qkv_projections()`) before capturing, or describe the sites "
            "with an adapter that splits the fused output (pytest_ditredundancy.capture.adapters)."
        )


def discover_sites(transformer: nn.Module, kinds: Iterable[str] = DEFAULT_KINDS) -> list[CaptureSite]:
    """Every attention layer of a diffusers transformer, in module registration order, for ``kinds``."""
    wanted = validate_kinds(kinds)
    sites: list[CaptureSite] = []
    for name, module in transformer.named_modules():
        if not is_attention_module(module):
            continue
        _check_not_fused(name, module)
        candidates = [
            ("k", module.to_k, None),
            ("v", module.to_v, None),
            ("a", module, first_output),
        ]
        if isinstance(getattr(module, "add_k_proj", None), nn.Module):
            candidates += [("k_text", module.add_k_proj, None), ("v_text", module.add_v_proj, None)]
            if isinstance(getattr(module, "to_add_out", None), nn.Module):
                candidates.append(("a_text", module, second_output))
        elif type(getattr(module, "processor", None)).__name__.startswith("CogVideoX"):
            candidates.append(("a_text", module, second_output))  # one joint sequence, output split (video, text)
        sites += [CaptureSite(name, kind, target, select) for kind, target, select in candidates if kind in wanted]
    if not sites:
        raise ValueError(
            f"{type(transformer).__name__} has no attention module with to_k/to_v projections; pass explicit "
            "sites (see pytest_ditredundancy.capture.adapters) for models that are not diffusers transformers."
        )
    return sites


def validate_kinds(kinds: Iterable[str]) -> tuple[str, ...]:
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown kinds {unknown or kinds!r}; choose from {', '.join(KINDS)}")
    return kinds
