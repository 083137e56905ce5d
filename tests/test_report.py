"""The run report: compact summaries, the JSON document, the self-contained HTML page, and that page in a
real (headless) browser."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from dit_runs import FAST, NO_BASELINES, QUICK_SUITES, browser, run_pytest, use_suites
from pytest_ditredundancy import profile_model
from pytest_ditredundancy.judging.baselines import Baseline, profile_section
from pytest_ditredundancy.judging.tolerances import default_table
from pytest_ditredundancy.plugin.options import DitConfig
from pytest_ditredundancy.report import build_document, render_html
from pytest_ditredundancy.report.document import config_dict
from pytest_ditredundancy.report.summary import baseline_diff, profile_summary
from pytest_ditredundancy.profiling.runner import settings_for
from pytest_ditredundancy.zoo import get_spec

PROMPTS = ["a red bus", "a cat on a sofa", "mountains at dawn"]


@pytest.fixture(scope="module")
def tiny_profiles(tiny_pipeline_cache):
    pipe = tiny_pipeline_cache("tiny-pixart-alpha")
    return {steps: profile_model(pipe, prompts=PROMPTS, steps=steps) for steps in (4, 6)}


def _summary(profile, steps, default_steps=4, baseline=None):
    spec = get_spec("tiny-pixart-alpha")
    settings = settings_for(spec, steps=steps, num_prompts=len(PROMPTS))
    default = settings_for(spec, steps=default_steps, num_prompts=len(PROMPTS))
    return profile_summary(profile, model=spec.name, family=spec.family, in_paper=spec.in_paper, settings=settings,
                           settings_key=settings.key(), default=default, baseline=baseline, device_class="cpu")


def _floats(value):
    if isinstance(value, float):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _floats(v)
    elif isinstance(value, list):
        for v in value:
            yield from _floats(v)


def test_summary_is_compact_plain_and_rounded(tiny_profiles):
    profile = tiny_profiles[4]
    summary = _summary(profile, 4)
    json.dumps(summary, allow_nan=False)  # plain, strict JSON builtins
    assert summary["is_default"] and summary["label"] == "default" and summary["branch"] == "cond"
    for metric in ("abs_l1", "rel_l1"):
        for kind in profile.kinds:
            matrix = summary["matrices"][metric][kind]
            assert len(matrix) == len(profile.layers) and all(len(row) == profile.num_step_pairs for row in matrix)
    b = profile.branches.index("cond")
    expected = profile.mean_over_prompts("abs_l1")[b, profile.kinds.index("a")]
    got = np.array(summary["matrices"]["abs_l1"]["a"], dtype=float)
    np.testing.assert_allclose(got, expected, rtol=5e-4)  # means over prompts, 4 significant digits
    assert all(float(f"{v:.4g}") == v for v in _floats(summary))
    assert "prompts" not in summary["metadata"] and summary["num_prompts"] == 3

    variant = _summary(tiny_profiles[6], 6)
    assert not variant["is_default"] and variant["label"] == "6 steps" and variant["matrices"] == {}
    assert len(variant["curves"]["abs_l1"]["a"]) == 5  # layer-mean curves only


def test_baseline_diff_marks_the_cells_out_of_tolerance(tiny_profiles):
    profile = tiny_profiles[4]
    b, a = profile.branches.index("cond"), profile.kinds.index("a")
    mean = profile.mean_over_prompts("abs_l1")[b].copy()
    mean[a, 1, 2] *= 1.5
    times = list(np.linspace(1, 0, profile.num_step_pairs))
    section = profile_section(profile.kinds, profile.layers, mean, np.zeros_like(mean), metric="abs_l1", branch="cond",
                              times=times)
    baseline = Baseline(Path("base.json"), "tiny-pixart-alpha", "key", {"profile": section, "tolerances": default_table()})
    diff = baseline_diff(profile, baseline, "cpu")
    assert diff["out_of_tolerance"] == [["a", 1, 2]]
    assert diff["excess"]["a"][1][2] > 1 > max(v for row in diff["excess"]["k"] for v in row if v is not None)
    assert _summary(profile, 4, baseline=baseline)["baseline"]["out_of_tolerance"] == [["a", 1, 2]]
    section["layers"] = section["layers"][:-1]
    assert "layout differs" in baseline_diff(profile, baseline, "cpu")["error"]


def _document(summary, model="tiny-pixart-alpha", extra_records=()):
    cfg = DitConfig(models=(model,), device="cpu", dtype="auto", prompts=tuple(PROMPTS), prompt_source="",
                    num_prompts=3, steps=4, scheduler=None, seed=0, batch_size=8, baseline_dir=Path("baselines"),
                    update_baselines=False, step_factors=(2.0,), schedulers=(), cv_bounds=(0.0, 0.2),
                    min_shape_correlation=0.8)
    run = {**config_dict(cfg, [model]), "command": "suites", "workers": None}
    nodeid = f"suites/test_prompt_stability.py::test_prompt_stability[{model}]"
    record = {"model": model, "family": "pixart-alpha", "suite": "prompt_stability", "statistic": "robust_cv[k]",
              "value": 0.12, "bounds": [0.05, 0.2], "passed": True, "nodeid": nodeid, "kind": "k", "paper_cv": 0.11,
              "ci": [0.1, float("nan")]}
    tests = {"collected": 1, "results": {nodeid: "passed"}, "messages": {}, "missing": []}
    env = {"versions": {"pytest-ditredundancy": "0"}, "gpus": [], "devices": ["cpu (x86_64)"], "workers": [],
           "platform": "Linux", "cpu_count": 2, "cuda": None}
    records = [record, *({**r, "model": model, "nodeid": nodeid} for r in extra_records)]
    return build_document(run=run, records=records, summaries=[{**summary, "model": model}], tests=tests,
                          environment=env, started=0.0, finished=1.0)


def test_a_broken_stability_claim_is_never_shown_as_met(tiny_profiles):
    """A claim the model breaks passes the test (claims are reported unless enforced), so its record says
    passed; the report must still say the claim is not met, in the summary cell and in the numbers table."""
    claim = {"family": "pixart-alpha", "suite": "prompt_stability", "statistic": "claim_cv[a]", "value": 0.24,
             "bounds": [0.0, 0.2], "passed": True, "question": "claim", "met": False, "kind": "a"}
    held = {**claim, "statistic": "claim_cv[k]", "value": 0.12, "met": True, "kind": "k"}
    doc = _document(_summary(tiny_profiles[4], 4), extra_records=[claim, held])
    suite = doc["models"][0]["suites"]["prompt_stability"]
    assert suite["passed"] and suite["claims_not_met"] == 1
    html = render_html(doc)
    assert "1 stability claim of the paper not met" in html
    rows = [row for row in html.split("<tr>") if "<code>claim_cv[" in row]
    assert len(rows) == 2
    broken, kept = (rows[0], rows[1]) if "claim_cv[a]" in rows[0] else (rows[1], rows[0])
    assert "claim not met" in broken and "paper&#39;s claim" in broken and "✓" not in broken
    assert "claim not met" not in kept and "✓" in kept


def test_html_is_one_self_contained_file_that_escapes_names(tiny_profiles):
    evil = "tiny</script><b>x</b>"
    doc = _document(_summary(tiny_profiles[4], 4), model=evil)
    assert doc["models"][0]["paper_family"] and doc["records"][0]["ci"] == [0.1, None]
    html = render_html(doc)
    assert "<script src" not in html and "<link" not in html and "@import" not in html
    assert set(re.findall(r"https?://[^\s\"')]+", html)) <= {"http://www.w3.org/2000/svg"}
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    assert evil not in html and "tiny&lt;/script&gt;&lt;b&gt;x&lt;/b&gt;" in html
    data = html.split('<script type="application/json" id="dit-data">')[1].split("</script>")[0]
    embedded = json.loads(data)
    assert embedded["models"][0]["model"] == evil
    assert embedded["models"][0]["profiles"][0]["matrices"]["abs_l1"]["a"]
    assert '"series"' not in html  # per-prompt profile rows never reach the page
    assert "10%–15%" in html and "full-size pixart-alpha" in html


def test_report_paths_have_ini_twins_and_the_command_line_wins(pytester):
    pytester.makeini("[pytest]\ndit_report = out/ini.html\ndit_json = out/ini.json\n")
    pytester.makepyfile("def test_ok():\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*HTML report: out/ini.html", "*JSON report: out/ini.json"])
    doc = json.loads((pytester.path / "out" / "ini.json").read_text())
    assert doc["status"] == "passed" and doc["tests"]["counts"] == {"passed": 1} and doc["models"]
    assert (pytester.path / "out" / "ini.html").read_text().startswith("<!doctype html>")
    pytester.runpytest("-p", "no:cacheprovider", "--dit-report=cli.html").stdout.fnmatch_lines(["*HTML report: cli.html"])
    assert (pytester.path / "cli.html").exists()
    help_text = pytester.runpytest("--help").stdout.str()
    for option, ini in (("--dit-report", "dit_report"), ("--dit-json", "dit_json"), ("--dit-shard", "dit_shard"),
                        ("--dit-progress-interval", "dit_progress_interval")):
        assert option in help_text and ini in help_text


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One serial run of two suites for a tiny model, writing reports/index.html and (ini) reports/report.json."""
    root = tmp_path_factory.mktemp("report-run")
    use_suites(root)
    (root / "pytest.ini").write_text("[pytest]\ndit_json = reports/report.json\n", encoding="utf-8")
    result = run_pytest(root, *QUICK_SUITES, "--dit-model=tiny-pixart-alpha", *FAST, *NO_BASELINES,
                        "--dit-report=reports/index.html", "--dit-progress-interval=0")
    assert result.returncode == 0, result.stdout + result.stderr
    return root, result


def test_tiny_run_writes_the_report_and_names_it_in_the_summary(tiny_run):
    root, result = tiny_run
    lines = result.stdout.splitlines()
    section = lines[next(i for i, line in enumerate(lines) if "ditredundancy" in line and "=" in line):]
    assert any(line.startswith("tiny-pixart-alpha: ok; CV k=") for line in section)
    assert "HTML report: reports/index.html" in section and "JSON report: reports/report.json" in section
    assert "ditredundancy: tiny-pixart-alpha [dpm-solver, 6 steps]: 3/3 prompts" in result.stdout  # progress
    doc = json.loads((root / "reports" / "report.json").read_text())
    (entry,) = doc["models"]
    assert entry["status"] == "passed" and list(entry["suites"]) == ["prompt_stability", "step_stability"]
    assert [p["label"] for p in entry["profiles"]] == ["default", "12 steps"]
    assert entry["paper_family"] and not entry["in_paper"] and set(entry["paper_cv"]) == {"k", "v", "a"}
    assert doc["paper"]["cv_range"] == [0.1, 0.15] and doc["tests"]["counts"] == {"passed": 2}
    assert doc["environment"]["workers"][0]["worker"] == "main" and doc["dtypes"] == ["float32"]
    html = (root / "reports" / "index.html").read_text()
    assert len(html) < 200_000 and '"series"' not in html


def _chromium(args: list[str], page: Path, profile_dir: Path) -> subprocess.CompletedProcess:
    exe = browser()
    command = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile_dir}",
               "--enable-logging=stderr", "--v=0", *args, page.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(browser() is None, reason="no Chromium/Chrome on PATH (Debian: apt-get install chromium)")
def test_report_renders_in_a_headless_browser_without_console_errors(tiny_run, tmp_path):
    root, _ = tiny_run
    page = root / "reports" / "index.html"
    dom = _chromium(["--dump-dom"], page, tmp_path / "profile")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-rendered="done"' in dom.stdout  # the script ran to its end
    assert len(re.findall(r'<canvas class="heatmap"[^>]*data-rendered="1"', dom.stdout)) == 3  # K, V, A
    assert len(re.findall(r'<svg class="chart"[^>]*data-rendered="1"', dom.stdout)) == 6  # curves + overlays
    assert "<title>layer 0 transformer_blocks.0.attn1" in dom.stdout  # numbers on hover
    shot = tmp_path / "report.png"
    run = _chromium(["--window-size=1400,2200", "--hide-scrollbars", f"--screenshot={shot}"], page, tmp_path / "profile")
    assert run.returncode == 0 and shot.stat().st_size > 20_000
    console = [line for line in (dom.stderr + run.stderr).splitlines() if ":CONSOLE" in line]
    assert not console, console  # no errors, no CSP violations (the page fetches nothing)


CACHE_RECORD = {
    "model": "tiny-pixart-alpha", "family": "pixart-alpha", "suite": "cache_gate", "statistic": "psnr", "value": 72.4,
    "bounds": [71.0, 74.0], "passed": True, "nodeid": "suites/test_cache_gate.py::test_cache_gate[tiny-pixart-alpha-x]",
    "strategy": "profile:budget=0.3", "psnr": 72.4, "ssim": 0.99, "latent_mse": 0.066, "speedup": 1.2,
    "skipped": {"attention": 0.3, "transformer": 0.17}, "spearman": 0.99,
    "sweep": [{"budget": b, "order": o, "skipped_fraction": b, "predicted_error": b * (1 if o == "cheapest" else 9),
               "measured_error": b * (0.1 if o == "cheapest" else 1)} for b in (0.1, 0.3) for o in ("cheapest", "costliest")],
    "schedule": {"layers": ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"], "steps": 4,
                 "mask": [[False, True, True, False], [False, False, True, True]], "skipped_fraction": 0.5},
}


def test_cache_gate_section_draws_frontier_premise_and_schedule(tiny_profiles, tmp_path):
    doc = _document(_summary(tiny_profiles[4], 4))
    cache = dict(CACHE_RECORD)
    doc["models"][0]["suites"]["cache_gate"] = {"records": [cache], "title": "Cache gate", "passed": True,
                                               "headline": "1/1 checks within bounds", "bounds": ""}
    html = render_html(doc)
    assert "Cache gate" in html
    data = json.loads(html.split('<script type="application/json" id="dit-data">')[1].split("</script>")[0])
    (entry,) = data["models"][0]["cache"]
    assert entry["schedule"]["mask"][0] == [False, True, True, False] and len(entry["sweep"]) == 4
    if browser() is None:
        pytest.skip("no Chromium/Chrome on PATH (Debian: apt-get install chromium) for the drawing check")
    page = tmp_path / "index.html"
    page.write_text(html, encoding="utf-8")
    dom = _chromium(["--dump-dom"], page, tmp_path / "profile")
    assert 'data-rendered="done"' in dom.stdout
    assert len(re.findall(r'<svg class="chart scatter"[^>]*data-rendered="1"', dom.stdout)) == 2  # frontier, premise
    assert "Schedule: profile:budget=0.3" in dom.stdout  # the layer x step mask
    assert not [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
