"""Output quality of a cached run against the uncached one: PSNR and SSIM (scikit-image), latent MSE, and
the rank correlation between predicted and measured error (scipy).

scikit-image is an optional extra (``pip install pytest-ditredundancy[quality]``); without it the metric
functions raise :class:`QualityDependencyError` and the cache suite skips with that message.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

#: PSNR of identical outputs is infinite; it is reported (and stored) as this many dB.
PSNR_CAP = 100.0


class QualityDependencyError(ImportError):
    """scikit-image is missing."""


def require_scikit_image() -> Any:
    """``skimage.metrics``, or :class:`QualityDependencyError` saying how to install it."""
    try:
        from skimage import metrics
    except ImportError:
        raise QualityDependencyError(
            "the cache gate measures PSNR/SSIM with scikit-image, which is not installed; install the extra: "
            "pip install 'pytest-ditredundancy[quality]'") from None
    return metrics


def as_images(output: Any) -> np.ndarray:
    """A pipeline's decoded output as float ``[N, H, W, C]`` in [0, 1]; video frames become images."""
    if hasattr(output, "detach"):
        output = output.detach().float().cpu().numpy()
    if isinstance(output, (list, tuple)):
        output = np.stack([np.asarray(o, dtype=np.float64) / (255.0 if np.asarray(o).dtype == np.uint8 else 1.0)
                           for o in output])
    array = np.asarray(output, dtype=np.float64)
    if array.ndim < 3:
        raise ValueError(f"expected images [..., H, W, C], got shape {array.shape}")
    if array.ndim == 3:
        array = array[..., None]
    return array.reshape(-1, *array.shape[-3:])


def psnr(reference: np.ndarray, test: np.ndarray) -> float:
    """Mean PSNR over images (data range 1), each capped at :data:`PSNR_CAP` dB; NaN when either side holds a
    non-finite value (a gate must fail such output, not read it as identical)."""
    metrics = require_scikit_image()
    ref, out = as_images(reference), as_images(test)
    _same_shape(ref, out)
    if not (np.isfinite(ref).all() and np.isfinite(out).all()):
        return float("nan")  # NaN/inf output is a failure, never a perfect match
    values = []
    for a, b in zip(ref, out):
        if np.array_equal(a, b):
            values.append(PSNR_CAP)
            continue
        value = float(metrics.peak_signal_noise_ratio(a, b, data_range=1.0))
        values.append(min(value, PSNR_CAP))  # finite inputs that differ: a finite PSNR
    return float(np.mean(values))


def ssim(reference: np.ndarray, test: np.ndarray) -> float:
    """Mean SSIM over images (data range 1; the window shrinks to fit tiny images)."""
    metrics = require_scikit_image()
    ref, out = as_images(reference), as_images(test)
    _same_shape(ref, out)
    side = min(ref.shape[1], ref.shape[2])
    window = min(7, side if side % 2 else side - 1)
    if window < 3:
        raise ValueError(f"images of {ref.shape[1]}x{ref.shape[2]} are too small for SSIM (need 3x3)")
    values = [float(metrics.structural_similarity(a, b, data_range=1.0, channel_axis=-1, win_size=window))
              for a, b in zip(ref, out)]
    return float(np.mean(values))


def latent_mse(reference: Any, test: Any) -> float:
    """Mean squared difference of the final latents (float64); NaN when either side is non-finite."""
    a = np.asarray(reference.detach().cpu().double() if hasattr(reference, "detach") else reference, dtype=np.float64)
    b = np.asarray(test.detach().cpu().double() if hasattr(test, "detach") else test, dtype=np.float64)
    _same_shape(a, b)
    return float(np.mean((a - b) ** 2))


def spearman(predicted: Sequence[float], measured: Sequence[float]) -> float | None:
    """Spearman rank correlation; ``None`` when it is undefined (fewer than 3 points, or a constant side)."""
    from scipy.stats import spearmanr

    x, y = np.asarray(predicted, dtype=np.float64), np.asarray(measured, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    value = float(spearmanr(x, y).statistic)
    return value if math.isfinite(value) else None


def _same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"outputs differ in shape: {a.shape} vs {b.shape}")


def nonfinite_share(values: Any) -> float:
    """Fraction of non-finite entries of an array or tensor (0.0 for clean output)."""
    array = np.asarray(values.detach().float().cpu().numpy() if hasattr(values, "detach") else values, dtype=np.float64)
    return float((~np.isfinite(array)).mean()) if array.size else 0.0

