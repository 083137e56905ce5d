"""Prompt adherence as a gated quality number of the cache gate (the trained models).

PSNR against the uncached run says how much a cache changed the pixels, not whether the image still shows
what the prompt asked for. On the models trained on the procedural shapes data, the shipped attribute
classifier reads shape and colour off each generated image; the gate holds the cached run's adherence (the
share of samples right on both) within its baseline bounds, and never more than ``drop`` below the uncached
run's, so a cache that keeps PSNR but loses the prompt fails.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

#: band: half-width of stored bounds beyond one sample; drop: how far below the uncached run the cached
#: run's adherence may fall. CPU runs repeat exactly; GPU kernels can flip a borderline sample.
TOLERANCES = {"cpu": {"band": 0.0, "drop": 0.05}, "cuda": {"band": 0.1, "drop": 0.1}}


class AdherenceError(ValueError):
    """The prompts are not captions the classifier can check."""


@dataclass
class AdherenceResult:
    """Adherence of the uncached and the cached run (share of samples right on shape and colour)."""

    reference: float
    cached: float
    per_attribute: dict[str, float]
    lost: dict[str, int]  # per attribute: samples right uncached and wrong cached
    samples: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def applies_to(spec: Any) -> bool:
    """Adherence is gated for the trained models (their prompts are the shapes captions)."""
    return bool(getattr(spec, "trained", False))


def measure(prompts: Sequence[str], reference_images: Any, cached_images: Any) -> AdherenceResult:
    reference, cached = _scores(prompts, reference_images, cached_images)
    return AdherenceResult(float(reference.all_correct.mean()), float(cached.all_correct.mean()),
                           dict(cached.accuracy), reference.changed(cached), len(list(prompts)))


def _tolerance(device_class: str) -> dict[str, float]:
    return TOLERANCES.get(device_class, TOLERANCES["cuda"])


def new_bounds(result: AdherenceResult, device_class: str) -> list[float]:
    half = _tolerance(device_class)["band"] + 1.0 / max(result.samples, 1)
    return [max(0.0, result.cached - half), min(1.0, result.cached + half)]


def drop_failure(result: AdherenceResult, device_class: str) -> str | None:
    """The failure line when the cached run lost the prompt against the uncached run, else None."""
    allowed = _tolerance(device_class)["drop"]
    if result.cached >= result.reference - allowed - 1e-12:
        return None
    lost = ", ".join(f"{name} {count}" for name, count in result.lost.items() if count) or "none"
    return (f"  prompt adherence {result.cached:.3g} cached vs {result.reference:.3g} uncached (more than {allowed:g} "
            f"lower; samples that lost an attribute: {lost}): the cache loses the prompt, whatever its PSNR")


def retention(prompts: Sequence[str], reference_images: Any, cached_images: Any) -> float:
    """Share of the samples the uncached run gets right (shape and colour) that the cached run still gets right:
    the tuning floor ``adherence`` (1.0: the cache loses no sample)."""
    reference, cached = _scores(prompts, reference_images, cached_images)
    right = reference.all_correct
    if not right.any():
        raise AdherenceError("the uncached run gets no sample right (shape and colour), so an adherence floor has "
                             "nothing to keep; use more prompts or drop the adherence floor")
    return float((right & cached.all_correct).sum() / right.sum())


def _scores(prompts: Sequence[str], reference_images: Any, cached_images: Any) -> tuple[Any, Any]:
    """The classifier's reading of both runs' images (AdherenceError when the prompts are not its captions)."""
    from ..training.adherence import score

    try:
        return score(reference_images, prompts), score(cached_images, prompts)
    except ValueError as exc:
        raise AdherenceError(
            f"prompt adherence cannot be scored ({exc}); the trained models are gated on captions of their "
            "shapes data: run them with --dit-prompts=shapes") from None
