"""The real transformer configs of the registered full-size models, shipped with the package (no weights).

Each ``data/configs/<model>.json`` holds the transformer's diffusers ``config.json`` as published with the
checkpoint (keys diffusers ignores left out), the class it instantiates, where it comes from, and the
pipeline geometry that decides how many tokens each attention layer sees (:class:`Geometry`). With them the
real transformer is built on the ``meta`` device (:func:`build_on_meta`): every module and parameter shape
exists, no memory is allocated and nothing is downloaded, so the project's own site discovery can be run on
the exact module tree ``pytest --dit-model=flux-dev`` will hook.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch
from torch import nn

from ..capture.sites import DEFAULT_KINDS, CaptureSite, discover_sites, validate_kinds
from .registry import get_spec



class NoRealConfigError(LookupError):
    """A model without a shipped real config (a tiny twin, or a model registered by another package)."""


@dataclass(frozen=True)
class Geometry:
    """How a request of ``height x width x frames`` becomes tokens.

    ``spatial_factor``: pixels per token side (VAE downsampling x patch size, or the pipeline's 2x2 packing);
    ``temporal_factor``: frames per latent frame; ``causal_frames``: causal video VAEs keep the first frame
    apart, ``(F - 1) // t + 1`` latent frames; ``latent_frames_per_chunk``: Open-Sora's VAE turns every
    ``temporal_factor`` frames into that many latent frames; ``text_tokens``: the text sequence the
    transformer sees (all encoders, plus any tokens the transformer prepends).
    """

    spatial_factor: int
    text_tokens: int
    temporal_factor: int = 1
    causal_frames: bool = False
    latent_frames_per_chunk: int | None = None
    notes: str = ""

    def latent_frames(self, frames: int | None) -> int:
        if frames is None:
            return 1
        if self.latent_frames_per_chunk is not None:
            return max(frames // self.temporal_factor * self.latent_frames_per_chunk, 1)
        if self.causal_frames:
            return (frames - 1) // self.temporal_factor + 1
        return frames // self.temporal_factor

    def image_tokens(self, height: int, width: int, frames: int | None) -> int:
        """Image/video tokens per sample (all frames)."""
        return (height // self.spatial_factor) * (width // self.spatial_factor) * self.latent_frames(frames)


@dataclass(frozen=True)
class RealConfig:
    model: str
    transformer_class: str
    source: str
    config: dict[str, Any]
    geometry: Geometry


def _config_dir():
    return resources.files("pytest_ditredundancy").joinpath("data/configs")


def shipped_models() -> list[str]:
    """Names of the models whose real config ships with the package, sorted."""
    files = _config_dir().iterdir()
    return sorted(f.name[: -len(".json")] for f in files if f.name.endswith(".json"))


def load_real_config(name: str) -> RealConfig:
    """The shipped config of registered model ``name`` (an unknown name fails with the closest names)."""
    spec = get_spec(name)
    if spec.trained:
        raise NoRealConfigError(f"{name!r} is a small model trained and shipped with the package: it runs on the CPU "
                                "as it is, so there is nothing to plan; plan a registered full-size model instead")
    if spec.is_tiny:
        full = spec.name[len("tiny-"):]
        raise NoRealConfigError(f"{name!r} is a tiny offline twin: it is built on the CPU in a second, so there "
                                f"is nothing to plan; plan its full-size model instead: --dit-model={full}")
    path = _config_dir() / f"{name}.json"
    if not path.is_file():
        raise NoRealConfigError(
            f"no real transformer config ships for {name!r} (shipped: {', '.join(shipped_models())}); add its "
            f"diffusers transformer config and geometry as pytest_ditredundancy/data/configs/{name}.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    return RealConfig(model=data["model"], transformer_class=data["transformer_class"], source=data["source"],
                      config=data["config"], geometry=Geometry(**data["geometry"]))


def build_on_meta(real: RealConfig) -> nn.Module:
    """The real transformer with every tensor on the ``meta`` device: shapes only, no memory, no weights."""
    with torch.device("meta"):
        if real.transformer_class == "STDiT3":
            return _stdit3(real.config)
        import diffusers

        cls = getattr(diffusers, real.transformer_class, None)
        if cls is None:
            raise NoRealConfigError(f"diffusers {diffusers.__version__} has no {real.transformer_class} (needed by "
                                    f"{real.model}); upgrade diffusers")
        return cls.from_config(real.config).eval()


def real_sites(real: RealConfig, transformer: nn.Module, kinds: Any = DEFAULT_KINDS) -> list[CaptureSite]:
    """The capture sites a real run hooks: diffusers site discovery, or Open-Sora's adapter sites (fused
    ``qkv`` slices; its caption K/V are not captured, see ``zoo.tiny_stdit.from_stdit3``)."""
    kinds = validate_kinds(kinds)
    if real.transformer_class != "STDiT3":
        return discover_sites(transformer, kinds)
    from ..capture.adapters import fused_qkv_sites

    caption_kv = {id(m.kv_linear) for m in transformer.modules() if isinstance(getattr(m, "kv_linear", None), nn.Module)}
    return [s for s in fused_qkv_sites(transformer, kv="kv_linear", kinds=kinds) if id(s.module) not in caption_kv]


def _stdit3(config: dict[str, Any]) -> nn.Module:
    """Open-Sora's STDiT3 is not in diffusers: the package's STDiT3-style model at the real config's sizes
    (same attention layout and projections; no qk-norm, size or fps embedders)."""
    from .tiny_stdit import TinySTDiT

    return TinySTDiT(in_channels=config["in_channels"], dim=config["hidden_size"], depth=config["depth"],
                     heads=config["num_heads"], patch=tuple(config["patch_size"]),
                     caption_channels=config["caption_channels"], tokens=config["model_max_length"],
                     mlp_ratio=config["mlp_ratio"]).eval()
