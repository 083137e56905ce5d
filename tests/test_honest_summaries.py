"""What the summaries say is true: a model whose tests did not all run is incomplete, never ok; a changed
checkpoint scheduler is explained as the harness uses it; a huge stored statistic fails with real numbers."""

from __future__ import annotations

import json

import numpy as np

from pytest_ditredundancy.judging import statistics as stats
from pytest_ditredundancy.judging.baselines import BaselineStore
from pytest_ditredundancy.judging.tolerances import resolve
from pytest_ditredundancy.judging.verdicts import judge_prompt_stability
from pytest_ditredundancy.plugin.terminal import summary_lines
from pytest_ditredundancy.report import build_document

from test_suite_verdicts import FakeSession, config, judge, stable_profile

MODEL = "tiny-dit-xl-2-256"
PASSED = {"model": MODEL, "suite": "prompt_stability", "statistic": "claim_cv[k]", "value": 0.1, "bounds": [0, 1],
          "passed": True, "question": "claim", "met": True, "kind": "k"}

INTERRUPTED = """
def test_prompt_stability(dit_check):
    dit_check.prompt_stability()

def test_interrupted(dit_model):
    raise KeyboardInterrupt

def test_never_ran(dit_model):
    pass

def test_never_ran_either(dit_model):
    pass
"""


def test_an_interrupted_model_is_incomplete_in_the_summary_and_the_report(pytester):
    pytester.makepyfile(test_models=INTERRUPTED)
    result = pytester.runpytest_subprocess(f"--dit-model={MODEL}", "--dit-steps=6", "--dit-num-prompts=3",
                                           "--dit-cv-bounds=0,1", "--dit-enforce-claims", "-p", "no:cacheprovider",
                                           "--dit-json=report.json")
    assert result.ret == 2  # interrupted
    lines = [line for line in result.stdout.lines if line.startswith(f"{MODEL}:")]
    assert len(lines) == 1 and lines[0].startswith(f"{MODEL}: incomplete; CV "), result.stdout.str()
    assert lines[0].endswith("; 3 tests did not run")  # the interrupted one and the two after it
    entry = json.loads((pytester.path / "report.json").read_text())["models"][0]
    assert entry["status"] == "incomplete" and len(entry["tests"]["not_run"]) == 3


def test_collecting_only_is_not_an_incomplete_run(pytester):
    pytester.makepyfile(test_models=INTERRUPTED)
    result = pytester.runpytest("--collect-only", "-q", f"--dit-model={MODEL}", "-p", "no:cacheprovider")
    assert "did not run" not in result.stdout.str() and "incomplete" not in result.stdout.str()


def test_tests_that_did_not_run_make_a_model_incomplete_and_a_failure_still_wins():
    assert summary_lines([PASSED]) == [f"{MODEL}: ok; CV k=0.100"]
    assert summary_lines([PASSED], not_run={MODEL: 1}) == [f"{MODEL}: incomplete; CV k=0.100; 1 test did not run"]
    assert summary_lines([], {MODEL: 1}, {MODEL: 2}) == [
        f"{MODEL}: FAIL; 1 test failed, errored or crashed; 2 tests did not run"]


def _document(results: dict[str, str], missing: list[str]) -> dict:
    tests = {"collected": len(results) + len(missing), "results": results, "messages": {},
             "missing": [{"nodeid": nodeid, "reason": "never ran"} for nodeid in missing]}
    return build_document(run={"models": [MODEL, "tiny-dit"]}, records=[PASSED], summaries=[], tests=tests,
                          environment={}, started=0.0, finished=1.0)


def test_the_reports_model_status_is_incomplete_when_a_test_of_it_never_ran():
    ran, later = f"t.py::test_a[{MODEL}]", f"t.py::test_b[{MODEL}]"
    doc = _document({ran: "passed"}, [later, "t.py::test_b[tiny-dit]"])
    assert doc["models"][0]["status"] == "incomplete" and doc["models"][0]["tests"]["not_run"] == [later]
    assert doc["models"][1]["status"] == "incomplete"
    assert _document({ran: "passed", later: "passed"}, [])["models"][0]["status"] == "passed"
    assert _document({ran: "failed"}, [later])["models"][0]["status"] == "failed"


# -- a checkpoint that ships another scheduler ------------------------------------------------------------------
DPM = {"class": "DPMSolverMultistepScheduler", "config": {"beta_end": 0.02, "solver_order": 2}}


def _scheduler_verdict(tmp_path, now: dict):
    store = BaselineStore(tmp_path)
    profile = stable_profile()
    profile.metadata.extra["checkpoint_scheduler"] = DPM
    judge(FakeSession(profile, store, config(update_baselines=True))).run("baseline_regression")
    changed = stable_profile()
    changed.metadata.extra["checkpoint_scheduler"] = now
    return judge(FakeSession(changed, store, config())).run("baseline_regression")


def test_a_changed_scheduler_config_is_said_to_move_the_numbers(tmp_path):
    verdict = _scheduler_verdict(tmp_path, {**DPM, "config": {**DPM["config"], "beta_end": 0.03}})
    assert verdict.outcome == "failed"
    message = verdict.message
    assert "ships another scheduler than its baseline" in message and "(config beta_end: 0.02 -> 0.03)" in message
    assert "would not show" not in message
    assert "from the checkpoint's scheduler config" in message and "moves the numbers" in message
    assert "the other suites may fail on them too" in message
    assert "restore the checkpoint's scheduler" in message and "--dit-update-baselines" in message


def test_a_changed_scheduler_class_alone_is_said_not_to_show_in_the_numbers(tmp_path):
    verdict = _scheduler_verdict(tmp_path, {**DPM, "class": "EulerDiscreteScheduler"})
    assert verdict.outcome == "failed"
    assert "(class DPMSolverMultistepScheduler in the baseline, EulerDiscreteScheduler now)" in verdict.message
    assert "the class alone does not show in the numbers" in verdict.message
    assert "'dpm-solver'" in verdict.message  # the scheduler the settings name, which the run uses


# -- a huge stored statistic ----------------------------------------------------------------------------------------
def _prompt_findings(stored_cv: float, ci: tuple[float, float] = (0.04, 0.06)):
    result = stats.PromptStability("k", 0.06, 0.05, *ci, 10)
    findings = judge_prompt_stability([result], {"k": {"robust_cv": stored_cv}}, resolve(None, "default", "cpu"),
                                      (0.0, 1.0))
    return next(f for f in findings if f.question == "regression")


def test_a_huge_stored_cv_fails_with_the_true_numbers_never_nan():
    for stored in (1e308, 1.7e308, 1e-300, 0.0):
        finding = _prompt_findings(stored)
        assert not finding.passed, stored  # a gate is worth what it fails
        assert "nan" not in finding.message, finding.message
        assert f"baseline {stored:.4g}" in finding.message and "robust CV 0.05" in finding.message
    assert "change by more than a factor of 1000" in _prompt_findings(1e308).message
    assert "-50% change" in _prompt_findings(0.1).message
    no_interval = _prompt_findings(0.1, ci=(float("nan"), float("nan"))).message
    assert "nan" not in no_interval and "no 95% CI" in no_interval


def test_a_non_finite_statistic_is_named_as_such():
    result = stats.PromptStability("k", float("nan"), float("nan"), float("nan"), float("nan"), 0)
    finding = judge_prompt_stability([result], {"k": {"robust_cv": 0.1}}, resolve(None, "default", "cpu"), (0, 1))[0]
    assert not finding.passed and "nan" not in finding.message and "not measured" in finding.message
    assert np.isnan(finding.value)
