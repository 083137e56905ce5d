"""The tiny video pipelines run offline, are seed-deterministic and survive a save/load round trip."""

from __future__ import annotations

import inspect

import pytest
import torch

from pytest_ditredundancy.zoo import tiny_video
from pytest_ditredundancy.zoo.catalog import FULL_SPECS, TINY_BUILDERS

#: family builder -> catalog entry whose tiny sizes it must handle.
FAMILIES = {
    "build_cogvideox": "cogvideox-5b",
    "build_latte": "latte-1",
    "build_mochi": "mochi-1",
    "build_wan": "wan2.1",
    "build_ltx": "ltx-video",
}
PROMPTS = ["a red bus", "a cat"]


def _sizes(builder: str) -> dict:
    module, function, overrides = TINY_BUILDERS[FAMILIES[builder]]
    assert (module, function) == ("tiny_video", builder)
    return {k: overrides[k] for k in ("height", "width", "num_frames")}


def run(pipe, builder: str, steps: int = 3, output_type: str = "latent"):
    sizes = _sizes(builder)
    # Latte names its frame count ``video_length``; the other pipelines say ``num_frames``.
    if "num_frames" not in inspect.signature(pipe.__call__).parameters:
        sizes["video_length"] = sizes.pop("num_frames")
    generators = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    return pipe(PROMPTS, num_inference_steps=steps, generator=generators, output_type=output_type, **sizes).frames


@pytest.fixture(scope="session")
def pipes():
    """One seed-0 pipeline per family, shared by the tests that only call it."""
    return {builder: getattr(tiny_video, builder)(0) for builder in FAMILIES}


@pytest.fixture(scope="session")
def outputs(pipes):
    """Three-step latents of each shared pipeline."""
    return {builder: run(pipe, builder) for builder, pipe in pipes.items()}


@pytest.mark.parametrize("builder", FAMILIES)
def test_runs_three_steps_with_two_prompts(builder, pipes, outputs):
    pipe, latents = pipes[builder], outputs[builder]
    spec = next(spec for spec in FULL_SPECS if spec.name == FAMILIES[builder])
    assert type(pipe).__name__ == spec.pipeline_class
    assert latents.shape[0] == len(PROMPTS)
    assert torch.isfinite(latents).all()
    assert not torch.equal(latents[0], latents[1])
    assert pipe.device.type == "cpu" and pipe.transformer.dtype == torch.float32


@pytest.mark.parametrize("builder", FAMILIES)
def test_decodes_to_frames(builder, pipes):
    sizes = _sizes(builder)
    video = run(pipes[builder], builder, steps=2, output_type="np")
    assert video.shape == (len(PROMPTS), sizes["num_frames"], sizes["height"], sizes["width"], 3)


@pytest.mark.parametrize("builder", FAMILIES)
def test_same_seed_same_output(builder, outputs):
    again = run(getattr(tiny_video, builder)(0), builder)
    assert torch.equal(again, outputs[builder])
    other = run(getattr(tiny_video, builder)(1), builder)
    assert not torch.equal(other, outputs[builder])


@pytest.mark.parametrize("builder", FAMILIES)
def test_save_load_round_trip_offline(builder, pipes, outputs, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline
    from diffusers.utils import is_accelerate_available

    if type(pipes[builder].transformer)._keep_in_fp32_modules and not is_accelerate_available():
        # diffusers refuses to load such a model (Wan) unless accelerate is installed, hub or local alike.
        pytest.skip("diffusers needs `accelerate` to load a model with _keep_in_fp32_modules")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipes[builder].save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is type(pipes[builder])
    assert type(loaded.tokenizer) is type(pipes[builder].tokenizer)
    assert torch.equal(run(loaded, builder), outputs[builder])
