"""A capture plan for a full-size model, without its weights: what ``pytest --dit-model=NAME`` will hook and hold.

The real transformer is built on the ``meta`` device from its shipped config
(:mod:`pytest_ditredundancy.zoo.real_configs`) and its capture sites are found with the same discovery a real
run uses. Each site's tensor size follows from the model's default size, frames and guidance:

* **tokens** — which token stream a site sees (:data:`STREAM_RULES`): the image/video tokens, the text tokens,
  or the joint ``[text, image]`` sequence (Flux/AuraFlow single blocks, CogVideoX K/V, Lumina2's main layers);
* **rows** — samples per transformer call: the batch, doubled by batched classifier-free guidance; guidance run
  as two calls (Wan, Lumina2) keeps two series of one row each;
* **held** — the previous step's tensors the capture keeps alive between steps: one step of every series, in
  the model's dtype (kept by reference; a fused-projection slice keeps its whole fused output alive);
* **transient** — scratch of one reduction, at most one site at a time: the eager path's float32 upcasts and
  difference, or nothing for the fused kernel (:mod:`pytest_ditredundancy.capture.fused_stats`);
* **peak** per memory mode (:mod:`pytest_ditredundancy.capture.batched_stats`): ``fast`` holds, on top of the
  previous step, one transformer call's tensors until the call ends (their reduction is one kernel, with no
  scratch): twice the held bytes for a model called once per step; ``low`` holds the previous step plus one
  reduction's transient.

The model's memory is its weights (exact, from the meta parameters) plus an activation floor: one block's live
tensors at the longest sequence (input, Q, K, V and attention output, plus the MLP hidden state) — a lower
bound, since real kernels keep more.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

from torch import nn

from ..capture.adapters import FusedSlice
from ..capture.sites import DEFAULT_KINDS, CaptureSite, validate_kinds
from ..zoo.real_configs import Geometry, RealConfig, build_on_meta, load_real_config, real_sites
from ..zoo.registry import ModelSpec, get_spec

IMAGE, TEXT, JOINT, TEXT_PER_FRAME = "image", "text", "joint", "text x frames"
_KV = frozenset({"k", "v"})
_IMAGE_KINDS = frozenset({"k", "v", "a"})
_CROSS = (r"attn2$", _KV, TEXT)

#: Per family: (layer-name pattern, kinds, stream), first match wins. Sites no rule matches see the image
#: tokens (k, v, a) or the text tokens (k_text, v_text, a_text). Checked against captured tensors of every
#: tiny twin by ``tests/test_capture_plan.py``.
STREAM_RULES: dict[str, list[tuple[str, frozenset[str], str]]] = {
    "flux": [(r"^single_transformer_blocks\.", _IMAGE_KINDS, JOINT)],
    "auraflow": [(r"^single_transformer_blocks\.", _IMAGE_KINDS, JOINT)],
    "cogvideox": [(r"attn1$", _KV, JOINT)],
    "lumina2": [(r"^context_refiner\.", _IMAGE_KINDS, TEXT), (r"^layers\.", _IMAGE_KINDS, JOINT)],
    "latte": [(r"^transformer_blocks\.\d+\.attn2$", _KV, TEXT_PER_FRAME)],
    "open-sora": [(r"cross_attn$", _KV, TEXT)],
    **{family: [_CROSS] for family in ("pixart-alpha", "pixart-sigma", "hunyuan-dit", "sana", "wan", "ltx")},
    "sd3": [], "mochi": [], "dit": [],
}

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class SitePlan:
    """One capture site at the model's default settings (sizes per transformer call)."""

    layer: str
    kind: str
    stream: str
    tokens: int  # per sample
    features: int
    rows: int  # per call
    calls: int  # series per prompt batch: 2 for guidance run as two calls
    storage: str  # what the kept tensor keeps alive: its own output, or a fused output K and V share
    storage_bytes: int  # that storage, for all rows and calls

    @property
    def numel(self) -> int:
        """Elements of the tensor one call produces."""
        return self.rows * self.tokens * self.features


@dataclass(frozen=True)
class LayerGroup:
    """Attention layers with the same name pattern, e.g. ``single_transformer_blocks.#.attn``."""

    pattern: str
    layers: int
    kinds: tuple[str, ...]


@dataclass
class CapturePlan:
    model: str
    transformer_class: str
    source: str
    dtype: str
    height: int
    width: int
    frames: int | None
    guidance_scale: float | None
    branch_layout: str
    batch_size: int
    image_tokens: int
    text_tokens: int
    parameters: int
    weight_bytes: int
    activation_bytes: int
    sites: list[SitePlan] = field(default_factory=list)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.kind for s in self.sites))

    @property
    def held_bytes(self) -> int:
        return self.held_for(self.kinds)

    @property
    def model_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes

    @property
    def call_bytes(self) -> int:
        """One transformer call's captured tensors (every series of a call; guidance run as two calls has two)."""
        return self.held_bytes // max((s.calls for s in self.sites), default=1)

    def peak_bytes(self, memory: str, kinds: Iterable[str] | None = None) -> int:
        """The capture's peak: ``fast`` the previous step plus one call's tensors held until the call ends;
        ``low`` the previous step plus the eager transient (the per-tensor path at its worst)."""
        held = self.held_bytes if kinds is None else self.held_for(kinds)
        if memory == "fast":
            return held + held // max((s.calls for s in self.sites), default=1)
        if memory == "low":
            return held + self.transient_bytes("eager")
        raise ValueError(f"unknown memory mode {memory!r}: fast or low")

    def transient_bytes(self, path: str) -> int:
        """Peak scratch of one step's reductions: ``eager`` (step_stats on CUDA) or ``fused`` (none)."""
        if path == "fused":
            return 0
        upcast = DTYPE_BYTES[self.dtype] != 4
        return max(eager_transient_bytes(s.numel, upcast) for s in self.sites)

    def held_for(self, kinds: Iterable[str]) -> int:
        """Held bytes if only ``kinds`` were captured (a fused output shared by K and V counts once)."""
        wanted = set(kinds)
        return sum({s.storage: s.storage_bytes for s in self.sites if s.kind in wanted}.values())

    def groups(self) -> list[LayerGroup]:
        found: dict[str, tuple[set[str], list[str]]] = {}
        for site in self.sites:
            layers, kinds = found.setdefault(re.sub(r"\.\d+\.", ".#.", site.layer), (set(), []))
            layers.add(site.layer)
            if site.kind not in kinds:
                kinds.append(site.kind)
        return [LayerGroup(p, len(layers), tuple(kinds)) for p, (layers, kinds) in found.items()]


def eager_transient_bytes(numel: int, upcast: bool) -> int:
    """Scratch of eager ``step_stats`` on CUDA for one tensor: the float32 difference and ``vecdot``'s
    product, plus float32 copies of the current and previous tensor when the model is not in float32."""
    return numel * 4 * (2 + (2 if upcast else 0))


def plan_capture(name: str, *, kinds: Iterable[str] = DEFAULT_KINDS, batch_size: int = 1, height: int | None = None,
                 width: int | None = None, num_frames: int | None = None, dtype: str | None = None,
                 real: RealConfig | None = None) -> CapturePlan:
    """The capture plan of registered model ``name``, built on the meta device: at its default size, frames
    and dtype unless given (``real``: a changed copy of its shipped config, e.g. with fewer layers)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    spec = get_spec(name)
    real = real if real is not None else load_real_config(name)
    transformer = build_on_meta(real)
    wanted = validate_kinds(kinds)
    geometry = real.geometry
    height, width = height or spec.height, width or spec.width
    frames = num_frames if num_frames is not None else spec.num_frames
    dtype = dtype or spec.dtype
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}: {', '.join(DTYPE_BYTES)}")
    image_tokens = geometry.image_tokens(height, width, frames)
    rows, calls = _rows_and_calls(spec, batch_size)
    dtype_bytes = DTYPE_BYTES[dtype]
    every = _site_plans(spec, geometry, real_sites(real, transformer), image_tokens, rows, calls, dtype_bytes,
                        frames)
    parameters = sum(p.numel() for p in transformer.parameters())
    return CapturePlan(
        model=spec.name, transformer_class=real.transformer_class, source=real.source, dtype=dtype,
        height=height, width=width, frames=frames, guidance_scale=spec.guidance_scale,
        branch_layout=spec.branch_layout, batch_size=batch_size, image_tokens=image_tokens,
        text_tokens=geometry.text_tokens, parameters=parameters, weight_bytes=parameters * dtype_bytes,
        activation_bytes=_activation_floor(transformer, every, dtype_bytes),
        sites=[s for s in every if s.kind in wanted])


def _rows_and_calls(spec: ModelSpec, batch_size: int) -> tuple[int, int]:
    guided = spec.branch_layout != "single" and (spec.guidance_scale or 0) > 1
    if not guided:
        return batch_size, 1
    if spec.branch_layout.startswith("sequential"):
        return batch_size, 2
    return 2 * batch_size, 1


def _site_plans(spec: ModelSpec, geometry: Geometry, sites: list[CaptureSite], image_tokens: int, rows: int,
                calls: int, dtype_bytes: int, frames: int | None) -> list[SitePlan]:
    tokens = {IMAGE: image_tokens, TEXT: geometry.text_tokens, JOINT: image_tokens + geometry.text_tokens,
              TEXT_PER_FRAME: geometry.latent_frames(frames) * geometry.text_tokens}
    plans = []
    for site in sites:
        stream = site_stream(spec.family, site.layer, site.kind)
        features = site_features(site)
        fused = isinstance(site.select, FusedSlice)  # K and V are views of one fused output, held once for both
        storage = f"{site.layer}/{'fused' if fused else site.kind}"
        held = rows * calls * tokens[stream] * features * (site.select.parts if fused else 1) * dtype_bytes
        plans.append(SitePlan(site.layer, site.kind, stream, tokens[stream], features, rows, calls, storage, held))
    return plans


def site_stream(family: str, layer: str, kind: str) -> str:
    """The token stream capture site (``layer``, ``kind``) of a model of ``family`` sees."""
    if family not in STREAM_RULES:
        raise LookupError(f"no token layout for family {family!r}; add its rules to capture_plan.STREAM_RULES")
    for pattern, kinds, stream in STREAM_RULES[family]:
        if kind in kinds and re.search(pattern, layer):
            return stream
    return TEXT if kind.endswith("_text") else IMAGE


def site_features(site: CaptureSite) -> int:
    """Channels of the site's tensor: a projection's output width (one part of a fused one), or the width of
    an attention module's output (after ``to_out`` / ``to_add_out``; the attention width where there is none)."""
    module = site.module
    if isinstance(module, nn.Linear):
        return module.out_features // (site.select.parts if isinstance(site.select, FusedSlice) else 1)
    if site.kind == "a_text" and isinstance(getattr(module, "to_add_out", None), nn.Linear):
        return module.to_add_out.out_features
    out = getattr(module, "to_out", None)
    if isinstance(out, nn.ModuleList) and isinstance(out[0], nn.Linear):
        return out[0].out_features
    if isinstance(out, nn.Linear):
        return out.out_features
    return module.to_q.out_features


def _activation_floor(transformer: nn.Module, sites: list[SitePlan], dtype_bytes: int) -> int:
    """One block's live tensors at the longest sequence: input, Q, K, V, attention output and MLP hidden."""
    width = max(s.features for s in sites if s.kind == "a")
    mlp = max((_out_channels(m) for name, m in transformer.named_modules()
               if re.search(r"(^|\.)(ff|ffn|mlp|proj_mlp|feed_forward)(\.|$)", name)), default=4 * width)
    tokens = max(s.tokens for s in sites)
    rows = max(s.rows for s in sites)
    return rows * tokens * (5 * width + mlp) * dtype_bytes


def _out_channels(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    return 0


def parse_memory_size(text: str) -> int:
    """Bytes of a size such as ``80GB`` (10^9), ``24GiB`` (2^30), ``141G`` or ``512MiB``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT])?(i)?[bB]?\s*", text or "")
    if not match or not match.group(2):
        raise ValueError(f"bad --gpu-memory {text!r}: give a size with a unit, such as 80GB, 24GiB or 141G")
    value, unit, binary = float(match.group(1)), match.group(2).upper(), match.group(3)
    power = "KMGT".index(unit) + 1
    size = int(value * (1024 if binary else 1000) ** power)
    if size <= 0:
        raise ValueError(f"bad --gpu-memory {text!r}: the size must be positive, such as 80GB")
    return size

