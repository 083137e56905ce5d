"""Guidance branches under ``branch_layout="auto"``: read from the pipeline call, never guessed.

A pipeline called with ``prompt_embeds`` (no prompt strings) used to be captured as twice the prompts on one
``cond`` branch when it batched classifier-free guidance. Every tiny text-to-image/video family is run here
with ``prompt_embeds`` (recorded from a call with prompt strings, so both calls see the same embeddings): the
profile must have the ``uncond``/``cond`` branches, one row per prompt, and the same values as the call with
prompt strings under the model's declared layout. DiT (class labels) and Open-Sora (not a diffusers pipeline)
take no ``prompt_embeds``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pytest_ditredundancy import capture_redundancy, get_spec
from pytest_ditredundancy.capture.assemble import AmbiguousLayoutError
from pytest_ditredundancy.profiling.runner import call_kwargs, settings_for
from pytest_ditredundancy.capture.sites import CaptureSite
from pytest_ditredundancy.zoo import tiny_model_names

PROMPTS = ["a red bus on a bridge", "a cat on a green sofa"]
STEPS = 3
#: what each pipeline's encode_prompt returns, as __call__ argument names (None: not an argument)
MASKS = ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask")
ENCODED = {
    "PixArtAlphaPipeline": [MASKS], "PixArtSigmaPipeline": [MASKS], "SanaPipeline": [MASKS],
    "MochiPipeline": [MASKS], "LTXPipeline": [MASKS], "AuraFlowPipeline": [MASKS], "Lumina2Pipeline": [MASKS],
    "StableDiffusion3Pipeline": [("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                                  "negative_pooled_prompt_embeds")],
    "CogVideoXPipeline": [("prompt_embeds", "negative_prompt_embeds")],
    "WanPipeline": [("prompt_embeds", "negative_prompt_embeds")],
    "LattePipeline": [("prompt_embeds", "negative_prompt_embeds")],
    "HunyuanDiTPipeline": [("prompt_embeds", "negative_prompt_embeds", "prompt_attention_mask",
                            "negative_prompt_attention_mask"),
                           ("prompt_embeds_2", "negative_prompt_embeds_2", "prompt_attention_mask_2",
                            "negative_prompt_attention_mask_2")],
    # FLUX.1-dev is guidance-distilled: its CFG is "true CFG", a negative prompt run as a second call
    "FluxPipeline": [("prompt_embeds", "pooled_prompt_embeds", None),
                     ("negative_prompt_embeds", "negative_pooled_prompt_embeds", None)],
}
FAMILIES = [name for name in tiny_model_names() if get_spec(name).conditioning == "text"
            and get_spec(name).family != "open-sora"]


def test_every_tiny_text_family_is_covered():
    assert {get_spec(name).pipeline_class for name in FAMILIES} == set(ENCODED)


def _call(spec, pipe, **extra):
    settings = settings_for(spec, steps=STEPS, num_prompts=len(PROMPTS))
    kwargs = call_kwargs(spec, settings, PROMPTS, pipe, [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))])
    if spec.family == "flux":
        kwargs.update(negative_prompt=["blurry"] * len(PROMPTS), true_cfg_scale=2.0)
    kwargs.update(extra)
    return kwargs


def _recorded_embeddings(spec, pipe) -> dict:
    """Run the pipeline with prompt strings and keep what its encode_prompt returned, named as call arguments."""
    returned = []
    original = pipe.encode_prompt

    def encode_prompt(*args, **kwargs):
        result = original(*args, **kwargs)
        returned.append(result if isinstance(result, tuple) else (result,))
        return result

    pipe.encode_prompt = encode_prompt
    try:
        pipe(**_call(spec, pipe))
    finally:
        del pipe.encode_prompt
    names = ENCODED[spec.pipeline_class]
    assert len(returned) == len(names), (spec.name, len(returned))
    return {name: value for call, values in zip(names, returned) for name, value in zip(call, values) if name}


@pytest.mark.parametrize("name", FAMILIES)
def test_prompt_embeds_with_guidance_give_uncond_and_cond_branches(name, tiny_pipeline_cache):
    spec, pipe = get_spec(name), tiny_pipeline_cache(name)
    embeddings = _recorded_embeddings(spec, pipe)
    sequential = spec.branch_layout == "sequential-cond-uncond" or spec.family == "flux"  # flux: true CFG calls
    with capture_redundancy(pipe, branch_layout="sequential-cond-uncond" if sequential else spec.branch_layout) as declared:
        pipe(**_call(spec, pipe))
    by_embeddings = _call(spec, pipe, **embeddings, negative_prompt=None)  # a default "" would clash with the embeddings
    del by_embeddings["prompt"]
    with capture_redundancy(pipe) as auto:  # branch_layout="auto"
        pipe(**by_embeddings)
    expected, got = declared.profile(), auto.profile()
    assert got.branches == (["cond", "uncond"] if sequential else ["uncond", "cond"]), name
    assert got.num_prompts == len(PROMPTS)
    assert got.metadata.prompts == ["sample 0", "sample 1"]  # no prompt strings: rows are named, not guessed
    for branch in ("cond", "uncond"):
        b, e = got.branches.index(branch), expected.branches.index(branch)
        np.testing.assert_array_equal(got.computed[:, b], expected.computed[:, e])
        for metric in got.values:
            np.testing.assert_allclose(got.values[metric][:, b], expected.values[metric][:, e], rtol=1e-5, atol=1e-8,
                                       err_msg=f"{name} {branch} {metric}")


@pytest.mark.parametrize("name", ["tiny-pixart-alpha", "tiny-sd3-medium", "tiny-flux-dev", "tiny-wan2.1"])
def test_prompt_embeds_without_guidance_stay_one_branch(name, tiny_pipeline_cache):
    spec, pipe = get_spec(name), tiny_pipeline_cache(name)
    embeddings = {k: v for k, v in _recorded_embeddings(spec, pipe).items() if not k.startswith("negative")}
    kwargs = _call(spec, pipe, **embeddings)
    for key in ("prompt", "negative_prompt", "true_cfg_scale"):
        kwargs.pop(key, None)
    if spec.family != "flux":
        kwargs["guidance_scale"] = 1.0
    with capture_redundancy(pipe) as cap:
        pipe(**kwargs)
    profile = cap.profile()
    assert profile.branches == ["cond"] and profile.num_prompts == len(PROMPTS), name


class Denoiser(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, hidden_states):
        return self.proj(hidden_states)


def _run_module(rows: int, calls: int = 1, **capture):
    model = Denoiser()
    x = torch.randn(rows, 3, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), capture_redundancy(model, sites=[CaptureSite("proj", "a", model.proj)], **capture) as cap:
        for step in range(3):
            for _ in range(calls):
                x = x - 0.1 * model(x)
            cap.end_step(step)
    return cap


@pytest.mark.parametrize("rows,calls", [(2, 1), (4, 1), (2, 2)])
def test_a_batch_that_reads_either_way_is_refused_with_the_fix(rows, calls):
    cap = _run_module(rows, calls)
    with pytest.raises(AmbiguousLayoutError, match="branch_layout=") as error:
        cap.profile()
    assert "batched-uncond-cond" in str(error.value) and "single" in str(error.value)
    explicit = _run_module(rows, calls, branch_layout="single").profile()
    assert explicit.num_prompts == rows


def test_an_odd_batch_is_no_guidance_pair():
    profile = _run_module(3).profile()
    assert profile.branches == ["cond"] and profile.num_prompts == 3


def test_ambiguous_error_names_the_argument_in_the_profile_call(tiny_pipeline_cache, monkeypatch):
    """A pipeline whose call says nothing (guidance hidden) and gets embeddings: refused, not mislabelled."""
    spec = get_spec("tiny-pixart-alpha")
    pipe = tiny_pipeline_cache(spec.name)
    embeddings = _recorded_embeddings(spec, pipe)
    kwargs = _call(spec, pipe, **embeddings, negative_prompt=None)
    del kwargs["prompt"]
    monkeypatch.setattr("pytest_ditredundancy.capture.hooks.call_guidance", lambda pipeline, transformer=None: (None, None))
    with capture_redundancy(pipe) as cap:
        pipe(**kwargs)
    with pytest.raises(AmbiguousLayoutError, match="branch_layout="):
        cap.profile()


def test_class_conditional_guidance_batch_is_cond_first(tiny_pipeline_cache):
    """DiT batches [class labels, null class]: auto reads it as cond, then uncond."""
    spec = get_spec("tiny-dit-xl-2-256")
    pipe = tiny_pipeline_cache(spec.name)
    with capture_redundancy(pipe, branch_layout=spec.branch_layout) as declared:
        pipe(**_call(spec, pipe))
    with capture_redundancy(pipe) as auto:
        pipe(**_call(spec, pipe))
    expected, got = declared.profile(), auto.profile()
    assert got.branches == expected.branches == ["cond", "uncond"]
    for metric in got.values:
        np.testing.assert_array_equal(got.values[metric], expected.values[metric])


def test_whole_batch_measures_both_halves_as_one_tensor(tiny_pipeline_cache):
    spec = get_spec("tiny-pixart-alpha")
    pipe = tiny_pipeline_cache(spec.name)
    with capture_redundancy(pipe, branch_layout=spec.branch_layout) as halves:
        pipe(**_call(spec, pipe))
    with capture_redundancy(pipe, branch_layout=spec.branch_layout, whole_batch=True) as whole:
        pipe(**_call(spec, pipe))
    split, together = halves.profile(), whole.profile()
    assert together.branches == ["batch"] and together.num_prompts == split.num_prompts
    cond, uncond = split.branches.index("cond"), split.branches.index("uncond")
    mean = (split.values["abs_l1"][:, cond].astype(np.float64) + split.values["abs_l1"][:, uncond]) / 2  # equal halves
    np.testing.assert_allclose(together.values["abs_l1"][:, 0], mean, rtol=1e-6)
