"""Capture leaves no trace: hooks removed (also on errors), fused QKV refused, odd cases flagged not dropped."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pytest_ditredundancy import FusedProjectionError, capture_redundancy, get_spec
from pytest_ditredundancy.capture.sites import CaptureSite
from test_capture import run_once

SPEC = get_spec("tiny-pixart-alpha")


@pytest.fixture(scope="module")
def pixart(tiny_pipeline_cache):
    return tiny_pipeline_cache("tiny-pixart-alpha")


def hook_count(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_hooks_and_wrappers_are_removed_when_the_pipeline_raises(pixart):
    calls = []

    def explode(module, args, output):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom in the second transformer call")

    failing = pixart.transformer.register_forward_hook(explode)
    before = hook_count(pixart.transformer)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            with capture_redundancy(pixart):
                assert hook_count(pixart.transformer) > before
                assert "step" in vars(pixart.scheduler)
                run_once(pixart, SPEC)
    finally:
        failing.remove()
    assert hook_count(pixart.transformer) == before - 1
    assert "step" not in vars(pixart.scheduler) and "set_timesteps" not in vars(pixart.scheduler)
    assert "check_inputs" not in vars(pixart)


def test_fused_qkv_projections_are_refused_with_the_fix(pixart):
    pixart.transformer.fuse_qkv_projections()
    try:
        with pytest.raises(FusedProjectionError, match="unfuse_qkv_projections"):
            capture_redundancy(pixart)
    finally:
        pixart.transformer.unfuse_qkv_projections()
    capture_redundancy(pixart)  # fine again once unfused


def test_cross_attention_kv_is_kept_and_flagged_constant(pixart):
    with capture_redundancy(pixart, branch_layout=SPEC.branch_layout) as cap:
        run_once(pixart, SPEC)
    profile = cap.profile()
    cond = profile.branches.index("cond")
    for l, layer in enumerate(profile.layers):
        for kind in ("k", "v"):
            k = profile.kinds.index(kind)
            constant = profile.constant[:, cond, k, l]
            assert constant.all() == layer.endswith("attn2"), (layer, kind)
            assert profile.computed[:, cond, k, l].all()  # kept, not dropped
    # (the uncond branch's cross-attention output may be constant too: an empty negative prompt leaves one
    # unmasked text token, so every query reads the same value vector)
    assert not profile.constant[:, cond, profile.kinds.index("a")].any()


def test_kinds_restrict_what_is_hooked(pixart):
    with capture_redundancy(pixart, kinds=["a"], branch_layout=SPEC.branch_layout) as cap:
        hooked = {site.kind for site in cap.sites}
        run_once(pixart, SPEC)
    assert hooked == {"a"}
    assert cap.profile().kinds == ["a"]
    with pytest.raises(ValueError, match="unknown kinds"):
        capture_redundancy(pixart, kinds=["q"])


def test_profile_without_a_run_says_what_to_do(pixart):
    with capture_redundancy(pixart) as cap:
        pass
    with pytest.raises(RuntimeError, match="nothing was captured"):
        cap.profile()


class Toy(nn.Module):
    """A one-layer 'transformer' whose output becomes NaN after ``nan_from`` calls (so its input, and the
    captured projection output, are NaN one step later)."""

    def __init__(self, nan_from: int) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.nan_from, self.calls = nan_from, 0

    def forward(self, hidden_states):
        self.calls += 1
        out = self.proj(hidden_states)
        return out * float("nan") if self.calls > self.nan_from else out


def test_non_finite_cells_are_flagged_per_cell():
    model = Toy(nan_from=2)
    sites = [CaptureSite("proj", "a", model.proj)]
    x = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), capture_redundancy(model, sites=sites, branch_layout="single") as cap:
        for step in range(5):
            x = x - 0.1 * model(x)
            cap.end_step(step)
    profile = cap.profile()
    flags = profile.nonfinite[0, 0, 0, 0]
    assert flags.tolist() == [False, False, True, True]
    assert np.isfinite(profile.values["abs_l1"][0, 0, 0, 0, :2]).all()


def test_in_place_mutation_after_capture_is_detected():
    layer = nn.Linear(4, 4)

    class Mutating(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, hidden_states):
            out = self.layer(hidden_states)
            result = out.clone()
            out.mul_(0)  # the model reuses the buffer after the hooked module returned it
            return result

    model = Mutating()
    x = torch.randn(1, 3, 4)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="modified in place"), \
            capture_redundancy(model, sites=[CaptureSite("layer", "k", layer)], branch_layout="single") as cap:
        for step in range(4):
            x = x + 0.1 * model(x)
            cap.end_step(step)
    profile = cap.profile()
    computed = profile.computed[0, 0, 0, 0].tolist()
    assert computed == [False, True, True]  # first pair lost to the mutation; copies afterwards
    assert any("modified in place" in w for w in profile.metadata.warnings)


def test_auto_layout_recognises_a_guidance_batch_the_pipeline_does_not_announce(pixart):
    # PixArt has no do_classifier_free_guidance property: the doubled batch per prompt tells
    with capture_redundancy(pixart) as cap:
        run_once(pixart, SPEC)
    profile = cap.profile()
    assert profile.branches == ["uncond", "cond"]
    assert profile.num_prompts == 2
