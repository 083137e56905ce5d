"""Tiny offline twin of Open-Sora 1.2: an STDiT3-style video transformer and its rectified-flow sampler.

Open-Sora is not a diffusers pipeline, so this twin is profiled through :mod:`pytest_ditredundancy.capture.adapters`.
It keeps what decides where K, V and A live and how batches fold: patch embedding of ``(B, C, F, H, W)``
latents; alternating spatial blocks (attention within a frame, frames folded sample-major into the batch,
``(B F) S C``) and temporal blocks (attention across frames with rotary positions, ``(B S) F C``); in each, a
fused ``qkv`` self-attention, a cross-attention to the caption (``q_linear``, fused ``kv_linear``, ``proj``)
and an MLP, all modulated by the timestep (adaLN-single, ``scale_shift_table``). The sampler batches
classifier-free guidance as ``[cond, null caption]`` and takes Euler steps of the rectified flow from
t=1000 down to 0, as Open-Sora's ``RFLOW.sample`` does. Left out: the VAE (latents are made directly, at
half the pixel resolution), size/fps conditioning, qk-norm and image/video conditioning masks.

Weights come from ``seeded(seed)`` (transformer) and ``seeded(seed + 2)`` (text encoder), so a seed always
gives bit-identical models.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..capture.adapters import fused_qkv_sites
from ..capture.sites import CaptureSite
from .tiny_parts import seeded, t5_encoder, t5_tokenizer

TEXT_DIM = 32  # width of the tiny T5's hidden states
TEXT_LEN = 32  # caption tokens (Open-Sora: 300)


def _sincos(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the values ``x`` (timesteps, positions): ``(N,) -> (N, dim)``."""
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, device=x.device) / (dim // 2))
    angles = x.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def _rope(x: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding over the sequence axis (-2) of ``(..., N, head_dim)``."""
    half = x.shape[-1] // 2
    angles = _sincos(torch.arange(x.shape[-2], device=x.device), 2 * half)
    cos, sin = angles[:, :half].to(x.dtype), angles[:, half:].to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    """Self-attention with one fused ``qkv`` projection laid out ``[Q | K | V]``, like Open-Sora's, with its
    attribute layout: ``q_norm``/``k_norm`` modules (identities here: Open-Sora's ``qk_norm=False``) and, in
    temporal blocks, ``rope`` true and ``rotary_emb`` the rotary function applied after them."""

    def __init__(self, dim: int, heads: int, rope: bool = False) -> None:
        super().__init__()
        self.heads, self.rope = heads, rope
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm, self.k_norm = nn.Identity(), nn.Identity()
        self.rotary_emb = _rope if rope else None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            q, k = self.rotary_emb(q), self.rotary_emb(k)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class CrossAttention(nn.Module):
    """Attention from video tokens to caption tokens (fused ``kv_linear``), padding masked out.

    Open-Sora packs all captions into one row for xformers; here each sample keeps its own row, so the K/V
    tensors split by sample like every other capture site."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, N, C = x.shape
        q = self.q_linear(x).view(B, N, self.heads, -1).transpose(1, 2)
        k, v = self.kv_linear(y).view(B, y.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = None if mask is None else mask[:, None, None, :].bool()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class STDiT3Block(nn.Module):
    """Modulated self-attention (spatial or temporal), cross-attention and MLP."""

    def __init__(self, dim: int, heads: int, temporal: bool, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.attn = Attention(dim, heads, rope=temporal)
        self.cross_attn = CrossAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(self, x, y, mask, t, T: int, S: int):
        B, _, C = x.shape
        modulation = (self.scale_shift_table[None] + t.view(B, 6, C)).chunk(6, dim=1)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = modulation
        h = self.norm1(x) * (1 + scale_a) + shift_a
        if self.temporal:  # B (T S) C -> (B S) T C: sample-major, so capture rows split by sample
            h = self.attn(h.view(B, T, S, C).transpose(1, 2).reshape(B * S, T, C))
            h = h.view(B, S, T, C).transpose(1, 2).reshape(B, T * S, C)
        else:  # B (T S) C -> (B T) S C
            h = self.attn(h.reshape(B * T, S, C)).view(B, T * S, C)
        x = x + gate_a * h
        x = x + self.cross_attn(x, y, mask)
        return x + gate_m * self.mlp(self.norm2(x) * (1 + scale_m) + shift_m)


class CaptionEmbedder(nn.Module):
    """Projects captions to the model width; ``y_embedding`` is the null caption guidance uses."""

    def __init__(self, in_channels: int, dim: int, tokens: int) -> None:
        super().__init__()
        self.y_proj = nn.Sequential(nn.Linear(in_channels, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.register_buffer("y_embedding", torch.randn(tokens, in_channels) / in_channels**0.5)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.y_proj(y)


class TinySTDiT(nn.Module):
    """STDiT3 in miniature: ``forward(x (B,C,F,H,W), timestep (B,), y (B,1,L,D), mask (B or 1, L))``.

    Size/fps keyword conditioning that Open-Sora passes is accepted and ignored."""

    def __init__(self, in_channels: int = 4, dim: int = 32, depth: int = 2, heads: int = 4,
                 patch: tuple[int, int, int] = (1, 2, 2), caption_channels: int = TEXT_DIM,
                 tokens: int = TEXT_LEN, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.in_channels, self.dim, self.patch = in_channels, dim, patch
        self.x_embedder = nn.Conv3d(in_channels, dim, kernel_size=patch, stride=patch)
        self.t_embedder = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.y_embedder = CaptionEmbedder(caption_channels, dim, tokens)
        self.spatial_blocks = nn.ModuleList(STDiT3Block(dim, heads, False, mlp_ratio) for _ in range(depth))
        self.temporal_blocks = nn.ModuleList(STDiT3Block(dim, heads, True, mlp_ratio) for _ in range(depth))
        self.final_norm = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.final_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)
        self.final_linear = nn.Linear(dim, math.prod(patch) * in_channels)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None,
                **conditioning: Any) -> torch.Tensor:
        dtype = self.x_embedder.weight.dtype
        B, C, Fx, Hx, Wx = x.shape
        pt, ph, pw = self.patch
        T, H, W = Fx // pt, Hx // ph, Wx // pw
        S = H * W
        x = self.x_embedder(x.to(dtype)).flatten(2).transpose(1, 2)  # B (T S) D
        rows, cols = torch.meshgrid(torch.arange(H, device=x.device), torch.arange(W, device=x.device), indexing="ij")
        pos = torch.cat([_sincos(rows.flatten(), self.dim // 2), _sincos(cols.flatten(), self.dim // 2)], dim=-1)
        x = (x.view(B, T, S, -1) + pos.to(dtype)).view(B, T * S, -1)
        t = self.t_embedder(_sincos(timestep, self.dim).to(dtype))
        t_mlp = self.t_block(t)
        y = self.y_embedder(y.to(dtype).squeeze(1))
        if mask is not None and mask.shape[0] != B:  # Open-Sora's null branch reuses the prompts' mask
            mask = mask.repeat(B // mask.shape[0], 1)
        for spatial, temporal in zip(self.spatial_blocks, self.temporal_blocks):
            x = temporal(spatial(x, y, mask, t_mlp, T, S), y, mask, t_mlp, T, S)
        shift, scale = (self.final_table[None] + t[:, None]).chunk(2, dim=1)
        x = self.final_linear(self.final_norm(x) * (1 + scale) + shift)
        x = x.view(B, T, H, W, pt, ph, pw, C).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(B, C, Fx, Hx, Wx).float()


class TinyT5Encoder:
    """Open-Sora's text-encoder interface (``encode(prompts) -> {"y", "mask"}``, ``null(n)``) over a tiny T5."""

    def __init__(self, seed: int, y_embedder: CaptionEmbedder, max_length: int = TEXT_LEN) -> None:
        self.tokenizer = t5_tokenizer(model_max_length=max_length)
        self.model = t5_encoder(seed, d_model=TEXT_DIM)
        self.y_embedder, self.max_length = y_embedder, max_length

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                                return_tensors="pt").to(self.model.device)
        y = self.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        return {"y": y[:, None], "mask": tokens.attention_mask}

    def null(self, n: int) -> torch.Tensor:
        return self.y_embedder.y_embedding[None].repeat(n, 1, 1)[:, None]

    def to(self, device: Any, dtype: torch.dtype | None = None) -> "TinyT5Encoder":
        self.model.to(device, dtype)
        return self


def _half_resolution(num_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """The tiny stand-in for a VAE's latent size: same frames, half the pixels per side."""
    return num_frames, height // 2, width // 2


class RectifiedFlowLoop:
    """Open-Sora's rectified-flow sampler as a :class:`~pytest_ditredundancy.capture.adapters.DenoisingLoop`.

    ``text_encoder`` follows Open-Sora's interface (``encode``, ``null``); ``latent_size(frames, height,
    width)`` maps a pixel size to the latent ``(F, H, W)``. Each step calls ``transformer(z_in, t, y=...,
    mask=..., height=, width=, num_frames=, fps=)`` once on ``[cond, uncond]`` rows and keeps the first
    ``latent_channels`` output channels (STDiT3 also predicts a variance).
    """

    branch_layout = "batched-cond-uncond"
    sampler = "RectifiedFlow"

    def __init__(self, transformer: nn.Module, text_encoder: Any, *, latent_channels: int,
                 latent_size: Callable[[int, int, int], Sequence[int]] = _half_resolution,
                 size: tuple[int, int, int] = (4, 16, 16), guidance_scale: float = 7.0, fps: int = 24,
                 num_timesteps: int = 1000, use_timestep_transform: bool = False,
                 sites: Sequence[CaptureSite] | None = None) -> None:
        self.transformer, self.text_encoder = transformer, text_encoder
        self.latent_channels, self.latent_size, self.size = latent_channels, latent_size, size
        self.guidance_scale, self.fps, self.num_timesteps = guidance_scale, fps, num_timesteps
        self.use_timestep_transform = use_timestep_transform
        self._sites = list(sites) if sites is not None else fused_qkv_sites(transformer, kv="kv_linear")

    def sites(self) -> list[CaptureSite]:
        return list(self._sites)

    device = property(lambda self: next(self.transformer.parameters()).device)
    dtype = property(lambda self: next(self.transformer.parameters()).dtype)

    def to(self, device: Any, dtype: torch.dtype | None = None) -> "RectifiedFlowLoop":
        """Move the transformer (and the text encoder, where it can move); returns ``self`` like diffusers."""
        self.transformer.to(device, dtype)
        if callable(getattr(self.text_encoder, "to", None)):
            self.text_encoder.to(device, dtype)
        return self

    def timesteps(self, steps: int, height: int, width: int, num_frames: int,
                  transform: bool | None = None) -> list[float]:
        """``(1 - i/steps) * 1000``; with the transform (``transform``, else the loop's
        ``use_timestep_transform``), Open-Sora's resolution/length shift."""
        values = [(1.0 - i / steps) * self.num_timesteps for i in range(steps)]
        if not (self.use_timestep_transform if transform is None else transform):
            return values
        frames = 1 if num_frames == 1 else max(num_frames // 17 * 5, 1)
        ratio = math.sqrt(height * width / 512**2) * math.sqrt(frames)
        return [self.num_timesteps * ratio * (t / self.num_timesteps) / (1 + (ratio - 1) * t / self.num_timesteps)
                for t in values]

    @torch.no_grad()
    def run(self, prompts: list[str], *, num_inference_steps: int, guidance_scale: float | None = None,
            generators: list[torch.Generator], end_step: Callable[[Any], None] = lambda t: None,
            height: int | None = None, width: int | None = None, num_frames: int | None = None,
            use_timestep_transform: bool | None = None, aes: float | None = None) -> torch.Tensor:
        """Sample latents ``(B, C, F, H, W)`` for ``prompts``; prompt ``i``'s noise comes from ``generators[i]``
        (drawn on the generator's device). ``use_timestep_transform`` overrides the loop's setting for this run;
        ``aes`` appends Open-Sora 1.2's aesthetic-score suffix (`` aesthetic score: 6.5.``) to every prompt."""
        if len(generators) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts need as many generators, got {len(generators)}")
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        frames, height, width = num_frames or self.size[0], height or self.size[1], width or self.size[2]
        device, n = self.device, len(prompts)
        shape = (self.latent_channels, *self.latent_size(frames, height, width))
        z = torch.stack([torch.randn(shape, generator=g, device=g.device).to(device) for g in generators])
        if aes is not None:
            prompts = [p if "aesthetic score:" in p else f"{p} aesthetic score: {aes:.1f}." for p in prompts]
        text = {k: v.to(device) for k, v in self.text_encoder.encode(prompts).items()}
        guided = scale > 1
        y = torch.cat([text["y"], self.text_encoder.null(n).to(device)]) if guided else text["y"]
        rows = 2 * n if guided else n
        sizes = {k: torch.full((rows,), float(v), device=device)
                 for k, v in (("height", height), ("width", width), ("num_frames", frames), ("fps", self.fps))}
        times = self.timesteps(num_inference_steps, height, width, frames, use_timestep_transform)
        for i, value in enumerate(times):
            t = torch.full((rows,), value, device=device)
            out = self.transformer(torch.cat([z, z]) if guided else z, t, y=y, mask=text.get("mask"), **sizes)
            v = out[:, :self.latent_channels].float()
            if guided:
                cond, uncond = v.chunk(2)
                v = uncond + scale * (cond - uncond)
            dt = (value - (times[i + 1] if i + 1 < len(times) else 0.0)) / self.num_timesteps
            z = z + v * dt
            end_step(t)
        return z


def build_tiny_stdit(seed: int = 0) -> RectifiedFlowLoop:
    """The ``tiny-open-sora-1.2`` loop: a seeded TinySTDiT, tiny T5, and the rectified-flow sampler."""
    with seeded(seed):
        transformer = TinySTDiT().eval()
    return RectifiedFlowLoop(transformer, TinyT5Encoder(seed + 2, transformer.y_embedder), latent_channels=4)


def from_stdit3(model: nn.Module, text_encoder: Any, vae: Any, *, guidance_scale: float = 7.0, fps: int = 24,
                size: tuple[int, int, int] = (51, 480, 848)) -> RectifiedFlowLoop:
    """Wrap a real Open-Sora 1.2 ``STDiT3``, its ``T5Encoder`` and VAE as built by Open-Sora's inference script.

    Never run against the real checkpoint here (no hub, no Open-Sora install): the tests drive it with the tiny
    twin standing in for all three. Text-to-video only: no reference-frame masks (``x_mask``). The sampler
    follows ``RFLOW.sample`` with ``use_timestep_transform=True`` (Open-Sora 1.2's configs). Cross-attention
    K/V are not captured: STDiT3 packs all captions into one row for xformers, so that tensor cannot be split
    by sample (and caption K/V do not change over steps); cross-attention A and all self-attention K/V/A are.
    """
    if getattr(text_encoder, "y_embedder", None) is None:
        text_encoder.y_embedder = model.y_embedder  # null(n) reads the model's null caption, as Open-Sora sets it
    caption_kv = {id(m.kv_linear) for m in model.modules() if isinstance(getattr(m, "kv_linear", None), nn.Module)}
    sites = [s for s in fused_qkv_sites(model, kv="kv_linear") if id(s.module) not in caption_kv]
    return RectifiedFlowLoop(model, text_encoder, latent_channels=vae.out_channels,
                             latent_size=lambda f, h, w: tuple(vae.get_latent_size([f, h, w])), size=size,
                             guidance_scale=guidance_scale, fps=fps, use_timestep_transform=True, sites=sites)
