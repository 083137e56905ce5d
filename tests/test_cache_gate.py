"""The cache suite end to end (pytester subprocesses): store bounds, gate against them both ways, record
what the report draws, skip what a model cannot run, refuse another model's schedule."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

SUITES = Path(__file__).resolve().parent.parent / "suites"
FAST = ["--dit-steps=6", "--dit-num-prompts=2", "--dit-step-factors=2", "--dit-cache-repeats=1",
        "--dit-cache-budgets=0.2,0.5", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning",
        "--dit-json=report.json"]

def setup(pytester: pytest.Pytester) -> None:
    shutil.copytree(SUITES, pytester.path / "suites")
    pytester.makeini("[pytest]\n")


def records(pytester: pytest.Pytester) -> list[dict]:
    """The cache-gate records of the last run, from its JSON report (``--dit-json=report.json``)."""
    path = pytester.path / "report.json"
    found = [r for r in json.loads(path.read_text())["records"] if r["suite"] == "cache_gate"] if path.exists() else []
    path.unlink(missing_ok=True)
    return found


def baseline(pytester: pytest.Pytester, model: str) -> tuple[Path, dict]:
    path = next((pytester.path / "baselines" / model).glob("*.json"))
    return path, json.loads(path.read_text())


def test_suites_with_profile_schedule_and_fbcache_store_gate_and_record(pytester):
    setup(pytester)
    args = ["suites", "--dit-model=tiny-pixart-alpha", "--dit-cache=profile:budget=0.3", "--dit-cache=fbcache:threshold=0.2", *FAST]
    pytester.runpytest_subprocess(*args, "--dit-update-baselines").assert_outcomes(passed=6, skipped=2)
    path, data = baseline(pytester, "tiny-pixart-alpha")
    section = data["suites"]["cache_gate"]
    assert set(section) == {"profile:budget=0.3", "fbcache:threshold=0.2"}
    profile = section["profile:budget=0.3"]
    assert profile["bounds"]["psnr"][0] < profile["psnr"] and 0.25 < profile["skipped_attention"] < 0.35
    assert profile["schedule"]["layers"] == ["transformer_blocks.0.attn1", "transformer_blocks.0.attn2",
                                             "transformer_blocks.1.attn1", "transformer_blocks.1.attn2"]
    assert not any(row[0] for row in profile["schedule"]["mask"])  # step 0 is never skipped
    records(pytester)

    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(passed=6, skipped=2)
    result.stdout.fnmatch_lines(["tiny-pixart-alpha: ok;*cache profile:budget=0.3 PSNR * skip 29% x*"])
    found = {r["strategy"]: r for r in records(pytester)}
    record = found["profile:budget=0.3"]
    assert record["passed"] and record["statistic"] == "psnr" and record["schedule"]["source"] == "baseline"
    assert len(record["schedule"]["mask"]) == 4 and len(record["schedule"]["mask"][0]) == 6
    assert record["skipped"]["attention"] == pytest.approx(profile["skipped_attention"], abs=1e-6)
    assert {p["order"] for p in record["sweep"]} == {"cheapest", "costliest"} and len(record["sweep"]) == 4
    assert record["spearman"] is not None and record["speedup"] > 0 and 0 < record["ssim"] <= 1
    assert found["fbcache:threshold=0.2"]["schedule"] is None and found["fbcache:threshold=0.2"]["sweep"] is None

    # the gate is two-sided: worse quality fails, and so does an unexplained jump in skipped compute
    profile["bounds"]["psnr"] = [profile["psnr"] + 5, profile["psnr"] + 10]
    section["fbcache:threshold=0.2"]["bounds"]["skipped"] = [0.5, 0.6]
    data["suites"]["cache_gate"]["profile:budget=0.3"]["bounds"]["skipped"] = [0.0, 0.1]
    path.write_text(json.dumps(data))
    result = pytester.runpytest_subprocess(*args, "-k", "cache_gate")
    result.assert_outcomes(failed=2, deselected=6)
    text = result.stdout.str()
    assert "cache gate of tiny-pixart-alpha with profile:budget=0.3 changed" in text
    assert "below its bound" in text and "output quality regressed" in text
    assert "above its bound 0.1" in text and "unexplained jump" in text
    assert "the cache skips less: it got slower" in text  # fbcache skips 1/3, below 0.5
    assert "--dit-cache=profile:budget=0.3,fbcache:threshold=0.2 " in text and "--dit-update-baselines -k cache_gate" in text


def test_inert_unsupported_stored_and_foreign_strategies(pytester):
    from pytest_ditredundancy.cache.schedule import CacheSchedule

    setup(pytester)
    layers = [f"transformer_blocks.{b}.attn{i}" for b in range(2) for i in (1, 2)]
    CacheSchedule("tiny-pixart-alpha", layers, 6, [[False] * 6 for _ in layers]).save(pytester.path / "pixart.json")
    args = ["suites/test_cache_gate.py", "--dit-model=tiny-flux-dev,tiny-sd3-medium",
            "--dit-cache=profile:budget=0.3", "--dit-cache=fbcache", *FAST]
    created = pytester.runpytest_subprocess(*args, "--dit-update-baselines", "-rs")
    # fbcache never fires on tiny Flux at its default threshold: a baseline would gate a cache that does nothing
    created.assert_outcomes(passed=2, failed=1, skipped=1)
    created.stdout.fnmatch_lines(["*fbcache on tiny-flux-dev skipped no attention compute*",
                                  "*fbcache does not support tiny-sd3-medium: TypeError*diffusers/hooks/"
                                  "first_block_cache.py*"])
    assert set(baseline(pytester, "tiny-flux-dev")[1]["suites"]["cache_gate"]) == {"profile:budget=0.3"}

    # what the baseline holds and the run cannot do fails instead of skipping; a schedule stored for another
    # budget is not replayed
    path, data = baseline(pytester, "tiny-sd3-medium")
    data["suites"]["cache_gate"]["fbcache"] = dict(data["suites"]["cache_gate"]["profile:budget=0.3"], schedule=None)
    path.write_text(json.dumps(data))
    path, data = baseline(pytester, "tiny-flux-dev")
    data["suites"]["cache_gate"]["profile:budget=0.3"]["schedule"]["budget"] = 0.2
    path.write_text(json.dumps(data))
    compared = pytester.runpytest_subprocess(*args, "--dit-cache=profile:schedule=pixart.json")
    compared.assert_outcomes(passed=1, failed=5)
    text = compared.stdout.str()
    assert "fbcache on tiny-sd3-medium now fails" in text
    assert "the baseline's schedule was derived with budget=0.2, but the strategy asks for budget=0.3" in text
    compared.stdout.fnmatch_lines(["*cache schedule was derived for 'tiny-pixart-alpha' with 4 attention layers; "
                                   "tiny-flux-dev has 4 (first difference: schedule 'transformer_blocks.0.attn1', model "
                                   "'transformer_blocks.0.attn')*"])


def test_missing_cache_baseline_names_the_command(pytester):
    setup(pytester)
    result = pytester.runpytest_subprocess("suites/test_cache_gate.py", "--dit-model=tiny-pixart-alpha",
                                           "--dit-cache=none", *FAST)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*no cache_gate baseline for tiny-pixart-alpha with none*",
                                 "*pytest suites --dit-model=tiny-pixart-alpha * --dit-cache=none *"
                                 "--dit-update-baselines -k cache_gate*"])
    with_floor = pytester.runpytest_subprocess("suites/test_cache_gate.py", "--dit-model=tiny-pixart-alpha",
                                               "--dit-cache=none", "--dit-cache-min-psnr=30", *FAST)
    with_floor.assert_outcomes(passed=1)
