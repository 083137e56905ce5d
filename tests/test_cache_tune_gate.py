"""Cache tuning end to end (pytester subprocesses on the tiny PixArt): the search stores its frontier, a later run
gates it both ways, bad input is refused before anything runs, nothing is stored on failure, and a cache setting
without a stored entry is judged by the model's floors instead of only asking for a baseline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from test_gate_end_to_end import NAN_MODEL

SUITES = Path(__file__).resolve().parent.parent / "suites"
MODEL = "--dit-model=tiny-pixart-alpha"
FAST = ["--dit-steps=6", "--dit-num-prompts=2", "--dit-cache-repeats=1", "-p", "no:cacheprovider",
        "-W", "ignore::DeprecationWarning", "--no-dit-cache-transfer"]
SEARCH = "--dit-cache-tune=profile:budget=0.1..0.6"


def setup(pytester: pytest.Pytester, conftest: str = "") -> None:
    shutil.copytree(SUITES, pytester.path / "suites", ignore=shutil.ignore_patterns("__pycache__"))
    pytester.makeini("[pytest]\n")
    if conftest:
        pytester.makeconftest(conftest)


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("suites", MODEL, *FAST, *args)


def stored(pytester: pytest.Pytester) -> tuple[Path, dict]:
    path = next((pytester.path / "baselines" / "tiny-pixart-alpha").glob("*.json"))
    return path, json.loads(path.read_text())


def test_bad_searches_and_floors_are_usage_errors_before_any_test(pytester):
    setup(pytester)
    for bad, message in [("--dit-cache-tune=fbcache:threshold=0.5..0.1", "empty or reversed"),
                         ("--dit-cache-tune=fbcache:treshold=0.1..0.5", "cannot tune 'treshold'"),
                         ("--dit-cache-floor=lpips:0.1", "unknown metric 'lpips'"),
                         ("--dit-cache-cliff=0", "positive number of dB")]:
        result = run(pytester, bad)
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        assert message in result.stderr.str()


def test_a_search_without_floors_or_with_unmeasurable_ones_fails_and_stores_nothing(pytester):
    setup(pytester)
    result = run(pytester, SEARCH, "--dit-update-baselines", "-k", "cache_tune")
    result.assert_outcomes(failed=1)
    assert "no quality floors to tune against: give them with --dit-cache-floor" in result.stdout.str()
    result = run(pytester, SEARCH, "--dit-cache-floor=psnr:30,adherence:1", "--dit-update-baselines", "-k", "cache_tune")
    result.assert_outcomes(failed=1)
    assert "tiny-pixart-alpha has no prompt-adherence classifier" in result.stdout.str()
    assert not (pytester.path / "baselines").exists() or not list((pytester.path / "baselines").rglob("*.json"))


def test_no_setting_keeps_the_floors_names_the_closest_and_stores_nothing(pytester):
    setup(pytester)
    result = run(pytester, SEARCH, "--dit-cache-floor=psnr:100", "--dit-update-baselines", "-k", "cache_tune")
    result.assert_outcomes(failed=1)
    text = result.stdout.str()
    assert "no setting in profile:budget=0.1..0.6 keeps the floors psnr:100; nothing was stored" in text
    assert "The closest is profile:budget=0.1: psnr" in text
    assert not list((pytester.path / "baselines").rglob("*.json"))
    written = json.loads((pytester.path / "dit-cache-tune" / "tiny-pixart-alpha--profile--budget--0.1..0.6.json").read_text())
    assert written["recommendation"] is None and written["best"]["setting"] == "profile:budget=0.1"


def test_a_tuning_is_stored_gated_and_fails_when_the_frontier_moves(pytester):
    setup(pytester)
    floors = "--dit-cache-floor=psnr:40,ssim:0.5"
    run(pytester, SEARCH, floors, "--dit-update-baselines", "-k", "cache_tune").assert_outcomes(passed=1)
    path, data = stored(pytester)
    entry = data["suites"]["cache_tune"]["profile:budget=0.1..0.6"]
    assert entry["floors"] == {"psnr": 40.0, "ssim": 0.5} and entry["recommendation"]["passes"]
    assert entry["runs"] == len(entry["frontier"]) >= 2
    values = [p["value"] for p in entry["frontier"]]
    assert values == sorted(values) and values[0] == 0.1 and values[-1] == 0.6
    chosen = entry["recommendation"]
    assert all(p["skipped"]["transformer"] <= chosen["skipped"]["transformer"] for p in entry["frontier"] if p["passes"])
    written = json.loads((pytester.path / "dit-cache-tune" / "tiny-pixart-alpha--profile--budget--0.1..0.6.json").read_text())
    assert written["recommendation"]["setting"] == chosen["setting"] and "applied(pipe" in written["code"]
    assert (pytester.path / "dit-cache-tune" / "tiny-pixart-alpha--profile--budget--0.1..0.6.schedule.json").exists()

    # the same code and model: the stored frontier is measured again and holds (floors come from the baseline)
    result = run(pytester, SEARCH, "-k", "cache_tune")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"tiny-pixart-alpha: ok; tuned profile:budget -> {chosen['value']:.4g}: skip *% PSNR *"])

    # other floors than the stored ones: tune again
    result = run(pytester, SEARCH, "--dit-cache-floor=psnr:45", "-k", "cache_tune")
    result.assert_outcomes(failed=1)
    assert "the floors changed from psnr:40,ssim:0.5 (stored with the tuning) to psnr:45" in result.stdout.str()

    # a frontier that moved fails with the numbers, both ways; so does a recommendation below the floors
    entry["frontier"][0]["quality"]["psnr"] += 10
    chosen_index = next(i for i, p in enumerate(entry["frontier"]) if p["value"] == chosen["value"])
    entry["frontier"][chosen_index]["skipped"]["transformer"] -= 0.1
    entry["floors"]["psnr"] = chosen["quality"]["psnr"] + 1
    path.write_text(json.dumps(data))
    result = run(pytester, SEARCH, "-k", "cache_tune")
    result.assert_outcomes(failed=1)
    text = result.stdout.str()
    assert "cache tuning profile:budget=0.1..0.6 on tiny-pixart-alpha changed" in text
    assert f"the stored recommendation {chosen['setting']} no longer keeps the floors" in text
    assert "profile:budget=0.1: PSNR" in text and "compute skipped" in text
    assert "--dit-update-baselines -k cache_tune" in text


def test_a_changed_cache_setting_is_judged_by_the_floors_not_just_missing(pytester):
    setup(pytester)
    run(pytester, "--dit-cache=profile:budget=0.2", "--dit-update-baselines", "-k", "cache_gate").assert_outcomes(passed=1)
    # no floors known anywhere: the old message, which now says how to give floors
    result = run(pytester, "--dit-cache=profile:budget=0.4", "-k", "cache_gate")
    result.assert_outcomes(failed=1)
    assert "no quality floors" in result.stdout.str() and "--dit-cache-floor=" in result.stdout.str()
    # floors that every cached setting breaks: fails, compared with the stored setting of the strategy
    result = run(pytester, "--dit-cache=profile:budget=0.4", "--dit-cache-floor=psnr:100", "-k", "cache_gate")
    result.assert_outcomes(failed=1)
    text = result.stdout.str()
    assert "profile:budget=0.4 has no stored entry of its own; judged against the floors psnr:100" in text
    assert "stored profile:budget=0.2: PSNR" in text and "psnr" in text and "below its floor 100" in text
    # floors it keeps: passes
    run(pytester, "--dit-cache=profile:budget=0.4", "--dit-cache-floor=psnr:1", "-k", "cache_gate").assert_outcomes(passed=1)
    # an update never accepts a setting that breaks the model's floors
    result = run(pytester, "--dit-cache=profile:budget=0.4", "--dit-cache-floor=psnr:100", "--dit-update-baselines",
                 "-k", "cache_gate")
    result.assert_outcomes(failed=1)
    assert "breaks the floors psnr:100" in result.stdout.str() and "Nothing was stored" in result.stdout.str()
    assert set(stored(pytester)[1]["suites"]["cache_gate"]) == {"profile:budget=0.2"}


def test_a_nan_model_fails_the_tuning(pytester):
    setup(pytester, NAN_MODEL)
    result = pytester.runpytest_subprocess("suites", "--dit-model=tiny-nan-pixart", *FAST, SEARCH,
                                           "--dit-cache-floor=psnr:30", "--dit-update-baselines", "-k", "cache_tune")
    result.assert_outcomes(failed=1)
    assert "non-finite" in result.stdout.str()
    assert not list((pytester.path / "baselines").rglob("*.json"))


def test_the_tuned_setting_is_rechecked_and_retuned_at_other_steps_and_schedulers(pytester):
    setup(pytester)
    args = [a for a in FAST if a != "--no-dit-cache-transfer"]
    result = pytester.runpytest_subprocess("suites", MODEL, *args, SEARCH, "--dit-cache-floor=psnr:40",
                                           "--dit-step-factors=2", "--dit-schedulers=euler,ddim",
                                           "--dit-update-baselines", "-k", "cache_tune")
    result.assert_outcomes(passed=1)
    entry = stored(pytester)[1]["suites"]["cache_tune"]["profile:budget=0.1..0.6"]
    transfer = {t["variant"].split(" (")[0].split(":")[0]: t for t in entry["transfer"]}
    assert set(transfer) == {"steps x2", "scheduler euler", "scheduler ddim"}
    for label in ("steps x2", "scheduler euler"):
        t = transfer[label]
        assert t["value"] == entry["recommendation"]["value"] and isinstance(t["holds"], bool)
        assert t["holds"] == (not t["failures"]) and t["runs"] >= 2
        assert t["tuned_value"] is None or 0.1 <= t["tuned_value"] <= 0.6
    assert transfer["steps x2"]["settings_key"].startswith("steps12-")


def test_an_update_is_held_to_the_stored_floors_and_a_retune_keeps_them(pytester):
    setup(pytester)
    run(pytester, SEARCH, "--dit-cache-floor=psnr:40", "--dit-update-baselines", "-k", "cache_tune").assert_outcomes(
        passed=1)
    # re-tuning without floors given keeps the stored ones
    run(pytester, SEARCH, "--dit-update-baselines", "-k", "cache_tune").assert_outcomes(passed=1)
    assert stored(pytester)[1]["suites"]["cache_tune"]["profile:budget=0.1..0.6"]["floors"] == {"psnr": 40.0}
    # a cache-gate update of a setting below the stored floors is refused, with no floors on the command line
    path, data = stored(pytester)
    data["suites"]["cache_tune"]["profile:budget=0.1..0.6"]["floors"] = {"psnr": 99.0}
    path.write_text(json.dumps(data))
    result = run(pytester, "--dit-cache=profile:budget=0.5", "--dit-update-baselines", "-k", "cache_gate")
    result.assert_outcomes(failed=1)
    text = result.stdout.str()
    assert "breaks the floors psnr:99 (stored with the tuning profile:budget=0.1..0.6)" in text
    assert "cache_gate" not in stored(pytester)[1]["suites"]
