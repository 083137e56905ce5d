"""The plugin is opt-in: installed, it must not change an unrelated project's test run (start-up time, imports,
header, ``-n auto``, torch threads, markers); a ``--dit-*`` option, a ``dit_*`` ini key or one of its fixtures
turns it on. "Without the plugin" is ``-p no:ditredundancy``: pytest then never imports it."""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

UNRELATED = '''
import json
import os
import sys

def test_unrelated():
    assert 1 + 1 == 2

def test_imports():
    ours = sorted(m for m in sys.modules if m.startswith("pytest_ditredundancy"))
    state = {"torch": "torch" in sys.modules, "ours": ours, "worker": os.environ.get("PYTEST_XDIST_WORKER")}
    with open(f"state-{state['worker'] or 'main'}.json", "w") as handle:
        json.dump(state, handle)
'''

RECORDER = '''
import json

def pytest_sessionfinish(session):
    names = {name for name, _ in session.config.pluginmanager.list_name_plugin()}
    ours = sorted(n for n in names if n.startswith("ditredundancy"))
    with open("plugins.json", "w") as handle:
        json.dump(ours, handle)
'''


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT"))}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _pytest(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=600)


@pytest.fixture
def unrelated(pytester: pytest.Pytester) -> Path:
    pytester.makepyfile(test_unrelated=UNRELATED)
    pytester.makeconftest(RECORDER)
    pytester.makeini("[pytest]\n")
    return pytester.path


def test_an_unrelated_project_runs_as_if_the_plugin_were_not_installed(unrelated):
    with_plugin = _pytest(unrelated)
    assert with_plugin.returncode == 0, with_plugin.stdout + with_plugin.stderr
    state = json.loads((unrelated / "state-main.json").read_text())
    assert not state["torch"]  # nothing imported torch
    light = {f"pytest_ditredundancy{name}" for name in ("", ".io", ".plugin", ".plugin.declared", ".plugin.options", ".plugin.relay",
                                                        ".profiling", ".profiling.prompts", ".profiling.schedulers",
                                                        ".judging", ".judging.tolerances", ".plugin.cache_options",
                                                        ".cache", ".cache.spec", ".cache.floors", ".cache.tuning")}
    assert set(state["ours"]) <= light, state["ours"]  # the plugin module and its option table's light helpers
    assert "ditredundancy:" not in with_plugin.stdout  # no header, no summary section
    plugins = json.loads((unrelated / "plugins.json").read_text())
    assert "ditredundancy-reporter" not in plugins and "ditredundancy-xdist" not in plugins
    without = _pytest(unrelated, "-p", "no:ditredundancy")
    assert without.returncode == 0
    assert _summary_line(with_plugin.stdout) == _summary_line(without.stdout)

    # no generic marker claimed: @pytest.mark.gpu is as unknown as without the plugin
    markers = _pytest(unrelated, "--markers").stdout
    assert "@pytest.mark.dit_gpu" in markers and "@pytest.mark.gpu:" not in markers
    (unrelated / "test_marked.py").write_text("import pytest\n\n@pytest.mark.gpu\ndef test_gpu():\n    pass\n")
    strict = [_pytest(unrelated, "--strict-markers", "test_marked.py", *extra)
              for extra in ([], ["-p", "no:ditredundancy"])]
    assert strict[0].returncode == strict[1].returncode == pytest.ExitCode.INTERRUPTED
    assert all("'gpu' not found in `markers`" in run.stdout for run in strict)


def _summary_line(stdout: str) -> str:
    return re.sub(r" in [\d.]+s", "", stdout.strip().splitlines()[-1])


def _workers(stdout: str) -> str:
    match = re.search(r"created: (\d+)/(\d+) workers|(\d+) workers \[", stdout)
    assert match, stdout
    return match.group(0)


def test_xdist_is_left_alone_auto_workers_torch_and_threads(unrelated):
    pytest.importorskip("xdist")
    with_plugin = _pytest(unrelated, "-n", "auto")
    without = _pytest(unrelated, "-n", "auto", "-p", "no:ditredundancy")
    assert with_plugin.returncode == without.returncode == 0, with_plugin.stdout + with_plugin.stderr
    assert _workers(with_plugin.stdout) == _workers(without.stdout)  # the same -n auto
    worker_states = [json.loads(p.read_text()) for p in unrelated.glob("state-gw*.json")]
    assert worker_states and not any(s["torch"] for s in worker_states)  # so torch.set_num_threads never ran
    assert not re.search(r"^ditredundancy", with_plugin.stdout + with_plugin.stderr, re.MULTILINE)


def _startup(cwd: Path, *args: str) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one ``pytest --collect-only`` in ``cwd``."""
    before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    result = _pytest(cwd, "--collect-only", "-q", *args)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert result.returncode == 0, result.stdout + result.stderr
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, wall


def test_start_up_time_is_the_same_with_and_without_the_plugin(unrelated):
    """Interleaved runs of ``pytest --collect-only`` in the unrelated project, timed by the CPU time of the
    pytest process (wall time on a busy machine is mostly waiting for a core); the fastest run of each is the
    least disturbed. Importing torch alone costs over a second of CPU, so a plugin that still imported it (or
    did anything heavy at start-up) fails this by a wide margin."""
    cpu: dict[str, list[float]] = {"with": [], "without": []}
    wall: dict[str, list[float]] = {"with": [], "without": []}
    for _ in range(5):
        for name, extra in (("with", ()), ("without", ("-p", "no:ditredundancy"))):
            seconds, elapsed = _startup(unrelated, *extra)
            cpu[name].append(seconds)
            wall[name].append(elapsed)
    best = {name: min(values) for name, values in cpu.items()}
    print(f"\nstart-up of pytest --collect-only, best of 5: with the plugin {best['with']:.3f} s CPU "
          f"({min(wall['with']):.3f} s wall), without {best['without']:.3f} s CPU ({min(wall['without']):.3f} s wall)")
    assert best["with"] <= best["without"] * 1.1 + 0.05, (cpu, wall)


@pytest.mark.parametrize("how", ["option", "ini", "override", "fixture"])
def test_an_option_an_ini_key_or_a_fixture_turns_it_on(pytester, how):
    pytester.makeini("[pytest]\ndit_seed = 3\n" if how == "ini" else "[pytest]\n")
    if how == "fixture":  # no option: the collected test turns it on (the header comes after collection)
        pytester.makepyfile("def test_seed(dit_session):\n    assert dit_session.config.seed == 0\n")
    else:
        pytester.makepyfile("def test_plain():\n    pass\n")
    args = {"option": ["--dit-seed=3"], "ini": [], "override": ["-o", "dit_seed=3"], "fixture": []}[how]
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["ditredundancy: models: tiny-*", "ditredundancy: device * seed *"])


def test_workers_turn_the_controller_on_when_they_send_data(pytester):
    """``pytest -n 2`` with no option: only the workers see the fixture; the records they send turn the
    controller on, which prints the summary."""
    pytest.importorskip("xdist")
    pytester.makeini("[pytest]\n")
    pytester.makepyfile(test_lazy='''
from pytest_ditredundancy.plugin.relay import emit
from pytest_ditredundancy.plugin.session import RECORD_KEY

def test_plain():
    pass

def test_records(dit_session, request):
    emit(request.node, RECORD_KEY, {"model": "tiny-dit-xl-2-256", "suite": "prompt_stability", "kind": "k",
                                    "statistic": "robust_cv[k]", "value": 0.25, "bounds": [0, 1], "passed": True,
                                    "nodeid": request.node.nodeid})
''')
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*= ditredundancy =*", "tiny-dit-xl-2-256: ok; CV k=0.250"])
