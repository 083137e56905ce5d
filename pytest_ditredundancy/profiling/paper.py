"""The redundancy study's protocol, reproduced exactly: ``profile_model(..., protocol="paper")``.

"Unveiling Redundancy in Diffusion Transformers (DiTs): A Systematic Study" (Sun, Fang, Li, Pan; arXiv
2411.13588) measured its seven models with the scripts of its DiTCacheAnalysis repository. This module
writes down what those scripts do, model by model, and builds the capture sites that measure the same
tensors here. What the study did, for every model:

* every caption runs in its own pipeline call, with the **same** generator seed (42 for the diffusers
  pipelines, 1024 for Open-Sora, Mochi's command-line default 1710977262), on the pipeline's device;
* the pipeline's own defaults otherwise: its step count, guidance scale, size and shipped scheduler;
* only **self-attention** layers (PixArt-α: the 28 ``attn1``; no cross-attention);
* ΔX = ``mean|X_t − X_{t−1}|`` over the **whole transformer batch** of the call, both classifier-free-guidance
  halves together (the profile's single branch ``batch``);
* K, V and A as the study's attention processors recorded them (:data:`PAPER_SETUPS`): for FLUX, CogVideoX,
  Mochi and Open-Sora K is taken *after* Q/K normalisation and rotary embedding, of the image/video tokens
  only (FLUX single-stream blocks: the whole joint sequence, as the study took it);
* its statistics over the first 10 captions of its 1000 MS-COCO captions (``coco1000``).

Differences that remain, all numerical: the tensors are reduced in float32 (the study reduced fp16/bf16
tensors in their own dtype, Mochi's in float32), and a CPU run uses float32 weights and a CPU generator.
Tiny twins keep their own size (and frame count) — their step counts, guidance and schedulers are the
study's.

Sites read module outputs with forward hooks, like every other capture here. Where the study's tensor is not
a module output (K after rotary embedding), the site hooks ``norm_k`` and applies the same rotary function
the model applies, to the same inputs, using the rotary embedding the attention module was called with
(:class:`~pytest_ditredundancy.capture.sites.ModuleCall`): the result is the tensor the attention consumed, bit for
bit.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from ..capture.adapters import FusedSlice
from ..capture.sites import CaptureSite, ModuleCall, first_output
from ..zoo.registry import ModelSpec
from .protocols import DEFAULT_NUM_PROMPTS, Protocol, ProtocolError

#: the kinds the study measured (it also recorded text-stream K/V/A of joint attention, but analysed only these)
PAPER_KINDS = ("k", "v", "a")
#: the study's statistics use captions 0-9 of its caption file (``batchsize = 10`` in its analysis scripts)
PAPER_NUM_PROMPTS = 10
PAPER_PROMPTS = "coco1000"


@dataclass(frozen=True)
class PaperSetup:
    """How the study ran and measured one model family."""

    family: str  # the zoo's family name
    study_name: str  # the model's name in the study's scripts
    blocks: tuple[str, ...]  # ModuleList attributes of the transformer whose blocks were measured, in its order
    attention: str  # the block's self-attention attribute
    sites: Callable[[nn.Module, str, str], list[CaptureSite]]  # (attention module, its path, study style)
    steps: int
    guidance_scale: float
    seed: int  # the generator seed of every prompt
    dtype: str  # the dtype the study ran in
    height: int
    width: int
    num_frames: int | None
    scheduler: str  # what the study sampled with (the checkpoint's shipped scheduler)
    k: str
    v: str
    a: str
    #: call arguments the zoo sets for its own protocol but the study left at the pipeline's default
    study_defaults: tuple[str, ...] = ()
    #: extra arguments of an adapter loop's run (Open-Sora's sampler settings)
    run_kwargs: dict[str, Any] = field(default_factory=dict)
    source: str = ""


# -- K after rotary embedding: the same functions the models apply ------------------------------------------------

def _rotary(call: ModuleCall | None) -> Any:
    return call.argument("image_rotary_emb") if call is not None else None


@dataclass(frozen=True)
class _RotatedKey(ABC):
    """K as a model's processor uses it: ``norm_k``'s output rotated with the RoPE of the attention call
    (:meth:`rotate`, each family's own); a call without RoPE gives :meth:`unrotated`."""

    def __call__(self, output: Any, call: ModuleCall | None) -> torch.Tensor | None:
        if not isinstance(output, torch.Tensor):
            return None
        freqs = _rotary(call)
        return self.unrotated(output, call) if freqs is None else self.rotate(output, freqs)

    def unrotated(self, output: torch.Tensor, call: ModuleCall | None) -> torch.Tensor:
        return output

    @abstractmethod
    def rotate(self, output: torch.Tensor, freqs: Any) -> torch.Tensor:
        """``output`` rotated as the family's attention processor rotates its keys with ``freqs``."""


@dataclass(frozen=True)
class FluxKey(_RotatedKey):
    """FLUX (``FluxAttnProcessor``): K = ``norm_k`` output ``(B, N, H, D)`` rotated with the call's RoPE. The
    joint sequence is ``[text, image]``, so the image tokens of a double block are the last ``N`` positions of
    the rotary table; a single block's ``norm_k`` already covers the whole joint sequence."""

    def rotate(self, output: torch.Tensor, freqs: Any) -> torch.Tensor:
        from diffusers.models.embeddings import apply_rotary_emb

        n = output.shape[1]
        cos, sin = freqs
        return apply_rotary_emb(output, (cos[-n:], sin[-n:]), sequence_dim=1)


@dataclass(frozen=True)
class CogVideoXKey(_RotatedKey):
    """CogVideoX (``CogVideoXAttnProcessor2_0``): ``to_k`` projects the joint ``[text, video]`` sequence; K =
    the video positions of the ``norm_k`` output ``(B, H, S, D)``, rotated with the call's RoPE (one row per
    video token, so the video part is the last ``len(rope)`` positions)."""

    def unrotated(self, output: torch.Tensor, call: ModuleCall | None) -> torch.Tensor:
        return output[:, :, _text_length(call):]

    def rotate(self, output: torch.Tensor, freqs: Any) -> torch.Tensor:
        from diffusers.models.embeddings import apply_rotary_emb

        return apply_rotary_emb(output[:, :, -freqs[0].shape[0]:], freqs)


@dataclass(frozen=True)
class VideoTokens:
    """CogVideoX V: the video positions (after the text) of ``to_v``'s joint-sequence output ``(B, S, C)``."""

    def __call__(self, output: Any, call: ModuleCall | None) -> torch.Tensor | None:
        return output[:, _text_length(call):] if isinstance(output, torch.Tensor) else None


def _text_length(call: ModuleCall | None) -> int:
    text = call.argument("encoder_hidden_states") if call is not None else None
    return int(text.shape[1]) if isinstance(text, torch.Tensor) else 0


@dataclass(frozen=True)
class MochiKey(_RotatedKey):
    """Mochi (``MochiAttnProcessor2_0``; the study's genmo code does the same): K = ``norm_k`` output
    ``(B, N, H, D)`` of the video tokens, rotated pairwise (even/odd channels) with the call's
    ``(cos, sin)`` in float32, then cast back, as the model's processor does."""

    def rotate(self, output: torch.Tensor, freqs: Any) -> torch.Tensor:
        cos, sin = freqs
        even, odd = output[..., 0::2].float(), output[..., 1::2].float()
        real = (even * cos - odd * sin).to(output.dtype)
        imag = (even * sin + odd * cos).to(output.dtype)
        return torch.stack([real, imag], dim=-1).flatten(-2)


@dataclass(frozen=True)
class OpenSoraKey:
    """Open-Sora 1.2 (STDiT3 ``Attention``): K = ``k_norm`` output ``(B, H, N, D)``, through the block's own
    rotary function where it has one (temporal blocks)."""

    def __call__(self, output: Any, call: ModuleCall | None) -> torch.Tensor | None:
        if not isinstance(output, torch.Tensor):
            return None
        attention = call.module if call is not None else None
        if attention is not None and getattr(attention, "rope", False):
            return attention.rotary_emb(output)
        return output


# -- per-family sites --------------------------------------------------------------------------------------------

def _projections(attn: nn.Module, layer: str, style: str) -> list[CaptureSite]:
    """K = ``to_k`` output, V = ``to_v`` output, A = the module's (first) output: PixArt-α, SD3 (the study's
    joint processor applies no Q/K norm; SD3-medium has none) and Latte."""
    return [CaptureSite(layer, "k", attn.to_k), CaptureSite(layer, "v", attn.to_v),
            CaptureSite(layer, "a", attn, first_output)]


def _flux(attn: nn.Module, layer: str, style: str) -> list[CaptureSite]:
    return [CaptureSite(layer, "k", attn.norm_k, FluxKey(), context=attn), CaptureSite(layer, "v", attn.to_v),
            CaptureSite(layer, "a", attn, first_output)]


def _cogvideox(attn: nn.Module, layer: str, style: str) -> list[CaptureSite]:
    return [CaptureSite(layer, "k", attn.norm_k, CogVideoXKey(), context=attn),
            CaptureSite(layer, "v", attn.to_v, VideoTokens(), context=attn),
            CaptureSite(layer, "a", attn, first_output)]


def _mochi(attn: nn.Module, layer: str, style: str) -> list[CaptureSite]:
    return [CaptureSite(layer, "k", attn.norm_k, MochiKey(), context=attn), CaptureSite(layer, "v", attn.to_v),
            CaptureSite(layer, "a", attn.to_out[0], read="input")]


def _open_sora(attn: nn.Module, layer: str, style: str) -> list[CaptureSite]:
    return [CaptureSite(layer, "k", attn.k_norm, OpenSoraKey(), context=attn),
            CaptureSite(layer, "v", attn.qkv, FusedSlice(2, 3)), CaptureSite(layer, "a", attn.proj)]


_DIFFUSERS_SOURCE = "{script}: pipeline defaults, generator=torch.Generator('cuda').manual_seed(42), one caption per call"

PAPER_SETUPS: dict[str, PaperSetup] = {setup.family: setup for setup in (
    PaperSetup(
        "flux", "flux", ("transformer_blocks", "single_transformer_blocks"), "attn", _flux, steps=28,
        guidance_scale=3.5, seed=42, dtype="float16", height=1024, width=1024, num_frames=None,
        scheduler="FlowMatchEulerDiscreteScheduler (shipped)",
        k="image tokens after norm_k and RoPE (single blocks: the joint sequence)",
        v="to_v output (single blocks: the joint sequence)",
        a="to_out output of the image tokens (single blocks: the attention output)",
        source=_DIFFUSERS_SOURCE.format(script="flux_example.py")),
    PaperSetup(
        "pixart-alpha", "pixart-alpha", ("transformer_blocks",), "attn1", _projections, steps=20, guidance_scale=4.5,
        seed=42, dtype="float16", height=1024, width=1024, num_frames=None,
        scheduler="DPMSolverMultistepScheduler (shipped)", k="to_k output", v="to_v output",
        a="attn1 output (after to_out)", source=_DIFFUSERS_SOURCE.format(script="pixartalpha_example.py")),
    PaperSetup(
        "sd3", "sd3", ("transformer_blocks",), "attn", _projections, steps=28, guidance_scale=7.0, seed=42,
        dtype="float16", height=1024, width=1024, num_frames=None,
        scheduler="FlowMatchEulerDiscreteScheduler (shipped)", k="to_k output (image tokens)",
        v="to_v output (image tokens)", a="to_out output (image tokens)",
        source=_DIFFUSERS_SOURCE.format(script="sd3_example.py")),
    PaperSetup(
        "cogvideox", "cogvideox-5b", ("transformer_blocks",), "attn1", _cogvideox, steps=50, guidance_scale=6.0,
        seed=42, dtype="float16", height=480, width=720, num_frames=9,
        scheduler="CogVideoXDPMScheduler (shipped)", k="video tokens after norm_k and RoPE",
        v="video tokens of to_v", a="video tokens of to_out", source=_DIFFUSERS_SOURCE.format(
            script="cogvideo_example.py (num_frames=9)")),
    PaperSetup(
        "latte", "latte", ("transformer_blocks", "temporal_transformer_blocks"), "attn1", _projections, steps=50,
        guidance_scale=7.5, seed=42, dtype="float16", height=512, width=512, num_frames=16,
        scheduler="DDIMScheduler (shipped)", k="to_k output", v="to_v output", a="attn1 output (after to_out)",
        study_defaults=("mask_feature",), source=_DIFFUSERS_SOURCE.format(script="latte_example.py")),
    PaperSetup(
        "mochi", "mochi", ("transformer_blocks",), "attn1", _mochi, steps=64, guidance_scale=4.5, seed=1710977262,
        dtype="bfloat16", height=480, width=848, num_frames=49,
        scheduler="linear-quadratic flow schedule (threshold 0.025)",
        k="video tokens after norm_k and RoPE", v="to_v output (video tokens)",
        a="attention output of the video tokens, before the output projection",
        source="mochi-xDiT demos/cli.py defaults (848x480, 49 frames, cfg 4.5, 64 steps, seed 1710977262), "
               "cond and uncond calls measured together"),
    PaperSetup(
        "open-sora", "opensora", ("spatial_blocks", "temporal_blocks"), "attn", _open_sora, steps=30,
        guidance_scale=7.0, seed=1024, dtype="bfloat16", height=240, width=426, num_frames=51,
        scheduler="rectified flow with the resolution/length timestep transform",
        k="after k_norm and RoPE (temporal blocks)", v="v of the fused qkv", a="proj output",
        run_kwargs={"use_timestep_transform": True, "aes": 6.5},
        source="Open-Sora 1.2 configs/opensora-v1-2/inference/sample.py (240p 9:16, 51 frames, 30 steps, cfg 7, "
               "aesthetic score 6.5) with torch.manual_seed(1024) before every caption"),
)}


def paper_setup(family: str, model: str | None = None) -> PaperSetup:
    """The study's setup of ``family``; the error names the seven families it measured."""
    if family not in PAPER_SETUPS:
        raise ProtocolError(
            f"protocol 'paper' reproduces the redundancy study, which measured {', '.join(sorted(PAPER_SETUPS))}; "
            f"{model or 'this model'} (family {family!r}) is not one of them. Use protocol 'project' for it.")
    return PAPER_SETUPS[family]


def paper_spec(spec: Any) -> Any:
    """``spec`` (a :class:`~pytest_ditredundancy.zoo.ModelSpec`) with the study's settings: its steps and
    guidance; for full-size models also its size, frames, dtype and call arguments. Tiny twins keep their own
    size (and their CPU-friendly call arguments), minus any argument the study left at the pipeline default
    (Latte's ``mask_feature``). Idempotent."""
    setup = paper_setup(spec.family, spec.name)
    call_kwargs = {k: v for k, v in spec.call_kwargs.items() if k not in setup.study_defaults}
    changes: dict[str, Any] = dict(steps=setup.steps, guidance_scale=setup.guidance_scale, call_kwargs=call_kwargs)
    if not spec.is_tiny:
        changes.update(height=setup.height, width=setup.width, num_frames=setup.num_frames, dtype=setup.dtype,
                       call_kwargs={k: v for k, v in call_kwargs.items() if k != "use_resolution_binning"})
    return replace(spec, **changes)


def paper_sites(transformer: nn.Module, family: str) -> list[CaptureSite]:
    """The study's K/V/A sites of ``transformer``: one self-attention layer per block, in the study's order."""
    setup = paper_setup(family)
    sites: list[CaptureSite] = []
    for blocks_name in setup.blocks:
        blocks = getattr(transformer, blocks_name, None)
        if not isinstance(blocks, nn.ModuleList):
            raise ProtocolError(f"{type(transformer).__name__} has no {blocks_name!r} blocks: it is not the "
                                f"{setup.study_name} architecture the study measured")
        for index, block in enumerate(blocks):
            attn = getattr(block, setup.attention)
            sites += setup.sites(attn, f"{blocks_name}.{index}.{setup.attention}", family)
    return sites


def describe(family: str) -> dict[str, str]:
    """What the study's K, V and A are for ``family`` (for reports and documentation)."""
    setup = paper_setup(family)
    return {"k": setup.k, "v": setup.v, "a": setup.a, "layers": " + ".join(f"{b}.*.{setup.attention}" for b in setup.blocks),
            "source": setup.source}


class PaperProtocol(Protocol):
    """The redundancy study's protocol, exactly (:mod:`~pytest_ditredundancy.profiling.paper`)."""

    name = "paper"
    summary = "the redundancy study's, exactly"
    default_batch_size = 1
    batch_fixed = True
    whole_batch = True
    same_seed = True
    runs_cache_gate = False
    default_prompt_set = PAPER_PROMPTS

    def spec(self, spec: ModelSpec) -> ModelSpec:
        return paper_spec(spec)

    def check_model(self, spec: ModelSpec) -> None:
        paper_setup(spec.family, spec.name)

    def selects(self, spec: ModelSpec) -> bool:
        return spec.family in PAPER_SETUPS

    def default_seed(self, spec: ModelSpec) -> int:
        return paper_setup(spec.family, spec.name).seed

    def seed_given(self, seed: int, given: bool) -> int | None:
        return seed if given else None  # each model's study seed unless the user set one

    def prompt_set(self, spec: ModelSpec) -> str:
        return PAPER_PROMPTS  # the study's captions, whatever the model

    def num_prompts(self, prompt_set: str) -> int:
        return PAPER_NUM_PROMPTS if prompt_set == PAPER_PROMPTS else DEFAULT_NUM_PROMPTS

    def batch_size(self, given: int | None) -> int:
        if given not in (None, 1):
            raise ProtocolError(f"protocol 'paper' runs one prompt per pipeline call, as the study did; got "
                                f"batch_size={given}")
        return 1

    def kinds(self, kinds: Iterable[str]) -> tuple[str, ...]:
        kept = tuple(k for k in kinds if k in PAPER_KINDS)
        if not kept:
            raise ProtocolError(f"protocol 'paper' measures kinds {', '.join(PAPER_KINDS)} only")
        return kept

    def sites(self, transformer: nn.Module, spec: ModelSpec, kinds: Sequence[str]) -> list[CaptureSite] | None:
        return [site for site in paper_sites(transformer, spec.family) if site.kind in kinds]

    def generator_device(self, execution_device: torch.device) -> torch.device:
        return execution_device  # the study seeded a generator on the pipeline's device

    def loop_run_kwargs(self, spec: ModelSpec) -> dict[str, Any]:
        return dict(paper_setup(spec.family, spec.name).run_kwargs)

    def metadata(self, seed: int) -> dict[str, Any]:
        return {"seed_rule": f"every prompt uses seed {seed}"}


__all__ = ["PAPER_KINDS", "PAPER_NUM_PROMPTS", "PAPER_PROMPTS", "PAPER_SETUPS", "PaperProtocol", "PaperSetup",
           "describe", "paper_setup", "paper_sites", "paper_spec"]
