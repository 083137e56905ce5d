"""A gate is worth what it fails: each case here is one a hostile user found passing or mislabelled.

Unit level (no model runs): non-finite values, baseline files that must not be trusted, updates that must
not destroy what they could not read, shards that lost series, regression vs claim verdicts, skips that
would hide a regression. The end-to-end versions run the suites in ``test_gate_end_to_end.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from pytest_ditredundancy.judging import statistics as stats
from pytest_ditredundancy.judging import verdicts
from pytest_ditredundancy.judging.baselines import BaselineError, BaselineStore, profile_section
from pytest_ditredundancy.plugin.cache_gate import CacheCheck
from pytest_ditredundancy.cache.quality import latent_mse, nonfinite_share, psnr
from pytest_ditredundancy.plugin.merge import MergeError, merge_profiles
from pytest_ditredundancy.capture.metrics import METRICS
from pytest_ditredundancy.capture.profile import ProfileMetadata, RedundancyProfile
from pytest_ditredundancy.profiling.schedulers import scheduler_rejection
from pytest_ditredundancy.judging.tolerances import resolve

METADATA = {"device_class": "cpu", "dtype": "float32", "settings": {"steps": 4}}


def make_profile(values: np.ndarray, computed: np.ndarray | None = None, model: str = "toy") -> RedundancyProfile:
    """``values``: [prompt, kind, layer, step_pair], one branch."""
    values = np.asarray(values, dtype=np.float32)[:, None]
    computed = np.ones(values.shape, bool) if computed is None else np.asarray(computed, bool)[:, None]
    p, _, k, l, s = values.shape
    return RedundancyProfile([f"blocks.{i}.attn" for i in range(l)], ["k", "v", "a"][:k], ["cond"],
                             {m: values.copy() for m in METRICS}, computed,
                             ProfileMetadata(model=model, steps=s + 1, timesteps=list(np.linspace(999, 0, s + 1))))


def stored_baseline(store: BaselineStore, model: str = "tiny-x", key: str = "k1") -> Path:
    mean = np.full((3, 2, 4), 0.5)
    section = profile_section(["k", "v", "a"], ["l0", "l1"], mean, mean * 0.1, metric="abs_l1", branch="cond",
                              times=[0.9, 0.6, 0.4, 0.1])
    return store.update(model, key, metadata=METADATA, sections={
        "profile": section, "suites.prompt_stability": {"a": {"robust_cv": 0.05, "paper_cv": 0.06, "ci": [0.04, 0.06]}}})


# -- non-finite values --------------------------------------------------------------------------------------
def test_nan_output_is_not_a_perfect_image():
    clean = np.full((1, 8, 8, 3), 0.5)
    broken = clean.copy()
    broken[0, 0, 0, 0] = np.nan
    assert math.isnan(psnr(clean, broken))  # was the 100 dB cap: "identical"
    assert math.isnan(latent_mse(clean, broken))
    assert nonfinite_share(broken) == pytest.approx(1 / broken.size)
    assert psnr(clean, clean) == 100.0  # identical finite output is still the cap


def test_a_nan_profile_is_refused_naming_where_it_started():
    values = np.ones((2, 3, 4, 5))
    values[:, 2, 3, 4] = np.nan  # later fallout
    values[1, 1, 2, 2] = np.inf  # the first bad cell: step pair 2, layer 2, kind v
    profile = make_profile(values)
    with pytest.raises(stats.NonFiniteProfileError) as info:
        stats.require_finite(profile)
    message = str(info.value)
    assert "layer blocks.2.attn (layer 3 of 4), kind v, step pair 2" in message and "non-finite" in message
    with pytest.raises(stats.NonFiniteProfileError):  # statistics refuse it too, instead of dropping the cells
        stats.prompt_stability(profile)
    assert stats.first_nonfinite(make_profile(np.ones((2, 3, 4, 5)))) is None


# -- baseline files ---------------------------------------------------------------------------------------------
def test_another_models_baseline_is_not_compared_as_drift(tmp_path):
    store = BaselineStore(tmp_path)
    source = stored_baseline(store, "tiny-a")
    target = store.path_for("tiny-b", "k1")
    target.parent.mkdir(parents=True)
    target.write_text(source.read_text())  # copied by hand: same layer names, another model
    with pytest.raises(BaselineError, match="belongs to model 'tiny-a', not 'tiny-b'"):
        store.load("tiny-b", "k1")
    renamed = store.path_for("tiny-a", "k2")
    renamed.write_text(source.read_text())
    with pytest.raises(BaselineError, match="settings_key 'k1', not 'k2'"):
        store.load("tiny-a", "k2")


@pytest.mark.parametrize("edit, where", [
    (lambda d: d["profile"]["spread"]["a"][0].__setitem__(1, "Infinity"), "profile.spread.a[0][1]"),
    (lambda d: d["tolerances"]["default"]["cpu"].__setitem__("relative_floor", "Infinity"),
     "tolerances.default.cpu.relative_floor"),
    (lambda d: d["profile"]["mean"]["k"][1].__setitem__(0, "0.5"), "profile.mean.k[1][0]"),
    (lambda d: d["profile"].pop("layers"), "profile.layers"),
    (lambda d: d["suites"]["prompt_stability"]["a"].pop("robust_cv"), "suites.prompt_stability.a.robust_cv"),
    (lambda d: d["profile"]["mean"]["v"].pop(), "profile.mean.v"),
    (lambda d: d["tolerances"]["default"]["cpu"].__setitem__("spread_factor", -1), "tolerances.default.cpu.spread_factor"),
])
def test_damaged_baseline_values_are_named_not_a_traceback(tmp_path, edit, where):
    store = BaselineStore(tmp_path)
    path = stored_baseline(store)
    data = json.loads(path.read_text())
    edit(data)
    text = json.dumps(data).replace('"Infinity"', "Infinity")  # a bare JSON Infinity, as Python writes it
    path.write_text(text)
    with pytest.raises(BaselineError) as info:
        store.load("tiny-x", "k1")
    assert where in str(info.value) and str(path) in str(info.value)


def test_infinite_tolerance_cannot_disable_the_check(tmp_path):
    store = BaselineStore(tmp_path)
    path = stored_baseline(store)
    path.write_text(path.read_text().replace('"absolute_floor": 1e-07', '"absolute_floor": Infinity', 1))
    with pytest.raises(BaselineError, match="tolerances.default.cpu.absolute_floor: expected a finite number, found inf"):
        store.load("tiny-x", "k1")


@pytest.mark.parametrize("damage", ["stray comma", "newer schema"])
def test_an_update_never_drops_sections_it_could_not_read(tmp_path, damage):
    store = BaselineStore(tmp_path)
    path = stored_baseline(store)
    text = path.read_text()
    text = text.replace('"model":', '"model":,', 1) if damage == "stray comma" else \
        text.replace('"schema_version": 2', '"schema_version": 3', 1)
    path.write_text(text)
    with pytest.raises(BaselineError, match="Refusing to update"):
        store.update("tiny-x", "k1", metadata=METADATA, sections={"suites.prompt_stability": {}})
    assert path.read_text() == text  # byte for byte: nothing lost


def test_newer_schema_names_the_upgrade(tmp_path):
    store = BaselineStore(tmp_path)
    path = stored_baseline(store)
    path.write_text(path.read_text().replace('"schema_version": 2', '"schema_version": 9', 1))
    with pytest.raises(BaselineError, match="newer pytest-ditredundancy.*upgrade the plugin"):
        store.load("tiny-x", "k1")


# -- merge ------------------------------------------------------------------------------------------------------
def test_merge_refuses_a_shard_that_lost_series():
    full = make_profile(np.ones((2, 3, 4, 5)))
    lost = np.ones((2, 3, 4, 5), bool)
    lost[:, :, 1:] = False  # 9 of 12 series gone
    partial = make_profile(np.where(lost, 1.0, np.nan), computed=lost)
    with pytest.raises(MergeError, match="prompts 2-3 is incomplete: it lacks 9 of 12 series"):
        merge_profiles([(0, 2, full), (2, 4, partial)], 4, "toy")
    assert merge_profiles([(0, 2, full), (2, 4, make_profile(np.ones((2, 3, 4, 5))))], 4, "toy").num_prompts == 4


# -- regression vs claim ---------------------------------------------------------------------------------------
def _stability(kind: str, cv: float) -> stats.PromptStability:
    return stats.PromptStability(kind, paper_cv=cv, robust_cv=cv, ci_low=cv * 0.9, ci_high=cv * 1.1, cells=10)


def test_prompt_stability_regression_uses_the_noise_tolerance_not_25_percent():
    stored = {"a": {"robust_cv": 0.05}}
    tolerance = resolve(None, "default", "cpu")
    same = verdicts.judge_prompt_stability([_stability("a", 0.05000001)], stored, tolerance, (0.0, 0.2))
    assert all(f.passed for f in same)
    moved = verdicts.judge_prompt_stability([_stability("a", 0.052)], stored, tolerance, (0.0, 0.2))  # +4%: was inside +-25%
    regression = [f for f in moved if f.question == "regression"]
    assert not regression[0].passed and "baseline 0.05" in regression[0].message
    strict = resolve(None, "strict", "cpu")
    assert not verdicts.judge_prompt_stability([_stability("a", 0.05001)], stored, strict, (0, 1))[0].passed


def test_claims_are_reported_separately_from_regressions():
    findings = verdicts.judge_prompt_stability([_stability("a", 0.3)], {"a": {"robust_cv": 0.3}},
                                               resolve(None, "default", "cpu"), (0.0, 0.2))
    regression, claim = findings
    assert regression.passed and regression.question == "regression"
    assert not claim.passed and claim.question == "claim" and "stability claim" in claim.message


def test_what_the_baseline_has_and_the_run_lacks_fails():
    tolerance = resolve(None, "default", "cpu")
    lost_kind = verdicts.judge_prompt_stability([_stability("a", 0.05)], {"a": {"robust_cv": 0.05},
                                                "k": {"robust_cv": 0.05}}, tolerance, (0, 1))
    assert [f.statistic for f in lost_kind if not f.passed] == ["robust_cv[k]"]
    stored = {"flow-heun/a": {"correlation": 0.9}, "flow-euler-karras/a": {"correlation": 0.95},
              "steps40/a": {"correlation": 0.99}}
    findings = verdicts.judge_shapes("scheduler_stability", {"flow-euler-karras/a": 0.95}, stored, tolerance, -1.0,
                                     unsupported={"flow-heun": "does not support custom sigmas"}, requested=set())
    failed = {f.statistic: f.message for f in findings if not f.passed}
    assert "unsupported[flow-heun]" in failed and "no longer runs" in failed["unsupported[flow-heun]"]
    assert "correlation[steps40/a]" in failed  # stored, never compared
    # an unsupported default variant the baseline never held is information, not a pass or a failure
    info = verdicts.judge_shapes("scheduler_stability", {}, None, tolerance, -1.0,
                                 unsupported={"flow-heun": "x"}, requested=set())
    assert [f.question for f in info] == ["info"]
    asked = verdicts.judge_shapes("scheduler_stability", {}, None, tolerance, -1.0, unsupported={"flow-heun": "x"},
                                  requested={"flow-heun"})
    assert not asked[0].passed  # the user asked for it explicitly


def test_only_the_diffusers_custom_sigmas_rejection_counts_as_unsupported():
    rejection = ValueError("The current scheduler class <class 'X'>'s `set_timesteps` does not support custom "
                           "sigmas schedules. Please check whether you are using the correct scheduler.")
    assert scheduler_rejection(rejection).startswith("The current scheduler class")
    assert scheduler_rejection(ValueError("scheduler config has a negative shift")) is None  # a real error
    assert scheduler_rejection(TypeError("step() got an unexpected keyword 'scheduler'")) is None


def test_a_missing_spearman_with_a_stored_floor_fails():
    values = {"psnr": 40.0, "skipped": 0.3, "spearman": None, "latent_mse": 1e-3}
    bounds = {"psnr": [39, 41], "skipped": [0.28, 0.32], "spearman": [0.5, None], "latent_mse": [9e-4, 1.1e-3]}
    failures = CacheCheck._failures(None, values, bounds, {"spearman": 0.7})
    assert len(failures) == 1 and "Spearman" in failures[0] and "could not be measured" in failures[0]
    assert CacheCheck._failures(None, {**values, "spearman": 0.69}, bounds, {"spearman": 0.7}) == []


def test_latent_mse_is_gated_both_ways():
    values = {"psnr": 40.0, "skipped": 0.3, "spearman": None, "latent_mse": 2e-3}
    bounds = {"psnr": [39, 41], "skipped": [0.28, 0.32], "latent_mse": [9e-4, 1.1e-3]}
    assert "latent MSE" in CacheCheck._failures(None, values, bounds, {"latent_mse": 1e-3})[0]
    assert "latent MSE" in CacheCheck._failures(None, {**values, "latent_mse": 1e-4}, bounds, {})[0]


def test_cells_regression_names_the_tolerance_level():
    base = np.full((1, 2, 3), 1.0)
    finding, drifts = verdicts.judge_cells(base * 1.0005, ["a"], ["l0", "l1"], base, base * 0,
                                           resolve(None, "default", "cpu"))
    assert finding.passed and not drifts
    finding, drifts = verdicts.judge_cells(base * 1.0005, ["a"], ["l0", "l1"], base, base * 0,
                                           resolve(None, "strict", "cpu"))
    assert not finding.passed and len(drifts) == 6 and finding.details["tolerance"]["level"] == "strict"


def test_stored_tolerances_are_used_and_validated(tmp_path):
    store = BaselineStore(tmp_path)
    path = stored_baseline(store)
    data = json.loads(path.read_text())
    data["tolerances"]["default"]["cpu"]["relative_floor"] = 0.5
    path.write_text(json.dumps(data))
    assert store.load("tiny-x", "k1").tolerance("default", "cpu").relative_floor == 0.5


def test_a_recorded_scheduler_compares_equal_after_any_file_round_trip():
    from pytest_ditredundancy.profiling.schedulers import comparable_scheduler

    recorded = {"class": "X", "config": {"lambda_min_clipped": float("-inf"), "beta_end": 0.0200000001, "x": [1.0]}}
    in_profile_json = {"class": "X", "config": {"lambda_min_clipped": "-inf", "beta_end": 0.0200000001, "x": [1.0]}}
    in_baseline = {"class": "X", "config": {"lambda_min_clipped": None, "beta_end": 0.02, "x": [1.0]}}
    assert comparable_scheduler(recorded) == comparable_scheduler(in_profile_json) == comparable_scheduler(in_baseline)
    assert comparable_scheduler(recorded) != comparable_scheduler({**recorded, "class": "Y"})
    assert comparable_scheduler(recorded) != comparable_scheduler({"class": "X", "config": {**recorded["config"],
                                                                                           "beta_end": 0.021}})


def test_flow_dpm_solver_keeps_the_flow_models_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from pytest_ditredundancy.profiling.schedulers import make_scheduler

    swapped = make_scheduler("flow-dpm-solver", FlowMatchEulerDiscreteScheduler(shift=3.0))
    assert swapped.config.flow_shift == 3.0  # it reads flow_shift and would silently sample shift 1


@pytest.mark.parametrize("foreign", [{"model": "tiny-sd3-medium"}, {"settings_key": "k0"},
                                     {"metadata": {**METADATA, "settings": {"steps": 4, "protocol": "paper"}}}])
def test_a_partial_update_never_relabels_another_runs_baseline(tmp_path, foreign):
    """A file copied from another model, settings key or protocol is refused by name, not rewritten as this one."""
    store = BaselineStore(tmp_path)
    path = stored_baseline(store, model="tiny-pixart-alpha", key="k1")
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, **foreign}))
    before = path.read_bytes()
    metadata = {**METADATA, "settings": {"steps": 4, "protocol": "project"}}
    with pytest.raises(BaselineError, match="Refusing to update .* another run") as failure:
        store.update("tiny-pixart-alpha", "k1", metadata=metadata,
                     sections={"suites.prompt_stability": {"a": {"robust_cv": 0.1}}})
    named = next(iter(foreign.values()))
    assert (repr(named) if isinstance(named, str) else "'paper'") in str(failure.value)
    assert path.read_bytes() == before
