"""The capture's memory mode end to end: ``plan`` predicts each mode's peak, ``--dit-capture-memory`` reaches the
capture through the run request, and the real-scale and GPU-check benchmarks run dry on the CPU.

The dry runs check the bookkeeping, not the speed: every model of the real-scale benchmark builds at its real
architecture (shrunk to one block), runs with capture, and the bytes the capture keeps equal the plan's
prediction for the same settings exactly.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from pytest_ditredundancy.capture.batched_stats import MEMORY_MODES
from pytest_ditredundancy.profiling.capture_plan import plan_capture
from pytest_ditredundancy.profiling.capture_plan_text import fit_on_gpu, format_plan

ROOT = Path(__file__).resolve().parent.parent


def test_plan_peaks_per_memory_mode():
    pixart = plan_capture("pixart-alpha")  # one transformer call per step (batched guidance)
    assert pixart.call_bytes == pixart.held_bytes
    assert pixart.peak_bytes("fast") == 2 * pixart.held_bytes
    assert pixart.peak_bytes("low") == pixart.held_bytes + pixart.transient_bytes("eager")
    wan = plan_capture("wan2.1")  # guidance as two calls per step: one call holds half a step
    assert wan.call_bytes == wan.held_bytes // 2 and wan.peak_bytes("fast") == wan.held_bytes + wan.held_bytes // 2
    with pytest.raises(ValueError, match="fast or low"):
        pixart.peak_bytes("tiny")
    text = format_plan(pixart)
    assert "capture peak, memory=fast" in text and "capture peak, memory=low" in text


def test_plan_at_other_settings_scales_with_tokens_and_dtype():
    base = plan_capture("pixart-alpha")
    half = plan_capture("pixart-alpha", height=512, width=512, dtype="float32")
    assert half.image_tokens == base.image_tokens // 4
    with pytest.raises(ValueError, match="unknown dtype"):
        plan_capture("pixart-alpha", dtype="int8")


def test_fit_picks_fast_when_it_fits_and_low_when_only_that_fits():
    plan = plan_capture("flux-dev")
    roomy = fit_on_gpu(plan, 141 * 10**9)
    assert roomy.memory == "fast" and roomy.capture_bytes == plan.peak_bytes("fast")
    only_low = plan.model_bytes + plan.peak_bytes("low") + 10**6
    tight = fit_on_gpu(plan, only_low)
    assert tight.memory == "low" and tight.fits
    assert "memory=auto picks low" in format_plan(plan, only_low)
    assert "memory=auto picks fast" in format_plan(plan, 141 * 10**9)


def test_the_option_values_are_the_capture_modes():
    from pytest_ditredundancy.plugin.options import CAPTURE_MEMORY

    assert CAPTURE_MEMORY == MEMORY_MODES


def test_a_bad_option_value_is_a_usage_error(pytester):
    from pytest_ditredundancy.plugin.option_steps import read_config

    config = pytester.parseconfig("--dit-capture-memory=small")
    with pytest.raises(pytest.UsageError, match="--dit-capture-memory.*auto, fast, low"):
        read_config(config)


def test_the_option_reaches_the_capture_through_the_run_request(tmp_path, tiny_pipeline_cache):
    from pytest_ditredundancy.plugin.options import DitConfig
    from pytest_ditredundancy.plugin.session import DitSession
    from pytest_ditredundancy.profiling.runner import run_profile

    config = DitConfig(models=(), device="cpu", dtype="auto", prompts=("a red bus",), prompt_source="",
                       num_prompts=1, steps=3, scheduler=None, seed=0, batch_size=1, baseline_dir=tmp_path,
                       update_baselines=False, step_factors=(), schedulers=(), cv_bounds=(0.0, 1.0),
                       min_shape_correlation=0.0, capture_memory="low")
    session = DitSession.from_config(config)
    request = session.request(session.spec("tiny-pixart-alpha"))
    assert request.capture_memory == "low"
    assert request.key == session.request(session.spec("tiny-pixart-alpha")).key  # not part of the key
    pipe = tiny_pipeline_cache("tiny-pixart-alpha")
    for memory in ("low", "fast"):
        profile = run_profile(pipe, replace(request, capture_memory=memory))
        assert profile.metadata.extra["step_stats"]["memory"] == memory


def run_module(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_real_scale_dry_run_matches_the_plan_for_every_architecture(tmp_path):
    out = tmp_path / "real_scale.json"
    done = run_module("benchmarks.real_scale", "--device", "cpu", "--quick", "--steps", "2", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text(encoding="utf-8"))
    names = [row["model"] for row in report["models"]]
    assert names == ["flux-dev", "pixart-alpha", "sd3-medium", "cogvideox-5b", "latte-1", "mochi-1",
                     "open-sora-1.2", "wan2.1", "sana"] and report["skipped"] == []
    for row in report["models"]:
        assert row["plain_seconds_per_step"] > 0 and row["captured_seconds_per_step"] > 0, row["model"]
        assert row["memory"]["measured"] == row["memory"]["predicted"] > 0, row["model"]  # plan == capture, exactly
        assert row["profile_ok"], row["model"]
    assert "open-sora-1.2" in done.stdout and "measured MiB" in done.stdout


def test_real_scale_refuses_bad_input():
    done = run_module("benchmarks.real_scale", "--device", "cpu")
    assert done.returncode == 2 and "add --quick" in done.stderr
    done = run_module("benchmarks.real_scale", "--device", "cpu", "--quick", "--models", "flux-dv")
    assert done.returncode == 2 and "unknown model(s) ['flux-dv']" in done.stderr


def test_gpu_check_dry_run_gathers_every_part(tmp_path):
    done = run_module("benchmarks.gpu_check", "--device", "cpu", "--quick", "--out", str(tmp_path), timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text(encoding="utf-8"))
    assert report["ok"] is True and set(report["parts"]) == {"cuda_tests", "capture", "real_scale"}
    tests = report["parts"]["cuda_tests"]["summary"]
    assert tests["tests"] > 0 and tests["failures"] == tests["errors"] == 0  # skipped here: no GPU
    assert report["parts"]["capture"]["result"]["rows"]
    assert len(report["parts"]["real_scale"]["result"]["models"]) == 9
