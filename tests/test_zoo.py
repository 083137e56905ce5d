"""The model zoo: names, specs, the real loading path from a saved directory, and clear errors."""

from __future__ import annotations

import pytest
import torch

from pytest_ditredundancy import ModelLoadError, ModelSpec, UnknownModelError, get_spec, load_model, register_model
from pytest_ditredundancy.profiling.runner import profile_model
from pytest_ditredundancy.zoo import registered_models, resolve_spec, tiny_model_names
from pytest_ditredundancy.zoo.catalog import FULL_SPECS

PAPER = {"flux-dev", "pixart-alpha", "sd3-medium", "cogvideox-5b", "latte-1", "mochi-1", "open-sora-1.2"}


def test_the_papers_seven_are_registered_with_the_papers_settings():
    assert {s.name for s in FULL_SPECS if s.in_paper} == PAPER
    flux, pixart, sd3 = get_spec("flux-dev"), get_spec("pixart-alpha"), get_spec("sd3-medium")
    assert (flux.steps, flux.height, flux.guidance_scale) == (28, 1024, 3.5)
    assert (pixart.steps, pixart.scheduler, pixart.guidance_scale) == (20, "dpm-solver", 4.5)
    assert (sd3.steps, sd3.guidance_scale) == (28, 7.0)
    cog = get_spec("cogvideox-5b")
    assert (cog.steps, cog.height, cog.width, cog.num_frames, cog.guidance_scale) == (50, 480, 720, 9, 6.0)
    latte = get_spec("latte-1")
    assert (latte.steps, latte.height, latte.num_frames, latte.guidance_scale) == (50, 512, 16, 7.5)
    assert get_spec("mochi-1").steps == 64


def test_every_family_has_a_tiny_twin_with_the_same_pipeline_class():
    full = [s for s in registered_models().values() if not s.is_tiny and not s.trained and s.family != "custom"]
    assert len(full) >= 15
    for spec in full:
        tiny = get_spec(f"tiny-{spec.name}")
        assert tiny.pipeline_class == spec.pipeline_class and tiny.family == spec.family
        assert tiny.dtype == "float32" and tiny.checkpoint is None


def test_unknown_names_list_close_matches():
    with pytest.raises(UnknownModelError, match="tiny-pixart-alpha") as info:
        get_spec("tiny-pixart-alfa")
    assert "Registered models" in str(info.value)
    with pytest.raises(UnknownModelError):
        resolve_spec("no-such-model")


def test_register_model_refuses_silent_overrides():
    spec = ModelSpec("my-dit", "custom", "PixArtAlphaPipeline", "me/my-dit", steps=10, height=64, width=64,
                     guidance_scale=4.5, scheduler="dpm-solver")
    register_model(spec)
    assert get_spec("my-dit") is spec
    with pytest.raises(ValueError, match="already registered"):
        register_model(ModelSpec("my-dit", "custom", "X", None, steps=5, height=8, width=8,
                                 guidance_scale=None, scheduler="euler"))
    with pytest.raises(ValueError, match="steps must be >= 2"):
        ModelSpec("bad", "custom", "X", None, steps=1, height=8, width=8, guidance_scale=None, scheduler="euler")


def test_hf_ids_resolve_to_their_family_settings():
    assert resolve_spec("PixArt-alpha/PixArt-XL-2-1024-MS").name == "pixart-alpha"
    custom = resolve_spec("someone/some-dit")
    assert custom.checkpoint == "someone/some-dit" and custom.family == "custom"


def test_hf_id_without_hub_access_fails_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="hub access|tiny model"):
        load_model("someone/not-cached-dit", device="cpu")


def test_open_sora_full_model_points_at_the_adapter():
    with pytest.raises(ModelLoadError, match="adapters"):
        load_model("open-sora-1.2", device="cpu")


def test_saved_directory_loads_offline_with_identical_output(tmp_path, monkeypatch, tiny_pipeline_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = tiny_pipeline_cache("tiny-pixart-alpha")
    pipe.save_pretrained(tmp_path / "pixart")
    spec = resolve_spec(tmp_path / "pixart")
    assert spec.family == "pixart-alpha" and spec.pipeline_class == "PixArtAlphaPipeline"
    loaded = load_model(tmp_path / "pixart", device="cpu")
    assert type(loaded) is type(pipe)
    kwargs = dict(prompts=["a red bus"], steps=3, height=32, width=32)
    a = profile_model(pipe, **kwargs)
    b = profile_model(loaded, **kwargs)
    for metric in a.values:
        torch.testing.assert_close(torch.from_numpy(a.values[metric]), torch.from_numpy(b.values[metric]),
                                   rtol=0, atol=0, equal_nan=True)


def test_directory_without_model_index_is_explained(tmp_path):
    with pytest.raises(ModelLoadError, match="model_index.json"):
        resolve_spec(tmp_path)


def test_tiny_models_are_deterministic_per_seed():
    a, b, c = (load_model("tiny-sd3-medium", device="cpu", seed=s) for s in (0, 0, 1))
    pa, pb, pc = (dict(p.transformer.named_parameters()) for p in (a, b, c))
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    assert not all(torch.equal(pa[n], pc[n]) for n in pa)


def test_bad_run_settings_are_refused(tiny_pipeline_cache):
    pipe = tiny_pipeline_cache("tiny-pixart-alpha")
    with pytest.raises(ValueError, match="steps must be at least 2"):
        profile_model(pipe, prompts=["a cat"], steps=1)
    with pytest.raises(ValueError, match="non-empty"):
        profile_model(pipe, prompts=["a cat", "  "], steps=3)
    with pytest.raises(ValueError, match="only 72"):
        profile_model(pipe, num_prompts=500, steps=3)


def test_tiny_names_cover_all_families():
    assert len(tiny_model_names()) == len(FULL_SPECS)


def test_scheduler_swaps_start_from_the_original_scheduler(tiny_pipeline_cache):
    from pytest_ditredundancy.profiling.schedulers import apply_scheduler

    pipe = tiny_pipeline_cache("tiny-sd3-medium")
    apply_scheduler(pipe, "flow-euler-karras")
    assert pipe.scheduler.config.use_karras_sigmas
    apply_scheduler(pipe, "flow-euler")
    assert not pipe.scheduler.config.use_karras_sigmas
    apply_scheduler(pipe, None)
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
