"""The gating use: "is this new checkpoint still like the old one?". A pipeline saved with save_pretrained
(one unchanged, one with a changed weight) is judged against the baselines of the model it came from
(``--dit-baseline-name``), and every command a message suggests repeats the model as the user typed it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from pytest_ditredundancy import load_model

SUITES = Path(__file__).resolve().parent.parent / "suites"
FAST = ["suites/test_baseline_regression.py", "--dit-steps=6", "--dit-num-prompts=3", "-p", "no:cacheprovider"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_pipeline_cache) -> Path:
    """``same-ckpt`` (tiny PixArt-α as saved) and ``new-ckpt`` (one attention weight changed). Made before the
    test's pytester fixture starts: pytester forgets modules imported during a test (diffusers here), and
    torch may not import them twice in one process."""
    root = tmp_path_factory.mktemp("checkpoints")
    tiny_pipeline_cache("tiny-pixart-alpha").save_pretrained(root / "same-ckpt")
    changed = load_model(root / "same-ckpt", device="cpu")
    with torch.no_grad():
        changed.transformer.transformer_blocks[1].attn1.to_v.weight.mul_(3.0)
    changed.save_pretrained(root / "new-ckpt")
    return root


def test_a_new_checkpoint_is_judged_against_the_old_models_baseline(checkpoints, pytester):
    shutil.copytree(SUITES, pytester.path / "suites")
    pytester.makeini("[pytest]\n")
    for name in ("same-ckpt", "new-ckpt"):
        shutil.copytree(checkpoints / name, pytester.path / name)
    pytester.runpytest_subprocess(*FAST, "--dit-model=tiny-pixart-alpha", "--dit-update-baselines").assert_outcomes(
        passed=1)

    same = pytester.runpytest_subprocess(*FAST, "--dit-model=./same-ckpt", "--dit-baseline-name=tiny-pixart-alpha")
    same.assert_outcomes(passed=1)
    same.stdout.fnmatch_lines(["ditredundancy: models: ./same-ckpt (judged against the baselines of tiny-pixart-alpha)",
                               "same-ckpt: ok; baseline drift 0 cells"])

    new = pytester.runpytest_subprocess(*FAST, "--dit-model=./new-ckpt", "--dit-baseline-name=tiny-pixart-alpha")
    new.assert_outcomes(failed=1)
    new.stdout.fnmatch_lines([
        "*new-ckpt drifted from the baseline of tiny-pixart-alpha steps6-dpm-solver-seed0-p3-32x32-g4.5.json*",
        "largest drift at layer transformer_blocks.1.attn1",
        "*If the change is intended, update the baseline:",
        "    pytest suites --dit-model=./new-ckpt --dit-num-prompts=3 --dit-steps=6 "
        "--dit-baseline-name=tiny-pixart-alpha --dit-update-baselines -k baseline_regression",
        "new-ckpt: FAIL; baseline drift * cells; 1 test failed, errored or crashed",
    ])

    alone = pytester.runpytest_subprocess(*FAST, "--dit-model=./new-ckpt")  # its own name: no baseline yet
    alone.assert_outcomes(failed=1)
    alone.stdout.fnmatch_lines(["*no baseline_regression baseline for new-ckpt with settings * in *"
                                f"{Path('baselines', 'new-ckpt')}*",
                                "    pytest suites --dit-model=./new-ckpt --dit-num-prompts=3 --dit-steps=6 "
                                "--dit-update-baselines -k baseline_regression"])
    assert "--dit-model=new-ckpt" not in alone.stdout.str()
