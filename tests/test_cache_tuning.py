"""Cache tuning without a model: parsing of searches and floors, the bisection, cliffs, and the judging of a stored
tuning. The search runs over synthetic quality curves, so every property is checked against brute force."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_ditredundancy.cache.floors import FloorError, Floors, Quality, parse_floors
from pytest_ditredundancy.cache.tune_verdict import FrontierTolerance, frontier_moves, interpolated, judge_unstored, recommendation_failure
from pytest_ditredundancy.cache.tuning import (MAX_CLIFF_BISECTIONS, TunePoint, TuneSpecError, candidates_from_breakpoints, grid,
                                               parse_tune, parse_tunes, search)


# -- parsing ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, problem", [
    ("fbcache:threshold=0.5..0.02", "empty or reversed"),
    ("fbcache:threshold=0.2..0.2", "empty or reversed"),
    ("fbcache:threshold=a..b", "not a range"),
    ("fbcache:threshold=0..inf", "finite"),
    ("fbcache:treshold=0.1..0.2", "cannot tune 'treshold'"),
    ("pab:spatial_attention_block_skip_range=1..4", "cannot be tuned"),
    ("fbcahe:threshold=0.1..0.2", "no such strategy"),
    ("fbcache", "give the searched parameter a range"),
    ("fbcache:threshold", "needs a value"),
    ("profile:budget=0.1..0.5,threshold=0.01..0.2", "one parameter is searched at a time"),
    ("profile:budget=0.1..1.5", "budget"),
    ("profile:budget=0.1..0.5,schedule=s.json", "either schedule"),
    ("magcache:threshold=0.01..0.5,max_skip_steps=0", "max_skip_steps"),
])
def test_bad_searches_name_the_fix(text, problem):
    with pytest.raises(TuneSpecError, match=problem):
        parse_tune(text)


def test_a_search_is_canonical_and_keeps_its_fixed_parameters():
    tune = parse_tune("magcache:max_skip_steps=2,threshold=0.010..0.50")
    assert tune.text == "magcache:threshold=0.01..0.5,max_skip_steps=2"
    assert tune.setting(0.2).text == "magcache:max_skip_steps=2,threshold=0.2"
    # option lists arrive split on commas: a piece without a strategy continues the search before it
    assert [t.text for t in parse_tunes(["magcache:threshold=0.01..0.5", "max_skip_steps=2", "fbcache:threshold=0..1"])] \
        == ["magcache:threshold=0.01..0.5,max_skip_steps=2", "fbcache:threshold=0..1"]
    with pytest.raises(TuneSpecError, match="given twice"):
        parse_tunes(["fbcache:threshold=0.1..0.5", "fbcache:threshold=0.10..0.50"])


@pytest.mark.parametrize("text, problem", [
    ("psnr", "needs a value"), ("lpips:0.1", "unknown metric"), ("psnr:abc", "not a number"),
    ("ssim:1.5", r"in \[-1, 1\]"), ("psnr:nan", "finite"), ("psnr:30,psnr:35", "given twice"),
    ("adherence:-0.1", r"in \[0, 1\]"),
])
def test_bad_floors_name_the_fix(text, problem):
    with pytest.raises(FloorError, match=problem):
        parse_floors(text)


def test_floors_parse_check_and_refuse_what_cannot_be_measured():
    floors = parse_floors("psnr:35, ssim=0.95,mse:1e-3")
    assert floors == Floors(psnr=35, ssim=0.95, latent_mse=1e-3) and str(floors) == "psnr:35,ssim:0.95,latent_mse:0.001"
    assert floors.failures(Quality(36, 0.96, 1e-4)) == []
    assert floors.failures(Quality(34, 0.96, 2e-3)) == ["psnr 34 below its floor 35", "latent_mse 0.002 above its ceiling 0.001"]
    assert "could not be measured" in floors.failures(Quality(math.nan, 0.99, 0.0))[0]  # NaN never passes
    with pytest.raises(FloorError, match="no prompt-adherence classifier"):
        parse_floors("adherence:1").require_measurable(False, "tiny-pixart-alpha")
    assert not parse_floors("") and not parse_floors(None)


# -- the search -------------------------------------------------------------------------------------------------
def _point(value: float, psnr: float, steps: int = 20) -> TunePoint:
    cached = min(steps - 1, int(value * steps))
    return TunePoint(value, f"fbcache:threshold={value:g}", Quality(psnr, 1.0, 0.0), {"transformer": value * 0.9},
                     1.0 + value, [1.0 if s < cached else 0.0 for s in range(steps)])


def _curve(psnr_of):
    calls = []

    def evaluate(value: float) -> TunePoint:
        calls.append(value)
        return _point(value, psnr_of(value))

    return evaluate, calls


def test_a_search_without_floors_is_refused():
    evaluate, _ = _curve(lambda v: 40.0)
    with pytest.raises(TuneSpecError, match="no quality floors"):
        search(evaluate, parse_tune("fbcache:threshold=0..1"), Floors(), grid(0, 1))


def test_the_fastest_setting_that_keeps_the_floor_with_few_runs():
    evaluate, calls = _curve(lambda v: 60 - 40 * v)  # PSNR 35 at v = 0.625
    result = search(evaluate, parse_tune("fbcache:threshold=0..1"), Floors(psnr=35), grid(0, 1, 17), cliff_db=100)
    assert result.recommendation.value == pytest.approx(0.625)
    assert len(calls) <= 2 + math.ceil(math.log2(17))
    assert result.runs == len(calls) and result.monotone and not result.cliffs


def test_no_setting_keeps_the_floors_names_the_closest():
    evaluate, _ = _curve(lambda v: 30 - v)
    result = search(evaluate, parse_tune("fbcache:threshold=0.1..1"), Floors(psnr=35), grid(0.1, 1))
    assert result.recommendation is None
    assert result.best.value == pytest.approx(0.1) and "psnr" in result.best.failures[0]


def test_every_setting_keeps_the_floors_takes_the_top_of_the_range():
    evaluate, calls = _curve(lambda v: 90 - v)
    result = search(evaluate, parse_tune("fbcache:threshold=0..1"), Floors(psnr=35), grid(0, 1))
    assert result.recommendation.value == 1.0 and len(calls) == 2


def test_a_cliff_is_bisected_down_to_one_cached_step():
    evaluate, _ = _curve(lambda v: 50 - 5 * v if v < 0.43 else 20 - 5 * v)  # a 30 dB drop at 0.43
    result = search(evaluate, parse_tune("fbcache:threshold=0..1"), Floors(psnr=10), grid(0, 1, 3), cliff_db=6)
    assert len(result.cliffs) == 1
    cliff = result.cliffs[0]
    assert cliff.below < 0.43 <= cliff.above and cliff.drop_db > 25
    assert cliff.above - cliff.below <= 0.5 / 2 ** (MAX_CLIFF_BISECTIONS - 1)


def test_a_slope_is_not_a_cliff():
    evaluate, _ = _curve(lambda v: 60 - 40 * v)  # 20 dB over the range, evenly
    result = search(evaluate, parse_tune("fbcache:threshold=0..1"), Floors(psnr=5), grid(0, 1, 3), cliff_db=6)
    assert result.cliffs == []


def test_a_non_monotone_quality_is_said():
    evaluate, _ = _curve(lambda v: 20 if v < 0.2 else 50)  # the smallest setting is the worst
    result = search(evaluate, parse_tune("fbcache:threshold=0..1"), Floors(psnr=35), grid(0, 1, 5), cliff_db=100)
    assert not result.monotone and "not monotone" in result.notes[0]
    assert result.recommendation.value == 1.0  # the fastest measured setting that keeps the floors


def test_a_nan_point_breaks_every_floor():
    evaluate, _ = _curve(lambda v: math.nan if v > 0.5 else 50)
    result = search(evaluate, parse_tune("fbcache:threshold=0..1"), Floors(psnr=35), grid(0, 1, 9), cliff_db=100)
    assert result.recommendation.value == 0.5


@settings(max_examples=60, deadline=None)
@given(drops=st.lists(st.floats(0, 10), min_size=2, max_size=20), floor=st.floats(0, 80))
def test_bisection_finds_what_brute_force_finds_on_monotone_curves(drops, floor):
    values = grid(0, 1, len(drops))
    psnr = {round(v, 12): 80 - sum(drops[:i + 1]) for i, v in enumerate(values)}
    evaluate, calls = _curve(lambda v: psnr[round(v, 12)])
    result = search(evaluate, parse_tune("fbcache:threshold=0..1"), Floors(psnr=floor), values, cliff_db=1e9)
    passing = [v for v in values if psnr[round(v, 12)] >= floor - 1e-12]
    expected = max(passing) if passing else None
    assert (result.recommendation and result.recommendation.value) == expected
    assert len(set(calls)) <= 2 + math.ceil(math.log2(len(values)))


def test_candidates_from_breakpoints_one_per_predicted_pattern():
    assert candidates_from_breakpoints(0.0, 1.0, [0.2, 0.6, 1.5, -1]) == [0.0, 0.1, 0.4, 0.8, 1.0]
    assert candidates_from_breakpoints(0.0, 1.0, []) == [0.0, 0.5, 1.0]


# -- judging a stored tuning ------------------------------------------------------------------------------------
TOL = FrontierTolerance(psnr_db=0.5, psnr_relative=0.01, skipped=0.02)


def test_a_moved_frontier_fails_with_the_numbers_and_a_stable_one_passes():
    stored = [_point(0.1, 50), _point(0.3, 38)]
    floors = Floors(psnr=35)
    for p in stored:
        p.failures = floors.failures(p.quality)
    assert frontier_moves(stored, [_point(0.1, 50.2), _point(0.3, 38.1)], TOL) == []
    moved = [_point(0.1, 50), _point(0.3, 31)]
    moved[1].failures = floors.failures(moved[1].quality)
    lines = frontier_moves(stored, moved, TOL)
    assert len(lines) == 1 and "PSNR 38 dB -> 31 dB" in lines[0] and "now breaks the floors" in lines[0]
    assert "no longer keeps the floors" in recommendation_failure(stored[1], moved, floors)
    assert recommendation_failure(stored[1], [_point(0.1, 50), _point(0.3, 38)], floors) is None
    # a point that moved up is flagged too (two-sided)
    assert frontier_moves(stored, [_point(0.1, 50), _point(0.3, 45)], TOL)
    assert "not re-measured" in frontier_moves(stored, [_point(0.1, 50)], TOL)[0]


def test_a_setting_without_an_entry_is_judged_by_the_floors_and_compared():
    frontier = [_point(0.1, 50), _point(0.3, 30)]
    failures, text = judge_unstored("fbcache:threshold=0.2", Quality(33, 0.9, 1e-3), 0.4, Floors(psnr=35),
                                    "stored with the tuning fbcache:threshold=0..1",
                                    {"fbcache:threshold=0.1": {"psnr": 50.0, "ssim": 0.99, "skipped_attention": 0.1}},
                                    ("fbcache:threshold=0..1", 0.2, frontier))
    assert failures == ["  psnr 33 below its floor 35"]
    assert "stored fbcache:threshold=0.1: PSNR 50 dB" in text and "measured PSNR 40 dB at this value" in text
    assert interpolated(frontier, 0.5, "psnr") is None
