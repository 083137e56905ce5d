"""Predicting a cache's skip pattern from the profile: the replayed rules (warm-up, limits, a reference refreshed only
on computed steps), breakpoints that really separate the predicted patterns, the calibration, bad inputs, and one
comparison with measured runs of the trained PixArt."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pytest_ditredundancy.cache.predict import (PREDICTORS, CacheDitPredictor, FBCachePredictor, MagCachePredictor,
                                                PredictInputError, Prediction, ProfilePredictor, bind, predictor_for)
from pytest_ditredundancy.cache.schedule import schedule_from_profile
from pytest_ditredundancy.cache.spec import STRATEGIES
from pytest_ditredundancy.capture.metrics import METRICS
from pytest_ditredundancy.capture.profile import ProfileMetadata, RedundancyProfile

#: two attention layers in the first block (as PixArt's attn1/attn2), one in each of three more
LAYERS = ("blocks.0.attn1", "blocks.0.attn2", "blocks.1.attn1", "blocks.2.attn1", "blocks.3.attn1")


def make_profile(rel: np.ndarray, sizes: np.ndarray | None = None, layers=LAYERS, kinds=("k", "a")) -> RedundancyProfile:
    """A profile whose attention outputs change by ``rel[prompt, branch, layer, pair]`` (relative L1) and have mean
    magnitude ``sizes[layer, pair]`` at each pair's first step."""
    rel = np.asarray(rel, dtype=np.float64)
    prompts, branches, n_layers, pairs = rel.shape
    sizes = np.ones((n_layers, pairs)) if sizes is None else np.asarray(sizes, dtype=np.float64)
    shape = (prompts, branches, len(kinds), n_layers, pairs)
    values = {m: np.full(shape, 0.5, np.float32) for m in METRICS}
    a = list(kinds).index("a") if "a" in kinds else None
    if a is not None:
        values["rel_l1"][:, :, a] = rel
        values["abs_l1"][:, :, a] = rel * sizes
    return RedundancyProfile(list(layers), list(kinds), ["uncond", "cond"][:branches], values, np.ones(shape, bool),
                             ProfileMetadata(model="synthetic", steps=pairs + 1))


def profile_of(change: list[float], layers=LAYERS) -> RedundancyProfile:
    """Every layer changes by ``change[s - 1]`` between steps ``s - 1`` and ``s``."""
    rel = np.broadcast_to(np.asarray(change, dtype=np.float64), (1, 2, len(layers), len(change))).copy()
    return make_profile(rel, layers=layers)


profiles = st.builds(
    lambda seed, steps: make_profile(np.random.default_rng(seed).uniform(0.01, 0.6, (2, 2, len(LAYERS), steps - 1)),
                                     np.random.default_rng(seed + 1).uniform(0.5, 2.0, (len(LAYERS), steps - 1))),
    st.integers(0, 10_000), st.integers(3, 24))
thresholds = st.floats(0.0, 3.0, allow_nan=False)


def count(prediction: Prediction) -> int:
    return len(prediction.cached_steps)


# -- the rules, by hand --------------------------------------------------------------------------------------------
def test_fbcache_compares_with_the_last_computed_step_not_the_last_step():
    # steps 1 and 2 change by 0.1 each: since step 0 that is 0.1, then 0.2 (cached at 0.25); step 3 brings it to 0.3
    # (computed, the reference moves to step 3); step 4 alone is 0.3 (computed)
    prediction = FBCachePredictor().predict(profile_of([0.1, 0.1, 0.1, 0.3]), {"threshold": 0.25})
    assert prediction.cached_steps == [1, 2]
    assert prediction.fractions[1] == pytest.approx(1 - 2 / 5)  # the first block's two attention layers still run
    assert prediction.indicator[0] is None and prediction.indicator[1:] == pytest.approx([0.1, 0.1, 0.1, 0.3])


def test_cachedit_warmup_limits_and_strict_threshold():
    change = [0.1] * 9
    plain = CacheDitPredictor().predict(profile_of(change), {"rdt": 0.25, "warmup": 2})
    assert plain.cached_steps == [2, 3, 5, 6, 8, 9]  # 0, 1: warm-up; 0.1, 0.2 since the last computed step, then 0.3
    # cache-dit caches when the change is *below* rdt, FBCache when it is at most the threshold (0.125: exact in float32)
    assert CacheDitPredictor().predict(profile_of([0.125] * 5), {"rdt": 0.25, "warmup": 1}).cached_steps == [1, 3, 5]
    assert FBCachePredictor().predict(profile_of([0.125] * 5), {"threshold": 0.25}).cached_steps == [1, 2, 4, 5]
    capped = CacheDitPredictor().predict(profile_of(change), {"rdt": 0.5, "warmup": 2, "max_cached_steps": 3})
    assert capped.cached_steps == [2, 3, 4]
    rows = CacheDitPredictor().predict(profile_of(change), {"rdt": 0.5, "warmup": 2, "max_continuous_cached_steps": 2})
    assert rows.cached_steps == [2, 3, 5, 6, 8, 9]
    always = CacheDitPredictor().predict(profile_of([5.0] * 4), {"rdt": 1.0, "warmup": 1})
    assert always.cached_steps == [1, 2, 3, 4]  # rdt >= 1: cache-dit treats every step as similar
    assert CacheDitPredictor().predict(profile_of(change), {"rdt": 0.0, "warmup": 0}).cached_steps == []
    fn2 = CacheDitPredictor().predict(profile_of(change), {"rdt": 0.5, "warmup": 2, "Fn": 2, "Bn": 1})
    assert fn2.fractions[2] == pytest.approx(1 - 4 / 5)  # blocks 0, 1 and 3 run: one layer of five is skipped


def test_magcache_accumulates_ratio_error_and_limits_the_run():
    ratios = [1.0, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]
    predictor = MagCachePredictor(ratios=ratios)
    profile = profile_of([0.1] * 7)
    # from step int(0.25 * 8 + 0.5) = 2: error 0.1 (skip), then 0.1 + 0.19 = 0.29 > 0.2 (compute, reset), ...
    got = predictor.predict(profile, {"threshold": 0.2, "retention_ratio": 0.25, "max_skip_steps": 3})
    assert got.cached_steps == [2, 4, 6]
    assert got.fractions[2] == 1.0  # MagCache skips the whole stack
    loose = predictor.predict(profile, {"threshold": 10.0, "retention_ratio": 0.0, "max_skip_steps": 2})
    assert loose.cached_steps == [1, 2, 4, 5, 7]  # step 0 stores the first residual; then at most 2 in a row


def test_the_profile_schedule_prediction_is_its_mask():
    rng = np.random.default_rng(3)
    profile = make_profile(rng.uniform(0.01, 0.5, (2, 2, len(LAYERS), 9)))
    for params in ({"budget": 0.3}, {"threshold": 0.4}, {"budget": 0.5, "threshold": 0.2}, {}):
        schedule = schedule_from_profile(profile, budget=params.get("budget", 0.3 if not params else None),
                                         threshold=params.get("threshold"))
        got = ProfilePredictor().predict(profile, params)
        assert got.fractions == pytest.approx(schedule.array.mean(axis=0).tolist())


# -- properties ---------------------------------------------------------------------------------------------------
@settings(max_examples=120, deadline=None)
@given(profiles, thresholds, thresholds, st.integers(0, 5))
def test_a_larger_threshold_never_caches_fewer_steps(profile, t1, t2, warmup):
    low, high = sorted((t1, t2))
    fb = FBCachePredictor()
    assert count(fb.predict(profile, {"threshold": low})) <= count(fb.predict(profile, {"threshold": high}))
    dit = CacheDitPredictor()
    params = {"warmup": warmup, "Fn": 2}
    assert count(dit.predict(profile, {**params, "rdt": low})) <= count(dit.predict(profile, {**params, "rdt": high}))


@settings(max_examples=120, deadline=None)
@given(profiles, thresholds, st.integers(0, 8), st.integers(1, 3), st.integers(-1, 6), st.integers(-1, 3),
       st.integers(1, 4))
def test_warmup_step_zero_and_limits_are_respected(profile, rdt, warmup, interval, most, run, skip):
    got = CacheDitPredictor().predict(profile, {"rdt": rdt, "warmup": warmup, "warmup_interval": interval,
                                                "max_cached_steps": most, "max_continuous_cached_steps": run})
    assert not set(got.cached_steps) & set(range(0, warmup, interval))
    assert 0 not in got.cached_steps
    if most >= 0:
        assert count(got) <= most
    if run >= 0:
        assert _longest_run(got.cached) <= run
    mag = MagCachePredictor().predict(profile, {"threshold": rdt, "max_skip_steps": skip, "retention_ratio": 0.1})
    assert _longest_run(mag.cached) <= skip and 0 not in mag.cached_steps
    assert 0 not in FBCachePredictor().predict(profile, {"threshold": rdt}).cached_steps


def _longest_run(flags: list[bool]) -> int:
    best = run = 0
    for flag in flags:
        run = run + 1 if flag else 0
        best = max(best, run)
    return best


SEARCHES = [("fbcache", "threshold", {}), ("cachedit", "rdt", {"warmup": 1}), ("cachedit", "rdt", {"Fn": 2}),
            ("magcache", "threshold", {}), ("magcache", "retention_ratio", {"threshold": 0.3}),
            ("cachedit", "max_cached_steps", {"rdt": 0.5, "warmup": 1}), ("magcache", "max_skip_steps", {}),
            ("profile", "budget", {}), ("profile", "threshold", {})]


@settings(max_examples=60, deadline=None)
@given(profiles, st.sampled_from(SEARCHES), st.floats(0.0, 1.0), st.floats(0.05, 2.0), st.floats(0.01, 0.99),
       st.floats(0.3, 3.0))
def test_breakpoints_separate_the_predicted_patterns(profile, search, start, width, where, scale):
    strategy, param, fixed = search
    predictor = predictor_for(strategy, scale=scale)
    lo, hi = start, start + width
    if param in ("max_cached_steps", "max_skip_steps"):
        lo, hi = float(math.floor(lo * 3) + (param == "max_skip_steps")), float(math.floor(lo * 3) + 12)
    if param == "budget":
        hi = min(hi, 0.999)
        assume(lo < hi)
    points = predictor.breakpoints(profile, param, lo, hi, fixed)
    assert points == sorted(points) and all(lo < p < hi for p in points)

    def pattern(value):
        return predictor.predict(profile, {**fixed, param: value}).fractions

    if param in ("max_cached_steps", "max_skip_steps"):  # whole numbers: each breakpoint is where it changes
        changes = [float(k) for k in range(int(lo) + 1, int(hi)) if pattern(k) != pattern(k - 1)]
        assert changes == points
        return
    edges = [lo, *points, hi]
    middles = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
    for a, b, middle in zip(edges, edges[1:], middles):
        inside = a + (b - a) * where
        assert pattern(inside) == pattern(middle), f"the pattern changed inside ({a}, {b})"
    for left, right in zip(middles, middles[1:]):
        assert pattern(left) != pattern(right), "a breakpoint that changes nothing"


# -- order matters: a shuffled profile predicts worse ------------------------------------------------------------------
def fbcache_on_tensors(states: list[np.ndarray], threshold: float) -> list[bool]:
    """FBCache's rule on the real tensors: mean|x_s - x_ref| / mean|x_ref| against the last computed step."""
    reference, cached = states[0], [False]
    for state in states[1:]:
        if np.abs(state - reference).mean() / np.abs(reference).mean() <= threshold:
            cached.append(True)
        else:
            cached.append(False)
            reference = state
    return cached


def test_a_profile_with_shuffled_steps_predicts_worse():
    rng = np.random.default_rng(0)
    steps, drift = 24, rng.normal(size=4096)
    states = [rng.normal(size=4096) + 3.0]
    for s in range(1, steps):  # large changes early, small late, mostly in one direction
        size = 0.4 * math.exp(-s / 5) + 0.01
        states.append(states[-1] + size * np.abs(states[-1]).mean() * (drift + 0.3 * rng.normal(size=4096)) / 1.2)
    change = [np.abs(b - a).sum() / np.abs(a).sum() for a, b in zip(states, states[1:])]
    ordered = profile_of(change, layers=("blocks.0.attn", "blocks.1.attn"))
    predictor, levels = FBCachePredictor(), [0.05, 0.1, 0.2, 0.3, 0.5, 0.8]

    def wrong(profile: RedundancyProfile) -> int:
        return sum(predictor.predict(profile, {"threshold": t}).compare(
            [0.5 if c else 0.0 for c in fbcache_on_tensors(states, t)]).wrong for t in levels)

    right = wrong(ordered)
    shuffled = []
    for seed in range(10):
        order = np.random.default_rng(seed).permutation(steps - 1)
        shuffled.append(wrong(profile_of([change[i] for i in order], layers=ordered.layers)))
    assert right <= 0.1 * len(levels) * steps  # the summed change since the last computed step is close
    assert right < min(shuffled), (right, shuffled)


# -- calibration ---------------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(profiles, st.floats(0.02, 1.0), st.floats(0.2, 5.0), st.sampled_from(["fbcache", "cachedit", "magcache"]))
def test_calibration_fits_a_run_of_a_rescaled_cache(profile, threshold, factor, strategy):
    """A cache whose quantity is ``factor`` x the profile's: the calibrated predictor reproduces its run."""
    name = PREDICTORS[strategy].threshold
    params = {name: threshold, **({"warmup": 1} if strategy == "cachedit" else {})}
    truth = predictor_for(strategy, scale=factor).predict(profile, params)
    raw = predictor_for(strategy)
    calibrated = raw.calibrated(profile, truth.fractions, params)
    assert calibrated.predict(profile, params).compare(truth.fractions).wrong == 0
    assert calibrated.scale > 0 and type(calibrated) is type(raw)


def test_calibration_keeps_magcache_ratios_and_leaves_the_exact_schedule_alone():
    ratios = [1.0, 0.8, 0.9, 1.1, 0.95]
    calibrated = MagCachePredictor(ratios=ratios).calibrated(profile_of([0.1] * 4), [0, 0, 1, 0, 1],
                                                               {"threshold": 0.2, "retention_ratio": 0.0})
    assert calibrated.ratios == ratios
    profile = profile_of([0.1, 0.2, 0.3])
    assert ProfilePredictor().calibrated(profile, [0, 0.4, 0.2, 0], {"budget": 0.2}).scale == 1.0


# -- the search helpers --------------------------------------------------------------------------------------------
def test_value_for_and_the_bound_predictor():
    profile = profile_of([0.3, 0.2, 0.1, 0.05, 0.05, 0.05, 0.1, 0.2])
    predictor = FBCachePredictor()
    value = predictor.value_for(profile, 3, "threshold", 0.01, 1.0)
    assert 0.01 <= value <= 1.0 and count(predictor.predict(profile, {"threshold": value})) == 3
    bound = bind("fbcache", profile)
    assert bound.breakpoints("threshold", 0.01, 1.0) == predictor.breakpoints(profile, "threshold", 0.01, 1.0)
    measured = [0.0, 0.6, 0.0, 0.6, 0.6, 0.0, 0.6, 0.0, 0.0]
    at_zero = bound.predicted("threshold", 0.0, [0.0] * 9)  # nothing to calibrate on at 0
    assert at_zero["calibrated"] is None and at_zero["raw"]["wrong"] == 0 and bound.calibration is None
    first = bound.predicted("threshold", 0.2, measured)
    assert first["raw"]["steps"] == 9
    fit = first["calibrated"]  # on its own run, calibration fits the count first, then the steps
    assert (abs(fit["count_error"]), fit["wrong"]) <= (abs(first["raw"]["count_error"]), first["raw"]["wrong"])
    assert first["calibrated_on"] == 0.2 and bound.calibration is not None
    later = bound.predicted("threshold", 0.4, measured)
    assert later["calibrated_on"] == 0.2 and "scale" in later
    json.dumps([first, later])  # plain builtins


def test_prediction_error_counts():
    prediction = Prediction("fbcache", {"threshold": 0.1}, [0.0, 0.5, 0.5, 0.0, 0.5], [None, 0.1, 0.1, 0.2, 0.1])
    error = prediction.compare([0.0, 0.5, 0.0, 0.5, 0.5])
    assert (error.predicted_cached, error.measured_cached, error.wrong) == (3, 3, 2)
    assert (error.missed, error.extra, error.count_error) == ([3], [2], 0)
    assert error.right_share == pytest.approx(0.6) and error.fraction_error == pytest.approx(0.2)
    assert json.loads(json.dumps(error.as_dict()))["right_share"] == pytest.approx(0.6)


def test_the_predictors_speak_the_strategies_parameters():
    from pytest_ditredundancy.cache.cachedit import KNOBS

    for name, cls in PREDICTORS.items():
        assert {p.name for p in cls.params} <= set(STRATEGIES[name].params), name
    defaults = {p.name: p.default for p in CacheDitPredictor.params}
    assert {k: v.default for k, v in KNOBS.items() if k in defaults} == {k: v for k, v in defaults.items()
                                                                          if k in KNOBS}


# -- bad inputs ----------------------------------------------------------------------------------------------------
def test_bad_inputs_are_refused_with_the_fix():
    profile = profile_of([0.1, 0.2, 0.3])
    with pytest.raises(PredictInputError, match=r"no attention output series \(kind 'a'.*profile the model"):
        FBCachePredictor().predict(make_profile(np.full((1, 2, 5, 3), 0.1), kinds=("k",)), {"threshold": 0.1})
    with pytest.raises(PredictInputError, match="fbcache has no parameter 'rdt'; its parameters: threshold"):
        FBCachePredictor().predict(profile, {"rdt": 0.1})
    with pytest.raises(PredictInputError, match=r"lo < hi, got \[0.5, 0.5\]"):
        FBCachePredictor().breakpoints(profile, "threshold", 0.5, 0.5)
    with pytest.raises(PredictInputError, match=r"lo < hi, got \[0.6, 0.2\]"):
        FBCachePredictor().breakpoints(profile, "threshold", 0.6, 0.2)
    with pytest.raises(PredictInputError, match="has no parameter 'budget'"):
        FBCachePredictor().breakpoints(profile, "budget", 0.1, 0.2)
    nan = make_profile(np.full((1, 2, 5, 3), 0.1))
    nan.values["rel_l1"][0, 1, 1, 1, 1] = np.nan  # prompt, branch, kind a, layer, pair
    with pytest.raises(PredictInputError, match=r"non-finite rel_l1 at layer blocks.0.attn2, step pair 1, prompt 0, "
                                                r"branch cond.*profile again"):
        FBCachePredictor().predict(nan, {"threshold": 0.1})
    with pytest.raises(PredictInputError, match="threshold must be a finite number >= 0, got -0.1"):
        FBCachePredictor().predict(profile, {"threshold": -0.1})
    with pytest.raises(PredictInputError, match="must be a number, got 'x'"):
        FBCachePredictor().predict(profile, {"threshold": "x"})
    with pytest.raises(PredictInputError, match="Fn=4 \\+ Bn=1 blocks exceed the model's 4 transformer blocks; "
                                                "use Fn=1,Bn=0"):
        CacheDitPredictor().predict(profile, {"Fn": 4, "Bn": 1})
    with pytest.raises(PredictInputError, match="warmup must be a whole number, got 1.5"):
        CacheDitPredictor().predict(profile, {"warmup": 1.5})
    with pytest.raises(PredictInputError, match="does not model max_accumulated_rdt=0.3"):
        CacheDitPredictor().predict(profile, {"max_accumulated_rdt": 0.3})
    with pytest.raises(PredictInputError, match="mag_ratios=flux.*MagCachePredictor\\(ratios="):
        MagCachePredictor().predict(profile, {"mag_ratios": "flux"})
    with pytest.raises(PredictInputError, match="budget must be a finite number >= 0 and < 1, got 1.0"):
        ProfilePredictor().predict(profile, {"budget": 1.0})
    with pytest.raises(PredictInputError, match="no prediction for strategy 'pab'; the profile predicts fbcache, "
                                                "cachedit, magcache, profile"):
        predictor_for("pab")
    with pytest.raises(PredictInputError, match="calibration scale must be a finite number > 0"):
        FBCachePredictor(scale=0.0)
    prediction = FBCachePredictor().predict(profile, {"threshold": 0.1})
    with pytest.raises(PredictInputError, match="measured pattern has 3 steps, the profile 4; measure the cached run"):
        prediction.compare([0.0, 0.5, 0.5])
    with pytest.raises(PredictInputError, match=r"finite numbers in \[0, 1\]"):
        prediction.compare([0.0, float("nan"), 0.5, 0.5])
    with pytest.raises(PredictInputError, match="calibrate on a run with threshold > 0"):
        FBCachePredictor().calibrated(profile, [0, 0, 0, 0], {"threshold": 0.0})
    with pytest.raises(PredictInputError, match="fbcache needs at least 2 transformer blocks"):
        FBCachePredictor().predict(profile_of([0.1, 0.2], layers=("blocks.0.attn",)), {"threshold": 0.1})


# -- the trained PixArt: predicted against measured -----------------------------------------------------------------
@pytest.fixture(scope="module")
def pixart_runs():
    """The profile, and per-step shares skipped by FBCache (threshold 0.2) and by MagCache on its calibrated ratios
    (threshold 0.2), on trained-pixart with 4 shapes captions."""
    from pytest_ditredundancy.cache.measure import RunPlan, calibrate_magcache, run_once
    from pytest_ditredundancy.cache.spec import parse_spec
    from pytest_ditredundancy.profiling.runner import profile_model
    from pytest_ditredundancy.profiling.settings import resolve_run
    from pytest_ditredundancy.zoo.loading import load_model, resolve_spec

    spec = resolve_spec("trained-pixart")
    request = resolve_run(spec, num_prompts=4)
    plan = RunPlan(load_model(spec, device="cpu"), spec, request.settings, list(request.prompts),
                   request.settings.seed, request.batch_size)
    profile = profile_model(plan.pipe, prompts=request.prompts, device="cpu", as_model=spec)
    reference = run_once(plan, None, count=True).attention_calls_per_step

    def shares(setting, **kwargs):
        done = run_once(plan, parse_spec(setting), count=True, **kwargs).attention_calls_per_step
        return [1.0 - (done[s] if s < len(done) else 0) / reference[s] for s in range(len(reference))]

    mag = parse_spec("magcache:threshold=0.2")
    ratios = calibrate_magcache(plan, mag)
    return profile, shares("fbcache:threshold=0.2"), ratios, shares(mag.text, context=plan.context(mag_ratios=ratios))


def test_trained_pixart_fbcache_predicted_against_measured(pixart_runs):
    profile, measured, _, _ = pixart_runs
    prediction = FBCachePredictor().predict(profile, {"threshold": 0.2})
    error = prediction.compare(measured)
    # what a cached step skips is right: every block but the first, 6 of PixArt's 8 attention layers
    assert {round(m, 6) for m in measured} == {0.0, 0.75}
    assert {f for f in prediction.fractions if f} == {0.75}
    # measured here: 10 steps cached, 13 predicted, 5 steps wrong (docs/cache-tuning.md)
    assert error.measured_cached >= 6 and abs(error.count_error) <= 4 and error.wrong <= 7, error.as_dict()
    calibrated = FBCachePredictor().calibrated(profile, measured, {"threshold": 0.2})
    fit = calibrated.predict(profile, {"threshold": 0.2}).compare(measured)
    # the block residual changes about 1.5x as much as the first block's attention outputs: the count then fits,
    # but the alternating steps come out of phase (docs/cache-tuning.md)
    assert fit.count_error == 0 and 1 < calibrated.scale < 3, (calibrated, fit.as_dict())


def test_trained_pixart_magcache_rule_replays_exactly_on_its_own_ratios(pixart_runs):
    profile, _, ratios, measured = pixart_runs
    exact = MagCachePredictor(ratios=ratios).predict(profile, {"threshold": 0.2})
    assert exact.compare(measured).wrong == 0 and exact.cached_steps, exact.cached_steps
