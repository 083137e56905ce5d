"""Quality floors: how much a cache may cost in output quality, as the user states it.

``--dit-cache-floor=psnr:35,ssim:0.95,adherence:1.0,latent_mse:1e-3`` parses to :class:`Floors`. PSNR and SSIM
are against the uncached run with the same seeds and prompts; ``adherence`` is the share of the samples the
uncached run gets right (shape and colour, by the trained models' classifier) that the cached run still gets
right (1.0: the cache loses no sample); ``latent_mse`` is a ceiling on the mean squared difference of the
final latents. A metric the model cannot measure (adherence without a classifier) is an error, not a floor
that silently passes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any


class FloorError(ValueError):
    """A ``--dit-cache-floor`` value that cannot be parsed or does not fit the model; the message says the fix."""


#: metric -> (direction, what it is, valid range); "min": the value must stay at or above the floor
FLOOR_METRICS: dict[str, tuple[str, str, tuple[float, float]]] = {
    "psnr": ("min", "PSNR against the uncached run, dB", (0.0, math.inf)),
    "ssim": ("min", "SSIM against the uncached run", (-1.0, 1.0)),
    "adherence": ("min", "share of the uncached run's correct samples the cached run keeps", (0.0, 1.0)),
    "latent_mse": ("max", "mean squared difference of the final latents (a ceiling)", (0.0, math.inf)),
}


@dataclass(frozen=True)
class Quality:
    """What a cached run costs against the uncached one. ``adherence`` is None where the model has no
    classifier."""

    psnr: float
    ssim: float
    latent_mse: float
    adherence: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Floors:
    """The quality a setting must keep; None: no floor on that metric."""

    psnr: float | None = None
    ssim: float | None = None
    adherence: float | None = None
    latent_mse: float | None = None

    @property
    def given(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def __bool__(self) -> bool:
        return bool(self.given)

    def __str__(self) -> str:
        return ",".join(f"{name}:{value:g}" for name, value in self.given.items()) or "none"

    def as_dict(self) -> dict[str, float]:
        return dict(self.given)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "Floors":
        data = data or {}
        unknown = set(data) - set(FLOOR_METRICS)
        if unknown:
            raise FloorError(f"stored floors name unknown metrics {sorted(unknown)}; known: {', '.join(FLOOR_METRICS)}")
        return cls(**{name: float(value) for name, value in data.items()})

    def require_measurable(self, has_classifier: bool, model: str) -> None:
        """An adherence floor on a model without a classifier could never be checked: refuse it."""
        if self.adherence is not None and not has_classifier:
            raise FloorError(f"--dit-cache-floor=adherence:{self.adherence:g}: {model} has no prompt-adherence "
                             "classifier (only the trained models have one); drop the adherence floor for it, or floor "
                             "psnr, ssim and latent_mse")

    def failures(self, quality: Quality) -> list[str]:
        """One line per floor the quality breaks (NaN breaks every floor it meets)."""
        out = []
        for name, floor in self.given.items():
            value = getattr(quality, name)
            direction = FLOOR_METRICS[name][0]
            if value is None or not math.isfinite(value):
                out.append(f"{name} could not be measured ({value}) but is floored at {floor:g}")
            elif direction == "min" and value < floor - 1e-12:
                out.append(f"{name} {value:.4g} below its floor {floor:g}")
            elif direction == "max" and value > floor + 1e-15:
                out.append(f"{name} {value:.4g} above its ceiling {floor:g}")
        return out

    def holds(self, quality: Quality) -> bool:
        return not self.failures(quality)

    def margin(self, quality: Quality) -> float:
        """How far inside the floors (positive) or outside (negative) the quality is, in the floors' own relative
        units: the worst metric decides. Used to name the best setting when none meets the floors."""
        worst = math.inf
        for name, floor in self.given.items():
            value = getattr(quality, name)
            if value is None or not math.isfinite(value):
                return -math.inf
            scale = max(abs(floor), 1e-12)
            gap = (value - floor) / scale if FLOOR_METRICS[name][0] == "min" else (floor - value) / scale
            worst = min(worst, gap)
        return worst


def parse_floors(text: str | None) -> Floors:
    """``psnr:35,ssim:0.95`` -> :class:`Floors`; raises :class:`FloorError` naming the problem."""
    if text is None or not str(text).strip():
        return Floors()
    values: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        name, sep, value = part.partition(":")
        if not sep:
            name, sep, value = part.partition("=")
        name = name.strip().lower()
        if name == "mse":
            name = "latent_mse"
        if name not in FLOOR_METRICS:
            raise FloorError(f"--dit-cache-floor: unknown metric {name!r} in {part!r}; floors: "
                             + "; ".join(f"{k} ({v[1]})" for k, v in FLOOR_METRICS.items()))
        if not sep or not value.strip():
            raise FloorError(f"--dit-cache-floor: {name} needs a value ({name}:NUMBER)")
        if name in values:
            raise FloorError(f"--dit-cache-floor: {name} is given twice")
        try:
            number = float(value)
        except ValueError:
            raise FloorError(f"--dit-cache-floor: {name}:{value.strip()} is not a number") from None
        low, high = FLOOR_METRICS[name][2]
        if not math.isfinite(number) or not low <= number <= high:
            raise FloorError(f"--dit-cache-floor: {name}:{value.strip()} must be a finite number in "
                             f"[{low:g}, {high:g}]")
        values[name] = number
    return Floors(**values)
