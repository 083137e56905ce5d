"""A procedural captioned image dataset: one coloured shape on a plain background, 32x32, with its caption.

Trained models need data, and the project must work offline, so the data is defined in code: every sample is
drawn from a seeded generator and rendered with numpy, e.g. "a small red circle at the top left on a black
background". The attribute sets are small on purpose: a model of a few million parameters learns them on a
CPU in minutes, and a small classifier can then tell whether a generated image matches its caption.

Sample ``i`` of a stream depends only on ``(seed, i)``, so streams are endless, reproducible and sliceable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterator, Mapping

import numpy as np

SIZE = 32  # image side in pixels
SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (235, 215, 40),
}
SIZES: dict[str, float] = {"small": 4.5, "large": 8.0}  # half-extent in pixels
POSITIONS: dict[str, tuple[float, float]] = {  # (x, y) centre; y grows downwards
    "at the top left": (8.5, 8.5), "at the top right": (23.5, 8.5), "at the bottom left": (8.5, 23.5),
    "at the bottom right": (23.5, 23.5), "in the center": (16.0, 16.0),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (15, 15, 15), "white": (240, 240, 240), "gray": (128, 128, 128)}

#: attribute name -> its values, in label order (the classifier's label ids index these tuples).
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES), "position": tuple(POSITIONS),
    "background": tuple(BACKGROUNDS),
}
SUPERSAMPLE = 4  # rendered at 4x and averaged: anti-aliased edges, like a real image


@dataclass(frozen=True)
class Shape:
    """The attributes of one sample; ``caption`` is the text the models are conditioned on."""

    shape: str
    colour: str
    size: str
    position: str
    background: str

    def __post_init__(self) -> None:
        for name, values in ATTRIBUTES.items():
            if getattr(self, name) not in values:
                raise ValueError(f"{name} {getattr(self, name)!r} is not one of {values}")

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} {self.position} on a {self.background} background"

    def labels(self) -> dict[str, int]:
        """Label id per attribute (index into :data:`ATTRIBUTES`)."""
        return {name: ATTRIBUTES[name].index(getattr(self, name)) for name in ATTRIBUTES}


def parse_caption(caption: str) -> Shape:
    """The attributes a caption names; fails for text that is not a caption of this dataset."""
    match = _CAPTION.fullmatch(" ".join(caption.lower().split()))
    if match is None:
        raise ValueError(f"caption {caption!r} is not in this dataset's form, e.g. "
                         "'a small red circle at the top left on a black background' (values: "
                         + "; ".join(f"{k}: {', '.join(v)}" for k, v in ATTRIBUTES.items()) + ")")
    return Shape(**match.groupdict())


def _alternatives(name: str) -> str:
    return f"(?P<{name}>" + "|".join(re.escape(v) for v in ATTRIBUTES[name]) + ")"


_CAPTION = re.compile(f"a {_alternatives('size')} {_alternatives('colour')} {_alternatives('shape')} "
                      f"{_alternatives('position')} on a {_alternatives('background')} background")


@dataclass(frozen=True)
class Distribution:
    """How often each attribute value is drawn (uniform where not given). Weights need not sum to one.

    A fine-tuning run changes only this, e.g. ``Distribution(background={"white": 4, "gray": 1})``
    (a value left out of a given mapping is never drawn).
    """

    weights: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, table in self.weights.items():
            if name not in ATTRIBUTES:
                raise ValueError(f"unknown attribute {name!r}; attributes are {', '.join(ATTRIBUTES)}")
            unknown = set(table) - set(ATTRIBUTES[name])
            if unknown:
                raise ValueError(f"{name}: unknown values {sorted(unknown)}; values are {ATTRIBUTES[name]}")
            if any(w < 0 for w in table.values()) or sum(table.values()) <= 0:
                raise ValueError(f"{name}: weights must be >= 0 with a positive sum, got {dict(table)}")

    def probabilities(self, name: str) -> np.ndarray:
        table = self.weights.get(name)
        if table is None:
            return np.full(len(ATTRIBUTES[name]), 1.0 / len(ATTRIBUTES[name]))
        p = np.array([float(table.get(v, 0.0)) for v in ATTRIBUTES[name]])
        return p / p.sum()


UNIFORM = Distribution()


def draw(rng: np.random.Generator, distribution: Distribution = UNIFORM) -> Shape:
    """One random set of attributes."""
    return Shape(**{name: values[rng.choice(len(values), p=distribution.probabilities(name))]
                    for name, values in ATTRIBUTES.items()})


def render(shape: Shape, rng: np.random.Generator | None = None) -> np.ndarray:
    """The image of ``shape`` as uint8 ``[32, 32, 3]``; ``rng`` adds small jitter (position, size, tint)."""
    jitter = rng.uniform(-1, 1, size=6) if rng is not None else np.zeros(6)
    cx, cy = POSITIONS[shape.position]
    cx, cy = cx + 1.5 * jitter[0], cy + 1.5 * jitter[1]
    r = SIZES[shape.size] * (1 + 0.08 * jitter[2])
    n = SIZE * SUPERSAMPLE
    grid = (np.arange(n) + 0.5) / SUPERSAMPLE
    x, y = np.meshgrid(grid, grid)
    dx, dy = x - cx, y - cy
    if shape.shape == "circle":
        mask = dx ** 2 + dy ** 2 <= r ** 2
    elif shape.shape == "square":
        side = r * 0.9
        mask = (np.abs(dx) <= side) & (np.abs(dy) <= side)
    else:  # triangle pointing up: apex at the top, base at the bottom
        top, bottom = -r, r * 0.85
        mask = (dy >= top) & (dy <= bottom) & (np.abs(dx) <= (dy - top) / (bottom - top) * r * 1.1)
    cover = mask.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE).mean(axis=(1, 3))[..., None]
    fg = np.clip(np.array(COLOURS[shape.colour], float) + 12 * jitter[3:6], 0, 255)
    bg = np.array(BACKGROUNDS[shape.background], float)
    return np.rint(cover * fg + (1 - cover) * bg).astype(np.uint8)


@dataclass(frozen=True)
class Batch:
    images: np.ndarray  # uint8 [n, 32, 32, 3]
    shapes: list[Shape]

    @property
    def captions(self) -> list[str]:
        return [s.caption for s in self.shapes]

    def labels(self) -> dict[str, np.ndarray]:
        """Label ids per attribute, int64 ``[n]`` each."""
        rows = [s.labels() for s in self.shapes]
        return {name: np.array([r[name] for r in rows], dtype=np.int64) for name in ATTRIBUTES}


@dataclass(frozen=True)
class ShapeDataset:
    """The endless stream of samples for one seed; sample ``i`` depends only on ``(seed, i)``."""

    seed: int = 0
    distribution: Distribution = UNIFORM

    def sample(self, index: int) -> tuple[np.ndarray, Shape]:
        if index < 0:
            raise IndexError(f"sample index must be >= 0, got {index}")
        rng = np.random.default_rng([self.seed, index])
        shape = draw(rng, self.distribution)
        return render(shape, rng), shape

    def batch(self, start: int, size: int) -> Batch:
        """Samples ``start .. start + size - 1``."""
        if size < 1:
            raise ValueError(f"batch size must be >= 1, got {size}")
        pairs = [self.sample(i) for i in range(start, start + size)]
        return Batch(np.stack([p[0] for p in pairs]), [p[1] for p in pairs])

    def batches(self, size: int, start: int = 0) -> Iterator[Batch]:
        """Consecutive batches from sample ``start`` on, forever."""
        while True:
            yield self.batch(start, size)
            start += size


def all_captions() -> list[str]:
    """Every caption the dataset can produce, in a fixed order (the prompts of the trained models' suites)."""
    import itertools

    return [Shape(*combo).caption for combo in itertools.product(*ATTRIBUTES.values())]


def to_tensor(images: np.ndarray):
    """uint8 ``[n, H, W, 3]`` -> float ``[n, 3, H, W]`` in [-1, 1], the range the VAE and pipelines use."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
