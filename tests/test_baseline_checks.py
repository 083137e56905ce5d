"""Does a stored baseline fit this run (``judging/baseline_checks.py``)? Each mismatch must be named, with
the place for the re-creating command, and a baseline that fits must pass."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest

from pytest_ditredundancy.judging.baseline_checks import FIX, layout_mismatch, scheduler_mismatch, settings_mismatch
from pytest_ditredundancy.judging.baselines import Baseline
from pytest_ditredundancy.profiling.settings import RunSettings

SETTINGS = RunSettings(steps=6, scheduler="dpm-solver", seed=0, num_prompts=3, height=32, width=32, num_frames=None,
                       guidance_scale=4.5)
PATH = Path("baselines/tiny/steps6.json")


def baseline(**metadata) -> Baseline:
    return Baseline(PATH, "tiny", SETTINGS.key(), {"metadata": metadata})


def profile(layers=("l0", "l1"), kinds=("k", "v", "a"), pairs=5, scheduler=None):
    return SimpleNamespace(layers=list(layers), kinds=list(kinds), num_step_pairs=pairs,
                           metadata=SimpleNamespace(extra={} if scheduler is None else {"checkpoint_scheduler": scheduler}))


def test_a_baseline_without_recorded_settings_or_with_other_settings_is_refused():
    missing = settings_mismatch(baseline(), SETTINGS)
    assert "does not record its run settings (metadata.settings)" in missing and FIX in missing
    other = settings_mismatch(baseline(settings={**asdict(SETTINGS), "steps": 20}), SETTINGS)
    assert "was recorded with other settings (steps: 20 there, 6 now)" in other and FIX in other
    assert settings_mismatch(baseline(settings=asdict(SETTINGS)), SETTINGS) is None


@pytest.mark.parametrize("layers, kinds, pairs, expected", [
    (["l0"], ["k", "v", "a"], 5, "has 1 attention layers, tiny now has 2 (first difference: count)"),
    (["l1", "l0"], ["k", "v", "a"], 5, "has 2 attention layers, tiny now has 2 (first difference: l1 vs l0)"),
    (["l0", "l1"], ["k", "v", "a"], 4, "has 4 step pairs, this run has 5"),
    (["l0", "l1"], ["k", "v", "a", "k_text"], 5, "has kinds ['k_text'] that this run did not capture"),
    (["l0", "l1"], ["k", "v"], 5, "this run captured kinds ['a'] that baseline"),
])
def test_a_baseline_of_another_layout_is_refused(layers, kinds, pairs, expected):
    message = layout_mismatch(baseline(), kinds, layers, pairs, profile(), "tiny")
    assert expected in message and FIX in message


def test_a_baseline_of_the_same_layout_fits():
    assert layout_mismatch(baseline(), ["k", "v", "a"], ["l0", "l1"], 5, profile(), "tiny") is None


def test_a_checkpoint_scheduler_is_compared_only_where_both_sides_recorded_it():
    dpm = {"class": "DPMSolverMultistepScheduler", "config": {"beta_end": 0.02}}
    assert scheduler_mismatch(baseline(checkpoint_scheduler=dpm), profile(scheduler=dpm), "tiny", None) is None
    assert scheduler_mismatch(baseline(), profile(scheduler=dpm), "tiny", None) is None
    changed = scheduler_mismatch(baseline(checkpoint_scheduler=dpm),
                                 profile(scheduler={**dpm, "config": {"beta_end": 0.03}}), "tiny", None)
    assert "(config beta_end: 0.02 -> 0.03)" in changed and FIX in changed
