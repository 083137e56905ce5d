"""The capture plan as text: what ``python -m pytest_ditredundancy plan`` prints, and the GPU fit verdict."""

from __future__ import annotations

from dataclasses import dataclass

from ..capture.batched_stats import CUDA_SHARE
from .capture_plan import CapturePlan

#: Lighter capture modes offered when the previous-step tensors are large: fewer kinds.
LIGHTER_KINDS = (("k", "v", "a"), ("a", "a_text"), ("a",))


@dataclass(frozen=True)
class Fit:
    """Whether the model and the capture fit on a GPU of ``gpu_bytes``: ``capture_bytes`` is the peak of the
    memory mode ``auto`` would pick (``fast`` when it fits below :data:`CUDA_SHARE` of the GPU, else ``low``)."""

    gpu_bytes: int
    model_bytes: int
    capture_bytes: int
    memory: str = "low"

    @property
    def model_fits(self) -> bool:
        return self.model_bytes <= self.gpu_bytes

    @property
    def fits(self) -> bool:
        return self.model_bytes + self.capture_bytes <= self.gpu_bytes


def fit_on_gpu(plan: CapturePlan, gpu_bytes: int) -> Fit:
    fast = plan.peak_bytes("fast")
    if plan.model_bytes + fast <= CUDA_SHARE * gpu_bytes:
        return Fit(gpu_bytes, plan.model_bytes, fast, "fast")
    return Fit(gpu_bytes, plan.model_bytes, plan.peak_bytes("low"), "low")


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_plan(plan: CapturePlan, gpu_bytes: int | None = None) -> str:
    size = f"{plan.width}x{plan.height}" + (f", {plan.frames} frames" if plan.frames else "")
    rows = plan.sites[0].rows * plan.sites[0].calls
    lines = [
        f"{plan.model}: {plan.transformer_class} ({plan.source})",
        f"  built on the meta device: {plan.parameters / 1e9:.3f} B parameters, no weights, no memory",
        f"  settings: {size}, guidance {plan.guidance_scale} ({plan.branch_layout}: {rows} row(s) per prompt batch "
        f"of {plan.batch_size}), {plan.dtype}",
        f"  tokens per sample: image {plan.image_tokens}, text {plan.text_tokens}, "
        f"joint {plan.image_tokens + plan.text_tokens}",
        f"  capture sites: {len(plan.sites)} in {sum(g.layers for g in plan.groups())} attention layers",
    ]
    for group in plan.groups():
        lines.append(f"    {group.pattern:<40} {group.layers:>3} layers  {' '.join(group.kinds)}")
    lines.append(f"  {'layers':<40} {'kind':<7} {'stream':<14} {'tokens':>7} {'width':>6} {'rows':>5} "
                 f"{'held per site':>14} {'held':>11}")
    for (pattern, kind, stream, tokens, features, rows_), (count, held) in _site_table(plan).items():
        lines.append(f"  {pattern:<40} {kind:<7} {stream:<14} {tokens:>7} {features:>6} {rows_:>5} "
                     f"{human(held / count):>14} {human(held):>11}")
    model = plan.model_bytes
    share = plan.held_bytes / model
    lines += [
        f"  memory ({plan.dtype}):",
        f"    model weights                          {human(plan.weight_bytes):>11}",
        f"    model activations (floor: one block)   {human(plan.activation_bytes):>11}",
        f"    capture, previous step held            {human(plan.held_bytes):>11}  "
        f"= {share:.1%} of the model's weights and activations",
        f"    capture, transient (eager path)        {human(plan.transient_bytes('eager')):>11}  "
        "float32 upcasts and difference of the largest tensor",
        f"    capture, transient (fused kernel)      {human(plan.transient_bytes('fused')):>11}",
        f"    capture peak, memory=fast              {human(plan.peak_bytes('fast')):>11}  previous step + one call's "
        f"tensors ({human(plan.call_bytes)}) held until the call ends: one reduction kernel per call",
        f"    capture peak, memory=low               {human(plan.peak_bytes('low')):>11}  previous step + the eager "
        "transient: one reduction per tensor",
        "  lighter modes: memory=low (above), and fewer kinds (capture_redundancy(pipe, kinds=...)): previous step held",
    ]
    shown: set[tuple[str, ...]] = set()
    for kinds in LIGHTER_KINDS:
        present = [k for k in kinds if k in plan.kinds]
        if present and tuple(present) != plan.kinds and tuple(present) not in shown:
            shown.add(tuple(present))
            held = plan.held_for(present)
            lines.append(f"    kinds={','.join(present):<34} {human(held):>11}  = {held / model:.1%} of the model")
    if gpu_bytes is not None:
        lines.append("  " + fit_verdict(plan, gpu_bytes))
    return "\n".join(lines)


def fit_verdict(plan: CapturePlan, gpu_bytes: int) -> str:
    fit = fit_on_gpu(plan, gpu_bytes)
    need = f"{human(fit.model_bytes + fit.capture_bytes)} (model {human(fit.model_bytes)} + capture " \
           f"{human(fit.capture_bytes)})"
    if not fit.model_fits:
        return (f"WARNING: the transformer alone needs {human(fit.model_bytes)}, more than the GPU's "
                f"{human(gpu_bytes)}: it does not fit, with or without capture (offload it or use a larger GPU)")
    if fit.fits:
        how = ("memory=auto picks fast" if fit.memory == "fast" else
               "memory=auto picks low: one more call's tensors would not fit below "
               f"{CUDA_SHARE:.0%} of the GPU")
        return f"fits on a {human(gpu_bytes)} GPU: needs {need}, {how} (text encoders and VAE not counted)"
    lighter = [k for k in LIGHTER_KINDS if fit.model_bytes + plan.peak_bytes("low", k) <= gpu_bytes
               and set(k) & set(plan.kinds)]
    hint = (f"; it fits with kinds={','.join(k for k in lighter[0] if k in plan.kinds)}" if lighter
            else "; no lighter mode fits either: use a larger GPU or a smaller size/frame count")
    return f"WARNING: the capture would not fit next to the model on a {human(gpu_bytes)} GPU: needs {need}{hint}"


def _site_table(plan: CapturePlan) -> dict[tuple, tuple[int, int]]:
    """(layer pattern, kind, stream, tokens, width, rows) -> (sites, held bytes)."""
    import re

    table: dict[tuple, tuple[int, int]] = {}
    seen: set[str] = set()
    for site in plan.sites:
        key = (re.sub(r"\.\d+\.", ".#.", site.layer), site.kind, site.stream, site.tokens, site.features,
               site.rows * site.calls)
        held = 0 if site.storage in seen else site.storage_bytes
        seen.add(site.storage)
        count, total = table.get(key, (0, 0))
        table[key] = (count + 1, total + held)
    return table


def _items(text: str, flag: str) -> list[str]:
    """A comma list; an empty item (``a,,b``, a comma at either end, a blank item) is an error naming ``flag``."""
    items = [item.strip() for item in text.split(",")]
    if "" in items:
        raise ValueError(f"{flag} has an empty item in {text!r} (two commas in a row, a comma at the start or end, "
                         "or a blank item): remove the extra comma")
    return items


def run_plan(models: str, *, gpu_memory: str | None = None, kinds: str | None = None, batch_size: int = 1) -> int:
    """The ``plan`` command: print the plan of each model; exit 2 on bad input, 1 when something does not fit."""
    import sys

    from .capture_plan import parse_memory_size, plan_capture
    from ..capture.sites import DEFAULT_KINDS
    from ..zoo.real_configs import NoRealConfigError, shipped_models
    from ..zoo.registry import UnknownModelError

    try:
        gpu_bytes = parse_memory_size(gpu_memory) if gpu_memory is not None else None
        if not models.strip():
            raise ValueError("--dit-model is empty: give a registered model such as flux-dev, or 'all'")
        names = shipped_models() if models.strip() == "all" else _items(models, "--dit-model")
        if batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
        wanted = DEFAULT_KINDS if kinds is None else tuple(_items(kinds, "--kinds"))
        plans = [plan_capture(name, kinds=wanted, batch_size=batch_size) for name in names]
    except (ValueError, UnknownModelError, NoRealConfigError) as exc:
        print(f"plan: error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    print("\n\n".join(format_plan(plan, gpu_bytes) for plan in plans))
    if gpu_bytes is not None and not all(fit_on_gpu(plan, gpu_bytes).fits for plan in plans):
        return 1
    return 0
