"""Cache schedules from profiles: greedy derivation (monotone in budget, never step 0), JSON round trip,
refusal of another model's schedule."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pytest_ditredundancy.cache.schedule import CacheSchedule, ScheduleError, derive_mask, predicted_error, profile_costs, schedule_from_costs, schedule_from_profile, with_budget
from pytest_ditredundancy.capture.metrics import METRICS
from pytest_ditredundancy.capture.profile import ProfileMetadata, RedundancyProfile

costs_arrays = arrays(np.float64, st.tuples(st.integers(1, 5), st.integers(2, 8)),
                      elements=st.one_of(st.floats(0, 3, allow_nan=False), st.just(np.nan)))
fractions = st.floats(0, 0.999)


@settings(max_examples=150, deadline=None)
@given(costs_arrays, fractions, fractions)
def test_a_larger_budget_skips_a_superset_and_never_step_zero(costs, b1, b2):
    small, large = sorted((b1, b2))
    a = derive_mask(costs, budget=small)
    b = derive_mask(costs, budget=large)
    assert not (a & ~b).any()  # superset
    assert not a[:, 0].any() and not b[:, 0].any()
    assert not (b & ~np.isfinite(costs)).any()  # unmeasured cells are never skipped
    assert b.sum() <= np.floor(large * costs.size + 1e-9)


@settings(max_examples=100, deadline=None)
@given(costs_arrays, st.floats(0, 5), st.floats(0, 5))
def test_threshold_bounds_the_predicted_error_and_is_monotone(costs, t1, t2):
    low, high = sorted((t1, t2))
    a = derive_mask(costs, threshold=low)
    b = derive_mask(costs, threshold=high)
    assert predicted_error(costs, a) <= low + 1e-12
    assert not (a & ~b).any()
    assert not b[:, 0].any()


def test_cheapest_cells_go_first_and_budget_and_threshold_combine():
    costs = np.array([[np.nan, 0.5, 0.1, 0.2],
                      [np.nan, 0.05, 0.9, 0.3]])
    mask = derive_mask(costs, budget=0.3)  # floor(0.3 * 8) = 2 cells
    assert mask.tolist() == [[False, False, True, False], [False, True, False, False]]
    both = derive_mask(costs, budget=0.9, threshold=0.2)  # 0.05 + 0.1 fits, + 0.2 does not
    assert both.sum() == 2 and predicted_error(costs, both) == pytest.approx(0.15)
    worst = derive_mask(costs, budget=0.3, order="costliest")
    assert worst.tolist() == [[False, True, False, False], [False, False, True, False]]
    assert derive_mask(costs, budget=0.0).sum() == 0


@pytest.mark.parametrize("budget", [-0.1, 1.0, 1.5])
def test_budget_outside_unit_interval_is_refused(budget):
    with pytest.raises(ScheduleError, match=r"budget must lie in \[0, 1\)"):
        derive_mask(np.zeros((2, 3)), budget=budget)


def _profile(layers=("blocks.0.attn", "blocks.1.attn"), steps=5, seed=0) -> RedundancyProfile:
    rng = np.random.default_rng(seed)
    shape = (3, 2, 2, len(layers), steps - 1)  # prompt, branch, kind, layer, step pair
    values = {m: rng.uniform(0.01, 1.0, shape).astype(np.float32) for m in METRICS}
    return RedundancyProfile(list(layers), ["k", "a"], ["uncond", "cond"], values, np.ones(shape, bool),
                             ProfileMetadata(model="synthetic", steps=steps))


def test_costs_are_the_attention_outputs_rel_l1_averaged_over_prompts_and_branches():
    profile = _profile()
    costs = profile_costs(profile)
    assert costs.shape == (2, 5) and np.isnan(costs[:, 0]).all()
    expected = profile.values["rel_l1"][:, :, 1].astype(np.float64).mean(axis=(0, 1))
    np.testing.assert_allclose(costs[:, 1:], expected, rtol=1e-6)
    no_a = RedundancyProfile(profile.layers, ["k"], profile.branches, {m: v[:, :, :1] for m, v in profile.values.items()},
                             profile.computed[:, :, :1], profile.metadata)
    with pytest.raises(ScheduleError, match="no kind 'a'"):
        profile_costs(no_a)


def test_schedule_json_round_trip_and_rederivation(tmp_path):
    schedule = schedule_from_profile(_profile(), budget=0.4, model="synthetic")
    assert schedule.skipped_cells == 4 and schedule.predicted_error > 0
    path = schedule.save(tmp_path / "schedule.json")
    loaded = CacheSchedule.load(path)
    assert loaded == schedule
    data = json.loads(path.read_text())
    assert data["schema"] == "pytest-ditredundancy/cache-schedule" and data["mask"][0][0] is False
    assert data["costs"][0][0] is None  # step 0 has no previous step
    assert with_budget(loaded, 0.4).mask == schedule.mask
    assert with_budget(loaded, 0.6).skipped_cells == 6


def test_a_schedule_for_another_model_or_step_count_is_refused(tmp_path):
    schedule = schedule_from_profile(_profile(), budget=0.3, model="synthetic")
    schedule.validate(["blocks.0.attn", "blocks.1.attn"], steps=5)
    with pytest.raises(ScheduleError, match=r"derived for 'synthetic' with 2 attention layers; other has 2 \(first "
                                            r"difference: schedule 'blocks.1.attn', model 'blocks.1.attn2'\)"):
        schedule.validate(["blocks.0.attn", "blocks.1.attn2"], model="other")
    with pytest.raises(ScheduleError, match="first difference: 2 vs 3 layers"):
        schedule.validate(["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"])
    with pytest.raises(ScheduleError, match="covers 5 denoising steps, this run has 8"):
        schedule.validate(schedule.layers, steps=8)


def test_damaged_schedules_are_explained(tmp_path):
    with pytest.raises(ScheduleError, match="no cache schedule at"):
        CacheSchedule.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ScheduleError, match="not valid JSON"):
        CacheSchedule.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ScheduleError, match="not a pytest-ditredundancy cache schedule"):
        CacheSchedule.load(tmp_path / "other.json")
    with pytest.raises(ScheduleError, match="may not skip step 0"):
        CacheSchedule("m", ["a"], 2, [[True, False]])
    with pytest.raises(ScheduleError, match="expected \\(layers=1, steps=3\\)"):
        CacheSchedule("m", ["a"], 3, [[False, True]])


def test_from_costs_keeps_order_and_source():
    costs = np.array([[np.nan, 1.0, 2.0]])
    schedule = schedule_from_costs(costs, ["x"], model="m", budget=0.4, order="costliest", source="test")
    assert schedule.mask == [[False, False, True]] and schedule.order == "costliest" and schedule.source == "test"
