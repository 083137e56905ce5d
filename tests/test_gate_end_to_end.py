"""The gate's hard cases end to end (pytester subprocesses on tiny models): a NaN model, claims vs
regressions, a checkpoint that ships another scheduler, a broken model under a family marker."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

SUITES = Path(__file__).resolve().parent.parent / "suites"
FAST = ["--dit-steps=6", "--dit-num-prompts=3", "--dit-step-factors=2", "--dit-cache-repeats=1",
        "--dit-cache-budgets=0.3", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning"]

def nan_model(name: str, projection: str) -> str:
    """A conftest registering ``name``: a tiny PixArt with one NaN weight in ``projection`` (e.g. ``to_k``) of its
    second block's self-attention."""
    return f'''
import math
from dataclasses import replace

import torch
from pytest_ditredundancy.zoo.registry import get_spec, register_model

base = get_spec("tiny-pixart-alpha")


def build(seed=0):
    pipe = base.build(seed)
    with torch.no_grad():
        pipe.transformer.transformer_blocks[1].attn1.{projection}.weight[0, 0] = math.nan
    return pipe


register_model(replace(base, name="{name}", build=build), replace_existing=True)
'''


#: a tiny PixArt with one NaN weight in the key projection of its second block
NAN_MODEL = nan_model("tiny-nan-pixart", "to_k")


def setup(pytester: pytest.Pytester, conftest: str = "") -> None:
    shutil.copytree(SUITES, pytester.path / "suites", ignore=shutil.ignore_patterns("__pycache__"))
    pytester.makeini("[pytest]\n")
    if conftest:
        pytester.makeconftest(conftest)


def baseline_files(pytester: pytest.Pytester) -> list[Path]:
    return sorted((pytester.path / "baselines").glob("*/*.json"))


def test_a_nan_model_fails_every_suite_and_is_never_stored(pytester):
    setup(pytester, NAN_MODEL)
    args = ["suites/test_prompt_stability.py", "suites/test_baseline_regression.py", "suites/test_cache_gate.py",
            "--dit-model=tiny-nan-pixart", "--dit-cache=profile:budget=0.3", *FAST]
    for extra in (["--dit-update-baselines"], []):
        result = pytester.runpytest_subprocess(*args, *extra)
        result.assert_outcomes(failed=3)
        text = result.stdout.str()
        assert text.count("non-finite") >= 3, text
        assert "step pair 0" in text and "no prompt_stability baseline" not in text
        assert "drift 0 cells" not in text and "unmeasured" not in text
        assert baseline_files(pytester) == []  # an update never stores a NaN profile


def test_claims_are_reported_and_enforced_only_when_asked(pytester):
    setup(pytester)
    # bounds no model meets: CV <= 0.001 and shape correlation >= 1
    args = ["suites/test_prompt_stability.py", "suites/test_step_stability.py", "--dit-model=tiny-pixart-alpha",
            "--dit-cv-bounds=0,0.001", "--dit-min-shape-correlation=1", *FAST]
    missing = pytester.runpytest_subprocess(*args)
    missing.assert_outcomes(failed=2)
    missing.stdout.fnmatch_lines(["*no prompt_stability baseline for tiny-pixart-alpha*", "*--dit-enforce-claims*"])

    claims_alone = pytester.runpytest_subprocess(*args, "--dit-enforce-claims")
    claims_alone.assert_outcomes(failed=2)
    # counted in the failure reports only: under CI pytest repeats whole messages in the short summary
    reports = claims_alone.stdout.str().split("short test summary info")[0]
    assert reports.count("breaks the paper's stability claim") == 2

    pytester.runpytest_subprocess(*args, "--dit-update-baselines").assert_outcomes(passed=2)
    reported = pytester.runpytest_subprocess(*args, "-W", "always::UserWarning")
    reported.assert_outcomes(passed=2)  # unchanged from the baseline: the claim is reported, not failed
    assert "DitClaimWarning" in reported.stdout.str()
    pytester.runpytest_subprocess(*args, "--dit-enforce-claims").assert_outcomes(failed=2)

    # a 3% move of the CV is a regression now (the old +-25% bounds passed it)
    path = baseline_files(pytester)[0]
    data = json.loads(path.read_text())
    data["suites"]["prompt_stability"]["a"]["robust_cv"] *= 1.03
    path.write_text(json.dumps(data))
    moved = pytester.runpytest_subprocess(*args, "-k", "prompt")
    moved.assert_outcomes(failed=1, deselected=1)
    moved.stdout.fnmatch_lines(["*changed from its baseline (default tolerance)*", "*a       robust CV * (baseline *"])


@pytest.fixture(scope="module")
def pixart_pipeline(tiny_pipeline_cache):
    """Loaded outside the pytester test: pytester forgets modules imported during a test, and torch parts must
    not be imported twice in one process."""
    import diffusers  # noqa: F401

    return tiny_pipeline_cache("tiny-pixart-alpha")


def test_a_checkpoint_that_ships_another_scheduler_fails_the_regression(pixart_pipeline, pytester):
    from diffusers import EulerDiscreteScheduler

    setup(pytester)
    pipe = pixart_pipeline
    checkpoint = pytester.path / "ckpt"
    pipe.save_pretrained(checkpoint)
    args = ["suites/test_baseline_regression.py", f"--dit-model={checkpoint}", *FAST]
    pytester.runpytest_subprocess(*args, "--dit-update-baselines").assert_outcomes(passed=1)
    pytester.runpytest_subprocess(*args).assert_outcomes(passed=1)
    type(pipe.scheduler).from_config(pipe.scheduler.config, solver_order=3).save_pretrained(checkpoint / "scheduler")
    changed = pytester.runpytest_subprocess(*args)
    changed.assert_outcomes(failed=1)
    changed.stdout.fnmatch_lines(["*ships another scheduler than its baseline*(config solver_order: 2 -> 3)*"])
    euler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    type(pipe)(**{**pipe.components, "scheduler": euler}).save_pretrained(checkpoint)  # model_index names the class
    swapped = pytester.runpytest_subprocess(*args)
    swapped.assert_outcomes(failed=1)
    swapped.stdout.fnmatch_lines(["*ships another scheduler than its baseline*(class DPMSolverMultistepScheduler in "
                                  "the baseline, EulerDiscreteScheduler now)*"])


def test_a_broken_model_under_a_family_marker_fails_instead_of_being_deselected(pytester):
    broken = pytester.path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json", encoding="utf-8")
    pytester.makeini("[pytest]\n")
    pytester.makepyfile(test_family='import pytest\n\n\n@pytest.mark.dit_families("pixart-alpha")\n'
                                    'def test_it(dit_model):\n    pass\n')
    result = pytester.runpytest_subprocess(f"--dit-model={broken}", "-p", "no:cacheprovider")
    assert result.ret != 0, result.stdout.str()
    assert "1 deselected" not in result.stdout.str()
