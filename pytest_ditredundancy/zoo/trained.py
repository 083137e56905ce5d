"""Zoo entries for the small DiTs trained on the procedural shapes data and shipped inside the package.

Unlike the ``tiny-*`` twins they are not built from a seed: their weights are loaded with the pipeline's own
``from_pretrained`` from ``pytest_ditredundancy/weights/<name>`` (offline). Prompts should be the dataset's
captions (the ``shapes`` prompt set, their default); anything else is outside what they learnt.
See docs/trained-models.md.
"""

from __future__ import annotations

from pathlib import Path

from .registry import ModelSpec

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
PACKAGE_PREFIX = "pytest_ditredundancy/weights/"  # the specs' checkpoint: where the weights sit in the package


def shipped_weights(spec: ModelSpec) -> Path:
    """The folder ``load_model`` reads a trained spec from (its checkpoint names it inside the package)."""
    if not spec.checkpoint or not spec.checkpoint.startswith(PACKAGE_PREFIX):
        raise ValueError(f"{spec.name}: a trained model's checkpoint must start with {PACKAGE_PREFIX!r}, "
                         f"got {spec.checkpoint!r}")
    path = WEIGHTS / spec.checkpoint[len(PACKAGE_PREFIX):]
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{spec.name}: no weights at {path}; reinstall the package or retrain with "
                                f"`python -m pytest_ditredundancy.train {spec.name}`")
    return path

#: PixArt masks caption padding, so its default 120 tokens are fine; caption cleaning needs bs4/ftfy and the
#: captions are clean already. SD3's joint attention sees every padding token, so it runs with the 16 T5 tokens
#: it was trained with (its CLIP tokenizers are 16 tokens long by construction).
_PIXART = {"use_resolution_binning": False, "clean_caption": False}
_SD3 = {"max_sequence_length": 16}


def trained_specs() -> list[ModelSpec]:
    pixart = dict(family="pixart-alpha", pipeline_class="PixArtAlphaPipeline", steps=20, height=32, width=32,
                  guidance_scale=4.5, scheduler="dpm-solver", dtype="float32", prediction="v_prediction",
                  branch_layout="batched-uncond-cond", call_kwargs=_PIXART, trained=True,
                  prompt_set="shapes")
    return [
        ModelSpec("trained-pixart", checkpoint=PACKAGE_PREFIX + "trained-pixart", **pixart,
                  description="PixArt-alpha class trained on procedural shapes (CPU, shipped weights)"),
        ModelSpec("trained-pixart-ft", checkpoint=PACKAGE_PREFIX + "trained-pixart-ft", **pixart,
                  description="trained-pixart fine-tuned on a shifted distribution (white/gray backgrounds, "
                              "more red)"),
        ModelSpec("trained-sd3", family="sd3", pipeline_class="StableDiffusion3Pipeline",
                  checkpoint=PACKAGE_PREFIX + "trained-sd3", steps=28, height=32, width=32, guidance_scale=7.0,
                  scheduler="flow-euler", dtype="float32", branch_layout="batched-uncond-cond", call_kwargs=_SD3, trained=True, prompt_set="shapes",
                  description="SD3 class (MMDiT, flow matching) trained on procedural shapes (CPU, shipped weights)"),
    ]
