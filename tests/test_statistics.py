"""Statistics: CVs against hand-computed numbers, shape comparison, signatures, baseline drift."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pytest_ditredundancy.capture.metrics import METRICS
from pytest_ditredundancy.capture.profile import ProfileMetadata, RedundancyProfile
from pytest_ditredundancy.judging.drift import CellDrift, compare_to_baseline, summarize_drift
from pytest_ditredundancy.judging.shapes import (ShapeComparison, Signature, compare_shapes, distinctness, normalized_times,
                                                signature, step_curves)
from pytest_ditredundancy.judging.statistics import PromptStability, confidence_interval, paper_cv, prompt_stability, robust_cv

positive = st.floats(0.01, 100.0)
cell_arrays = st.tuples(st.integers(2, 5), st.integers(1, 3), st.integers(1, 4)).flatmap(
    lambda shape: arrays(np.float64, shape, elements=positive))


def make_profile(values: np.ndarray, *, model: str = "toy", timesteps: list[float] | None = None,
                 kinds: tuple[str, ...] = ("k", "v", "a")) -> RedundancyProfile:
    """``values``: [prompt, kind, layer, step_pair], one branch ("cond"); NaN cells are not computed."""
    values = np.asarray(values, dtype=np.float32)[:, None]
    p, _, k, l, s = values.shape
    computed = np.isfinite(values)
    return RedundancyProfile(
        layers=[f"blocks.{i}" for i in range(l)], kinds=list(kinds[:k]), branches=["cond"],
        values={m: values for m in METRICS}, computed=computed,
        metadata=ProfileMetadata(model=model, steps=s + 1, timesteps=timesteps or [], num_train_timesteps=1000),
    )


# -- CV -------------------------------------------------------------------------------------------------------

def test_cv_by_hand():
    # cell (0, 0): prompts 1, 3 -> mean 2, population std 1 -> 0.5; cell (0, 1): 4, 2 -> mean 3, std 1 -> 1/3
    cells = np.array([[[1.0, 4.0]], [[3.0, 2.0]]])
    assert paper_cv(cells) == pytest.approx((0.5 + 1 / 3) / 2)
    assert robust_cv(cells) == pytest.approx((1 + 1) / (2 + 3))


def test_cv_skips_unmeasured_and_zero_cells():
    cells = np.array([[[1.0, np.nan, 0.0]], [[3.0, 5.0, 0.0]]])
    assert paper_cv(cells) == pytest.approx(0.5)  # NaN cell: not measured for all prompts; zero cell: mean 0
    assert robust_cv(cells) == pytest.approx(0.5)  # zero cell adds 0 to both sums
    assert math.isnan(paper_cv(np.full((2, 1, 2), np.nan)))
    assert math.isnan(robust_cv(np.zeros((3, 2, 2))))


def test_robust_cv_does_not_blow_up_on_near_zero_cells():
    cells = np.array([[[1.0, 1e-9]], [[1.2, 3e-9]]])
    assert paper_cv(cells) == pytest.approx((0.1 / 1.1 + 0.5) / 2)  # the tiny cell dominates
    assert robust_cv(cells) == pytest.approx(0.1 / 1.1, rel=1e-6)


def test_robust_cv_excludes_layers():
    cells = np.array([[[1.0], [10.0]], [[3.0], [10.0]]])  # layer 1 constant across prompts
    assert robust_cv(cells) == pytest.approx(1 / 12)
    assert robust_cv(cells, exclude_layers=np.array([False, True])) == pytest.approx(0.5)


@settings(max_examples=40, deadline=None)
@given(cell_arrays, st.floats(1e-3, 1e3))
def test_cv_is_scale_invariant(cells, scale):
    assert paper_cv(cells * scale) == pytest.approx(paper_cv(cells), rel=1e-9, abs=1e-12)
    assert robust_cv(cells * scale) == pytest.approx(robust_cv(cells), rel=1e-9, abs=1e-12)


@settings(max_examples=30, deadline=None)
@given(cell_arrays)
def test_cv_is_zero_when_all_prompts_agree(cells):
    same = np.repeat(cells[:1], max(cells.shape[0], 3), axis=0)
    assert paper_cv(same) == pytest.approx(0.0, abs=1e-12)
    assert robust_cv(same) == pytest.approx(0.0, abs=1e-12)
    assert confidence_interval(same) == (0.0, 0.0)


def _synthetic(rng, prompts: int, cells: int = 40, cv: float = 0.12, shared: float = 0.5) -> np.ndarray:
    """Profiles whose true robust CV is ``cv``: per-cell means, a prompt effect shared by all cells, own noise."""
    mean = rng.uniform(0.5, 2.0, cells)
    z = np.sqrt(shared) * rng.standard_normal((prompts, 1)) + np.sqrt(1 - shared) * rng.standard_normal((prompts, cells))
    return (mean * (1 + cv * z))[:, :, None]


@pytest.mark.parametrize("prompts, shared", [(8, 0.0), (8, 0.9), (16, 0.5)])
def test_confidence_interval_covers_the_true_cv_at_its_level(prompts, shared):
    # the interval must hold the *true* value ~95% of the time, not the estimate (which is biased low):
    # the percentile bootstrap this replaced covered it in about half of these draws
    rng = np.random.default_rng(prompts * 10 + int(shared * 10))
    draws = 400
    hits = sum(lo <= 0.12 <= hi for lo, hi in (confidence_interval(_synthetic(rng, prompts, shared=shared))
                                                   for _ in range(draws)))
    assert 0.89 <= hits / draws <= 0.99, hits / draws


def test_confidence_interval_is_not_centred_on_the_estimate_by_construction():
    # with a biased estimator the interval moves towards the truth: the estimate need not be its midpoint
    cells = _synthetic(np.random.default_rng(3), 8)
    low, high = confidence_interval(cells)
    assert low < high
    assert abs((low + high) / 2 - robust_cv(cells)) > 1e-4


def test_confidence_interval_edge_cases():
    assert all(math.isnan(x) for x in confidence_interval(np.ones((2, 2, 3)) * [[[1.0]], [[2.0]]]))  # 2 prompts
    assert all(math.isnan(x) for x in confidence_interval(np.full((3, 2, 3), np.nan)))
    cells = np.array([[[1.0], [10.0]], [[3.0], [10.0]], [[2.0], [12.0]]])
    exclude = np.array([False, True])
    low, high = confidence_interval(cells, exclude_layers=exclude)
    assert 0.0 <= low <= high
    assert low != confidence_interval(cells)[0]  # the keyword reached the statistic
    assert confidence_interval(cells, paper_cv) == confidence_interval(cells, paper_cv)  # deterministic


def test_prompt_stability_excludes_constant_layers():
    values = np.ones((3, 2, 2, 4))
    values[:, :, 0] *= np.array([1.0, 1.2, 0.8])[:, None, None]  # layer 0 varies by prompt
    values[:, 0, 1] = 0.0  # k of layer 1 never changes (cross-attention)
    result = prompt_stability(make_profile(values, kinds=("k", "v")))
    assert [r.kind for r in result] == ["k", "v"] and all(isinstance(r, PromptStability) for r in result)
    k, v = result
    cv = np.std([1.0, 1.2, 0.8]) / 1.0
    assert k.cells == 4 and k.robust_cv == pytest.approx(cv, rel=1e-5) and k.paper_cv == pytest.approx(cv, rel=1e-5)
    assert v.cells == 8 and v.robust_cv == pytest.approx(cv * 4 / 8, rel=1e-5)
    assert k.ci_low <= k.ci_high


# -- normalized times and shapes ------------------------------------------------------------------------------

def test_normalized_times():
    np.testing.assert_allclose(normalized_times([999, 800, 600], 1000), [0.8995, 0.7])
    np.testing.assert_allclose(normalized_times([999, 800, 600], None), [0.8995, 0.7])
    np.testing.assert_allclose(normalized_times([1.0, 0.5, 0.0], 1000), [0.75, 0.25])  # already normalized
    np.testing.assert_allclose(normalized_times([], None, pairs=4), [0.875, 0.625, 0.375, 0.125])
    np.testing.assert_allclose(normalized_times([999, 500], 1000, pairs=3), [5 / 6, 0.5, 1 / 6])  # wrong length
    assert normalized_times([], None).shape == (0,)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0, 1000), min_size=2, max_size=30, unique=True))
def test_normalized_times_decrease_and_stay_in_range(raw):
    t = normalized_times(sorted(raw, reverse=True), 1000)
    assert t.shape == (len(raw) - 1,) and np.all((t >= 0) & (t <= 1)) and np.all(np.diff(t) <= 0)


def curve(layers: int, times: np.ndarray) -> np.ndarray:
    return np.stack([np.exp(3 * times) * (i + 1) + times * i for i in range(layers)])


def test_compare_shapes_across_step_counts():
    ta, tb = normalized_times(np.linspace(999, 0, 21), 1000), normalized_times(np.linspace(999, 0, 8), 1000)
    same = compare_shapes(curve(3, ta), ta, 5.0 * curve(3, tb), tb)
    assert same.correlation > 0.99 and same.distance < 0.05 and same.points == 3 * 32
    flipped = compare_shapes(curve(3, ta), ta, curve(3, tb)[:, ::-1], tb)
    assert flipped.correlation < -0.5 and flipped.distance > 10 * same.distance


def test_compare_shapes_errors_and_constant_curves():
    t = np.array([0.9, 0.5, 0.1])
    with pytest.raises(ValueError, match="2 layers against 3 layers"):
        compare_shapes(np.ones((2, 3)), t, np.ones((3, 3)), t)
    with pytest.raises(ValueError, match="do not overlap"):
        compare_shapes(np.ones((1, 3)), t, np.ones((1, 3)), t + 2)
    assert compare_shapes(np.ones((2, 3)), t, 7 * np.ones((2, 3)), t).correlation == 1.0
    zero_vs_flat = compare_shapes(np.zeros((1, 3)), t, np.ones((1, 3)), t)
    assert zero_vs_flat.correlation == 0.0 and zero_vs_flat.distance == pytest.approx(1.0)
    partial = compare_shapes(np.array([[1.0, 2, 3], [np.nan, 1, 1]]), t, np.array([[2.0, 4, 6], [1, 1, 1]]), t)
    assert partial.correlation == pytest.approx(1.0) and partial.points == 32  # NaN layer skipped
    # layers that never change (cross-attention K/V) do not dilute the distance
    a, b = np.array([[1.0, 2, 3], [0, 0, 0]]), np.array([[3.0, 2, 1], [0, 0, 0]])
    assert compare_shapes(a, t, b, t).distance == pytest.approx(compare_shapes(a[:1], t, b[:1], t).distance)
    assert compare_shapes(np.zeros((2, 3)), t, np.zeros((2, 3)), t) == ShapeComparison(1.0, 0.0, 0)
    assert math.isnan(compare_shapes(np.full((1, 3), np.nan), t, np.ones((1, 3)), t).correlation)


curve_pairs = st.tuples(st.integers(1, 3), st.integers(2, 8), st.integers(2, 8)).flatmap(
    lambda s: st.tuples(arrays(np.float64, (s[0], s[1]), elements=positive),
                        arrays(np.float64, (s[0], s[2]), elements=positive)))


@settings(max_examples=40, deadline=None)
@given(curve_pairs, st.floats(1e-3, 1e3), st.floats(1e-3, 1e3))
def test_compare_shapes_identity_and_scale_invariance(pair, scale_a, scale_b):
    a, b = pair
    ta, tb = normalized_times([], None, pairs=a.shape[1]), normalized_times([], None, pairs=b.shape[1])
    self_match = compare_shapes(a, ta, a, ta)
    assert self_match.correlation == pytest.approx(1.0) and self_match.distance == pytest.approx(0.0, abs=1e-12)
    plain, scaled = compare_shapes(a, ta, b, tb), compare_shapes(a * scale_a, ta, b * scale_b, tb)
    assert scaled.correlation == pytest.approx(plain.correlation, abs=1e-6)
    assert scaled.distance == pytest.approx(plain.distance, rel=1e-9, abs=1e-12)
    assert -1.0 <= plain.correlation <= 1.0


def test_step_curves_on_synthetic_profile():
    values = np.arange(1.0, 1 + 2 * 3 * 2 * 4).reshape(2, 3, 2, 4)
    values[1, 2, 1, 3] = np.nan
    mean, times = step_curves(make_profile(values, timesteps=[999, 800, 600, 400, 200]), "a")
    np.testing.assert_allclose(mean[0], values[:, 2, 0].mean(axis=0), rtol=1e-6)
    assert mean[1, 3] == values[0, 2, 1, 3]  # mean over the prompts that measured it
    np.testing.assert_allclose(times, [0.8995, 0.7, 0.5, 0.3])
    with pytest.raises(KeyError, match="no kind 'q'"):
        step_curves(make_profile(values), "q")


# -- signatures -----------------------------------------------------------------------------------------------

def test_signature_is_scale_free_and_aligned():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.5, 2.0, size=(3, 2, 4, 5))
    small = signature(make_profile(base, kinds=("k", "a")), grid=8)
    big = signature(make_profile(base * 100.0, kinds=("k", "a")), grid=8)
    assert isinstance(small, Signature) and small.model == "toy"
    assert small.mean.shape == (48,) and small.per_prompt.shape == (3, 48)
    np.testing.assert_allclose(big.mean, small.mean, rtol=1e-5)
    np.testing.assert_array_equal(small.mean[16:32], 0.0)  # no "v": zeros keep the kinds aligned
    np.testing.assert_allclose(small.mean[:8].mean(), 1.0)
    # a model with other layer and step counts gives a vector of the same length
    assert signature(make_profile(rng.uniform(0.5, 2.0, size=(2, 3, 7, 9))), grid=8).mean.shape == (48,)


def test_distinctness():
    a = Signature("a", np.array([1.0, 1.0]), np.array([[1.1, 1.0], [0.9, 1.0]]))
    b = Signature("b", np.array([2.0, 1.0]), np.array([[2.0, 1.2], [2.0, 0.8]]))
    d = distinctness(a, b)
    assert (d.model_a, d.model_b) == ("a", "b")
    assert d.between == pytest.approx(0.5) and d.within_a == pytest.approx(0.05) and d.within_b == pytest.approx(0.1)
    assert d.ratio == pytest.approx(5.0)
    assert distinctness(Signature("x", np.ones(2), np.ones((1, 2))), b).ratio == pytest.approx(0.5 / 0.1)
    flat = Signature("c", np.ones(2), np.ones((2, 2)))
    assert distinctness(flat, Signature("d", np.full(2, 2.0), np.full((2, 2), 2.0))).ratio == math.inf
    assert distinctness(flat, flat).ratio == 0.0
    with pytest.raises(ValueError, match="2 and 3 features"):
        distinctness(a, Signature("e", np.ones(3), np.ones((1, 3))))


signatures = st.integers(1, 6).flatmap(lambda n: st.tuples(
    arrays(np.float64, n, elements=positive), arrays(np.float64, (3, n), elements=positive),
    arrays(np.float64, n, elements=positive), arrays(np.float64, (2, n), elements=positive)))


@settings(max_examples=30, deadline=None)
@given(signatures)
def test_distinctness_is_symmetric(parts):
    a, b = Signature("a", parts[0], parts[1]), Signature("b", parts[2], parts[3])
    ab, ba = distinctness(a, b), distinctness(b, a)
    assert ab.between == ba.between and ab.ratio == ba.ratio
    assert (ab.within_a, ab.within_b) == (ba.within_b, ba.within_a)


# -- baseline drift -------------------------------------------------------------------------------------------

KINDS, LAYERS = ["k", "v", "a"], ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
TOL = dict(kinds=KINDS, layers=LAYERS, spread_factor=3.0, relative_floor=0.05, absolute_floor=1e-6)
grids = arrays(np.float64, (3, 4, 5), elements=positive)


@settings(max_examples=30, deadline=None)
@given(grids, arrays(np.float64, (3, 4, 5), elements=st.floats(0, 1)), st.tuples(
    st.integers(0, 2), st.integers(0, 3), st.integers(0, 4)), st.floats(1.5, 10))
def test_baseline_identity_and_perturbation(base, spread, at, factor):
    assert compare_to_baseline(base, base, spread, **TOL) == []
    current = base.copy()
    tolerance = 3.0 * spread[at] + 0.05 * base[at] + 1e-6
    current[at] = base[at] + factor * tolerance
    drifts = compare_to_baseline(current, base, spread, **TOL)
    assert len(drifts) == 1
    d = drifts[0]
    assert (d.kind, d.layer, d.step_pair) == (KINDS[at[0]], LAYERS[at[1]], at[2])
    assert d.excess == pytest.approx(factor) and d.tolerance == pytest.approx(tolerance)
    current[at] = base[at] - factor * tolerance  # two-sided
    assert len(compare_to_baseline(current, base, spread, **TOL)) == 1


def test_baseline_nan_handling_order_and_shapes():
    base = np.ones((3, 4, 5))
    spread = np.full((3, 4, 5), 0.01)
    base[0, 0, 0] = np.nan
    current = base.copy()
    current[1, 2, 3] = 1.5  # excess 0.5 / 0.08 = 6.25
    current[2, 3, 4] = 1.2  # excess 2.5
    current[0, 1, 1] = np.nan  # measured before, not now
    drifts = compare_to_baseline(current, base, spread, **TOL)  # NaN in both at [0, 0, 0]: fine
    assert [(d.kind, d.layer, d.step_pair) for d in drifts] == [("k", "blocks.1", 1), ("v", "blocks.2", 3),
                                                                ("a", "blocks.3", 4)]
    assert drifts[0].excess == math.inf and drifts[1].excess == pytest.approx(0.5 / 0.080001)
    with pytest.raises(ValueError, match="current has 4 step pairs but the baseline has 5"):
        compare_to_baseline(current[..., :4], base, spread, **TOL)
    with pytest.raises(ValueError, match="baseline spread has 2 layers"):
        compare_to_baseline(current, base, spread[:, :2], **TOL)
    assert CellDrift("k", "x", 0, np.nan, np.nan, 1.0).excess == 0.0


def test_summarize_drift():
    assert "within tolerance" in summarize_drift([], LAYERS)
    drifts = [CellDrift("a", "blocks.3", 2, 1.0, 2.0, 0.1), CellDrift("k", "blocks.1", 0, 0.5, 0.6, 0.05),
              CellDrift("a", "blocks.1", 1, 1.0, 1.15, 0.1), CellDrift("v", "blocks.2", 4, 2.0, np.nan, 0.1)]
    drifts = sorted(drifts, key=lambda d: -d.excess)
    text = summarize_drift(drifts, LAYERS, max_rows=3)
    lines = text.splitlines()
    assert lines[0] == "4 cells out of tolerance (v: 1, a: 2, k: 1)"
    assert lines[1] == "largest drift at layer blocks.2"  # the unmeasured cell: infinite excess
    assert lines[2].startswith("drift starts at layer blocks.1 (layer 2 of 4)")
    assert lines[3] == "layers by drifting cells: blocks.1 (2), blocks.2 (1), blocks.3 (1)"
    assert "+100.0%" in text and "unmeasured" in text and "... and 1 more" in text
    header = next(line for line in lines if "baseline" in line and "tolerance" in line)
    assert header.split() == ["kind", "layer", "step", "baseline", "now", "change", "tolerance"]
    assert "+15.0%" not in text  # the 4th worst cell is not in a 3-row table


# -- a real profile -------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_profile():
    from pytest_ditredundancy import profile_model

    return profile_model("tiny-pixart-alpha", num_prompts=4, steps=6)


def test_statistics_on_a_real_profile(tiny_profile):
    stability = prompt_stability(tiny_profile)
    assert [s.kind for s in stability] == tiny_profile.kinds
    for s in stability:
        assert s.cells > 0 and 0 <= s.robust_cv < 1 and s.ci_low <= s.ci_high
        assert math.isfinite(s.paper_cv)
    constant = tiny_profile.constant[:, tiny_profile.branches.index("cond")].all(axis=0)
    assert stability[0].cells == int((~constant[0]).sum()) * tiny_profile.num_step_pairs

    mean, times = step_curves(tiny_profile, "a")
    assert mean.shape == (len(tiny_profile.layers), tiny_profile.num_step_pairs) and times.shape == (5,)
    assert np.all(np.diff(times) < 0) and 0 <= times.min() and times.max() <= 1
    same = compare_shapes(mean, times, mean * 3, times)
    assert same.correlation == pytest.approx(1.0) and same.distance == pytest.approx(0.0, abs=1e-9)

    whole = signature(tiny_profile)
    assert whole.mean.shape == (96,) and whole.per_prompt.shape == (4, 96) and whole.model == "tiny-pixart-alpha"
    assert np.all(np.isfinite(whole.per_prompt))
    assert distinctness(whole, whole).between == 0.0
    # a "model" whose redundancy runs backwards in time is far more distinct than the prompts scatter
    reversed_values = {m: v[..., ::-1].copy() for m, v in tiny_profile.values.items()}
    mirrored = RedundancyProfile(tiny_profile.layers, tiny_profile.kinds, tiny_profile.branches, reversed_values,
                                 tiny_profile.computed[..., ::-1].copy(), tiny_profile.metadata)
    assert distinctness(whole, signature(mirrored)).ratio > 5


def test_the_drift_table_prints_a_factor_not_a_huge_percentage():
    drifts = [CellDrift(kind="k", layer="blocks.0.attn", step_pair=0, baseline=1e-300, current=0.5, tolerance=1e-9)]
    text = summarize_drift(drifts, ["blocks.0.attn"])
    row = next(line for line in text.splitlines() if "blocks.0.attn     0" in line)
    assert "x5e+299" in row and len(row) < 100
