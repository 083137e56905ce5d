"""The tiny image pipelines run offline, are reproducible from their seed, and survive save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pytest_ditredundancy.zoo.catalog import TINY_BUILDERS
from pytest_ditredundancy.zoo.registry import get_spec

FAMILIES = [name for name, (module, _, _) in TINY_BUILDERS.items() if module == "tiny_image"]
STEPS = 3


def _inputs(spec) -> dict:
    """Two prompts (two class labels for DiT) at the catalog's tiny size, with the catalog's call kwargs."""
    if spec.conditioning == "class":  # DiTPipeline takes labels and has no height/width arguments
        inputs = dict(class_labels=[1, 2])
    else:
        inputs = dict(prompt=["a red bus", "a cat"], height=spec.height, width=spec.width)
    return {**inputs, **spec.call_kwargs}


def _run(pipe, spec, output_type: str = "latent", steps: int = STEPS):
    generators = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    out = pipe(**_inputs(spec), num_inference_steps=steps, generator=generators, output_type=output_type)
    return torch.as_tensor(np.asarray(out.images)) if output_type == "np" else torch.as_tensor(out.images)


@pytest.fixture(scope="session", params=FAMILIES)
def built(request):
    """(spec, pipeline built with seed 0, its 3-step latent output) — built once per family."""
    spec = get_spec(f"tiny-{request.param}")
    pipe = spec.build(0)
    return spec, pipe, _run(pipe, spec)


def test_runs_with_two_prompts(built):
    spec, pipe, out = built
    assert type(pipe).__name__ == spec.pipeline_class
    assert out.shape[0] == 2 and torch.isfinite(out).all()
    params = list(pipe.transformer.parameters())
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)
    attention = [m for m in pipe.transformer.modules() if hasattr(m, "to_k") or hasattr(m, "to_qkv")]
    assert len(attention) >= 2
    assert not any(getattr(m, "to_qkv", None) is not None or getattr(m, "fused_projections", False)
                   for m in attention), "Q/K/V must stay separate projections"


def test_decodes_to_images(built):
    spec, pipe, _ = built
    images = _run(pipe, spec, output_type="np", steps=2)
    assert tuple(images.shape) == (2, spec.height, spec.width, 3)
    assert torch.isfinite(images).all()


def test_same_seed_same_output(built):
    spec, _, out = built
    assert torch.equal(_run(spec.build(0), spec), out)
    assert not torch.equal(_run(spec.build(1), spec), out)


def test_save_load_round_trip_offline(built, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline

    spec, pipe, out = built
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is type(pipe)
    assert type(loaded.scheduler) is type(pipe.scheduler)
    assert torch.equal(_run(loaded, spec), out)
