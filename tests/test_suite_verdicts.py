"""The suites return verdicts (no pytest below ``plugin/``): the outcome, its message, the records for the report,
the warnings and the baselines used. The plugin turns a verdict into a test outcome; a merge reads it directly."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from pytest_ditredundancy.judging.baselines import BaselineStore
from pytest_ditredundancy.judging.suites import DitClaimWarning, SuiteJudge, Verdict, judge_distinctness
from pytest_ditredundancy.profiling.settings import resolve_run
from pytest_ditredundancy.zoo import get_spec

from test_gate_soundness import make_profile

NODE = "suites/test_x.py::test_prompt_stability[tiny-pixart-alpha]"


@dataclass
class FakeSession:
    """A session serving one fixed profile (the suites' view of the plugin's or a merge's session)."""

    profile_of: Any
    store: BaselineStore
    config: Any
    device_class: str = "cpu"
    models: list[str] = field(default_factory=lambda: ["tiny-pixart-alpha"])

    def request(self, spec, *, steps=None, scheduler=None):
        return resolve_run(spec, prompts=[f"prompt {i}" for i in range(self.profile_of.num_prompts)], steps=4)

    def profile(self, request):
        return self.profile_of

    def spec(self, model):
        return get_spec(model)

    def selected_models(self):
        return self.models

    def baseline_name_for(self, spec):
        return spec.name

    def command(self, spec, *extra):
        return " ".join(["pytest suites", f"--dit-model={spec.name}", *extra])

    def baseline_metadata(self, profile, request):
        return {"device_class": "cpu", "dtype": profile.metadata.dtype,
                "settings": {**request.settings.__dict__, "prompt_source": request.prompt_source}}


def config(**changes):
    values = dict(tolerance="default", update_baselines=False, enforce_claims=False, cv_bounds=(0.0, 0.2),
                  min_shape_correlation=0.8, step_factors=(), schedulers=(), given={}, protocol="project")
    return SimpleNamespace(**{**values, **changes})


def stable_profile(noise: float = 0.05) -> Any:
    rng = np.random.default_rng(0)
    values = 0.5 + noise * rng.standard_normal((6, 3, 2, 3))
    return make_profile(values, model="tiny-pixart-alpha")


def judge(session) -> SuiteJudge:
    return SuiteJudge(session, get_spec("tiny-pixart-alpha"), NODE)


def test_a_nan_profile_is_a_failed_verdict_not_an_exception(tmp_path):
    values = np.full((4, 3, 2, 3), 0.5)
    values[1, 2, 1, 0] = np.nan
    session = FakeSession(make_profile(values), BaselineStore(tmp_path), config())
    verdict = judge(session).run("prompt_stability")
    assert isinstance(verdict, Verdict) and verdict.outcome == "failed"
    assert "non-finite" in verdict.message and verdict.records == []


def test_a_missing_baseline_fails_with_the_command_that_creates_it(tmp_path):
    session = FakeSession(stable_profile(), BaselineStore(tmp_path), config())
    verdict = judge(session).run("baseline_regression")
    assert verdict.outcome == "failed"
    assert "no baseline_regression baseline for tiny-pixart-alpha" in verdict.message
    assert "--dit-update-baselines -k baseline_regression" in verdict.message


def test_update_then_compare_passes_and_a_changed_profile_fails(tmp_path):
    store = BaselineStore(tmp_path)
    stored = judge(FakeSession(stable_profile(), store, config(update_baselines=True))).run("prompt_stability")
    assert stored.outcome == "passed" and len(stored.baselines_used) == 1
    same = judge(FakeSession(stable_profile(), store, config())).run("prompt_stability")
    assert same.outcome == "passed", same.message
    assert {r["suite"] for r in same.records} == {"prompt_stability"} and all(r["nodeid"] == NODE for r in same.records)
    assert same.result is not None  # the statistics, as dit_check.prompt_stability() returns them
    changed = judge(FakeSession(stable_profile(noise=0.15), store, config())).run("prompt_stability")
    assert changed.outcome == "failed" and "changed from its baseline" in changed.message


def test_a_broken_claim_is_a_warning_in_the_verdict_unless_enforced(tmp_path):
    store = BaselineStore(tmp_path)
    judge(FakeSession(stable_profile(), store, config(update_baselines=True))).run("prompt_stability")
    tight = judge(FakeSession(stable_profile(), store, config(cv_bounds=(0.0, 0.001)))).run("prompt_stability")
    assert tight.outcome == "passed" and any(isinstance(w, DitClaimWarning) for w in tight.warnings)
    enforced = judge(FakeSession(stable_profile(), store, config(cv_bounds=(0.0, 0.001), enforce_claims=True)))
    verdict = enforced.run("prompt_stability")
    assert verdict.outcome == "failed" and "--dit-enforce-claims" in verdict.message


def test_distinctness_of_one_model_is_skipped_and_an_unknown_suite_is_refused(tmp_path):
    session = FakeSession(stable_profile(), BaselineStore(tmp_path), config())
    verdict = judge_distinctness(session, NODE)
    assert verdict.outcome == "skipped" and "two or more models" in verdict.message
    with pytest.raises(ValueError, match="unknown suite 'prompt'"):
        judge(session).run("prompt")


def test_a_second_run_does_not_repeat_the_first_runs_records(tmp_path):
    store = BaselineStore(tmp_path)
    judge(FakeSession(stable_profile(), store, config(update_baselines=True))).run("prompt_stability")
    one = judge(FakeSession(stable_profile(), store, config()))
    first, second = one.run("prompt_stability"), one.run("prompt_stability")
    assert len(first.records) == len(second.records) > 0 and one.records == []
