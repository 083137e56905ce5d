"""The capture plan: real configs built on the meta device, their sites, token streams and memory.

* Every shipped real config builds on the meta device (no memory) and site discovery finds the layer counts
  the model cards publish: this is what proves ``pytest --dit-model=flux-dev`` hooks the layers it should.
* The token-stream rules are checked against the tensors the capture records on every tiny twin (same
  pipeline and transformer classes): a wrong rule, width or row count fails there.
"""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from pytest_ditredundancy.capture import hooks as capture_module
from pytest_ditredundancy import profile_model
from pytest_ditredundancy.profiling.capture_plan import IMAGE, JOINT, TEXT, TEXT_PER_FRAME, _rows_and_calls, parse_memory_size, plan_capture, site_features, site_stream
from pytest_ditredundancy.profiling.capture_plan_text import fit_on_gpu, format_plan, run_plan
from pytest_ditredundancy.zoo import get_spec, registered_models
from pytest_ditredundancy.zoo.real_configs import NoRealConfigError, build_on_meta, load_real_config, real_sites, shipped_models

#: Attention layers per layer pattern, from the model cards / papers (FLUX.1: 19 double + 38 single blocks;
#: PixArt-XL/2: 28; SD3-medium: 24 MMDiT blocks; CogVideoX-5B: 42; Latte-1: 28 spatial + 28 temporal; ...).
EXPECTED_LAYERS = {
    "flux-dev": {"transformer_blocks.#.attn": 19, "single_transformer_blocks.#.attn": 38},
    "pixart-alpha": {"transformer_blocks.#.attn1": 28, "transformer_blocks.#.attn2": 28},
    "pixart-sigma": {"transformer_blocks.#.attn1": 28, "transformer_blocks.#.attn2": 28},
    "sd3-medium": {"transformer_blocks.#.attn": 24},
    "cogvideox-5b": {"transformer_blocks.#.attn1": 42},
    "latte-1": {"transformer_blocks.#.attn1": 28, "transformer_blocks.#.attn2": 28,
                "temporal_transformer_blocks.#.attn1": 28},
    "mochi-1": {"transformer_blocks.#.attn1": 48},
    "open-sora-1.2": {"spatial_blocks.#.attn": 28, "spatial_blocks.#.cross_attn": 28,
                      "temporal_blocks.#.attn": 28, "temporal_blocks.#.cross_attn": 28},
    "hunyuan-dit": {"blocks.#.attn1": 40, "blocks.#.attn2": 40},
    "dit-xl-2-256": {"transformer_blocks.#.attn1": 28},
    "sana": {"transformer_blocks.#.attn1": 20, "transformer_blocks.#.attn2": 20},
    "wan2.1": {"blocks.#.attn1": 30, "blocks.#.attn2": 30},
    "ltx-video": {"transformer_blocks.#.attn1": 28, "transformer_blocks.#.attn2": 28},
    "auraflow": {"joint_transformer_blocks.#.attn": 4, "single_transformer_blocks.#.attn": 32},
    "lumina2": {"noise_refiner.#.attn": 2, "context_refiner.#.attn": 2, "layers.#.attn": 26},
}
#: Published parameter counts (billions) of the transformers, to 2 significant digits.
EXPECTED_BILLIONS = {"flux-dev": 11.9, "sd3-medium": 2.0, "pixart-alpha": 0.61, "cogvideox-5b": 5.6,
                     "mochi-1": 10.0, "hunyuan-dit": 1.5, "sana": 1.6, "auraflow": 6.8, "lumina2": 2.6}


def layer_counts(sites) -> dict[str, int]:
    counts: dict[str, set[str]] = {}
    for site in sites:
        counts.setdefault(re.sub(r"\.\d+\.", ".#.", site.layer), set()).add(site.layer)
    return {pattern: len(layers) for pattern, layers in counts.items()}


def test_every_full_model_ships_a_real_config():
    full = sorted(name for name, spec in registered_models().items() if not spec.is_tiny and not spec.trained)
    assert shipped_models() == full
    assert sorted(EXPECTED_LAYERS) == full


@pytest.mark.parametrize("name", sorted(EXPECTED_LAYERS))
def test_real_config_sites_on_the_meta_device(name):
    real = load_real_config(name)
    transformer = build_on_meta(real)
    assert all(t.device.type == "meta" for t in (*transformer.parameters(), *transformer.buffers()))
    sites = real_sites(real, transformer)
    assert layer_counts(sites) == EXPECTED_LAYERS[name]
    if name in EXPECTED_BILLIONS:
        billions = sum(p.numel() for p in transformer.parameters()) / 1e9
        assert billions == pytest.approx(EXPECTED_BILLIONS[name], rel=0.03)


def test_a_wrong_layer_count_in_a_config_fails_the_check():
    real = load_real_config("flux-dev")
    wrong = replace(real, config={**real.config, "num_single_layers": 37})
    assert layer_counts(real_sites(wrong, build_on_meta(wrong))) != EXPECTED_LAYERS["flux-dev"]


def test_flux_plan_matches_hand_arithmetic():
    plan = plan_capture("flux-dev")
    assert (plan.image_tokens, plan.text_tokens) == (4096, 512)  # (1024/16)^2, T5 512
    kinds = {k: sum(1 for s in plan.sites if s.kind == k) for k in plan.kinds}
    assert kinds == {"k": 57, "v": 57, "a": 57, "k_text": 19, "v_text": 19, "a_text": 19}
    # 19 double blocks: 3 x (4096 + 512) x 3072; 38 single blocks: 3 x 4608 x 3072; bf16, one row
    assert plan.held_bytes == (19 * 3 * 4608 + 38 * 3 * 4608) * 3072 * 2
    assert plan.held_bytes / 1e9 == pytest.approx(4.84, abs=0.01)  # "FLUX at 1024^2 holds ~5 GB in bf16"
    assert plan.held_for(("a",)) == 57 * 4096 * 3072 * 2 + 38 * 512 * 3072 * 2
    assert plan.transient_bytes("fused") == 0 < plan.transient_bytes("eager")


def test_video_token_counts_follow_the_published_latent_sizes():
    geometry = load_real_config("cogvideox-5b").geometry
    assert geometry.image_tokens(480, 720, 49) == 13 * 30 * 45  # 17550, CogVideoX's 49-frame sequence
    assert load_real_config("wan2.1").geometry.image_tokens(480, 832, 81) == 21 * 30 * 52
    assert load_real_config("ltx-video").geometry.image_tokens(512, 704, 161) == 21 * 16 * 22
    assert load_real_config("mochi-1").geometry.image_tokens(480, 848, 163) == 28 * 30 * 53


def test_fused_projection_output_is_held_once():
    plan = plan_capture("open-sora-1.2", kinds=("k", "v"))
    k_only = plan_capture("open-sora-1.2", kinds=("k",))
    assert plan.held_bytes == k_only.held_bytes  # K and V views keep the same qkv output alive
    site = next(s for s in k_only.sites if s.kind == "k")
    assert site.storage_bytes == 3 * site.rows * site.tokens * site.features * 2


@pytest.mark.parametrize("text, expected", [("80GB", 80 * 10**9), ("80GiB", 80 * 2**30), ("141G", 141 * 10**9),
                                            ("0.5TB", 5 * 10**11), ("512MiB", 512 * 2**20)])
def test_gpu_memory_sizes(text, expected):
    assert parse_memory_size(text) == expected


@pytest.mark.parametrize("text", ["80", "eighty GB", "80XB", "", "0GB"])
def test_bad_gpu_memory_names_the_fix(text):
    with pytest.raises(ValueError, match="--gpu-memory.*80GB"):
        parse_memory_size(text)


def test_fit_warning_and_lighter_mode():
    plan = plan_capture("flux-dev")
    roomy, tight = 80 * 10**9, plan.model_bytes + plan.held_for(("a",)) + plan.transient_bytes("eager") + 10**6
    assert fit_on_gpu(plan, roomy).fits
    assert not fit_on_gpu(plan, tight).fits and fit_on_gpu(plan, tight).model_fits
    text = format_plan(plan, tight)
    assert "WARNING: the capture would not fit next to the model" in text and "kinds=a" in text
    assert "fits on a" in format_plan(plan, roomy)


def test_plan_command_errors(capsys):
    assert run_plan("flux-dv") == 2
    assert "unknown model 'flux-dv'" in capsys.readouterr().err
    assert run_plan("tiny-flux-dev") == 2
    assert "--dit-model=flux-dev" in capsys.readouterr().err
    assert run_plan("flux-dev", gpu_memory="lots") == 2
    assert "80GB" in capsys.readouterr().err
    assert run_plan("flux-dev", kinds="q") == 2
    assert "unknown kinds" in capsys.readouterr().err
    assert run_plan("sana", gpu_memory="80GB") == 0
    assert "transformer_blocks.#.attn1" in capsys.readouterr().out
    assert run_plan("wan2.1", gpu_memory="24GB") == 1


def test_no_real_config_for_an_unshipped_model(monkeypatch):
    from pytest_ditredundancy.zoo import ModelSpec, registered_models
    from pytest_ditredundancy.zoo import registry

    registered_models()  # the built-in zoo first; the test model is removed again at teardown
    monkeypatch.setitem(registry._REGISTRY, "plan-test-model", ModelSpec(
        "plan-test-model", "flux", "FluxPipeline", "me/x", steps=4, height=64, width=64, guidance_scale=None,
        scheduler="flow-euler"))
    with pytest.raises(NoRealConfigError, match="data/configs/plan-test-model.json"):
        load_real_config("plan-test-model")


# -- the stream rules against what the capture really records on the tiny twins -------------------------------
@pytest.fixture
def recorded_captures(monkeypatch):
    captures = []
    original = capture_module.RedundancyCapture.profile

    def recording(self, **metadata):
        captures.append(self)
        return original(self, **metadata)

    monkeypatch.setattr(capture_module.RedundancyCapture, "profile", recording)
    return captures


@pytest.mark.parametrize("full", sorted(EXPECTED_LAYERS))
def test_stream_rules_match_captured_tensors(full, recorded_captures, tiny_pipeline_cache):
    spec = get_spec(f"tiny-{full}")
    profile_model(tiny_pipeline_cache(spec.name), prompts=["a red bus"], steps=2, seed=0)
    cap = recorded_captures[-1]
    rows, calls = _rows_and_calls(spec, 1)
    run = next(r for r in cap.runs if r.series)
    observed: dict[str, set[int]] = {}
    assert {call for _, call in run.series} == set(range(calls))
    for (index, _call), series in run.series.items():
        site = cap.sites[index]
        features = site_features(site)
        assert series.rows == rows, site.layer
        assert series.numel % features == 0, f"{site.layer}/{site.kind}: width {features} does not divide"
        observed.setdefault(site_stream(spec.family, site.layer, site.kind), set()).add(series.numel // features)
    packed = observed.pop(JOINT, set()) if spec.family == "lumina2" else set()
    assert all(len(tokens) == 1 for tokens in observed.values()), observed
    tokens = {stream: values.pop() for stream, values in observed.items()}
    # Lumina2 packs each call's joint sequence to its real caption length: the plan's padded length bounds it
    assert all(tokens[IMAGE] <= n <= tokens[IMAGE] + tokens[TEXT] for n in packed) and (packed or JOINT in tokens
                                                                                        or spec.family != "lumina2")
    if JOINT in tokens:
        assert tokens[JOINT] == tokens[IMAGE] + tokens[TEXT]
    if TEXT_PER_FRAME in tokens:
        assert tokens[TEXT_PER_FRAME] % spec.num_frames == 0 and tokens[TEXT_PER_FRAME] != tokens[IMAGE]
    assert IMAGE in tokens


def test_stream_rules_fail_for_a_wrong_rule(monkeypatch):
    from pytest_ditredundancy.profiling import capture_plan

    assert site_stream("flux", "single_transformer_blocks.3.attn", "k") == JOINT
    monkeypatch.setitem(capture_plan.STREAM_RULES, "flux", [])
    assert site_stream("flux", "single_transformer_blocks.3.attn", "k") == IMAGE
    with pytest.raises(LookupError, match="STREAM_RULES"):
        site_stream("unknown-family", "x.attn", "k")

