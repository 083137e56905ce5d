"""A worker that dies inside a model's group under ``--dist loadgroup``, the mode the docs recommend: the run
finishes, the crashed test fails once (it is not re-run to kill the replacement too), the rest of its group
runs on the replacement, and the report names the crash. pytest-xdist 3.8's own loadgroup scheduler hangs or
crash-loops here (pytest-xdist #1323, #1327, #1371), so every run is bounded."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("xdist")

from xdist.remote import Producer

from pytest_ditredundancy.plugin.xdist import scheduler_class

#: a hang shows as a timeout instead of a stuck test run; a healthy run takes well under a minute
BOUND_S = 240

CRASH_IN_GROUP = """
import os

def test_load(dit_model):
    pass

def test_crash(dit_model):
    if dit_model.name == "tiny-pixart-alpha":
        os._exit(3)

def test_after(dit_model):
    pass

def test_plain():
    pass
"""


def test_a_worker_crash_in_a_model_group_finishes_and_is_reported(pytester):
    pytester.makeini("[pytest]\n")
    pytester.makepyfile(test_group_crash=CRASH_IN_GROUP)
    start = time.monotonic()
    result = pytester.runpytest_subprocess(
        "-n", "2", "--dist", "loadgroup", "--dit-model=tiny-pixart-alpha,tiny-dit-xl-2-256", "-p",
        "no:cacheprovider", "--dit-json=report.json", timeout=BOUND_S)
    assert time.monotonic() - start < BOUND_S
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    crashed = "test_group_crash.py::test_crash[tiny-pixart-alpha]"
    result.assert_outcomes(passed=6, failed=1)  # the crash once; its group's later test ran on the replacement
    doc = json.loads((pytester.path / "report.json").read_text())
    (missing,) = doc["tests"]["missing"]
    assert missing["nodeid"] == crashed
    assert re.fullmatch(rf"worker 'gw\d+' crashed while running '{re.escape(crashed)}'", missing["reason"])
    assert doc["status"] == "failed"
    assert doc["tests"]["results"]["test_group_crash.py::test_after[tiny-pixart-alpha]"] == "passed"
    result.stdout.fnmatch_lines(["*1 test without a result*"])
    assert result.stdout.str().count("crashed while running") <= 2  # once in the log line, once in the summary


# -- the scheduler on its own (fake nodes; no worker processes) -------------------------------------------------
class _Node:
    def __init__(self, name: str) -> None:
        self.gateway = SimpleNamespace(id=name)
        self.shutting_down = False
        self.sent: list[int] = []

    def send_runtest_some(self, indices: list[int]) -> None:
        assert indices, "an empty batch leaves the worker waiting forever"
        self.sent += indices

    def shutdown(self) -> None:
        self.shutting_down = True


def _scheduler(collection: list[str], numnodes: int = 1):
    config = SimpleNamespace(option=SimpleNamespace(loadscopereorder=False),
                             getvalue=lambda name: {"tx": [f"{numnodes}*popen"]}[name])
    sched = scheduler_class("loadgroup")(config, Producer("sched", enabled=False))
    nodes = [_Node(f"gw{i}") for i in range(numnodes)]
    for node in nodes:
        sched.add_node(node)
        sched.add_node_collection(node, collection)
    sched.schedule()
    return sched, nodes


def test_the_crashed_test_is_not_rerun_and_the_replacement_gets_the_rest_of_its_group():
    tests = [f"t.py::test_{i}@g" for i in range(4)] + ["t.py::test_x@h"]
    sched, (gw0,) = _scheduler(tests)
    assert gw0.sent == [0, 1, 2, 3]  # group g; group h waits in the queue
    sched.mark_test_complete(gw0, 0)
    assert sched.remove_node(gw0) == tests[1]  # gw0 died running test_1
    gw1 = _replacement(sched, tests)
    assert gw1.sent == [4, 2, 3]  # h, then what is left of g: not test_0 (done) nor test_1 (crashed)
    sched.mark_test_complete(gw1, 4)
    assert gw1.shutting_down  # nothing left to send: it runs test_3 instead of waiting for a next item
    for index in (2, 3):
        sched.mark_test_complete(gw1, index)
    assert sched.tests_finished


def _replacement(sched, tests: list[str]) -> _Node:
    node = _Node("gw1")
    sched.add_node(node)
    sched.add_node_collection(node, tests)
    sched.schedule()
    return node


def test_a_replacement_given_one_test_is_told_to_finish():
    tests = ["t.py::test_a@g", "t.py::test_crash@g", "t.py::test_b@g"]
    sched, (gw0,) = _scheduler(tests)
    sched.mark_test_complete(gw0, 0)
    sched.remove_node(gw0)
    gw1 = _replacement(sched, tests)
    assert gw1.sent == [2] and gw1.shutting_down  # xdist 3.8 sent test_b without a next item: a hang


def test_a_crash_on_the_last_test_of_a_group_requeues_nothing():
    tests = ["t.py::test_a@g", "t.py::test_crash@g"]
    sched, (gw0,) = _scheduler(tests)
    sched.mark_test_complete(gw0, 0)
    assert sched.remove_node(gw0) == tests[1]
    assert not sched.workqueue and sched.tests_finished


@pytest.mark.parametrize("dist", ["loadscope", "loadfile", "load", "each", "worksteal"])
def test_other_modes_keep_their_scheduler_or_get_the_same_fix(dist):
    from xdist.scheduler import LoadFileScheduling, LoadScopeScheduling

    cls = scheduler_class(dist)
    if dist in ("loadscope", "loadfile"):
        assert issubclass(cls, {"loadscope": LoadScopeScheduling, "loadfile": LoadFileScheduling}[dist])
    else:
        assert cls is None  # xdist's own: these recover from a crash already


SLOW = """
import time
from pathlib import Path

def test_quick():
    pass

def test_slow():
    Path("started").touch()
    time.sleep(300)
"""


def test_sigterm_to_the_controller_still_writes_the_report(pytester):
    """A job runner's SIGTERM (a CI timeout or cancel) ends the run like Ctrl-C: the report is written and
    names the tests that never finished."""
    pytester.makeini("[pytest]\n")
    pytester.makepyfile(test_slow=SLOW)
    proc = pytester.popen([sys.executable, "-m", "pytest", "-n", "1", "-p", "no:cacheprovider",
                           "--dit-json=report.json"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + BOUND_S
        while not (pytester.path / "started").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, out.decode()
    doc = json.loads((pytester.path / "report.json").read_text())
    assert doc["tests"]["results"]["test_slow.py::test_quick"] == "passed"
    assert [m["nodeid"] for m in doc["tests"]["missing"]] == ["test_slow.py::test_slow"]
    assert b"SIGTERM" in out
