"""The adapter path: fused-projection sites, DenoisingLoop, profile_loop, and the tiny Open-Sora twin."""

from __future__ import annotations

import zlib
from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from brute_force import reference_series
from torch import nn

from pytest_ditredundancy import load_model, profile_model
from pytest_ditredundancy.capture.adapters import DenoisingLoop, FusedSlice, fused_qkv_sites, profile_loop
from pytest_ditredundancy.capture.metrics import METRICS
from pytest_ditredundancy.zoo.tiny_parts import seeded
from pytest_ditredundancy.zoo.tiny_stdit import RectifiedFlowLoop, build_tiny_stdit, from_stdit3

DIM, HEADS, TOKENS = 8, 2, 6
PROMPTS = ["a red bus on a bridge", "a cat asleep on a green sofa", "lemons in a bowl"]


# --- a hand-written loop: fused qkv attention and an Euler loop with guidance batched [cond, uncond] ----------


class FusedAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, HEADS, C // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


class Denoiser(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.t_embed = nn.Linear(1, DIM)
        self.blocks = nn.ModuleList([FusedAttention(), FusedAttention()])

    def forward(self, x, t):
        x = x + self.t_embed(t.view(-1, 1, 1) / 1000)
        for block in self.blocks:
            x = x + block(x)
        return x


class EulerLoop:
    branch_layout = "batched-cond-uncond"
    guidance_scale = 3.0

    def __init__(self, seed: int = 0, forget_end_step: bool = False) -> None:
        with seeded(seed):
            self.transformer = Denoiser().eval()
        self.forget_end_step = forget_end_step

    def sites(self):
        return fused_qkv_sites(self.transformer)

    @torch.no_grad()
    def run(self, prompts, *, num_inference_steps, guidance_scale, generators, end_step, **kwargs):
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        x = torch.stack([torch.randn(TOKENS, DIM, generator=g) for g in generators])
        cond = torch.stack([torch.randn(DIM, generator=torch.Generator().manual_seed(zlib.crc32(p.encode())))
                            for p in prompts])[:, None]
        for i in range(num_inference_steps):
            t = torch.full((len(prompts),), 1000.0 * (1 - i / num_inference_steps))
            if scale > 1:
                c, u = self.transformer(torch.cat([x + cond, x]), torch.cat([t, t])).chunk(2)
                v = u + scale * (c - u)
            else:
                v = self.transformer(x + cond, t)
            x = x - v / num_inference_steps
            if not self.forget_end_step:
                end_step(t)
        return x


def generators(n: int, offset: int = 0):
    return [torch.Generator("cpu").manual_seed(offset + i) for i in range(n)]


def expected_tensor(site, output):
    """K/V sliced by hand from a fused ``[Q|K|V]`` or ``[K|V]`` output (independent of FusedSlice)."""
    if site.kind == "a":
        return output
    parts = site.module.out_features // site.module.in_features
    width, index = output.shape[-1] // parts, parts - 2 + ("k", "v").index(site.kind)
    return output[..., index * width:(index + 1) * width]


def record_every_step(loop, prompts, steps, guidance_scale=None, **kwargs):
    """Naive reference: run the loop with hooks that copy every site's tensor at every step."""
    sites = loop.sites()
    stored: dict[int, dict[int, torch.Tensor]] = defaultdict(dict)
    state = {"step": 0}
    handles = []
    for index, site in enumerate(sites):
        def hook(module, args, output, index=index, site=site):
            stored[index].setdefault(state["step"], expected_tensor(site, output).clone())
        handles.append(site.module.register_forward_hook(hook))

    def end_step(t):
        state["step"] += 1

    try:
        output = loop.run(prompts, num_inference_steps=steps, guidance_scale=guidance_scale,
                          generators=generators(len(prompts)), end_step=end_step, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return sites, stored, output


def assert_matches_reference(profile, loop, prompts, steps, **kwargs):
    sites, stored, _ = record_every_step(loop, prompts, steps, **kwargs)
    n = len(prompts)
    for index, site in enumerate(sites):
        k, layer = profile.kinds.index(site.kind), profile.layers.index(site.layer)
        for b, branch in enumerate(profile.branches):
            row = {"cond": 0, "uncond": n}[branch]
            for prompt in range(n):
                expected = reference_series(stored[index], 2 * n, row + prompt)
                for metric in METRICS:
                    np.testing.assert_allclose(profile.values[metric][prompt, b, k, layer], expected[metric],
                                               rtol=1e-4, atol=1e-6, err_msg=f"{site.layer}/{site.kind}/{branch}")


# --- fused projections ------------------------------------------------------------------------------------


def test_fused_slices_are_the_unfused_projections():
    with seeded(0):
        fused, x = nn.Linear(DIM, 3 * DIM), torch.randn(5, 4, DIM)
    out = fused(x)
    for part in range(3):
        rows = slice(part * DIM, (part + 1) * DIM)
        torch.testing.assert_close(FusedSlice(part, 3)(out), F.linear(x, fused.weight[rows], fused.bias[rows]))
    # per-head interleaved layout (heads, parts, head_dim)
    w, b = fused.weight.view(HEADS, 3, DIM // HEADS, DIM), fused.bias.view(HEADS, 3, DIM // HEADS)
    expected_k = F.linear(x, w[:, 1].reshape(DIM, DIM), b[:, 1].reshape(DIM)).unflatten(-1, (HEADS, -1))
    torch.testing.assert_close(FusedSlice(1, 3, heads=HEADS)(out), expected_k)
    kv = nn.Linear(DIM, 2 * DIM)
    torch.testing.assert_close(FusedSlice(1, 2)(kv(x)), F.linear(x, kv.weight[DIM:], kv.bias[DIM:]))
    assert FusedSlice(0, 2)((out,)) is None


def test_fused_qkv_sites_name_layers_by_module_path_in_order():
    model = Denoiser()
    sites = fused_qkv_sites(model)
    assert [(s.layer, s.kind) for s in sites] == [
        (f"blocks.{i}", kind) for i in range(2) for kind in ("k", "v", "a")]
    assert sites[0].module is model.blocks[0].qkv and sites[2].module is model.blocks[0].proj
    assert sites[0].select == FusedSlice(1, 3) and sites[1].select == FusedSlice(2, 3) and sites[2].select is None
    assert [s.kind for s in fused_qkv_sites(model, kinds=["a"])] == ["a", "a"]
    stdit = build_tiny_stdit(0).transformer
    layers = list(dict.fromkeys(s.layer for s in fused_qkv_sites(stdit, kv="kv_linear")))
    assert layers == [f"{blocks}.{i}.{attn}" for blocks in ("spatial_blocks", "temporal_blocks") for i in range(2)
                      for attn in ("attn", "cross_attn")]
    cross = [s for s in fused_qkv_sites(stdit, kv="kv_linear") if s.layer.endswith("cross_attn") and s.kind == "k"]
    assert cross[0].select == FusedSlice(0, 2) and cross[0].module is stdit.spatial_blocks[0].cross_attn.kv_linear
    with pytest.raises(ValueError, match="fused"):
        fused_qkv_sites(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="3 equal parts"):
        fused_qkv_sites(nn.ModuleDict({"attn": nn.ModuleDict({"qkv": nn.Linear(2, 4), "proj": nn.Linear(2, 2)})}))


# --- profile_loop on the hand-written loop ------------------------------------------------------------------


def test_loop_satisfies_the_protocol_and_others_are_refused():
    assert isinstance(EulerLoop(), DenoisingLoop) and isinstance(build_tiny_stdit(0), DenoisingLoop)
    with pytest.raises(TypeError, match="DenoisingLoop"):
        profile_loop(nn.Linear(2, 2), PROMPTS, steps=3)
    with pytest.raises(RuntimeError, match="end_step"):
        profile_loop(EulerLoop(forget_end_step=True), PROMPTS, steps=3)


def test_every_site_gets_steps_minus_one_values_equal_to_brute_force():
    loop, steps = EulerLoop(), 5
    profile = profile_loop(loop, PROMPTS, steps=steps, model_name="euler-toy")
    assert profile.branches == ["cond", "uncond"] and profile.kinds == ["k", "v", "a"]
    assert profile.layers == ["blocks.0", "blocks.1"]
    assert profile.shape == (len(PROMPTS), 2, 3, 2, steps - 1) and profile.computed.all()
    assert not profile.constant.any() and not profile.nonfinite.any()
    meta = profile.metadata
    assert meta.model == "euler-toy" and meta.prompts == PROMPTS and meta.seed == 0 and meta.guidance_scale == 3.0
    assert meta.timesteps == [1000.0, 800.0, 600.0, 400.0, 200.0] and meta.pipeline_class == "EulerLoop"
    assert meta.transformer_class == "Denoiser" and meta.warnings == []
    assert_matches_reference(profile, loop, PROMPTS, steps)


def test_batches_and_offsets_do_not_change_a_prompts_profile():
    loop = EulerLoop()
    whole = profile_loop(loop, PROMPTS, steps=4, batch_size=2, seed=3)
    for i, prompt in enumerate(PROMPTS):
        alone = profile_loop(loop, [prompt], steps=4, seed=3, prompt_offset=i)
        for metric in METRICS:
            np.testing.assert_allclose(alone.values[metric][0], whole.values[metric][i], rtol=1e-5, atol=1e-7)
    progress = []
    profile_loop(loop, PROMPTS, steps=3, batch_size=2, progress=lambda *a: progress.append(a[:2]))
    assert progress == [(2, 3), (3, 3)]


def test_guidance_off_profiles_the_single_conditional_branch():
    profile = profile_loop(EulerLoop(), PROMPTS[:2], steps=3, guidance_scale=1.0, kinds=["k"])
    assert profile.branches == ["cond"] and profile.kinds == ["k"] and profile.computed.all()
    assert profile.metadata.guidance_scale == 1.0


def test_capture_leaves_the_loop_output_bit_identical():
    loop = EulerLoop()
    plain = loop.run(PROMPTS, num_inference_steps=4, guidance_scale=None, generators=generators(3),
                     end_step=lambda t: None)
    captured = []
    original = loop.run
    loop.run = lambda *a, **k: captured.append(original(*a, **k))
    profile_loop(loop, PROMPTS, steps=4)
    assert torch.equal(captured[0], plain)


# --- the tiny Open-Sora twin ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stdit():
    return build_tiny_stdit(0)


def test_tiny_stdit_profile_end_to_end(stdit):
    profile = profile_loop(stdit, PROMPTS[:2], steps=6, run_kwargs={"num_frames": 4, "height": 16, "width": 16})
    assert profile.branches == ["cond", "uncond"] and profile.kinds == ["k", "v", "a"] and len(profile.layers) == 8
    assert profile.computed.all() and not profile.nonfinite.any() and profile.metadata.warnings == []
    cross = np.array([layer.endswith("cross_attn") for layer in profile.layers])
    constant = profile.constant  # [prompt, branch, kind, layer]: caption K/V never change, nothing else is
    assert constant[:, :, :2][..., cross].all() and not constant[:, :, :2][..., ~cross].any()
    assert not constant[:, :, 2].any()
    assert profile.metadata.timesteps[:2] == [1000.0, pytest.approx(1000 * 5 / 6)]
    assert profile.metadata.scheduler_class == "RectifiedFlow"
    assert_matches_reference(profile, stdit, PROMPTS[:2], 6)


def test_tiny_stdit_frames_fold_sample_major(stdit):
    """Spatial rows fold (B F), temporal rows (B S): a sample's profile must not depend on its batch mates."""
    together = profile_loop(stdit, PROMPTS[:2], steps=4)
    second = profile_loop(stdit, PROMPTS[1:2], steps=4, prompt_offset=1)
    for metric in METRICS:
        np.testing.assert_allclose(second.values[metric][0], together.values[metric][1], rtol=1e-4, atol=1e-6)


def test_tiny_stdit_is_deterministic_and_capture_free_of_side_effects(stdit):
    def sample(loop):
        return loop.run(PROMPTS[:2], num_inference_steps=20, generators=generators(2))

    plain = sample(stdit)
    assert plain.shape == (2, 4, 4, 8, 8) and torch.isfinite(plain).all() and not torch.equal(plain[0], plain[1])
    assert torch.equal(sample(build_tiny_stdit(0)), plain)
    assert not torch.equal(sample(build_tiny_stdit(1)), plain)
    outputs = []
    original = stdit.run
    stdit.run = lambda *a, **k: outputs.append(original(*a, **k))
    try:
        first = profile_loop(stdit, PROMPTS[:2], steps=20)
        again = profile_loop(stdit, PROMPTS[:2], steps=20)
    finally:
        del stdit.run
    assert torch.equal(outputs[0], plain)
    for metric in METRICS:
        np.testing.assert_array_equal(first.values[metric], again.values[metric])


def test_profile_model_by_name_delegates_to_the_loop():
    loop = load_model("tiny-open-sora-1.2", device="cpu")
    assert isinstance(loop, RectifiedFlowLoop) and loop.to("cpu") is loop and loop.dtype == torch.float32
    profile = profile_model("tiny-open-sora-1.2", num_prompts=2, steps=5, device="cpu")
    meta = profile.metadata
    assert profile.shape == (2, 2, 3, 8, 4) and profile.computed.all()
    assert (meta.model, meta.extra["family"], meta.pipeline_class) == ("tiny-open-sora-1.2", "open-sora",
                                                                       "RectifiedFlowLoop")
    assert (meta.num_frames, meta.height, meta.width, meta.guidance_scale) == (4, 16, 16, 7.0)
    assert meta.extra["settings_key"].startswith("steps5-rectified-flow-seed0-p2")
    again = profile_model(loop, num_prompts=2, steps=5)  # an already loaded loop keeps its spec
    np.testing.assert_array_equal(again.values["abs_l1"], profile.values["abs_l1"])
    with pytest.raises(ValueError, match="own loop"):
        profile_model(loop, num_prompts=1, steps=3, scheduler="ddim")


def test_from_stdit3_wraps_a_model_with_open_soras_interfaces(stdit):
    """The real-model recipe, with the tiny twin standing in for STDiT3, T5Encoder and the VAE."""

    class FakeVAE:
        out_channels = 4

        @staticmethod
        def get_latent_size(size):
            frames, height, width = size
            return [frames, height // 2, width // 2]

    loop = from_stdit3(stdit.transformer, stdit.text_encoder, FakeVAE(), size=(4, 16, 16))
    model = stdit.transformer
    caption_kv = {id(b.cross_attn.kv_linear) for b in (*model.spatial_blocks, *model.temporal_blocks)}
    assert caption_kv and not any(id(s.module) in caption_kv for s in loop.sites())
    assert {s.kind for s in loop.sites() if s.layer.endswith("cross_attn")} == {"a"}
    profile = profile_loop(loop, PROMPTS[:1], steps=3)
    assert profile.computed[:, :, profile.kinds.index("a")].all() and profile.metadata.warnings == []
    shifted = loop.timesteps(3, 480, 848, 51)
    assert shifted[0] == pytest.approx(1000) and shifted[1] > 1000 * 2 / 3  # shifted toward noise
