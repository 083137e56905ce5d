"""The built-in zoo: the paper's seven DiTs, the other diffusers DiT families, and a tiny twin of each.

Settings of the paper's models follow "Unveiling Redundancy in Diffusion Transformers" (arXiv 2411.13588);
the others follow the defaults in each model's diffusers documentation / model card.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any, Callable

from .registry import ModelSpec, register_model


def _builder(module: str, function: str) -> Callable[[int], Any]:
    """A tiny-pipeline builder imported on first use (keeps ``import pytest_ditredundancy`` light)."""

    def build(seed: int = 0) -> Any:
        return getattr(import_module(f"{__package__}.{module}"), function)(seed)

    build.__qualname__ = build.__name__ = function
    return build


#: PixArt bins the requested size to its trained aspect ratios, which rejects sizes it has no bins for; the
#: square sizes the zoo uses are bins already, so binning off changes nothing there and allows small sizes.
_PIXART = {"use_resolution_binning": False}
#: Tiny variants also skip caption cleaning (bs4/ftfy text preprocessing, not what we measure).
_PIXART_TINY = {**_PIXART, "clean_caption": False}
#: Sana and HunyuanDiT bin too (HunyuanDiT to >= 768 px). HunyuanDiT and Lumina2 hard-code a VAE scale factor
#: of 8, so their tiny variants run at 128 px (a 16x16 latent, 64 image tokens like the other tiny DiTs).
_NO_BINNING = {"use_resolution_binning": False}

#: Latte's default mask_feature=True trims every prompt's embedding to the longest prompt *in the batch* and
#: passes no attention mask, so a prompt's result would depend on its batch-mates (and on sharding).
_LATTE = {"mask_feature": False}

FULL_SPECS: list[ModelSpec] = [
    ModelSpec("flux-dev", "flux", "FluxPipeline", "black-forest-labs/FLUX.1-dev", steps=28, height=1024,
              width=1024, guidance_scale=3.5, scheduler="flow-euler", in_paper=True, branch_layout="single"),
    ModelSpec("pixart-alpha", "pixart-alpha", "PixArtAlphaPipeline", "PixArt-alpha/PixArt-XL-2-1024-MS", steps=20,
              height=1024, width=1024, guidance_scale=4.5, scheduler="dpm-solver", dtype="float16",
              prediction="epsilon", branch_layout="batched-uncond-cond", call_kwargs=_PIXART, in_paper=True),
    ModelSpec("sd3-medium", "sd3", "StableDiffusion3Pipeline", "stabilityai/stable-diffusion-3-medium-diffusers",
              steps=28, height=1024, width=1024, guidance_scale=7.0, scheduler="flow-euler", dtype="float16",
              in_paper=True, branch_layout="batched-uncond-cond"),
    ModelSpec("cogvideox-5b", "cogvideox", "CogVideoXPipeline", "THUDM/CogVideoX-5b", steps=50, height=480,
              width=720, num_frames=9, guidance_scale=6.0, scheduler="cogvideox-dpm", prediction="v_prediction",
              in_paper=True, branch_layout="batched-uncond-cond"),
    ModelSpec("latte-1", "latte", "LattePipeline", "maxin-cn/Latte-1", steps=50, height=512, width=512,
              num_frames=16, frames_argument="video_length", guidance_scale=7.5, call_kwargs=_LATTE, scheduler="ddim", dtype="float16", prediction="epsilon",
              in_paper=True, branch_layout="batched-uncond-cond"),
    ModelSpec("mochi-1", "mochi", "MochiPipeline", "genmo/mochi-1-preview", steps=64, height=480, width=848,
              num_frames=19, guidance_scale=4.5, scheduler="flow-euler", in_paper=True, branch_layout="batched-uncond-cond"),
    ModelSpec("open-sora-1.2", "open-sora", "OpenSoraAdapter", "hpcai-tech/OpenSora-STDiT-v3", steps=30,
              height=480, width=848, num_frames=51, guidance_scale=7.0, scheduler="rectified-flow",
              in_paper=True, description="not a diffusers pipeline: profiled through the adapter interface", branch_layout="batched-cond-uncond"),
    ModelSpec("pixart-sigma", "pixart-sigma", "PixArtSigmaPipeline", "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
              steps=20, height=1024, width=1024, guidance_scale=4.5, scheduler="dpm-solver", dtype="float16",
              prediction="epsilon", branch_layout="batched-uncond-cond", call_kwargs=_PIXART),
    ModelSpec("hunyuan-dit", "hunyuan-dit", "HunyuanDiTPipeline", "Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers",
              steps=50, height=1024, width=1024, guidance_scale=5.0, scheduler="ddpm", dtype="float16",
              prediction="v_prediction", branch_layout="batched-uncond-cond"),
    ModelSpec("dit-xl-2-256", "dit", "DiTPipeline", "facebook/DiT-XL-2-256", steps=25, height=256, width=256,
              guidance_scale=4.0, scheduler="dpm-solver", dtype="float16", conditioning="class",
              prediction="epsilon", branch_layout="batched-cond-uncond"),
    ModelSpec("sana", "sana", "SanaPipeline", "Efficient-Large-Model/Sana_1600M_1024px_diffusers", steps=20,
              height=1024, width=1024, guidance_scale=4.5, scheduler="flow-dpm-solver", branch_layout="batched-uncond-cond"),
    ModelSpec("wan2.1", "wan", "WanPipeline", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", steps=50, height=480,
              width=832, num_frames=81, guidance_scale=5.0, scheduler="flow-unipc",
              branch_layout="sequential-cond-uncond"),
    ModelSpec("ltx-video", "ltx", "LTXPipeline", "Lightricks/LTX-Video", steps=50, height=512, width=704,
              num_frames=161, guidance_scale=3.0, scheduler="flow-euler", branch_layout="batched-uncond-cond"),
    ModelSpec("auraflow", "auraflow", "AuraFlowPipeline", "fal/AuraFlow", steps=50, height=1024, width=1024,
              guidance_scale=3.5, scheduler="flow-euler", dtype="float16", branch_layout="batched-uncond-cond"),
    ModelSpec("lumina2", "lumina2", "Lumina2Pipeline", "Alpha-VLLM/Lumina-Image-2.0", steps=30, height=1024,
              width=1024, guidance_scale=4.0, scheduler="flow-euler", branch_layout="sequential-cond-uncond"),
]

#: family -> (module, builder function, overrides for the tiny spec).
TINY_BUILDERS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "flux-dev": ("tiny_image", "build_flux", dict(height=32, width=32)),
    "pixart-alpha": ("tiny_image", "build_pixart_alpha", dict(height=32, width=32, call_kwargs=_PIXART_TINY)),
    "sd3-medium": ("tiny_image", "build_sd3", dict(height=32, width=32)),
    "cogvideox-5b": ("tiny_video", "build_cogvideox", dict(height=16, width=16, num_frames=9)),
    "latte-1": ("tiny_video", "build_latte", dict(height=16, width=16, num_frames=4,
                                                 call_kwargs={**_LATTE, "clean_caption": False})),
    "mochi-1": ("tiny_video", "build_mochi", dict(height=16, width=16, num_frames=7)),
    "open-sora-1.2": ("tiny_stdit", "build_tiny_stdit", dict(height=16, width=16, num_frames=4)),
    "pixart-sigma": ("tiny_image", "build_pixart_sigma", dict(height=32, width=32, call_kwargs=_PIXART_TINY)),
    "hunyuan-dit": ("tiny_image", "build_hunyuan_dit", dict(height=128, width=128, call_kwargs=_NO_BINNING)),
    "dit-xl-2-256": ("tiny_image", "build_dit", dict(height=32, width=32)),
    "sana": ("tiny_image", "build_sana", dict(height=32, width=32, call_kwargs=_NO_BINNING)),
    "wan2.1": ("tiny_video", "build_wan", dict(height=16, width=16, num_frames=5)),
    "ltx-video": ("tiny_video", "build_ltx", dict(height=32, width=32, num_frames=9)),
    "auraflow": ("tiny_image", "build_auraflow", dict(height=32, width=32)),
    "lumina2": ("tiny_image", "build_lumina2", dict(height=128, width=128)),
}


def _register_builtin() -> None:
    for spec in FULL_SPECS:
        register_model(spec)
    for spec in FULL_SPECS:
        module, function, overrides = TINY_BUILDERS[spec.name]
        overrides = {"steps": 20, **overrides}
        register_model(spec.tiny(_builder(module, function), **overrides))
    from .trained import trained_specs  # small DiTs trained on procedural shapes, weights in the package

    for spec in trained_specs():
        register_model(spec)


_register_builtin()
