"""``protocol="paper"``: the redundancy study's measurement, reproduced exactly on the tiny twins of its seven models.

Parity: every family's paper-protocol profile equals, within float32 rounding, what an independent
re-implementation of the study's recording processors measures on the same pipeline (``study_reference``),
run the study's way (one caption per call, same seed, the study's steps and guidance).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from study_reference import STUDY, study_profile

from pytest_ditredundancy import capture_redundancy, get_spec, profile_model
from pytest_ditredundancy.profiling.paper import PAPER_SETUPS, ProtocolError, paper_spec
from pytest_ditredundancy.profiling.prompts import coco_prompts
from pytest_ditredundancy.profiling.runner import settings_for
from pytest_ditredundancy.zoo import tiny_model_names

PAPER_TWINS = [name for name in tiny_model_names() if get_spec(name).family in PAPER_SETUPS]
#: two captions of the study's file, one with the trailing space the study kept
CAPTIONS = coco_prompts()[:2]
#: float32 rounding of a mean over one tensor (the study) vs. per-row float32 sums added in float64 (here)
RTOL = 2e-6


def test_the_seven_families_have_tiny_twins():
    assert sorted(get_spec(name).family for name in PAPER_TWINS) == sorted(PAPER_SETUPS) == sorted(STUDY)
    assert CAPTIONS[0].endswith(" ")


@pytest.mark.parametrize("name", PAPER_TWINS)
def test_parity_with_the_study_reimplementation(name, tiny_pipeline_cache):
    spec, pipe = get_spec(name), tiny_pipeline_cache(name)
    profile = profile_model(pipe, prompts=CAPTIONS, protocol="paper")
    study = STUDY[spec.family]
    size = {"height": spec.height, "width": spec.width, "num_frames": spec.num_frames}
    call = {k: v for k, v in spec.call_kwargs.items() if k != "mask_feature"}  # Latte: the study kept the default
    reference, layers, latents = study_profile(pipe, spec.family, CAPTIONS, size=size, call_kwargs=call,
                                               frames_argument=spec.frames_argument)
    assert profile.branches == ["batch"] and profile.kinds == ["k", "v", "a"]
    assert profile.layers == layers  # self-attention only, in the study's order
    assert profile.num_step_pairs == study["steps"] - 1
    assert profile.metadata.protocol == "paper" and profile.metadata.seed == study["seed"]
    assert profile.metadata.guidance_scale == study["guidance"]
    assert profile.metadata.prompts == CAPTIONS and profile.computed.all()
    for k, kind in enumerate(profile.kinds):
        np.testing.assert_allclose(profile.values["abs_l1"][:, 0, k], reference[kind], rtol=RTOL, atol=0,
                                   err_msg=f"{name} {kind}")
    # the reference processors reproduce the model: the same sample as the pipeline alone
    if spec.family == "open-sora":
        plain = pipe.run([CAPTIONS[0]], num_inference_steps=study["steps"], generators=[torch.Generator().manual_seed(
            study["seed"])], use_timestep_transform=True, aes=6.5, **size)
    else:
        frames = {spec.frames_argument: size["num_frames"]} if size["num_frames"] else {}
        plain = pipe(prompt=CAPTIONS[0], generator=torch.Generator().manual_seed(study["seed"]),
                     num_inference_steps=study["steps"], guidance_scale=study["guidance"], height=size["height"],
                     width=size["width"], output_type="latent", **frames, **call)
        plain = plain[0] if isinstance(plain, tuple) else getattr(plain, "images", getattr(plain, "frames", plain))
    assert torch.equal(torch.as_tensor(plain), latents[0])


@pytest.mark.parametrize("name", ["tiny-flux-dev", "tiny-cogvideox-5b", "tiny-mochi-1"])
def test_rotated_keys_are_not_the_projection_output(name, tiny_pipeline_cache):
    """Negative control: measured on ``to_k`` (before norm and RoPE), K would miss the study's values."""
    spec, pipe = get_spec(name), tiny_pipeline_cache(name)
    paper = profile_model(pipe, prompts=CAPTIONS[:1], protocol="paper", steps=6)
    settings = settings_for(spec, protocol="paper", steps=6, num_prompts=1, seed=None)
    with capture_redundancy(pipe, kinds=["k"], branch_layout=spec.branch_layout, whole_batch=True) as cap:
        from pytest_ditredundancy.profiling.runner import call_kwargs

        pipe(**call_kwargs(paper_spec(spec), settings, CAPTIONS[:1], pipe, [torch.Generator().manual_seed(settings.seed)]))
    projection = cap.profile()
    layer = paper.layers[0]
    rotated = paper.series(kind="k", layer=layer, branch="batch")[0]
    raw = projection.series(kind="k", layer=layer, branch="batch")[0]
    assert not np.allclose(rotated, raw, rtol=1e-2)


def test_paper_settings_metadata_and_key():
    spec = get_spec("tiny-pixart-alpha")
    settings = settings_for(spec, protocol="paper", seed=None, num_prompts=10)
    assert settings.key() == "paper-steps20-dpm-solver-seed42-p10-32x32-g4.5"
    assert settings_for(spec).key() == "steps20-dpm-solver-seed0-p8-32x32-g4.5"  # the project's keys are unchanged
    assert settings_for(get_spec("tiny-mochi-1"), protocol="paper", seed=None).steps == 64
    full = paper_spec(get_spec("latte-1"))
    assert (full.height, full.width, full.num_frames, full.dtype, full.steps) == (512, 512, 16, "float16", 50)
    assert "mask_feature" not in full.call_kwargs and "mask_feature" not in paper_spec(get_spec("tiny-latte-1")).call_kwargs
    assert paper_spec(paper_spec(spec)) == paper_spec(spec)


def test_the_paper_protocol_refuses_what_the_study_did_not_do(tiny_pipeline_cache):
    with pytest.raises(ProtocolError, match="measured cogvideox, flux, latte, mochi, open-sora, pixart-alpha, sd3"):
        profile_model(tiny_pipeline_cache("tiny-wan2.1"), prompts=CAPTIONS, protocol="paper")
    with pytest.raises(ProtocolError, match="one prompt per pipeline call"):
        profile_model(tiny_pipeline_cache("tiny-pixart-alpha"), prompts=CAPTIONS, protocol="paper", batch_size=2)
    with pytest.raises(ProtocolError, match="unknown protocol"):
        profile_model(tiny_pipeline_cache("tiny-pixart-alpha"), prompts=CAPTIONS, protocol="study")


def _study_cv(path: Path) -> dict[str, float]:
    """The study's CV, from a profile JSON with nothing but json and numpy: per kind, [prompt, layer, step] of
    ΔX, then mean over cells of population std / mean across prompts (its analysis script). The file's numbers
    are float32 in their shortest form: read back as float32 they are the profile's values exactly."""
    data = json.loads(path.read_text(encoding="utf-8"))
    shape = data["shape"]
    cells = {kind: np.zeros((shape["prompts"], len(shape["layers"]), shape["step_pairs"]), dtype=np.float32)
             for kind in shape["kinds"]}
    for series in data["series"]:
        cells[series["kind"]][series["prompt"], shape["layers"].index(series["layer"])] = series["abs_l1"]
    cells = {kind: c.astype(np.float64) for kind, c in cells.items()}
    return {kind: float(np.mean(np.sqrt(np.var(c, axis=0)) / np.mean(c, axis=0))) for kind, c in cells.items()}


def test_report_shows_the_study_cv_of_the_paper_profile(pytester, tmp_path):
    """Done when: profile_model("tiny-pixart-alpha", protocol="paper"), recomputed from its JSON with the study's
    procedure, gives the CV the report shows."""
    pytester.makepyfile(test_profile_json=f"""
def test_save(dit_profile):
    dit_profile().save({str(tmp_path / 'session.json')!r})
""")
    suite = Path(__file__).resolve().parent.parent / "suites" / "test_prompt_stability.py"
    pytester.makepyfile(test_prompt_stability=suite.read_text(encoding="utf-8"))
    result = pytester.runpytest_subprocess(
        "test_profile_json.py", "test_prompt_stability.py", "--dit-model=tiny-pixart-alpha", "--dit-protocol=paper",
        "--dit-cv-bounds=0,10", "--dit-enforce-claims", f"--dit-json={tmp_path / 'report.json'}",
        f"--dit-report={tmp_path / 'report.html'}", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*protocol paper, 10 prompts from coco1000*"])
    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    entry = report["models"][0]
    assert report["protocol"] == entry["protocol"] == "paper"
    assert all(r["protocol"] == "paper" for r in report["records"])
    session_cv = _study_cv(tmp_path / "session.json")
    for kind, value in entry["paper_cv"].items():
        assert value == pytest.approx(session_cv[kind], rel=1e-9), kind  # the report's number, recomputed
    profile = profile_model("tiny-pixart-alpha", protocol="paper")  # the same run, in this process
    assert profile.num_prompts == 10 and profile.metadata.prompts == coco_prompts()[:10]
    profile.save(tmp_path / "profile.json")
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    for kind, value in _study_cv(tmp_path / "profile.json").items():
        assert value == pytest.approx(entry["paper_cv"][kind], rel=1e-4), kind  # thread counts differ at ~1e-7
        assert f"<td>{value:.3g}</td>" in html  # as the report's statistics table prints it
    assert "protocol paper" in html and "the study&#39;s protocol, exactly" in html


def test_protocol_option_is_validated(pytester):
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest("--dit-protocol=study")
    result.stderr.fnmatch_lines(["*unknown protocol 'study'*--dit-protocol*"])
    result = pytester.runpytest("--dit-protocol=paper", "--dit-model=tiny-wan2.1")
    result.stderr.fnmatch_lines(["*not one of them*--dit-protocol=paper*"])
    result = pytester.runpytest("--dit-protocol=paper", "--dit-batch-size=4")
    result.stderr.fnmatch_lines(["*one prompt per pipeline call*"])
    pytester.makeini("[pytest]\ndit_protocol = paper\n")
    result = pytester.runpytest("--dit-model=tiny-sd3-medium")
    result.stdout.fnmatch_lines(["*protocol paper, 10 prompts from coco1000, each model's study seed*"])


def test_paper_selection_defaults_to_the_seven_twins(pytester):
    pytester.makepyfile("def test_model(dit_model):\n    pass\n")
    result = pytester.runpytest("--collect-only", "-q", "--dit-protocol=paper")
    result.stdout.fnmatch_lines([f"*{len(PAPER_TWINS)} tests collected*"])


def test_module_runs_standalone():
    """The reference imports nothing from the package (it must stay independent of the capture)."""
    source = (Path(__file__).parent / "study_reference.py").read_text(encoding="utf-8")
    assert "pytest_ditredundancy" not in source.split('"""', 2)[2]
    subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, 'tests'); import study_reference"],
                   cwd=Path(__file__).parent.parent, check=True)
