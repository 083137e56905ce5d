"""Properties of the distance metrics, and the streaming form against the plain definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pytest_ditredundancy.capture.metrics import abs_l1, cosine_distance, metrics_from_stats, rel_l1, step_stats

# Activations: zero or of magnitude 1e-6..1e3 (float32 squares of ~1e-20 are denormal and lose precision).
finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32).filter(lambda v: v == 0 or abs(v) >= 1e-6)
vectors = arrays(np.float32, st.integers(1, 64), elements=finite)


def streamed(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Metrics of the step pair (y -> x) through the on-device streaming path."""
    prev = step_stats(torch.from_numpy(y)[None], None, 1)
    cur = step_stats(torch.from_numpy(x)[None], torch.from_numpy(y)[None], 1)
    stats = torch.stack([prev, cur]).permute(2, 0, 1).numpy()  # (rows, steps, 4)
    return {k: float(v[0, 0]) for k, v in metrics_from_stats(stats, x.size).items()}


@given(vectors)
def test_identical_steps_have_zero_distance(x):
    assert abs_l1(x, x) == 0
    assert rel_l1(x, x) == 0
    assert cosine_distance(x, x) == pytest.approx(0, abs=1e-9)
    got = streamed(x, x)
    assert got["abs_l1"] == 0 and got["rel_l1"] == 0
    assert got["cosine"] == pytest.approx(0, abs=1e-5)


@given(vectors, st.data())
def test_abs_l1_and_cosine_are_symmetric(x, data):
    y = data.draw(arrays(np.float32, x.shape, elements=finite))
    assert abs_l1(x, y) == pytest.approx(abs_l1(y, x))
    assert cosine_distance(x, y) == pytest.approx(cosine_distance(y, x), abs=1e-12)


@given(vectors, st.data(), st.floats(1e-3, 1e3))
def test_relative_l1_is_scale_invariant(x, data, scale):
    y = data.draw(arrays(np.float32, x.shape, elements=finite))
    scaled = rel_l1(x.astype(np.float64) * scale, y.astype(np.float64) * scale)
    plain = rel_l1(x, y)
    if math.isinf(plain):
        assert math.isinf(scaled)
    else:
        assert scaled == pytest.approx(plain, rel=1e-9, abs=1e-12)


@settings(deadline=None)
@given(vectors, st.data())
def test_streaming_equals_plain_definitions(x, data):
    y = data.draw(arrays(np.float32, x.shape, elements=finite))
    got = streamed(x, y)
    scale = float(np.abs(x).sum() + np.abs(y).sum()) + 1e-30
    assert got["abs_l1"] == pytest.approx(abs_l1(x, y), rel=1e-5, abs=1e-6 * scale / x.size)
    expected_rel = rel_l1(x, y)
    if math.isinf(expected_rel):
        assert math.isinf(got["rel_l1"])
    else:
        assert got["rel_l1"] == pytest.approx(expected_rel, rel=1e-4, abs=1e-6)
    assert got["cosine"] == pytest.approx(cosine_distance(x, y), abs=2e-5)


@given(vectors)
def test_non_finite_values_come_out_non_finite(x):
    bad = x.copy()
    bad[0] = np.nan
    got = streamed(bad, x)
    assert all(math.isnan(v) for v in got.values())


def test_zero_steps_are_defined_not_nan():
    zero = np.zeros(8, dtype=np.float32)
    one = np.ones(8, dtype=np.float32)
    assert streamed(zero, zero) == {"abs_l1": 0.0, "rel_l1": 0.0, "cosine": 0.0}
    moved = streamed(one, zero)
    assert moved["rel_l1"] == math.inf and moved["cosine"] == 1.0
    assert rel_l1(one, zero) == math.inf and cosine_distance(one, zero) == 1.0


def test_rows_are_reduced_per_sample():
    x = torch.arange(12, dtype=torch.float32).reshape(4, 3)  # 2 samples folded as (b f)
    stats = step_stats(x, torch.zeros_like(x), rows=2)
    assert stats.shape == (5, 2)
    assert stats[0].tolist() == [sum(range(6)), sum(range(6, 12))]


def test_plain_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="cannot compare"):
        abs_l1(np.zeros(3), np.zeros(4))
