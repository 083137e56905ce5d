"""Distributed runs: device assignment for xdist workers, CPU thread split, prompt sharding and the merge,
reports under ``-n 2``, and worker crashes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from dit_runs import FAST, NO_BASELINES, QUICK_SUITES, run_pytest, same_results, use_suites
from pytest_ditredundancy.plugin import xdist as distributed
from pytest_ditredundancy import profile_model
from pytest_ditredundancy.plugin.xdist import DeviceAssigner, XdistHooks, configure_worker
from pytest_ditredundancy.plugin.merge import MergeError, Shard, check_shards, merge_profiles
from pytest_ditredundancy.plugin.shard import ShardError, check_shard_fits, parse_shard, shard_range

MODELS = "--dit-model=tiny-pixart-alpha,tiny-dit-xl-2-256"


# -- device assignment (no GPU needed: fake nodes) -------------------------------------------------------------
def _node(worker: str):
    return SimpleNamespace(gateway=SimpleNamespace(id=worker), workerinput={"workerid": worker, "workercount": 2})


def _hooks(devices):
    config = SimpleNamespace(getoption=lambda *a, **k: "auto", getini=lambda name: "auto")
    return XdistHooks(config, devices=devices)


def test_each_worker_gets_its_own_gpu_and_a_replacement_gets_the_freed_one():
    hooks = _hooks(["cuda:0", "cuda:1", "cuda:2"])
    nodes = [_node(f"gw{i}") for i in range(3)]
    for node in nodes:
        hooks.pytest_configure_node(node)
    assert [n.workerinput["dit_device"] for n in nodes] == ["cuda:0", "cuda:1", "cuda:2"]
    hooks.pytest_testnodedown(nodes[1], error="crashed")  # gw1 dies; xdist starts gw3 in its place
    replacement = _node("gw3")
    hooks.pytest_configure_node(replacement)
    assert replacement.workerinput["dit_device"] == "cuda:1"  # the free GPU, not cuda:(3 % 3)
    assert sorted(hooks.assigner.holders.values()) == ["cuda:0", "cuda:1", "cuda:2"]


def test_more_workers_than_gpus_share_the_least_used_and_cpu_runs_get_no_device():
    assigner = DeviceAssigner(["cuda:0", "cuda:1"])
    assert [assigner.acquire(f"gw{i}") for i in range(5)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assigner.release("gw1")
    assert assigner.acquire("gw5") == "cuda:1"
    node = _node("gw0")
    _hooks([]).pytest_configure_node(node)
    assert "dit_device" not in node.workerinput


def test_auto_workers_is_one_per_gpu(monkeypatch):
    assert _hooks(["cuda:0", "cuda:1"]).pytest_xdist_auto_num_workers(None) == 2
    assert _hooks([]).pytest_xdist_auto_num_workers(None) is None  # xdist's own default (CPU count)
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert distributed.gpu_devices("auto") == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert distributed.gpu_devices("cuda:1") == [] and distributed.gpu_devices("cpu") == []


def _config(**overrides):
    from pytest_ditredundancy.plugin.options import DitConfig

    values = dict(models=(), device="auto", dtype="auto", prompts=("a",), prompt_source="", num_prompts=1, steps=None,
                  scheduler=None, seed=0, batch_size=8, baseline_dir=Path("baselines"), update_baselines=False,
                  step_factors=(2.0,), schedulers=(), cv_bounds=(0.0, 0.2), min_shape_correlation=0.8)
    return DitConfig(**{**values, **overrides})


def test_a_worker_takes_its_device_and_its_share_of_the_cores(monkeypatch):
    import torch

    base = _config()
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    monkeypatch.setattr(distributed, "cpu_count", lambda: 16)
    gpu = SimpleNamespace(workerinput={"workerid": "gw1", "workercount": 2, "dit_device": "cuda:1"})
    assert configure_worker(gpu, replace(base, device="auto")).device == "cuda:1" and threads == []
    cpu = SimpleNamespace(workerinput={"workerid": "gw0", "workercount": 3})
    assert configure_worker(cpu, replace(base, device="cpu")).device == "cpu" and threads == [5]
    assert configure_worker(SimpleNamespace(), base) is base  # not a worker: unchanged
    # the controller assigned nothing (the plugin was off there): the worker takes GPU N mod count itself
    monkeypatch.setattr(distributed, "gpu_devices", lambda requested: ["cuda:0", "cuda:1"])
    lazy = SimpleNamespace(workerinput={"workerid": "gw3", "workercount": 4})
    assert configure_worker(lazy, replace(base, device="auto")).device == "cuda:1"


# -- sharding and merging ---------------------------------------------------------------------------------------
def test_shards_are_contiguous_blocks_that_cover_every_prompt():
    assert parse_shard("2/8", 72) == (2, 8)
    blocks = [shard_range(10, (k, 3)) for k in (1, 2, 3)]
    assert blocks == [(0, 3), (3, 6), (6, 10)]
    assert shard_range(10, None) == (0, 10)
    for text, message in (("0/3", "K counts from 1"), ("4/3", "K counts from 1"), ("2-3", "expected K/N"),
                          ("1/9", "use at most 8 shards")):
        with pytest.raises(ShardError, match=message):
            parse_shard(text, 8)


def test_a_model_with_a_smaller_prompt_set_of_its_own_is_refused_by_name():
    # the option was checked against the shipped prompts (8); a trained model runs its own 4 captions
    assert parse_shard("1/8", 8) == (1, 8)
    check_shard_fits((1, 4), "trained-pixart", 4)
    check_shard_fits(None, "trained-pixart", 4)
    with pytest.raises(ShardError, match=r"--dit-shard=1/8: trained-pixart runs its own set of 4 prompts, so 8 "
                                         r"shards would leave some empty: use at most 4 shards for it"):
        check_shard_fits((1, 8), "trained-pixart", 4)


def test_sharded_profiles_merge_into_the_unsharded_profile(tiny_pipeline_cache):
    pipe = tiny_pipeline_cache("tiny-pixart-alpha")
    prompts = ["a red bus", "a cat on a sofa", "mountains at dawn", "a bowl of soup", "a lighthouse"]
    whole = profile_model(pipe, prompts=prompts, steps=4, seed=3)
    parts = [(s, e, profile_model(pipe, prompts=prompts[s:e], steps=4, seed=3, prompt_offset=s))
             for s, e in (shard_range(5, (k, 2)) for k in (2, 1))]  # any order
    merged = merge_profiles(parts, 5, "tiny-pixart-alpha")
    assert merged.metadata.prompts == prompts and merged.shape == whole.shape
    for metric in whole.values:
        np.testing.assert_allclose(merged.values[metric], whole.values[metric], rtol=1e-5, atol=1e-7)
    assert (merged.computed == whole.computed).all()

    first, second = parts[1], parts[0]  # prompts 0-1 and 2-4
    with pytest.raises(MergeError, match="m: prompts 1–1 were profiled by two shards"):
        merge_profiles([first, (1, 3, second[2].select_prompts([0, 1]))], 5, "m")
    with pytest.raises(MergeError, match="m: prompts 2–4 are missing"):
        merge_profiles([first], 5, "m")
    other = profile_model(pipe, prompts=prompts[2:], steps=5, seed=3, prompt_offset=2)
    with pytest.raises(MergeError, match="shards disagree on model settings"):
        merge_profiles([first, (2, 5, other)], 5, "m")


def _shard(index, count, **run):
    doc = {"shard": {"index": index, "count": count, "prompts": [0, 1]}, "shard_profiles": [],
           "run": {"prompts": ["a", "b", "c", "d"], "seed": 0, "steps": 6, **run}}
    return Shard(Path(f"shard-{index}.json"), doc)


def test_merge_names_disagreeing_settings_duplicate_and_missing_shards():
    check_shards([_shard(1, 2), _shard(2, 2)])
    with pytest.raises(MergeError, match="disagree on model settings: steps is 6 in shard-1.json; 8 in shard-2.json"):
        check_shards([_shard(1, 2), _shard(2, 2, steps=8)])
    with pytest.raises(MergeError, match="both shard 1/2"):
        check_shards([_shard(1, 2), _shard(1, 2)])
    with pytest.raises(MergeError, match=r"missing shard\(s\) 2/3 \(prompts 1–1\)"):
        check_shards([_shard(1, 3), _shard(3, 3)])
    with pytest.raises(MergeError, match="cut differently"):
        check_shards([_shard(1, 2), _shard(2, 3)])


def test_merge_of_models_with_prompt_sets_of_different_sizes_names_missing_shards_without_spans():
    def own_sets(index, count):  # the run ran models whose own prompt sets differ: no run-wide block
        shard = _shard(index, count)
        shard.doc["shard"].update({"prompts": [None, None], "total": None})
        return shard

    with pytest.raises(MergeError, match=r"missing shard\(s\) 2/3: merge every shard"):
        check_shards([own_sets(1, 3), own_sets(3, 3)])
    with pytest.raises(MergeError, match="overlap on prompts of each model's own set"):
        check_shards([own_sets(1, 2), own_sets(1, 2)])


def test_update_baselines_needs_every_prompt(pytester):
    pytester.makepyfile("def test_ok():\n    pass\n")
    result = pytester.runpytest("--dit-shard=1/2", "--dit-update-baselines")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "run it without --dit-shard" in result.stderr.str()
    assert "use at most 8 shards" in pytester.runpytest("--dit-shard=1/9").stderr.str()


# -- whole runs (subprocesses) ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def serial_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    use_suites(root)
    result = run_pytest(root, *QUICK_SUITES, MODELS, *FAST, *NO_BASELINES, "--dit-json=serial.json",
                        "--dit-report=serial.html", "--junitxml=serial.xml")
    assert result.returncode == 0, result.stdout + result.stderr
    return root, json.loads((root / "serial.json").read_text())


def test_junit_xml_of_a_two_model_run_carries_no_report_data(serial_run):
    """Report data travels outside ``user_properties``, which pytest writes into JUnit XML."""
    root, serial = serial_run
    xml = (root / "serial.xml").read_text()
    assert len(xml.encode()) < 100_000 and "<property" not in xml and "ditredundancy" not in xml
    assert [m["status"] for m in serial["models"]] == ["passed", "passed"]  # the report still got everything
    assert all(m["profiles"] and m["suites"] for m in serial["models"])


def test_parallel_run_writes_the_same_json_as_serial(serial_run):
    root, serial = serial_run
    result = run_pytest(root, *QUICK_SUITES, MODELS, *FAST, *NO_BASELINES, "-n", "2", "--dit-json=parallel.json",
                        "--dit-progress-interval=0", "--junitxml=parallel.xml")
    assert result.returncode == 0, result.stdout + result.stderr
    parallel = json.loads((root / "parallel.json").read_text())
    assert not same_results(serial, parallel)
    xml = (root / "parallel.xml").read_text()
    assert len(xml.encode()) < 100_000 and "<property" not in xml
    assert parallel["run"]["workers"] == 2 and {w["worker"] for w in parallel["environment"]["workers"]} <= {"gw0", "gw1"}
    assert all(w["torch_threads"] >= 1 for w in parallel["environment"]["workers"])
    assert "JSON report: parallel.json" in result.stdout
    assert "ditredundancy [gw" in result.stderr and "3/3 prompts" in result.stderr  # progress from the workers


def test_shard_runs_merge_into_the_serial_result(serial_run):
    root, serial = serial_run
    first = run_pytest(root, *QUICK_SUITES, MODELS, *FAST, *NO_BASELINES, "--dit-shard=1/2", "--dit-json=shard-1.json")
    second = run_pytest(root, *QUICK_SUITES, MODELS, *FAST, *NO_BASELINES, "--dit-shard=2/2", "--dit-json=shard-2.json",
                        "-n", "2")  # full profiles travel from the workers too
    for result in (first, second):
        assert result.returncode == 0, result.stdout + result.stderr
        assert "4 skipped" in result.stdout and "judged on every prompt" in json.dumps(
            json.loads((root / "shard-1.json").read_text())["tests"]["messages"])
    shard = json.loads((root / "shard-2.json").read_text())
    assert shard["shard"] == {"index": 2, "count": 2, "prompts": [1, 3], "total": 3}
    assert {(p["model"], p["start"], p["end"]) for p in shard["shard_profiles"]} >= {("tiny-dit-xl-2-256", 1, 3)}
    merged = subprocess.run([sys.executable, "-m", "pytest_ditredundancy", "merge", "shard-1.json", "shard-2.json",
                             "--report", "merged.html", "--json", "merged.json", "--profiles-dir", "profiles"],
                            cwd=root, capture_output=True, text=True)
    assert merged.returncode == 0, merged.stdout + merged.stderr
    doc = json.loads((root / "merged.json").read_text())
    assert not same_results(serial, doc)
    assert doc["merged_from"] == ["shard-1.json", "shard-2.json"]
    assert len(list((root / "profiles").glob("*/*.json"))) == 4  # 2 models × (6 and 12 steps)
    assert "merged from 2 shards" in (root / "merged.html").read_text()

    bad = subprocess.run([sys.executable, "-m", "pytest_ditredundancy", "merge", "shard-1.json", "--json", "x.json"],
                         cwd=root, capture_output=True, text=True)
    assert bad.returncode == 2 and "missing shard(s) 2/2 (prompts 1–2)" in bad.stderr


def test_a_shard_of_a_model_with_its_own_prompts_reports_that_set(tmp_path):
    """No --dit-prompts: trained-pixart runs its own captions, and the report's prompt list and shard block say
    so (not the shipped list the option would name)."""
    from pytest_ditredundancy.profiling.prompts import resolve_prompts
    from pytest_ditredundancy.profiling.settings import resolve_run
    from pytest_ditredundancy.zoo.registry import get_spec

    own = list(resolve_run(get_spec("trained-pixart")).prompts)
    use_suites(tmp_path)
    result = run_pytest(tmp_path, "suites/test_prompt_stability.py", "--dit-model=trained-pixart", "--dit-shard=2/2",
                        "--dit-steps=6", *NO_BASELINES, "-p", "no:cacheprovider", "--dit-json=own.json")
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads((tmp_path / "own.json").read_text())
    assert not set(own) & set(resolve_prompts("default"))  # its captions, not the shipped list
    assert doc["run"]["prompts"] == own and doc["run"]["num_prompts"] == len(own) == 8
    assert doc["run"]["prompts_by_model"] == {"trained-pixart": 8}
    assert doc["shard"]["total"] == 8 and doc["shard"]["prompts"] == [4, 8]
    assert [(p["model"], p["start"], p["end"]) for p in doc["shard_profiles"]] == [("trained-pixart", 4, 8)]


CRASH = """
import os

def test_before():
    pass

def test_crash():
    os._exit(3)

def test_after_one():
    pass

def test_after_two():
    pass
"""


def test_a_worker_crash_still_writes_the_report_and_names_what_is_missing(pytester):
    pytest.importorskip("xdist")
    pytester.makepyfile(test_crash=CRASH)
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider", "--dit-json=r.json", "--dit-report=r.html")
    result.assert_outcomes(passed=3, failed=1)  # xdist restarts the worker and runs the rest
    doc = json.loads((pytester.path / "r.json").read_text())
    (missing,) = doc["tests"]["missing"]
    assert missing["nodeid"] == "test_crash.py::test_crash"
    assert re.fullmatch(r"worker 'gw\d' crashed while running 'test_crash.py::test_crash'", missing["reason"])
    assert doc["status"] == "failed" and doc["tests"]["results"]["test_crash.py::test_after_two"] == "passed"
    assert "test_crash.py::test_crash" in (pytester.path / "r.html").read_text()
    result.stdout.fnmatch_lines(["*1 test without a result*", "*HTML report: r.html*"])

    stopped = pytester.runpytest_subprocess("-n", "1", "--max-worker-restart=0", "-p", "no:cacheprovider",
                                            "--dit-json=s.json")  # no restart: the tests after it never run
    doc = json.loads((pytester.path / "s.json").read_text())
    missing = {m["nodeid"]: m["reason"] for m in doc["tests"]["missing"]}
    assert "crashed while running" in missing["test_crash.py::test_crash"]
    assert "never reported a result" in missing["test_crash.py::test_after_two"]
    assert len(missing) == 3 and "3 tests without a result" in stopped.stdout.str()


def test_shards_merge_in_another_checkout_and_refuse_mixed_devices(tmp_path_factory):
    """The example workflow: shards run on one machine, the merge in a fresh checkout elsewhere, judged
    against that checkout's baselines. Shard JSON holds no path of the machine that wrote it."""
    machine = tmp_path_factory.mktemp("shard-machine")
    use_suites(machine)
    args = ["suites/test_baseline_regression.py", "--dit-model=tiny-dit-xl-2-256", *FAST]
    created = run_pytest(machine, *args, "--dit-update-baselines")
    assert created.returncode == 0, created.stdout + created.stderr
    for k in (1, 2):
        shard = run_pytest(machine, *args, f"--dit-shard={k}/2", f"--dit-json=out/shard-{k}.json")
        assert shard.returncode == 0, shard.stdout + shard.stderr
        text = (machine / "out" / f"shard-{k}.json").read_text()
        assert str(machine) not in text and json.loads(text)["run"]["baseline_dir"] == "baselines"

    checkout = tmp_path_factory.mktemp("merge-checkout")
    shutil.copytree(machine / "baselines", checkout / "baselines")
    shutil.copytree(machine / "out", checkout / "artifacts")
    shards = ["artifacts/shard-1.json", "artifacts/shard-2.json"]
    merge = [sys.executable, "-m", "pytest_ditredundancy", "merge", *shards, "--json", "merged.json"]
    merged = subprocess.run(merge, cwd=checkout, capture_output=True, text=True)
    doc = json.loads((checkout / "merged.json").read_text())
    assert merged.returncode == 0, merged.stdout + merged.stderr + json.dumps(doc["tests"]["messages"])
    assert list(doc["tests"]["results"].values()) == ["passed"]
    assert doc["models"][0]["suites"]["baseline_regression"]["passed"]

    # a checkout without the baselines: the suite fails, and the merge says where it looked
    bare = tmp_path_factory.mktemp("bare-checkout")
    shutil.copytree(machine / "out", bare / "artifacts")
    missing = subprocess.run(merge, cwd=bare, capture_output=True, text=True)
    assert missing.returncode == 1 and "no baseline directory baselines here" in missing.stderr
    assert "no baseline_regression baseline for tiny-dit-xl-2-256" in (bare / "merged.json").read_text()

    # a shard that ran on a GPU cannot be merged with CPU shards (their tolerances differ)
    second = json.loads((checkout / shards[1]).read_text())
    for entry in second["shard_profiles"]:
        entry["profile"]["metadata"]["device"] = "cuda:0"
    (checkout / "artifacts" / "shard-2.json").write_text(json.dumps(second))
    mixed = subprocess.run(merge, cwd=checkout, capture_output=True, text=True)
    assert mixed.returncode == 2
    assert "shards ran on different kinds of device (cpu in shard-1.json; cuda in shard-2.json)" in mixed.stderr
