"""The plugin seen from a user's side (pytester): options, ini, parametrization, markers, baselines, errors.

Runs that execute models use subprocesses: an in-process run would re-import parts of torch that may only
be imported once per process.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

SUITES = Path(__file__).resolve().parent.parent / "suites"
FAST = ["--dit-steps=6", "--dit-num-prompts=3", "--dit-step-factors=2", "-p", "no:cacheprovider"]


def use_suites(pytester: pytest.Pytester) -> Path:
    target = pytester.path / "suites"
    shutil.copytree(SUITES, target)
    pytester.makeini("[pytest]\n")
    return target


def test_options_are_grouped_with_ini_twins(pytester):
    result = pytester.runpytest("--help")
    text = result.stdout.str()
    assert "DiT redundancy profiling" in text
    for option in ("--dit-model", "--dit-device", "--dit-dtype", "--dit-prompts", "--dit-num-prompts", "--dit-steps",
                   "--dit-scheduler", "--dit-seed", "--dit-batch-size", "--dit-baseline-dir",
                   "--dit-update-baselines"):
        assert option in text
        assert option[2:].replace("-", "_").replace("dit_model", "dit_models") in text  # ini twin listed


def test_models_parametrize_tests_with_their_names_as_ids(pytester):
    pytester.makepyfile("def test_model(dit_model):\n    assert dit_model.name\n")
    result = pytester.runpytest("--collect-only", "-q", "--dit-model=tiny-dit-xl-2-256,tiny-sd3-medium",
                                "--dit-model=tiny-flux-dev")
    result.stdout.fnmatch_lines(["*test_model[[]tiny-dit-xl-2-256[]]", "*test_model[[]tiny-sd3-medium[]]",
                                 "*test_model[[]tiny-flux-dev[]]"])
    result = pytester.runpytest("--collect-only", "-q", "--dit-model=tiny-dit-xl-2-256,tiny-sd3-medium", "-k", "sd3")
    result.stdout.fnmatch_lines(["*test_model[[]tiny-sd3-medium[]]", "*1/2 tests collected*"])


def test_ini_selects_models_and_the_command_line_wins(pytester):
    pytester.makeini("[pytest]\ndit_models = tiny-dit-xl-2-256\ndit_num_prompts = 2\n")
    pytester.makepyfile("def test_model(dit_model, dit_session):\n"
                        "    assert dit_session.config.num_prompts == 2\n")
    pytester.runpytest("--collect-only", "-q").stdout.fnmatch_lines(["*test_model[[]tiny-dit-xl-2-256[]]"])
    pytester.runpytest("--collect-only", "-q", "--dit-model=tiny-flux-dev").stdout.fnmatch_lines(
        ["*test_model[[]tiny-flux-dev[]]"])


def test_default_selection_is_every_tiny_model(pytester):
    from pytest_ditredundancy.zoo import tiny_model_names

    pytester.makepyfile("def test_model(dit_model):\n    pass\n")
    result = pytester.runpytest("--collect-only", "-q")
    result.stdout.fnmatch_lines([f"*{len(tiny_model_names())} tests collected*"])


def test_header_names_models_device_and_versions(pytester):
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest("--dit-model=tiny-dit-xl-2-256")
    result.stdout.fnmatch_lines(["ditredundancy: models: tiny-dit-xl-2-256", "ditredundancy: device cpu*",
                                 "ditredundancy: torch *, diffusers *"])


def test_markers_are_registered_and_work(pytester):
    pytester.makepyfile(
        "import pytest\n"
        "@pytest.mark.dit_families('sd3')\n"
        "def test_only_sd3(dit_model):\n    assert dit_model.family == 'sd3'\n"
        "@pytest.mark.dit_gpu\n"
        "def test_needs_gpu():\n    pass\n"
    )
    result = pytester.runpytest_subprocess("--strict-markers", "-rs", "--dit-model=tiny-sd3-medium,tiny-dit-xl-2-256",
                                "--dit-device=cpu")
    result.assert_outcomes(passed=1, skipped=1, deselected=1)
    result.stdout.fnmatch_lines(["*needs a CUDA GPU; this run uses cpu*"])
    assert "dit_families" in pytester.runpytest_subprocess("--markers").stdout.str()


@pytest.mark.parametrize("args,message", [
    (["--dit-scheduler=eulr"], "unknown scheduler 'eulr'. Did you mean euler"),
    (["--dit-num-prompts=500"], "500 prompts requested but the shipped prompt set has only 72"),
    (["--dit-steps=1"], "--dit-steps must be at least 2"),
    (["--dit-cv-bounds=0.5,0.1"], "LO <= HI"),
    # a value given is a value used, or a usage error: never silently the default
    (["--dit-model="], "--dit-model is empty (an unset variable?)"),
    (["--dit-steps=0"], "--dit-steps must be at least 2 (a profile compares consecutive steps), got 0"),
    (["--dit-num-prompts=0"], "--dit-num-prompts must be at least 1, got 0"),
    (["--dit-device=foo"], "--dit-device=foo is not a device; valid values: auto, cpu, cuda, cuda:N"),
    (["--dit-dtype=int8"], "--dit-dtype=int8 is not a dtype the plugin runs; valid values: auto, float32, float16, "
                           "bfloat16"),
    (["--dit-batch-size=0"], "--dit-batch-size (ini dit_batch_size) must be at least 1, got 0"),
    (["--dit-cache-min-skipped=1"], "--dit-cache-min-skipped must lie in [0, 1), got 1.0"),
    (["--dit-model=tiny-pixart-alfa"], "--dit-model=tiny-pixart-alfa: unknown model 'tiny-pixart-alfa'. Did you mean: "
                                       "tiny-pixart-alpha"),
    (["--dit-model=tiny-sd3-medium", "--dit-baseline-name=sd3-medium", "--dit-model=tiny-flux-dev"],
     "select exactly one model with --dit-model (selected: tiny-sd3-medium, tiny-flux-dev)"),
])
def test_bad_options_are_usage_errors(pytester, args, message):
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest_subprocess(*args)  # validating schedulers imports diffusers
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()
    assert "Traceback" not in result.stdout.str() + result.stderr.str()


def test_empty_ini_values_are_usage_errors_too(pytester):
    pytester.makeini("[pytest]\ndit_models =\n")
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "dit_models (ini) is empty" in result.stderr.str()


def test_zero_is_a_value_like_any_other(pytester):
    """0 where 0 means something (a bound, a seed, a progress interval) is used as given, not as "unset"."""
    from pytest_ditredundancy.plugin.cache_options import read_cache_options
    from pytest_ditredundancy.plugin.option_steps import read_config

    config = pytester.parseconfig("--dit-cache-min-psnr=0", "--dit-cache-min-skipped=0", "--dit-seed=0",
                                  "--dit-progress-interval=0")
    options = read_cache_options(config)
    assert options.min_psnr == 0.0 and options.min_skipped == 0.0
    cfg = read_config(config)
    assert cfg.seed == 0 and cfg.progress_interval == 0.0
    unset = read_cache_options(pytester.parseconfig())
    assert unset.min_psnr is None and unset.min_skipped is None and read_config(pytester.parseconfig()).steps is None


def test_the_same_model_twice_runs_once(pytester):
    pytester.makepyfile("def test_model(dit_model):\n    pass\n")
    result = pytester.runpytest("--collect-only", "-q", "--dit-model=tiny-dit-xl-2-256,tiny-dit-xl-2-256",
                                "--dit-model=tiny-dit-xl-2-256")
    result.stdout.fnmatch_lines(["*test_model[[]tiny-dit-xl-2-256[]]", "*1 test collected*"])


def test_a_boolean_flag_of_the_ini_file_can_be_turned_off(pytester):
    pytester.makeini("[pytest]\ndit_update_baselines = true\n")
    pytester.makepyfile("def test_nothing():\n    pass\n")
    assert "(UPDATING)" in pytester.runpytest().stdout.str()
    result = pytester.runpytest("--no-dit-update-baselines")
    result.stdout.fnmatch_lines(["ditredundancy: device *, baselines in baselines"])
    assert "(UPDATING)" not in result.stdout.str()


def test_prompt_file_larger_request_names_the_file(pytester):
    prompts = pytester.path / "prompts.txt"
    prompts.write_text("a cat\na dog\n", encoding="utf-8")
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest_subprocess(f"--dit-prompts={prompts}", "--dit-num-prompts=3")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "prompts.txt has only 2" in result.stderr.str()


@pytest.mark.parametrize("env,message", [
    ({"HF_HUB_OFFLINE": "1"}, "--dit-model=someorg/somemodel: someorg/somemodel is not in the local Hugging Face "
                              "cache, and HF_HUB_OFFLINE=1 forbids downloading it"),
    ({"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"},  # nothing listens there: no network
     "--dit-model=someorg/somemodel: the Hugging Face Hub is unreachable (ConnectError"),
])
@pytest.mark.parametrize("workers", [[], ["-n", "2"]])
def test_an_unreachable_model_is_one_usage_error_before_anything_runs(pytester, monkeypatch, env, message, workers):
    if workers:
        pytest.importorskip("xdist")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    pytester.makepyfile("def test_a(dit_pipeline):\n    pass\n\ndef test_b(dit_profile):\n    dit_profile()\n")
    result = pytester.runpytest_subprocess("--dit-model=someorg/somemodel", *workers)
    output = result.stdout.str() + result.stderr.str()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert output.count(message) == 1, output
    assert "Traceback" not in output and "httpx" not in output and len(output.splitlines()) < 15, output


def test_a_model_that_fails_to_load_is_not_loaded_again(pytester):
    """A directory that only looks like a pipeline: the first test fails with the short reason, the next
    ones at once, without a second attempt (and without the loader's traceback)."""
    broken = pytester.mkdir("broken")
    (broken / "model_index.json").write_text('{"_class_name": "PixArtAlphaPipeline", "transformer": '
                                             '["diffusers", "PixArtTransformer2DModel"]}')
    pytester.makepyfile("def test_a(dit_profile):\n    dit_profile()\n\ndef test_b(dit_profile):\n    dit_profile()\n")
    result = pytester.runpytest_subprocess("--dit-model=./broken", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=2)
    text = result.stdout.str().split("short test summary info")[0]  # under CI the summary repeats messages
    assert text.count("could not load 'broken' from") == 2 and text.count("not retried") == 1
    assert "Traceback" not in text


def test_missing_baseline_fails_with_the_command_that_creates_it(pytester):
    use_suites(pytester)
    result = pytester.runpytest_subprocess("suites/test_prompt_stability.py", "--dit-model=tiny-dit-xl-2-256", *FAST)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*no prompt_stability baseline for tiny-dit-xl-2-256*",
                                 "*pytest suites --dit-model=tiny-dit-xl-2-256 --dit-num-prompts=3 --dit-steps=6 "
                                 "--dit-step-factors=2 --dit-update-baselines -k prompt_stability*"])


def test_update_then_compare_then_damaged_baseline(pytester):
    use_suites(pytester)
    args = ["suites", "--dit-model=tiny-dit-xl-2-256", *FAST]
    created = pytester.runpytest_subprocess(*args, "--dit-update-baselines")
    created.assert_outcomes(passed=4, skipped=3)  # the cache gate and tuning skip without --dit-cache(-tune)
    files = list((pytester.path / "baselines" / "tiny-dit-xl-2-256").glob("*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert set(data["suites"]) == {"prompt_stability", "step_stability", "scheduler_stability"}
    assert data["profile"]["layers"] and data["metadata"]["device_class"] == "cpu"
    pytester.runpytest_subprocess(*args).assert_outcomes(passed=4, skipped=3)

    # updating one suite keeps the others' sections
    before = data["suites"]["step_stability"]
    pytester.runpytest_subprocess(*args, "--dit-update-baselines", "-k", "prompt").assert_outcomes(passed=1, deselected=6)
    assert json.loads(files[0].read_text())["suites"]["step_stability"] == before

    files[0].write_text(files[0].read_text()[:200])
    damaged = pytester.runpytest_subprocess(*args, "-k", "baseline")
    damaged.assert_outcomes(failed=1, deselected=6)
    damaged.stdout.fnmatch_lines([f"*baseline *{files[0].name} is corrupt or truncated*--dit-update-baselines*"])
    assert len(files[0].read_text()) == 200  # never overwritten without the flag


def test_old_schema_and_layer_mismatch_are_explained(pytester):
    use_suites(pytester)
    args = ["suites/test_baseline_regression.py", "--dit-model=tiny-dit-xl-2-256", *FAST]
    pytester.runpytest_subprocess(*args, "--dit-update-baselines").assert_outcomes(passed=1)
    path = next((pytester.path / "baselines" / "tiny-dit-xl-2-256").glob("*.json"))
    data = json.loads(path.read_text())
    data["profile"]["layers"] = data["profile"]["layers"][:-1]
    for kind in data["profile"]["mean"]:
        data["profile"]["mean"][kind] = data["profile"]["mean"][kind][:-1]
        data["profile"]["spread"][kind] = data["profile"]["spread"][kind][:-1]
    path.write_text(json.dumps(data))
    result = pytester.runpytest_subprocess(*args)
    result.stdout.fnmatch_lines(["*has 1 attention layers, tiny-dit-xl-2-256 now has 2*"])
    data["schema_version"] = 0
    path.write_text(json.dumps(data))
    pytester.runpytest_subprocess(*args).stdout.fnmatch_lines(["*has schema version 0, this plugin reads version 2*"])


PERTURB = '''
from dataclasses import replace
import torch
from pytest_ditredundancy import get_spec, register_model

spec = get_spec("tiny-pixart-alpha")

def build(seed):
    pipe = spec.build(seed)
    with torch.no_grad():
        pipe.transformer.transformer_blocks[1].attn1.to_v.weight.mul_(3.0)
    return pipe

register_model(replace(spec, build=build), replace_existing=True)
'''


def test_a_perturbed_layer_fails_the_baseline_suite_and_is_named(pytester):
    use_suites(pytester)
    args = ["suites/test_baseline_regression.py", "--dit-model=tiny-pixart-alpha", *FAST]
    pytester.runpytest_subprocess(*args, "--dit-update-baselines").assert_outcomes(passed=1)
    pytester.makeconftest(PERTURB)
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(failed=1)
    text = result.stdout.str()
    assert "tiny-pixart-alpha drifted from its baseline" in text
    assert "largest drift at layer transformer_blocks.1.attn1" in text
    assert "layers by drifting cells: transformer_blocks.1.attn1" in text


def test_parallel_run_matches_serial_and_keeps_every_section(pytester):
    pytest.importorskip("xdist")
    use_suites(pytester)
    args = ["suites", "--dit-model=tiny-dit-xl-2-256,tiny-pixart-alpha", *FAST]
    pytester.runpytest_subprocess(*args, "-n", "2", "--dit-update-baselines").assert_outcomes(passed=9, skipped=4)
    for model in ("tiny-dit-xl-2-256", "tiny-pixart-alpha"):
        data = json.loads(next((pytester.path / "baselines" / model).glob("*.json")).read_text())
        assert set(data["suites"]) == {"prompt_stability", "step_stability", "scheduler_stability"}
        assert "profile" in data
    parallel = pytester.runpytest_subprocess(*args, "-n", "2")
    parallel.assert_outcomes(passed=9, skipped=4)
    serial = pytester.runpytest_subprocess(*args)
    serial.assert_outcomes(passed=9, skipped=4)
    summary = [line for line in serial.stdout.lines if line.startswith("tiny-")]
    assert summary and all(line in parallel.stdout.lines for line in summary)


SUMMARY = """
import os

def test_prompt_stability(dit_check):
    dit_check.prompt_stability()

def test_other(dit_model):
    {body}
"""


@pytest.mark.parametrize("body,workers", [("assert False, 'broken'", []), ("os._exit(3)", ["-n", "1"])])
def test_the_summary_never_says_ok_for_a_model_whose_test_failed_or_whose_worker_crashed(pytester, body, workers):
    """The prompt-stability records pass; the model's other test fails (serial) or kills its worker (-n 1: the
    records of the test the worker had finished come from its spool file, since it never finished)."""
    if workers:
        pytest.importorskip("xdist")
    pytester.makepyfile(test_models=SUMMARY.format(body=body))
    result = pytester.runpytest_subprocess("--dit-model=tiny-dit-xl-2-256", "--dit-steps=6", "--dit-num-prompts=3",
                                           "--dit-cv-bounds=0,1", "--dit-enforce-claims", "-p", "no:cacheprovider",
                                           "--dit-json=report.json", *workers)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["tiny-dit-xl-2-256: FAIL; *1 test failed, errored or crashed"])
    doc = json.loads((pytester.path / "report.json").read_text())
    records = [r for r in doc["records"] if r["suite"] == "prompt_stability"]
    assert records and all(r["passed"] for r in records)  # the passing test's records reached the controller
    assert doc["models"][0]["status"] == "failed"
