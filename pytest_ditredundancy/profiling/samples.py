"""Generate with a trained model at its registered settings, score adherence, draw the trained models' figures (docs/trained-models.md).

Sampling goes through the same path as the suites (``settings_for`` / ``call_kwargs`` / ``apply_scheduler``),
so the adherence number is that of the model as the plugin runs it: its steps, guidance, scheduler, 32x32.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..training.adherence import Adherence, score
from ..training.shapes import all_captions


def evaluation_captions(count: int, seed: int = 0) -> list[str]:
    """``count`` captions cycling through every caption in a seeded order (balanced over attributes)."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    captions = all_captions()
    order = np.random.default_rng(seed).permutation(len(captions))
    return [captions[order[i % len(captions)]] for i in range(count)]


def generate(model: Any, captions: Sequence[str], *, seed: int = 0, batch_size: int = 32,
             **overrides: Any) -> np.ndarray:
    """Images (uint8 ``[n, 32, 32, 3]``) for ``captions``; caption ``i`` gets generator seed ``seed + i``.

    ``model`` is a zoo name or a pipeline loaded with ``load_model``; ``overrides`` change registered settings
    (``steps=``, ``guidance_scale=``, ``scheduler=``), as ``profile_model`` takes them.
    """
    from .runner import batched, call_kwargs, settings_for
    from .schedulers import apply_scheduler
    from ..zoo.loading import load_model, resolve_spec, spec_of

    pipe = load_model(model, device="cpu") if isinstance(model, str) else model
    spec = resolve_spec(model) if isinstance(model, str) else spec_of(pipe)
    if spec is None:
        raise ValueError("pass a zoo name or a pipeline loaded with load_model(), so its registered settings apply")
    settings = settings_for(spec, num_prompts=len(captions), **overrides)
    apply_scheduler(pipe, settings.scheduler)
    out = []
    for start, batch in batched(list(captions), batch_size):
        generators = [torch.Generator("cpu").manual_seed(seed + start + i) for i in range(len(batch))]
        kwargs = call_kwargs(spec, settings, batch, pipe, generators) | {"output_type": "np"}
        out.append(pipe(**kwargs).images)
    return np.rint(np.concatenate(out) * 255).clip(0, 255).astype(np.uint8)


def adherence_of(model: Any, count: int = 120, seed: int = 0, **overrides: Any) -> tuple[Adherence, np.ndarray]:
    """Adherence of ``count`` samples at the model's registered settings, and the images."""
    captions = evaluation_captions(count, seed)
    images = generate(model, captions, seed=seed, **overrides)
    return score(images, captions), images


def save_grid(images: np.ndarray, path: Path, columns: int = 8, scale: int = 3,
              labels: Sequence[str] | None = None) -> None:
    """A PNG grid of images, each scaled up ``scale`` times (nearest neighbour: pixels stay visible)."""
    from PIL import Image, ImageDraw

    n = len(images)
    rows = -(-n // columns)
    side, label_h = 32 * scale, (12 if labels else 0)
    canvas = Image.new("RGB", (columns * (side + 2), rows * (side + 2 + label_h)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, image in enumerate(images):
        x, y = (i % columns) * (side + 2), (i // columns) * (side + 2 + label_h)
        canvas.paste(Image.fromarray(image).resize((side, side), Image.NEAREST), (x, y))
        if labels:
            draw.text((x + 1, y + side), labels[i][:18], fill="black")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def save_loss_curves(records: dict[str, Path], path: Path, size: tuple[int, int] = (640, 360)) -> None:
    """Training loss (smoothed, log scale) of each model's ``training.json`` in one PNG."""
    from PIL import Image, ImageDraw

    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    curves = {}
    for name, directory in records.items():
        record = json.loads((Path(directory) / "training.json").read_text(encoding="utf-8"))
        steps = np.arange(len(record["loss_curve"])) * record["curve_stride"]
        curves[name] = (steps, np.log10(np.maximum(record["loss_curve"], 1e-6)))
    width, height = size
    left, right, top, bottom = 60, 20, 20, 40
    x_max = max(s[-1] for s, _ in curves.values()) or 1
    lo = min(v.min() for _, v in curves.values())
    hi = max(v.max() for _, v in curves.values())
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([left, top, width - right, height - bottom], outline="black")

    def xy(step: float, value: float) -> tuple[float, float]:
        return (left + (width - left - right) * step / x_max,
                height - bottom - (height - top - bottom) * (value - lo) / max(hi - lo, 1e-9))

    for decade in range(int(np.floor(lo)), int(np.ceil(hi)) + 1):
        if lo <= decade <= hi:
            _, y = xy(0, decade)
            draw.line([left - 4, y, left, y], fill="black")
            draw.text((4, y - 6), f"1e{decade}", fill="black")
    draw.text((width // 2 - 40, height - bottom + 8), f"step (0 .. {x_max})", fill="black")
    for (name, (steps, values)), colour in zip(curves.items(), colours):
        draw.line([xy(s, v) for s, v in zip(steps, values)], fill=colour, width=2)
    for i, (name, colour) in enumerate(zip(curves, colours)):
        y = top + 12 + 14 * i
        draw.line([width - right - 190, y, width - right - 172, y], fill=colour, width=2)
        draw.text((width - right - 166, y - 6), name, fill=colour)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
