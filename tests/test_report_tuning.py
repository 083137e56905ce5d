"""The cache tuning in the report: the HTML section per model and search (frontier with floors, cliffs and the
recommendation, predicted vs measured skip pattern, recommendation box with the line of code, transfer table) and
the ``cache_tune`` summary of the JSON document, from tuning records built by hand in the format the tuning test
records."""

from __future__ import annotations

import html as htmllib
import json
import re
import subprocess
from pathlib import Path

import pytest
from dit_runs import browser
from markupsafe import escape

from pytest_ditredundancy.cache import engine_of, parse_spec
from pytest_ditredundancy.cache.floors import Floors, Quality, parse_floors
from pytest_ditredundancy.cache.tuning import Cliff, TunePoint, TuneResult
from pytest_ditredundancy.plugin.options import DitConfig
from pytest_ditredundancy.report import build_document, render_html
from pytest_ditredundancy.report.document import config_dict
from pytest_ditredundancy.report.tuning import floor_texts, pattern, search_summary

MODEL = "tiny-pixart-alpha"
STEPS = 10
KEY = "project-s10-dpm-r64-p3"


def _cached(*steps: int, share: float = 1.0) -> list[float]:
    return [share if s in steps else 0.0 for s in range(STEPS)]


def _point(tune: str, value: float, quality: tuple, skipped: float, cached: list[float], floors: Floors,
           predicted: dict | None = None) -> TunePoint:
    point = TunePoint(value, tune.split(":")[0] + f":{tune.split(':')[1].split('=')[0]}={value:g}", Quality(*quality),
                      {"attention": min(1.0, skipped * 1.2), "attention_calls": skipped * 1.1, "transformer": skipped},
                      1 / (1 - skipped), cached, predicted=predicted)
    point.failures = floors.failures(point.quality)
    return point


def _predicted(value: float, predicted: list[int], measured: list[float]) -> dict:
    """The prediction in the form the bound predictor records: the raw pattern and its error, and the calibrated
    one (calibrated on the first measured value, 0.02 here)."""
    want = [s in predicted for s in range(STEPS)]
    have = [m > 0 for m in measured]
    wrong = sum(a != b for a, b in zip(want, have))
    raw = {"steps": STEPS, "predicted_cached": sum(want), "measured_cached": sum(have), "wrong": wrong,
           "missed": [], "extra": [], "fraction_error": wrong / STEPS, "right_share": 1 - wrong / STEPS,
           "count_error": sum(want) - sum(have)}
    calibrated = [s for s in range(STEPS) if have[s]]
    return {"strategy": "fbcache", "param": "threshold", "value": value, "predicted_steps": predicted,
            "fractions": [1.0 if w else 0.0 for w in want], "raw": raw,
            "calibrated": {**raw, "predicted_cached": len(calibrated), "wrong": 0, "right_share": 1.0},
            "scale": 1.7, "calibrated_on": 0.02, "calibrated_steps": calibrated}


def _record(result: TuneResult, tune: str, *, passed: bool, updated: bool, code: str | None,
            speedup: float | None = None, transfer: list | None = None, stored: list | None = None) -> dict:
    """What the tuning test records (``TuneCheck._entry`` and ``_record``)."""
    strategy, rest = tune.split(":")
    param, bounds = rest.split(",")[0].split("=")
    data = result.as_dict()
    data.update({"model": MODEL, "family": "pixart-alpha", "suite": "cache_tune", "statistic": "psnr",
                 "value": None if result.recommendation is None else result.recommendation.quality.psnr,
                 "bounds": None, "passed": passed, "nodeid": f"suites/test_cache_tune.py::test_cache_tune[{MODEL}-{tune}]",
                 "strategy": strategy, "parameter": param, "range": [float(b) for b in bounds.split("..")],
                 "settings_key": KEY, "settings": {"steps": STEPS}, "speedup": speedup,
                 "seconds": None if speedup is None else {"uncached": [1.0, 1.1, 1.0], "cached": [0.6, 0.62, 0.61]},
                 "code": code, "transfer": transfer or [], "stored_frontier": stored, "updated": updated})
    return data


def passing_search(*, code: str | None = None, stored: bool = False) -> dict:
    """fbcache: quality falls with the threshold, a 12 dB cliff between 0.26 and 0.3, 0.26 recommended."""
    tune, floors = "fbcache:threshold=0.02..0.5", parse_floors("psnr:35,ssim:0.95")
    measured = {0.02: _cached(), 0.1: _cached(6, 8), 0.2: _cached(4, 6, 8), 0.26: _cached(3, 5, 7, 8),
                0.3: _cached(2, 3, 4, 5, 6, 7, 8), 0.5: _cached(*range(1, 10))}
    quality = {0.02: (100.0, 1.0, 0.0), 0.1: (44.1, 0.995, 2e-5), 0.2: (38.2, 0.982, 1.1e-4),
               0.26: (36.0, 0.971, 2.4e-4), 0.3: (24.0, 0.81, 3.9e-3), 0.5: (18.0, 0.62, 1.2e-2)}
    predicted = {0.26: [3, 5, 7, 8, 9], 0.1: [6, 8], 0.02: []}
    points = [_point(tune, v, quality[v], sum(c > 0 for c in measured[v]) / STEPS * 0.8, measured[v], floors,
                     _predicted(v, predicted[v], measured[v]) if v in predicted else None) for v in measured]
    chosen = next(p for p in points if p.value == 0.26)
    cliff = Cliff(0.26, 0.3, 36.0, 24.0, chosen.skipped["transformer"], points[4].skipped["transformer"])
    result = TuneResult(tune, floors, points, [cliff], chosen, chosen, 6, sorted(measured), True,
                        ["candidates from the prediction: 5 values"])
    transfer = [
        {"variant": "steps x0.5 (5)", "settings_key": "project-s5-dpm-r64-p3", "value": 0.26, "holds": True,
         "quality": {"psnr": 37.5, "ssim": 0.975, "latent_mse": 2e-4, "adherence": None}, "skipped": 0.3, "failures": [],
         "tuned_value": 0.3, "tuned_skipped": 0.4, "runs": 5},
        {"variant": "steps x2 (20)", "settings_key": "project-s20-dpm-r64-p3", "value": 0.26, "holds": False,
         "quality": {"psnr": 33.1, "ssim": 0.96, "latent_mse": 4e-4, "adherence": None}, "skipped": 0.45,
         "failures": ["psnr 33.1 below its floor 35"], "tuned_value": 0.2, "tuned_skipped": 0.38, "runs": 6},
        {"variant": "scheduler heun: does not run (the pipeline rejects it)", "holds": None},
    ]
    fbcache = parse_spec(chosen.setting)
    line = code or engine_of(fbcache).code_line(fbcache, has_enable_cache=True)
    old = None
    if stored:
        old = [{**p.as_dict(), "quality": {**p.quality.as_dict(), "psnr": min(100.0, p.quality.psnr + 0.5)}}
               for p in points]
    return _record(result, tune, passed=True, updated=not stored, code=line, speedup=1.64, transfer=transfer,
                   stored=old)


def failing_search() -> dict:
    """cachedit: every setting breaks the PSNR floor; nothing is stored, the closest is named."""
    tune, floors = "cachedit:rdt=0.02..0.4,Fn=1", parse_floors("psnr:45,latent_mse:1e-4")
    points = [_point(tune, v, q, s, _cached(*c), floors) for v, q, s, c in (
        (0.02, (41.0, 0.99, 5e-5), 0.1, (5,)), (0.21, (33.0, 0.95, 9e-4), 0.3, (3, 5, 7)),
        (0.4, (27.5, 0.9, 3e-3), 0.5, (2, 3, 5, 6, 7)))]
    best = max(points, key=lambda p: floors.margin(p.quality))
    result = TuneResult(tune, floors, points, [], None, best, 3, [0.02, 0.21, 0.4], True, [])
    return _record(result, tune, passed=False, updated=False, code=None)


def unpredicted_search() -> dict:
    """magcache without a prediction of its skip pattern (and no PSNR floor: nothing to draw as a line)."""
    tune, floors = "magcache:threshold=0.01..0.5", parse_floors("ssim:0.9,latent_mse:1e-3")
    points = [_point(tune, v, q, s, _cached(*c), floors) for v, q, s, c in (
        (0.01, (52.0, 0.999, 1e-6), 0.0, ()), (0.25, (39.0, 0.97, 3e-4), 0.32, (4, 6, 8)),
        (0.5, (30.0, 0.88, 2e-3), 0.56, (2, 4, 5, 6, 7, 8, 9)))]
    result = TuneResult(tune, floors, points, [], points[1], points[1], 3, [0.01, 0.25, 0.5], True, [])
    code = ("pipe.transformer.enable_cache(MagCacheConfig(threshold=0.25, num_inference_steps=10, "
            "mag_ratios=[1.0, 0.98, 0.97, 0.95, 0.93, 0.9, 0.87, 0.84, 0.8, 0.76]))")
    return _record(result, tune, passed=True, updated=True, code=code)


def _document(*records: dict) -> dict:
    cfg = DitConfig(models=(MODEL,), device="cpu", dtype="auto", prompts=("a red bus", "a cat", "a hill"),
                    prompt_source="", num_prompts=3, steps=STEPS, scheduler=None, seed=0, batch_size=8,
                    baseline_dir=Path("baselines"), update_baselines=False, step_factors=(2.0,), schedulers=(),
                    cv_bounds=(0.0, 0.2), min_shape_correlation=0.8)
    run = {**config_dict(cfg, [MODEL]), "command": "suites", "workers": None}
    nodeid = f"suites/test_prompt_stability.py::test_prompt_stability[{MODEL}]"
    stability = {"model": MODEL, "family": "pixart-alpha", "suite": "prompt_stability", "statistic": "robust_cv[k]",
                 "value": 0.12, "bounds": [0.05, 0.2], "passed": True, "nodeid": nodeid, "kind": "k"}
    results = {nodeid: "passed", **{r["nodeid"]: "passed" if r["passed"] else "failed" for r in records}}
    tests = {"collected": len(results), "results": results, "messages": {}, "missing": []}
    env = {"versions": {"pytest-ditredundancy": "0"}, "gpus": [], "devices": ["cpu (x86_64)"], "workers": [],
           "platform": "Linux", "cpu_count": 2, "cuda": None}
    return build_document(run=run, records=[stability, *records], summaries=[], tests=tests, environment=env,
                          started=0.0, finished=1.0)


def _page_data(page: str) -> dict:
    return json.loads(page.split('<script type="application/json" id="dit-data">')[1].split("</script>")[0])


def _search_html(page: str, index: int) -> str:
    """The HTML of the model's ``index``-th search (1-based)."""
    return re.sub(r"\s+", " ", page.split(f'id="tune-1-{index}"')[1].split('<div class="tune" ')[0])


# -- no section -----------------------------------------------------------------------------------------------------
def test_no_tuning_section_without_tuning_records():
    doc = _document()
    assert doc["models"][0]["cache_tune"] == []
    page = render_html(doc)
    main = page.split("<main>")[1].split("</main>")[0]  # the page, without its inline style and script
    assert "<h2>tiny-pixart-alpha</h2>" in main
    assert "Cache tuning" not in main and 'class="tune"' not in main and 'data-role="tune"' not in main
    assert _page_data(page)["models"][0]["tune"] == []


# -- nothing met the floors ------------------------------------------------------------------------------------------
def test_nothing_met_the_floors_says_so_and_names_the_closest():
    doc = _document(failing_search())
    (summary,) = doc["models"][0]["cache_tune"]
    assert summary["recommendation"] is None and summary["met_floors"] is False and summary["code"] is None
    assert summary["best"]["setting"] == "cachedit:rdt=0.02" and summary["best"]["failures"] == [
        "psnr 41 below its floor 45"]
    assert summary["mode"] == "searched" and summary["passed"] is False
    assert doc["models"][0]["suites"]["cache_tune"]["headline"] == "cachedit:rdt=0.02..0.4,Fn=1: nothing met the floors"
    page = render_html(doc)
    search = _search_html(page, 1)
    assert "Nothing met the floors" in search and "Recommended:" not in search and '<pre class="code">' not in search
    assert "The closest is <code>cachedit:rdt=0.02</code>: psnr 41 below its floor 45." in search
    assert "keeps PSNR ≥ 45 dB, latent MSE ≤ 0.0001" in search
    assert "searched, nothing stored" in search and '<span class="badge failed">failed</span>' in search
    assert 'class="recbox ok"' not in search
    (view,) = _page_data(page)["models"][0]["tune"]
    assert view["recommended"] is None and view["closest"] == 0.02


# -- a passing search: floor, cliff, prediction, recommendation, transfer -------------------------------------------
def test_a_passing_search_draws_floor_cliff_prediction_recommendation_and_transfer():
    doc = _document(passing_search())
    (summary,) = doc["models"][0]["cache_tune"]
    rec = summary["recommendation"]
    assert rec["setting"] == "fbcache:threshold=0.26" and rec["value"] == 0.26 and rec["passes"]
    assert rec["speedup"] == 1.64 and rec["repeats"] == 3 and rec["skipped"]["transformer"] == pytest.approx(0.32)
    assert rec["quality"] == {"psnr": 36.0, "ssim": 0.971, "latent_mse": 2.4e-4, "adherence": None}
    assert summary["floors"] == {"psnr": 35.0, "ssim": 0.95} and summary["runs"] == 6 and summary["points"] == 6
    assert summary["code"] == "pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.26))"
    (cliff,) = summary["cliffs"]
    assert (cliff["below"], cliff["above"], cliff["drop_db"]) == (0.26, 0.3, 12.0)
    assert [(t["variant"], t["holds"]) for t in summary["transfer"]] == [
        ("steps x0.5 (5)", True), ("steps x2 (20)", False), ("scheduler heun: does not run (the pipeline rejects it)", None)]
    assert summary["transfer"][1]["failures"] == ["psnr 33.1 below its floor 35"] and summary["transfer"][1]["psnr"] == 33.1
    assert summary["prediction"]["error"]["wrong"] == 1 and summary["prediction"]["calibrated_error"]["wrong"] == 0
    assert summary["best"] is None and summary["mode"] == "tuned" and summary["met_floors"]
    headline = doc["models"][0]["suites"]["cache_tune"]["headline"]
    assert headline == "fbcache:threshold=0.26 ×1.64, 32% skipped"

    page = render_html(doc)
    assert "<h3>Cache tuning" in page and headline in page  # the section and the summary table's cell
    search = _search_html(page, 1)
    assert "The dashed red line is the PSNR floor, 35 dB." in search and "Other floors: SSIM ≥ 0.95." in search
    assert ('<li class="cliff">Cliff between threshold=0.26 and threshold=0.3:' in search
            and "PSNR 36 → 24 dB (−12 dB)" in search)
    assert "<strong>1 of 10 steps wrong</strong> (predicted 5 cached, measured 4)" in search
    assert "Calibrated (threshold scale ×1.7, fitted at threshold=0.02): 0 of 10 steps wrong." in search
    assert "Recommended: <code>fbcache:threshold=0.26</code>" in search and 'class="recbox ok"' in search
    assert "×1.64 wall time (median of 3 interleaved" in search and "32.0% of the transformer" in search
    assert ('<pre class="code"><code>pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.26))</code></pre>'
            in search)
    rows = search.split('<div class="transfer">')[1]
    assert "steps x2 (20)" in rows and "✗ psnr 33.1 below its floor 35" in rows and "did not run" in rows
    assert "threshold=0.3 (40% skipped)" in rows
    (view,) = _page_data(page)["models"][0]["tune"]
    assert view["recommended"] == 0.26 and view["closest"] is None and view["floors"]["psnr"] == 35.0
    assert [p["value"] for p in view["points"]] == [0.02, 0.1, 0.2, 0.26, 0.3, 0.5]
    assert [p["passes"] for p in view["points"]] == [True, True, True, True, False, False]
    assert view["pattern"]["measured"] == _cached(3, 5, 7, 8) and view["pattern"]["predicted"] == _cached(3, 5, 7, 8, 9)
    assert view["stored"] is None and len(view["cliffs"]) == 1


def test_the_code_line_is_escaped_once():
    profile = parse_spec("profile:budget=0.3")
    code = engine_of(profile).code_line(profile, schedule_path="schedules/tiny<pixart>&'x'.json")
    page = render_html(_document(passing_search(code=code)))
    assert "schedules/tiny<pixart>" not in page  # never raw markup
    assert str(escape(code)) in page
    pre = re.search(r'<pre class="code"><code>(.*?)</code></pre>', page).group(1)
    assert htmllib.unescape(pre) == code  # escaped exactly once: it reads back as the line to paste


def test_a_gate_run_carries_the_stored_frontier():
    doc = _document(passing_search(stored=True))
    (summary,) = doc["models"][0]["cache_tune"]
    assert summary["mode"] == "gate"
    page = render_html(doc)
    assert "the stored frontier re-measured" in page and "grey points are the stored frontier" in page
    (view,) = _page_data(page)["models"][0]["tune"]
    assert [p["psnr"] for p in view["stored"]][:2] == [100.0, 44.6]


# -- no prediction ---------------------------------------------------------------------------------------------------
def test_a_strategy_without_prediction_says_so():
    doc = _document(unpredicted_search())
    (summary,) = doc["models"][0]["cache_tune"]
    assert summary["prediction"] is None and summary["met_floors"]
    page = render_html(doc)
    search = _search_html(page, 1)
    assert "No prediction exists for this strategy (magcache)" in search and "steps wrong" not in search
    assert "No PSNR floor is set, so no floor line is drawn. Other floors: SSIM ≥ 0.9, latent MSE ≤ 0.001." in search
    (view,) = _page_data(page)["models"][0]["tune"]
    assert view["pattern"]["predicted"] is None and view["pattern"]["measured"] == _cached(4, 6, 8)


# -- the prediction's two record forms and the floors' wording -------------------------------------------------------
def test_pattern_reads_both_prediction_forms_and_refuses_unequal_lengths():
    measured = _cached(2, 4, share=0.5)
    short = pattern({"value": 0.1, "cached_steps": measured, "predicted": {"steps": [0.0, 1.0], "error": {}}})
    assert "2 steps, the measured pattern 10" in short["mismatch"]
    brief = pattern({"value": 0.1, "cached_steps": measured,
                     "predicted": {"steps": _cached(2, 5), "error": {"steps_wrong": 2, "predicted_cached": 2}}})
    assert brief["mismatch"] is None and brief["error"]["wrong"] == 2 and brief["error"]["measured_cached"] == 2
    assert brief["calibrated"] is None and brief["calibrated_error"] is None
    counted = pattern({"value": 0.1, "cached_steps": measured, "predicted": {"fractions": _cached(2, 5, 6), "raw": None}})
    assert counted["error"]["wrong"] == 3 and counted["error"]["right_share"] == pytest.approx(0.7)
    bound = pattern({"value": 0.02, "cached_steps": measured, "predicted": _predicted(0.02, [2], measured)})
    assert bound["calibrated"] == _cached(2, 4) and bound["in_sample"] and bound["scale"] == 1.7
    assert pattern({"value": 0.1, "cached_steps": measured, "predicted": None})["predicted"] is None


def test_floor_texts_read_ceilings_and_floors():
    assert floor_texts({"latent_mse": 0.001, "psnr": 35.0}) == ["PSNR ≥ 35 dB", "latent MSE ≤ 0.001"]
    assert floor_texts({"psnr": 35.0, "adherence": 1.0}, skip=["psnr"]) == ["adherence ≥ 1"]
    assert search_summary({"floors": None, "frontier": None})["floors"] == {}


# -- drawn in a real browser -----------------------------------------------------------------------------------------
def _chromium(args: list[str], page: Path, profile_dir: Path) -> subprocess.CompletedProcess:
    command = [browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile_dir}",
               "--enable-logging=stderr", "--v=0", *args, page.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.skipif(browser() is None, reason="no Chromium/Chrome on PATH (Debian: apt-get install chromium)")
def test_the_tuning_figures_draw_in_a_headless_browser(tmp_path):
    page = tmp_path / "index.html"
    page.write_text(render_html(_document(passing_search(stored=True), failing_search(), unpredicted_search())),
                    encoding="utf-8")
    dom = _chromium(["--dump-dom"], page, tmp_path / "profile")
    assert dom.returncode == 0, dom.stderr[-2000:]
    out = dom.stdout
    assert 'data-rendered="done"' in out
    assert len(re.findall(r'<svg class="chart tune-frontier"[^>]*data-rendered="1"', out)) == 3
    assert len(re.findall(r'<svg class="chart tune-strips"[^>]*data-rendered="1"', out)) == 3
    assert len(re.findall(r'<line class="floor"', out)) == 2  # fbcache and cachedit floor PSNR, magcache does not
    assert len(re.findall(r'<rect class="cliff"', out)) == 1 and "cliff −12 dB" in out
    assert len(re.findall(r'<circle class="recommended"', out)) == 2 and len(re.findall(r'<circle class="closest"', out)) == 1
    assert len(re.findall(r'<circle class="point fail"', out)) == 2 + 3 + 1
    assert len(re.findall(r'<circle class="stored"', out)) == 6
    assert len(re.findall(r'<rect class="step computed wrong"', out)) == 1  # step 9: predicted cached, computed
    assert "outlined: predicted wrong" in out  # the strips' legend, where a prediction exists
    assert not [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
