"""Prompt adherence: does a generated image show what its caption says?

The shipped attribute classifier reads each image; a sample is correct on an attribute when the classifier's
reading equals the caption's value. ``score`` returns accuracy per attribute and the per-sample booleans, so a
cache gate can compare two runs sample by sample (a cache that keeps PSNR but loses the prompt shows up here).

Example (``score`` from this module)::

    images = pipe(captions, output_type="np", ...).images
    result = score(images, captions)
    result.accuracy["colour"], result.correct["shape"]          # 0.95, array([True, False, ...])
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .classifier import AttributeNet, load_classifier
from .shapes import ATTRIBUTES, SIZE, parse_caption

CLASSIFIER = Path(__file__).resolve().parent.parent / "weights" / "classifier"
#: The attributes the adherence target (>= 90%) is stated for; the others are reported too.
PRIMARY = ("shape", "colour")


@dataclass(frozen=True)
class Adherence:
    """Per-attribute accuracy and per-sample correctness (``correct[attribute][i]``) of one set of images."""

    accuracy: dict[str, float]
    correct: dict[str, np.ndarray]
    predicted: dict[str, list[str]]
    captions: list[str]

    @property
    def all_correct(self) -> np.ndarray:
        """Samples right on every primary attribute (shape and colour)."""
        return np.logical_and.reduce([self.correct[name] for name in PRIMARY])

    def changed(self, other: "Adherence") -> dict[str, int]:
        """Per attribute, how many samples were right here and wrong in ``other`` (same captions, same order)."""
        if self.captions != other.captions:
            raise ValueError("adherence results compare sample by sample; score the same captions in the same order")
        return {name: int((self.correct[name] & ~other.correct[name]).sum()) for name in ATTRIBUTES}


@lru_cache(maxsize=4)
def _classifier(path: str) -> AttributeNet:
    return load_classifier(Path(path))


def as_batch(images: Any) -> torch.Tensor:
    """Pipeline output (PIL images, ``np`` float [0,1] or uint8 NHWC, ``pt`` float [0,1] NCHW) -> float
    ``[n, 3, 32, 32]`` in [-1, 1], the classifier's input."""
    if hasattr(images, "images"):  # a pipeline output object
        images = images.images
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("no images to score")
        if all(hasattr(im, "convert") for im in images):  # PIL
            images = np.stack([np.asarray(im.convert("RGB")) for im in images])
        else:
            images = np.stack([np.asarray(im) for im in images])
    if isinstance(images, np.ndarray):
        array = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images.astype(np.float32)
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(f"numpy images must be [n, H, W, 3], got shape {images.shape}")
        tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2)
    elif isinstance(images, torch.Tensor):
        tensor = images.detach().float().cpu()
        if tensor.ndim == 3:
            tensor = tensor[None]
        if tensor.ndim != 4 or tensor.shape[1] != 3:
            raise ValueError(f"tensor images must be [n, 3, H, W] in [0, 1] (output_type='pt'), got shape "
                             f"{tuple(images.shape)}; latents (output_type='latent') must be decoded first")
    else:
        raise TypeError(f"cannot score {type(images).__name__}; pass PIL images, a numpy array or a tensor")
    if tensor.shape[-2:] != (SIZE, SIZE):
        raise ValueError(f"images must be {SIZE}x{SIZE} (the trained models' size), got {tuple(tensor.shape[-2:])}")
    if tensor.min() < -1e-3 or tensor.max() > 1 + 1e-3:
        raise ValueError("float images must be in [0, 1] (the pipelines' 'np'/'pt' output range)")
    return tensor.mul(2).sub(1)


def score(images: Any, captions: Sequence[str], classifier: Path | None = None) -> Adherence:
    """Score generated ``images`` against the ``captions`` they were generated from."""
    batch = as_batch(images)
    captions = list(captions)
    if len(captions) != batch.shape[0]:
        raise ValueError(f"{batch.shape[0]} images but {len(captions)} captions; pass one caption per image")
    wanted = [parse_caption(c).labels() for c in captions]
    net = _classifier(str(classifier or CLASSIFIER))
    with torch.no_grad():
        logits = net(batch)
    correct, predicted, accuracy = {}, {}, {}
    for name, values in ATTRIBUTES.items():
        ids = logits[name].argmax(1).numpy()
        correct[name] = ids == np.array([w[name] for w in wanted])
        predicted[name] = [values[i] for i in ids]
        accuracy[name] = float(correct[name].mean())
    return Adherence(accuracy, correct, predicted, captions)
