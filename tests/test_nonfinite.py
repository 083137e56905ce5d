"""A NaN is named where the model first computed it, not where step-pair differences first see it.

A NaN weight in a middle block makes the *next* step's input NaN, so every layer's step pair 0 turns
non-finite, the first block's included; only the activations themselves (step 0) show the block that broke.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from pytest_ditredundancy import capture_redundancy, get_spec
from pytest_ditredundancy.capture.profile import RedundancyProfile
from pytest_ditredundancy.capture.sites import discover_sites
from pytest_ditredundancy.judging import statistics as stats
from pytest_ditredundancy.profiling.runner import call_kwargs, settings_for

from test_gate_end_to_end import nan_model

PROMPTS = ["a red bus on a bridge", "a cat asleep on a green sofa"]
STEPS = 3
#: model -> the self-attention layer of a middle block (FLUX: its first single-stream block)
MIDDLE = {
    "tiny-pixart-alpha": "transformer_blocks.1.attn1",
    "tiny-sd3-medium": "transformer_blocks.1.attn",
    "tiny-flux-dev": "single_transformer_blocks.0.attn",
}


def set_weight_nan(pipe, layer: str):
    """Put a NaN into ``layer``'s V projection; returns the undo."""
    weight = pipe.transformer.get_submodule(f"{layer}.to_v").weight
    saved = weight[0, 0].item()
    with torch.no_grad():
        weight[0, 0] = math.nan

    def undo() -> None:
        with torch.no_grad():
            weight[0, 0] = saved

    return undo


def capture(pipe, spec, sites=None) -> RedundancyProfile:
    settings = settings_for(spec, steps=STEPS, num_prompts=len(PROMPTS))
    generators = [torch.Generator("cpu").manual_seed(i) for i in range(len(PROMPTS))]
    with capture_redundancy(pipe, branch_layout=spec.branch_layout, sites=sites) as cap:
        pipe(**call_kwargs(spec, settings, PROMPTS, pipe, generators))
    return cap.profile(model=spec.name)


def refusal(profile: RedundancyProfile) -> str:
    with pytest.raises(stats.NonFiniteProfileError) as info:
        stats.require_finite(profile)
    return str(info.value)


@pytest.mark.parametrize("model", sorted(MIDDLE))
def test_the_first_nonfinite_activation_is_named(model, tiny_pipeline_cache):
    spec, pipe = get_spec(model), tiny_pipeline_cache(model)
    layer = MIDDLE[model]
    undo = set_weight_nan(pipe, layer)
    try:
        profile = capture(pipe, spec)
    finally:
        undo()
    first = profile.metadata.first_nonfinite
    assert (first["step"], first["layer"], first["kind"]) == (0, layer, "v"), first
    assert first["prompt"] == 0 and first["prompt_text"] == PROMPTS[0] and first["branch"] in profile.branches
    message = refusal(profile)
    assert f"step 0, layer {layer} (layer " in message and ", kind v, " in message, message
    assert f"prompt 0 ('{PROMPTS[0]}')" in message, message
    assert profile.layers[0] != layer and f"layer {profile.layers[0]} " not in message  # not the fallout

    # the JSON keeps it; a file without it (written before) is still named by its first step pair
    loaded = RedundancyProfile.from_json(profile.to_json())
    assert loaded.metadata.first_nonfinite == first and refusal(loaded) == message
    data = json.loads(profile.to_json())
    del data["metadata"]["first_nonfinite"]
    old = refusal(RedundancyProfile.from_json(json.dumps(data)))
    assert "step pair 0 (0->1)" in old and "first non-finite activation" not in old


def test_hook_order_not_site_order_decides(tiny_pipeline_cache):
    """Sites listed deepest first: the NaN of the first block still comes first, as the model computed it."""
    spec, pipe = get_spec("tiny-pixart-alpha"), tiny_pipeline_cache("tiny-pixart-alpha")
    sites = discover_sites(pipe.transformer)[::-1]
    undo = set_weight_nan(pipe, "transformer_blocks.0.attn1")
    try:
        profile = capture(pipe, spec, sites=sites)
    finally:
        undo()
    assert profile.layers[0] == "transformer_blocks.1.attn2"
    first = profile.metadata.first_nonfinite
    assert (first["step"], first["layer"], first["kind"]) == (0, "transformer_blocks.0.attn1", "v"), first


def test_the_whole_batch_branch_is_named(tiny_pipeline_cache):
    spec, pipe = get_spec("tiny-pixart-alpha"), tiny_pipeline_cache("tiny-pixart-alpha")
    settings = settings_for(spec, steps=STEPS, num_prompts=len(PROMPTS))
    undo = set_weight_nan(pipe, MIDDLE["tiny-pixart-alpha"])
    try:
        with capture_redundancy(pipe, branch_layout=spec.branch_layout, whole_batch=True) as cap:
            pipe(**call_kwargs(spec, settings, PROMPTS, pipe, [torch.Generator().manual_seed(0)] * 2))
    finally:
        undo()
    first = cap.profile().metadata.first_nonfinite
    assert (first["step"], first["kind"], first["branch"], first["prompt"]) == (0, "v", "batch", 0), first


def test_a_finite_profile_names_nothing(tiny_pipeline_cache):
    spec, pipe = get_spec("tiny-pixart-alpha"), tiny_pipeline_cache("tiny-pixart-alpha")
    profile = capture(pipe, spec)
    assert profile.metadata.first_nonfinite is None and stats.first_nonfinite(profile) is None
    assert "first_nonfinite" in json.loads(profile.to_json())["metadata"]


def test_selected_prompts_keep_their_own_entry(tiny_pipeline_cache):
    spec, pipe = get_spec("tiny-pixart-alpha"), tiny_pipeline_cache("tiny-pixart-alpha")
    undo = set_weight_nan(pipe, MIDDLE["tiny-pixart-alpha"])
    try:
        profile = capture(pipe, spec)
    finally:
        undo()
    assert profile.select_prompts([0, 1]).metadata.first_nonfinite == profile.metadata.first_nonfinite
    assert profile.select_prompts([1]).metadata.first_nonfinite is None  # its prompt index would be wrong
    assert "step pair 0" in refusal(profile.select_prompts([1]))


SUITES = Path(__file__).resolve().parent.parent / "suites"
NAN_V_MODEL = nan_model("tiny-nan-v-pixart", "to_v")


def test_the_plugin_prints_the_message_once_per_test(pytester):
    shutil.copytree(SUITES, pytester.path / "suites", ignore=shutil.ignore_patterns("__pycache__"))
    pytester.makeini("[pytest]\n")
    pytester.makeconftest(NAN_V_MODEL)
    pytester.makepyfile(test_own_check="def test_own_check(dit_check):\n    dit_check.profile()\n")
    result = pytester.runpytest_subprocess(
        "suites/test_prompt_stability.py", "suites/test_baseline_regression.py", "test_own_check.py",
        "--dit-model=tiny-nan-v-pixart", "--dit-steps=4", "--dit-num-prompts=2", "-p", "no:cacheprovider",
        "-W", "ignore::DeprecationWarning")
    result.assert_outcomes(failed=3)
    text = result.stdout.str()
    reports = text.split("short test summary info")[0]  # the summary repeats each message once more
    named = "first non-finite activation: step 0, layer transformer_blocks.1.attn1 (layer 3 of 4), kind v"
    assert reports.count(named) == 3, text
    assert reports.count("is non-finite (NaN or inf activations)") == 3, text
    assert "During handling of the above exception" not in text and "direct cause" not in text, text
    assert "from layer transformer_blocks.0.attn1" not in text
