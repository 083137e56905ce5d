"""The premise test of profile-guided caching must score a profile that carries no information at ~0.

Pooling nested budgets (cheapest-first and costliest-first) correlates the predicted with the measured error
through the budget size alone, ~0.5 for any profile; single-cell probes do not. (On random-weight models the
real profile scores near 0 too: their redundancy does not predict the error of reusing a cell; the trained
models' premise is measured by the cache gate on them (docs/trained-models.md, "The cache gate on the trained models").)
"""

from __future__ import annotations

import numpy as np
import pytest

from pytest_ditredundancy import profile_model
from pytest_ditredundancy.cache.measure import RunPlan, budget_sweep, premise_test, run_once
from pytest_ditredundancy.cache.quality import spearman
from pytest_ditredundancy.cache.schedule import CacheSchedule, ScheduleError, probe_cells, schedule_from_costs, schedule_from_profile
from pytest_ditredundancy.profiling.runner import settings_for
from pytest_ditredundancy.zoo import get_spec

PROMPTS = ["a red bus", "a cat on a sofa"]


@pytest.fixture(scope="module")
def plan_and_schedule(tiny_pipeline_cache):
    pipe = tiny_pipeline_cache("tiny-pixart-alpha")
    spec = get_spec("tiny-pixart-alpha")
    settings = settings_for(spec, steps=8, num_prompts=len(PROMPTS))
    profile = profile_model(pipe, prompts=PROMPTS, steps=8)
    plan = RunPlan(pipe, spec, settings, PROMPTS, 0, 2)
    return plan, schedule_from_profile(profile, budget=0.3), run_once(plan)


def shuffled(schedule: CacheSchedule, seed: int) -> CacheSchedule:
    """The same costs, randomly reassigned to cells: a profile that predicts nothing."""
    costs = schedule.cost_array()
    cells = np.isfinite(costs)
    values = costs[cells].copy()
    np.random.default_rng(seed).shuffle(values)
    costs = costs.copy()
    costs[cells] = values
    return schedule_from_costs(costs, schedule.layers, model=schedule.model, budget=0.3)


def rho(points) -> float:
    return spearman([p.predicted_error for p in points], [p.measured_error for p in points])


def test_a_shuffled_profile_scores_about_zero(plan_and_schedule):
    plan, schedule, reference = plan_and_schedule
    noise = [rho(premise_test(plan, shuffled(schedule, seed), reference, cells=12)) for seed in range(5)]
    assert abs(float(np.mean(noise))) < 0.3, noise  # no information: about 0 on average
    assert min(noise) < 0.2, noise  # and not systematically positive, as nested budgets are


def test_nested_budgets_reward_a_profile_that_predicts_nothing(plan_and_schedule):
    # the statistic this replaced: pooled nested budgets score a shuffled profile well above 0
    plan, schedule, reference = plan_and_schedule
    points = budget_sweep(plan, shuffled(schedule, 0), [0.1, 0.3, 0.5], reference)
    assert rho(points) > 0.3


def test_probe_cells_span_the_ranking_and_never_step_zero(plan_and_schedule):
    _, schedule, _ = plan_and_schedule
    cells = probe_cells(schedule, 6)
    costs = schedule.cost_array()
    values = [costs[c] for c in cells]
    assert len(cells) == 6 and all(step > 0 for _, step in cells)
    assert values == sorted(values) and values[0] == np.nanmin(costs[:, 1:]) and values[-1] == np.nanmax(costs)
    with pytest.raises(ScheduleError, match="at least 3"):
        probe_cells(schedule, 2)
