"""The detection-power benchmark refuses bad input before any model runs, and a saved copy of a registered model
is profiled with that model's settings (``profile_model(..., as_model=NAME)``), as the plugin judges one.

Every bad-input case exits with status 4 (a usage error), says what is wrong and what to do, and leaves nothing
behind: the checks run before the first profile, so a run is never lost to an output path found bad at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import gate_power
from pytest_ditredundancy import load_model, profile_model
from pytest_ditredundancy.zoo import get_spec, resolve_spec

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def no_model_runs(monkeypatch):
    """Any model load or profile fails the test: a bad input must be refused before the work."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model ran although the input was bad")

    monkeypatch.setattr(gate_power, "load_model", refuse)
    monkeypatch.setattr(gate_power, "profile_model", refuse)
    monkeypatch.setattr(gate_power, "profiles_of", refuse)


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _usage_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exited:
        gate_power.main(argv)
    assert exited.value.code == 4
    captured = capsys.readouterr()
    assert "measured" not in captured.err and not captured.out.strip()
    return captured.err


def test_unknown_model_lists_close_names(tmp_path, capsys, no_model_runs):
    err = _usage_error(["--model", "tiny-flux-de", "--out", str(tmp_path / "out" / "power.json")], capsys)
    assert "unknown model 'tiny-flux-de'" in err and "tiny-flux-dev" in err
    err = _usage_error(["--model", "nosuch", "--out", str(tmp_path / "out" / "power.json")], capsys)
    assert "unknown model 'nosuch'" in err
    assert _files(tmp_path) == []


def test_output_directory_is_refused_before_the_run(tmp_path, capsys, no_model_runs):
    err = _usage_error(["--model", "tiny-pixart-alpha", "--quick", "--out", str(tmp_path)], capsys)
    assert "--out" in err and "is a directory" in err
    assert _files(tmp_path) == []


def test_output_under_a_file_is_refused_before_the_run(tmp_path, capsys, no_model_runs):
    blocker = tmp_path / "results.txt"
    blocker.write_text("not a directory\n", encoding="utf-8")
    err = _usage_error(["--model", "tiny-pixart-alpha", "--out", str(blocker / "sub" / "power.json")], capsys)
    assert "--out" in err and "results.txt" in err and "not a directory" in err
    assert _files(tmp_path) == ["results.txt"]


def test_too_few_prompts_is_a_usage_error(tmp_path, capsys, no_model_runs):
    err = _usage_error(["--model", "tiny-pixart-alpha", "--prompts", "2", "--out", str(tmp_path / "p.json")], capsys)
    assert "--prompts" in err
    err = _usage_error(["--model", "trained-pixart", "--prompts", "500", "--out", str(tmp_path / "p.json")], capsys)
    assert "--prompts" in err and "shapes" in err
    assert _files(tmp_path) == []


def test_hub_model_offline_suggests_the_tiny_twin(tmp_path):
    """A real process (the exit status itself), offline with an empty cache: refused at once, nothing written."""
    out = tmp_path / "out" / "power.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-m", "benchmarks.gate_power", "--model", "flux-dev", "--out", str(out)],
                          cwd=ROOT, check=False, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 4, done.stderr[-2000:]
    assert "HF_HUB_OFFLINE" in done.stderr and "tiny-flux-dev" in done.stderr
    assert "Traceback" not in done.stderr and "measured" not in done.stderr
    assert not out.parent.exists()


def _assert_same_profile(a, b) -> None:
    assert a.metadata.extra["settings_key"] == b.metadata.extra["settings_key"]
    assert a.metadata.prompts == b.metadata.prompts and a.layers == b.layers and a.kinds == b.kinds
    for metric in a.values:
        np.testing.assert_array_equal(a.values[metric], b.values[metric])


def test_saved_copy_profiled_as_the_registered_model(tmp_path, tiny_pipeline_cache):
    tiny_pipeline_cache("tiny-pixart-alpha").save_pretrained(tmp_path / "copy")
    registered = profile_model("tiny-pixart-alpha", num_prompts=2, device="cpu")
    as_path = profile_model(tmp_path / "copy", as_model="tiny-pixart-alpha", num_prompts=2, device="cpu")
    _assert_same_profile(registered, as_path)
    loaded = load_model(tmp_path / "copy", device="cpu")  # an already loaded pipeline takes it too
    _assert_same_profile(registered, profile_model(loaded, as_model="tiny-pixart-alpha", num_prompts=2))


def test_saved_copy_without_as_model_names_the_inferred_settings(tmp_path, tiny_pipeline_cache):
    tiny_pipeline_cache("tiny-pixart-alpha").save_pretrained(tmp_path / "copy")
    from pytest_ditredundancy.zoo.loading import InferredSettingsWarning

    spec = resolve_spec(tmp_path / "copy")
    with pytest.warns(InferredSettingsWarning) as warned:
        profile_model(tmp_path / "copy", num_prompts=1, steps=2, device="cpu")
    message = str(warned[0].message)
    assert str(tmp_path / "copy") in message and "PixArtAlphaPipeline" in message
    for shown in (f"{spec.steps} steps", f"guidance {spec.guidance_scale:g}", f"scheduler {spec.scheduler}",
                  "use_resolution_binning", "as_model=", "tiny-pixart-alpha"):
        assert shown in message, (shown, message)


def test_borrowed_settings_include_the_call_arguments(tmp_path, tiny_pipeline_cache):
    """trained-sd3 runs with max_sequence_length=16: a saved copy judged as it must too (the plugin's
    --dit-baseline-name and profile_model's as_model= share this one rule)."""
    tiny_pipeline_cache("tiny-sd3-medium").save_pretrained(tmp_path / "sd3")
    spec = resolve_spec(tmp_path / "sd3").with_settings_of(get_spec("trained-sd3"))
    trained = get_spec("trained-sd3")
    assert spec.call_kwargs == {"max_sequence_length": 16} and spec.prompt_set == "shapes"
    assert (spec.steps, spec.height, spec.scheduler) == (trained.steps, trained.height, trained.scheduler)
    assert spec.checkpoint == str((tmp_path / "sd3").resolve()) and not spec.trained


def test_scheduler_variant_skips_what_the_pipeline_rejects():
    """FLUX passes custom sigmas, which flow-Heun cannot take: the benchmark names the reason and takes the next
    compatible scheduler instead of crashing."""
    chosen, rejected = gate_power.scheduler_variant("tiny-flux-dev", get_spec("tiny-flux-dev"), "a red bus")
    assert chosen not in (None, "flow-euler", "flow-heun")
    assert "does not support custom" in rejected["flow-heun"]
