"""``--dit-executor=ray``: profiles on a pool of Ray actors give the local run's numbers, bit for bit on CPU;
a killed actor's work is retried elsewhere; a bad cluster, a missing Ray, a model a node cannot load or see are
clear errors; Ctrl-C leaves the baselines alone.

The tests that need Ray share one local instance (2 CPUs, no dashboard) and skip, saying why, without Ray.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest

from dit_runs import FAST, differences, use_suites
from pytest_ditredundancy.capture.profile import RedundancyProfile
from pytest_ditredundancy.profiling.executors import ExecutorSettings, join_parts, parts_for, split_request
from pytest_ditredundancy.profiling.pool_worker import PoolWorker
from pytest_ditredundancy.profiling.runner import run_profile
from pytest_ditredundancy.profiling.settings import resolve_run
from pytest_ditredundancy.zoo.loading import ModelLoadError, load_model, resolve_spec

INSTALL = "pip install 'pytest-ditredundancy[ray]'"
RUN = [*FAST, "--dit-model=tiny-pixart-alpha", "--dit-device=cpu", "--dit-step-factors=2"]
SUITE_FILES = ["suites/test_prompt_stability.py", "suites/test_step_stability.py", "suites/test_baseline_regression.py"]


def _request(model: str = "tiny-pixart-alpha", **kwargs):
    return resolve_run(resolve_spec(model), **{"num_prompts": 6, "steps": 6, "batch_size": 2, **kwargs})


def _same(a: RedundancyProfile, b: RedundancyProfile) -> None:
    """Bit for bit: every array, and the metadata."""
    assert (a.layers, a.kinds, a.branches) == (b.layers, b.kinds, b.branches)
    for metric in a.values:
        assert np.array_equal(a.values[metric], b.values[metric], equal_nan=True), metric
    assert np.array_equal(a.computed, b.computed)
    assert asdict(a.metadata) == asdict(b.metadata)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- parts of a request (no Ray) ----------------------------------------------------------------------------------
def test_parts_hold_whole_batches_and_every_worker_gets_some():
    request = _request(num_prompts=7, batch_size=2)  # batches [0,2) [2,4) [4,6) [6,7)
    assert [(p.start, p.end) for p in split_request(request, 2)] == [(0, 4), (4, 7)]
    assert [(p.start, p.end) for p in split_request(request, 3)] == [(0, 4), (4, 7)]  # 4 batches: 2 + 2
    assert [(p.start, p.end) for p in split_request(request, 99)] == [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert [(p.start, p.end) for p in split_request(request, 1)] == [(0, 7)]
    # two requests of 6 and 2 prompts over 4 workers: about two parts per worker, in proportion
    assert parts_for([_request(num_prompts=6), _request(num_prompts=2)], 4) == {0: 6, 1: 2}
    assert split_request(request, 2)[1].label(request.shard(0, 7)) == \
        f"tiny-pixart-alpha {request.key} prompts 4-6"


def test_joined_parts_are_the_unsplit_profile(tiny_pipeline_cache):
    pipe = tiny_pipeline_cache("tiny-pixart-alpha")
    request = _request(num_prompts=5, batch_size=2)
    whole = run_profile(pipe, request)
    parts = split_request(request, 3)
    assert len(parts) == 3
    joined = join_parts([(p, run_profile(pipe, request.shard(p.start, p.end))) for p in reversed(parts)])
    _same(joined, whole)
    one = split_request(request, 1)[0]
    assert join_parts([(one, whole)]) is whole


# -- options (no Ray, no model) -----------------------------------------------------------------------------------
def test_executor_options_are_checked_before_any_test_runs(pytester):
    pytester.makepyfile("def test_ran():\n    open('ran.txt', 'w').close()\n")
    cases = {
        ("--dit-executor=dask",): "unknown executor 'dask'; choose 'local'",
        ("--dit-ray-address=head:6379",): "--dit-ray-address applies to --dit-executor=ray only",
        ("--dit-executor=ray", "--dit-ray-actors=0"): "--dit-ray-actors must be at least 1",
        ("--dit-executor=ray", "-n", "2"): "run it without pytest-xdist's -n",
    }
    for args, message in cases.items():
        result = pytester.runpytest("-p", "no:cacheprovider", *args)
        assert result.ret == pytest.ExitCode.USAGE_ERROR, args
        assert message in result.stderr.str(), (args, result.stderr.str())
    assert not (pytester.path / "ran.txt").exists()


def test_without_ray_the_usage_error_names_the_extra(pytester, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    pytester.makepyfile("def test_ran():\n    open('ran.txt', 'w').close()\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "--dit-executor=ray")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert f"needs Ray, which is not installed here: {INSTALL}" in result.stderr.str()
    assert not (pytester.path / "ran.txt").exists()
    # the local executor never imports Ray
    assert pytester.runpytest("-p", "no:cacheprovider", "--dit-executor=local").ret == pytest.ExitCode.OK


def test_an_unreachable_cluster_is_a_usage_error_before_any_test_runs(tmp_path):
    pytest.importorskip("ray", reason=f"Ray is not installed ({INSTALL})")
    (tmp_path / "test_ran.py").write_text("def test_ran():\n    open('ran.txt', 'w').close()\n")
    started = time.monotonic()  # in a subprocess: Ray's extension modules load once per process
    result = _run(tmp_path, "-p", "no:cacheprovider", "--dit-executor=ray",
                  f"--dit-ray-address=127.0.0.1:{_free_port()}")
    assert result.returncode == pytest.ExitCode.USAGE_ERROR
    assert "the Ray cluster at 127.0.0.1:" in result.stderr and "is unreachable" in result.stderr
    assert time.monotonic() - started < 60  # Ray alone retries for minutes
    assert not (tmp_path / "ran.txt").exists()
    bad = _run(tmp_path, "-p", "no:cacheprovider", "--dit-executor=ray", "--dit-ray-address=head-without-port")
    assert bad.returncode == pytest.ExitCode.USAGE_ERROR and "is not a cluster address" in bad.stderr


# -- what a worker does (no Ray: the actor's class, driven directly) ----------------------------------------------
def _saved_index(path: Path) -> Path:
    path.mkdir()
    (path / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    return path


def test_a_directory_the_node_cannot_see_is_named_with_the_node(tmp_path):
    spec = resolve_spec(str(_saved_index(tmp_path / "ckpt")))
    (tmp_path / "ckpt" / "model_index.json").unlink()
    (tmp_path / "ckpt").rmdir()  # the controller saw it; this node does not
    worker = PoolWorker(device="cpu", node="node-7 (10.0.0.7)")
    with pytest.raises(ModelLoadError) as caught:
        worker.pipeline(spec)
    message = str(caught.value)
    assert f"the model directory {tmp_path / 'ckpt'} does not exist on node node-7 (10.0.0.7)" in message
    assert "a filesystem every node mounts at the same path" in message
    with pytest.raises(ModelLoadError, match="does not exist on node node-7"):  # not tried again
        worker.pipeline(spec)


def test_the_session_fails_a_test_with_the_message_that_names_the_node(tmp_path):
    """What a pool raises for a model a node could not load becomes the test's failure, message alone."""
    from pytest_ditredundancy.judging.baselines import BaselineStore
    from pytest_ditredundancy.plugin.options import DitConfig
    from pytest_ditredundancy.plugin.session import DitSession, PipelineSlot
    from pytest_ditredundancy.profiling.executors import Executor

    class Refusing(Executor):
        name, summary = "refusing", "a pool whose node cannot load the model"

        def profile(self, request, *, progress=None):
            raise ModelLoadError("could not load 'x'\n(loading failed on node worker-3 (10.0.4.17), worker pid 88)")

        def call(self, spec, function, *args, **kwargs):
            raise ModelLoadError("could not load 'x'\n(loading failed on node worker-3 (10.0.4.17), worker pid 88)")

    session = DitSession(config=DitConfig(prompts=("a red bus",), num_prompts=1), store=BaselineStore(tmp_path),
                         slot=PipelineSlot("cpu", "float32", 0))
    session._executor = Refusing(ExecutorSettings(), load=None)
    with pytest.raises(pytest.fail.Exception, match=r"loading failed on node worker-3 \(10.0.4.17\)") as caught:
        session.profile(_request(num_prompts=1))
    assert caught.value.pytrace is False and caught.value.__context__ is None  # no Ray chain in the report


# -- on a local Ray instance ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_address():
    ray = pytest.importorskip("ray", reason=f"Ray is not installed ({INSTALL})")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="class")
def executor(ray_address):
    from pytest_ditredundancy.profiling.ray_executor import RayExecutor

    pool = RayExecutor(ExecutorSettings(device="cpu", actors=2), load=None)
    try:
        yield pool
    finally:
        pool.close()
    import ray

    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < 2:  # the actors are gone: their CPUs are back
        assert time.monotonic() < deadline, "the pool's actors outlived close()"
        time.sleep(0.1)


class TestOnePool:
    """One pool of two CPU actors for these tests (starting actors is the slow part)."""

    def test_ray_profiles_are_bit_identical_to_local_ones_on_cpu(self, executor):
        requests = [_request(), _request(protocol="paper", num_prompts=3, steps=6, batch_size=None)]
        executor.prepare(requests[:1], speculative=requests[1:])
        for request in requests:
            remote = executor.profile(request)
            local = run_profile(load_model(request.spec, device="cpu", seed=0), request)
            _same(remote, local)
        where = executor.workers()
        assert len(where) == 2 and {w.device for w in where} == {"cpu"} and len({w.pid for w in where}) == 2
        assert os.getpid() not in {w.pid for w in where}  # computed in the actors, not here
        assert executor.describe() == "executor ray (a local Ray instance): 2 actors, one per CPU"
        assert executor.retried() == []

    def test_a_model_that_fails_to_load_on_a_node_names_the_node(self, executor, tmp_path):
        broken = resolve_spec(str(_saved_index(tmp_path / "broken")))  # an index, no weights
        with pytest.raises(ModelLoadError) as caught:
            executor.profile(replace(_request(), spec=broken))
        node = executor.workers()[0].node
        assert socket.gethostname() in node
        assert f"could not load 'broken' from '{tmp_path / 'broken'}'" in str(caught.value)
        assert "loading failed on node " in str(caught.value) and socket.gethostname() in str(caught.value)
        gone = resolve_spec(str(_saved_index(tmp_path / "gone")))
        (tmp_path / "gone" / "model_index.json").unlink()
        (tmp_path / "gone").rmdir()  # resolved here; not on the node that loads it
        with pytest.raises(ModelLoadError, match=f"the model directory {tmp_path / 'gone'} does not exist on "
                                                 f"node {socket.gethostname()}"):
            executor.profile(replace(_request(), spec=gone))


    def test_a_cache_gate_plan_runs_on_an_actor_as_it_runs_here(self, executor):
        import torch

        from pytest_ditredundancy.cache.measure import RunPlan
        from pytest_ditredundancy.cache.remote_plan import RemotePlan, plan_on
        from pytest_ditredundancy.cache.spec import parse_spec
        from pytest_ditredundancy.profiling.executors import LocalExecutor

        request = _request(num_prompts=2, steps=6)
        pipe = load_model(request.spec, device="cpu", seed=0)
        remote = plan_on(executor, request.spec, request)
        local = plan_on(LocalExecutor(ExecutorSettings(device="cpu"), lambda spec: pipe), request.spec, request)
        assert isinstance(remote, RemotePlan) and remote.pipe is None
        assert type(local) is RunPlan and local.pipe is pipe
        assert remote.layer_names() == local.layer_names()
        for strategy in (None, parse_spec("fbcache:threshold=0.2")):
            ours = remote.run(strategy, context=remote.context(), count=True)
            theirs = local.run(strategy, context=local.context(), count=True)
            assert np.array_equal(ours.images, theirs.images) and torch.equal(ours.latents, theirs.latents)
            assert (ours.attention_calls, ours.linear_macs, ours.strategy) == \
                (theirs.attention_calls, theirs.linear_macs, theirs.strategy)


KILL_TEST = '''
import os, signal, time
from pathlib import Path


def test_an_actor_dies(dit_session):
    """Runs first: waits until an actor computes a part, and kills its process."""
    executor = dit_session.executor
    deadline = time.monotonic() + 120
    while not executor.busy():
        assert time.monotonic() < deadline, "no actor started working"
        time.sleep(0.02)
    victim = executor.busy()[0]
    os.kill(victim.pid, signal.SIGKILL)
    Path("killed.txt").write_text(str(victim.pid))
'''


def _run(root: Path, *args: str, timeout: float = 600, **env_vars: str) -> subprocess.CompletedProcess:
    """pytest in ``root``, on one torch thread like a CPU actor (float sums differ between thread counts)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT"))}
    env.update(HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1", **env_vars)
    return subprocess.run([sys.executable, "-m", "pytest", *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_a_killed_actor_has_its_work_retried_and_the_run_equals_a_local_one(ray_address, tmp_path):
    local_root, ray_root = tmp_path / "local", tmp_path / "ray"
    for root in (local_root, ray_root):
        root.mkdir()
        use_suites(root)
    (ray_root / "suites" / "test_0_kill.py").write_text(KILL_TEST)
    local = _run(local_root, *RUN, *SUITE_FILES, "--dit-update-baselines", "--dit-json=r.json")
    assert local.returncode == 0, local.stdout[-3000:]
    ray = _run(ray_root, *RUN, "suites/test_0_kill.py", *SUITE_FILES, "--dit-update-baselines", "--dit-json=r.json",
               "--dit-report=r.html", "--dit-executor=ray", f"--dit-ray-address={ray_address}",
               "--dit-ray-actors=2")
    assert ray.returncode == 0, ray.stdout[-3000:] + ray.stderr[-3000:]
    killed = (ray_root / "killed.txt").read_text()
    assert "ditredundancy: executor ray (" in ray.stdout and "2 actors, one per CPU" in ray.stdout
    lines = [line for line in ray.stdout.splitlines() if line.startswith("retried work: ")]
    assert lines and f"pid {killed} died (" in lines[0] and "retried on " in lines[0], ray.stdout[-2000:]
    doc = json.loads((ray_root / "r.json").read_text())
    retried = doc["environment"]["executor"]["retried"]
    assert retried[0]["failed_on"].endswith(f"pid {killed}") and retried[0]["retried_on"]
    assert retried[0]["retried_on"] != retried[0]["failed_on"]
    assert "Retried work" in (ray_root / "r.html").read_text()
    # nothing lost: the same records and profile summaries as the local run, and the same baselines
    expected = json.loads((local_root / "r.json").read_text())
    assert differences(doc["models"], expected["models"], rel=0, abs_tol=0) == []
    assert differences(doc["records"], expected["records"], rel=0, abs_tol=0) == []
    for path in sorted((local_root / "baselines").rglob("*.json")):
        ours = json.loads((ray_root / path.relative_to(local_root)).read_text())
        theirs = json.loads(path.read_text())
        for stored in (ours, theirs):
            stored["metadata"].pop("updated")  # when it was written
        assert differences(ours, theirs, rel=0, abs_tol=0) == [], path


def test_a_cluster_that_refuses_the_token_is_a_usage_error_naming_the_variables(ray_address, tmp_path):
    (tmp_path / "test_ran.py").write_text("def test_ran():\n    open('ran.txt', 'w').close()\n")
    result = _run(tmp_path, "-p", "no:cacheprovider", "--dit-executor=ray", f"--dit-ray-address={ray_address}",
                  RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="not-the-cluster-token")
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, result.stdout[-2000:]
    assert f"could not join the Ray cluster {ray_address}" in result.stderr
    assert "RAY_AUTH_MODE=token and its token in RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH" in result.stderr
    assert not (tmp_path / "ran.txt").exists()


def test_ctrl_c_cancels_the_work_and_leaves_the_baselines_alone(ray_address, tmp_path):
    import ray

    use_suites(tmp_path)
    baselines = tmp_path / "baselines"
    baselines.mkdir()
    (baselines / "keep.txt").write_text("untouched")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT"))}
    env.update(HF_HUB_OFFLINE="1")
    slow = ["--dit-num-prompts=16", "--dit-steps=3000"]  # minutes of work: the interrupt lands in it
    process = subprocess.Popen([sys.executable, "-m", "pytest", "suites/test_prompt_stability.py", "-p",
                                "no:cacheprovider", "--dit-model=tiny-pixart-alpha", "--dit-device=cpu", *slow,
                                "--dit-update-baselines", "--dit-executor=ray", f"--dit-ray-address={ray_address}",
                                "--dit-ray-actors=2"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while ray.available_resources().get("CPU", 0) > 0:  # both actors are up
            assert process.poll() is None and time.monotonic() < deadline, "the run did not start its actors"
            time.sleep(0.1)
        time.sleep(1.0)
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == pytest.ExitCode.INTERRUPTED, output[-3000:]
    assert "KeyboardInterrupt" in output
    assert sorted(p.relative_to(baselines).as_posix() for p in baselines.rglob("*") if p.is_file()) == ["keep.txt"]
    assert (baselines / "keep.txt").read_text() == "untouched"
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < 2:  # the outstanding work was cancelled, the actors ended
        assert time.monotonic() < deadline, "the interrupted run left its actors working"
        time.sleep(0.1)


def test_the_cache_gate_and_tuning_run_on_actors_and_agree_with_a_local_run(ray_address, tmp_path):
    """Every pass of the cache gate and the tuning runs where the pipeline is (a remote plan); what they store with
    Ray is what a local run then measures again, inside the CPU tolerances."""
    use_suites(tmp_path)
    cache = ["suites/test_cache_gate.py", "suites/test_cache_tune.py", "--dit-cache=profile:budget=0.3",
             "--dit-cache=fbcache:threshold=0.2", "--dit-cache-tune=fbcache:threshold=0.05..0.5",
             "--dit-cache-floor=psnr:40", "--no-dit-cache-transfer", "--dit-cache-repeats=1"]
    ray = _run(tmp_path, *RUN, *cache, "--dit-update-baselines", "--dit-executor=ray",
               f"--dit-ray-address={ray_address}", "--dit-ray-actors=2")
    assert ray.returncode == 0, ray.stdout[-3000:] + ray.stderr[-3000:]
    assert "3 passed" in ray.stdout, ray.stdout[-2000:]
    stored = json.loads(next((tmp_path / "baselines" / "tiny-pixart-alpha").glob("*.json")).read_text())
    assert set(stored["suites"]["cache_gate"]) == {"profile:budget=0.3", "fbcache:threshold=0.2"}
    assert stored["suites"]["cache_tune"]["fbcache:threshold=0.05..0.5"]["recommendation"] is not None
    local = _run(tmp_path, *RUN, *cache)
    assert local.returncode == 0 and "3 passed" in local.stdout, local.stdout[-3000:]
