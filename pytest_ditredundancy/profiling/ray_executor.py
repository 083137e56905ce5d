"""``--dit-executor=ray``: profiles computed on a pool of Ray actors, one per GPU (one per CPU on a cluster
without GPUs), each keeping its loaded pipelines between requests.

The pytest process is Ray's driver: it joins the cluster (``--dit-ray-address``, else ``RAY_ADDRESS``, else a
local instance it starts), splits each request into parts of whole batches, and a dispatcher thread hands the
parts to idle actors (work a test waits for first, then parts of the model an actor has loaded, speculative
work last). Actors return profiles as numpy arrays plus a metadata dataclass; the suites, baselines and report
stay in the pytest process. An actor whose process dies has its part computed again on another actor (and
a replacement actor is started); :meth:`RayExecutor.retried` says which part and where. Ray is imported only
here, and only when this executor is chosen.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..capture.profile import RedundancyProfile
from ..zoo.registry import ModelSpec
from .executors import (Executor, ExecutorError, ExecutorSettings, Part, Progress, RemoteWorkError, RetriedWork,
                        WorkerInfo, join_parts, parts_for, split_request)
from .pool_worker import PoolWorker
from .ray_connect import INSTALL, check_reachable, connect, import_ray
from .settings import RunRequest

#: how many times one part is computed again after its actor died, before the run gives up on it
MAX_RETRIES = 2
#: seconds a pool waits for its first actor to start before its work fails (a cluster without free resources)
START_TIMEOUT = 600.0
log = logging.getLogger("pytest_ditredundancy")


class _RayWorker(PoolWorker):
    """The actor: a pool worker that names its node by host name and IP address."""

    def __init__(self, **kwargs: Any) -> None:
        import ray

        super().__init__(node=f"{socket.gethostname()} ({ray.util.get_node_ip_address()})", **kwargs)


@dataclass(eq=False)
class _Job:
    """One request (as the session profiles it), in parts."""

    request: RunRequest
    wanted: bool
    parts: list[Part]
    results: dict[Part, RedundancyProfile] = field(default_factory=dict)
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


@dataclass(eq=False)
class _Item:
    job: _Job
    part: Part
    order: int
    failures: list[RetriedWork] = field(default_factory=list)


@dataclass(eq=False)
class _Worker:
    handle: Any
    info_ref: Any
    info: WorkerInfo | None = None
    item: _Item | None = None
    ref: Any = None
    model: str | None = None


class RayExecutor(Executor):
    name = "ray"
    summary = "a pool of Ray actors, one per GPU, each keeping its loaded pipelines"
    #: the pool spreads the work itself: pytest-xdist's -n would start one pool per worker
    spreads_work = True
    options = ("ray_address", "ray_actors")

    def __init__(self, settings: ExecutorSettings, load: Callable[[ModelSpec], Any]) -> None:
        super().__init__(settings, load)
        self.ray = import_ray()
        self.address = settings.address or os.environ.get("RAY_ADDRESS") or None
        self.started = connect(self.ray, self.address)
        resources = self.ray.cluster_resources()
        self.gpu = settings.device not in ("cpu", "mps") and resources.get("GPU", 0) >= 1
        if settings.device.startswith("cuda") and not self.gpu:
            raise ExecutorError(f"--dit-device={settings.device}: the Ray cluster has no GPU; use --dit-device=auto")
        self.size = settings.actors or max(1, int(resources.get("GPU" if self.gpu else "CPU", 1)))
        self.replacements = 2 * self.size  # actors started after a death, at most
        self._actor = self.ray.remote(num_gpus=1 if self.gpu else 0, num_cpus=1, max_restarts=0)(_RayWorker)
        self._lock = threading.Condition()
        self._jobs: dict[tuple, _Job] = {}
        self._pending: list[_Item] = []
        self._order = itertools.count()
        self._retried: list[RetriedWork] = []
        self._workers = [self._start_worker() for _ in range(self.size)]
        self._stopping = False
        self._thread = threading.Thread(target=self._dispatch, name="ditredundancy-ray", daemon=True)
        self._thread.start()

    def _start_worker(self) -> _Worker:
        handle = self._actor.remote(device="cuda" if self.gpu else "cpu", dtype=self.settings.dtype,
                                    seed=self.settings.seed, threads=None if self.gpu else 1)
        return _Worker(handle, handle.where.remote())

    # -- facts --------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if self.gpu else "cpu")

    @property
    def device_name(self) -> str:
        infos = self.workers()
        return infos[0].device_name if infos else self.device.type

    def describe(self) -> str:
        where = self.address or "a local Ray instance"
        kind = "GPU" if self.gpu else "CPU"
        return f"executor ray ({where}): {self.size} actor{'s' if self.size != 1 else ''}, one per {kind}"

    def facts(self) -> dict[str, Any]:
        return {**super().facts(), "address": self.address or "local", "actors": self.size,
                "per": "GPU" if self.gpu else "CPU"}

    def workers(self, timeout: float = 60.0) -> list[WorkerInfo]:
        """Where each live actor runs (waits until each has started)."""
        with self._lock:
            workers = list(self._workers)
        return [info for info in (self._info(w, timeout) for w in workers) if info is not None]

    def busy(self) -> list[WorkerInfo]:
        """The live actors computing a part right now (those that have started)."""
        with self._lock:
            working = [w for w in self._workers if w.item is not None]
        return [info for info in (self._info(w) for w in working) if info is not None]

    def retried(self) -> list[RetriedWork]:
        return list(self._retried)

    def _info(self, worker: _Worker, timeout: float = 0.0) -> WorkerInfo | None:
        if worker.info is None:
            try:
                worker.info = WorkerInfo(**self.ray.get(worker.info_ref, timeout=timeout))
            except Exception:  # not started yet, or died before it said where it runs
                return None
        return worker.info

    # -- work ---------------------------------------------------------------------------------------------
    @staticmethod
    def _key(request: RunRequest) -> tuple:
        return (request.spec.name, request.settings, request.prompts, request.prompt_offset, request.kinds)

    def prepare(self, requests: Sequence[RunRequest], *, speculative: Sequence[RunRequest] = ()) -> None:
        every = [*requests, *speculative]
        counts = parts_for(every, self.size)
        with self._lock:
            for i, request in enumerate(every):
                self._submit(request, counts[i], wanted=False, speculative=i >= len(requests))
            self._lock.notify_all()

    def _submit(self, request: RunRequest, parts: int, *, wanted: bool, speculative: bool = False) -> _Job:
        key = self._key(request)
        job = self._jobs.get(key)
        if job is None:
            job = self._jobs[key] = _Job(request, wanted, split_request(request, parts))
            base = next(self._order) + (10 ** 9 if speculative else 0)
            self._pending += [_Item(job, part, base) for part in job.parts]
        job.wanted = job.wanted or wanted
        return job

    def profile(self, request: RunRequest, *, progress: Progress | None = None) -> RedundancyProfile:
        with self._lock:
            job = self._submit(request, self.size, wanted=True)
            self._lock.notify_all()
        started, reported = time.perf_counter(), 0
        total = len(request.prompts)
        while not job.done.wait(0.5):  # woken often: Ctrl-C reaches this thread between waits
            done = sum(p.end - p.start for p in list(job.results))
            if progress is not None and done > reported:
                reported = done
                progress(done, total, done * request.settings.steps / max(time.perf_counter() - started, 1e-9))
        with self._lock:
            self._jobs.pop(self._key(request), None)
        if job.error is not None:
            raise job.error
        if progress is not None and reported < total:
            progress(total, total, total * request.settings.steps / max(time.perf_counter() - started, 1e-9))
        return join_parts(list(job.results.items()))

    def call(self, spec: ModelSpec, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Runs on a live actor of its own choosing, outside the dispatcher: a caller's call does not wait for the
        queue of parts (a dead actor is replaced and the call made again on another)."""
        for attempt in range(MAX_RETRIES + 1):
            with self._lock:
                live = sorted(self._workers, key=lambda w: (w.model != spec.name, w.item is not None))
            if not live:
                raise RemoteWorkError("no Ray actor is left to run on")
            worker = live[0]
            try:
                result = self.ray.get(worker.handle.call.remote(spec, function, args, kwargs))
            except self.ray.exceptions.RayTaskError as exc:
                raise _cause(exc) from None
            except self._deaths() as exc:
                with self._lock:
                    self._died(worker, None, exc)
                continue
            worker.model = spec.name
            return result
        raise RemoteWorkError(f"{function.__name__} on {spec.name} failed: {MAX_RETRIES + 1} actors died running it")

    # -- the dispatcher thread ------------------------------------------------------------------------------
    def _deaths(self) -> tuple[type[BaseException], ...]:
        errors = self.ray.exceptions
        return (errors.RayActorError, errors.WorkerCrashedError, errors.OutOfMemoryError, errors.NodeDiedError,
                errors.ObjectLostError)

    def _dispatch(self) -> None:
        started = time.monotonic()
        while True:
            try:
                with self._lock:
                    if self._stopping:
                        return
                    if started is not None:
                        started = self._check_started(started)
                    self._assign()
                    running = {w.ref: w for w in self._workers if w.item is not None}
                    if not running:
                        self._lock.wait(0.2)
                        continue
                ready, _ = self.ray.wait(list(running), num_returns=1, timeout=0.2)
                for ref in ready:
                    self._finish(running[ref], ref)
            except Exception as exc:  # the dispatcher must never die silently: every waiting test would hang
                with self._lock:
                    self._fail_all(RemoteWorkError(f"the Ray dispatcher failed: {type(exc).__name__}: {exc}"))
                    self._stopping = True
                return

    def _check_started(self, since: float) -> float | None:
        """None once an actor has started; a pool none of whose actors starts (no free GPU or CPU in the
        cluster) fails its work after :data:`START_TIMEOUT` seconds instead of waiting for ever."""
        if any(self._info(w) is not None for w in self._workers):
            return None
        if time.monotonic() - since > START_TIMEOUT:
            kind = "GPU" if self.gpu else "CPU"
            self._fail_all(RemoteWorkError(
                f"no Ray actor started within {START_TIMEOUT:.0f} s: the cluster has no free {kind} for them "
                f"(see 'ray status'; --dit-ray-actors sets how many the run asks for)"))
        return since

    def _fail_all(self, error: BaseException) -> None:
        for job in self._jobs.values():
            if not job.done.is_set():
                job.error = job.error or error
                job.done.set()
        self._pending = []
        self._lock.notify_all()

    def _assign(self) -> None:
        """Give each idle actor the next part: one a test waits for, then one of the model it has loaded, in
        order of submission (speculative parts last)."""
        for worker in self._workers:
            if worker.item is not None or not self._pending:
                continue
            item = min(self._pending, key=lambda it: (not it.job.wanted, it.job.request.spec.name != worker.model,
                                                      it.order))
            self._pending.remove(item)
            part = item.part
            try:
                worker.ref = worker.handle.profile.remote(item.job.request.shard(part.start, part.end))
            except Exception as exc:  # the request cannot be sent (e.g. code the nodes cannot import)
                item.job.error = RemoteWorkError(f"{part.label(item.job.request)} could not be sent to a Ray actor: "
                                                 f"{type(exc).__name__}: {exc}")
                self._pending = [it for it in self._pending if it.job is not item.job]
                item.job.done.set()
                continue
            worker.item, worker.model = item, item.job.request.spec.name

    def _finish(self, worker: _Worker, ref: Any) -> None:
        item = worker.item
        try:
            profile = self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as exc:
            outcome: Any = _cause(exc)
        except self._deaths() as exc:
            with self._lock:
                self._died(worker, item, exc)
            return
        except Exception as exc:  # cancelled, or Ray's own failure: the part cannot finish
            outcome = RemoteWorkError(f"{item.part.label(item.job.request)}: {type(exc).__name__}: {exc}")
        else:
            outcome = profile
        with self._lock:
            worker.item, worker.ref = None, None
            job = item.job
            if isinstance(outcome, BaseException):
                job.error = job.error or outcome
                self._pending = [it for it in self._pending if it.job is not job]
                job.done.set()
            else:
                for retry in item.failures:
                    retry.retried_on = str(self._info(worker, timeout=5.0) or "another actor")
                job.results[item.part] = outcome
                if len(job.results) == len(job.parts):
                    job.done.set()
            self._lock.notify_all()

    def _died(self, worker: _Worker, item: _Item | None, exc: BaseException) -> None:
        """``worker``'s process is gone: its part goes back to the front of the queue, a replacement starts."""
        where = self._info(worker, timeout=1.0)
        if worker in self._workers:
            self._workers.remove(worker)
            try:
                self.ray.kill(worker.handle)
            except Exception:  # already gone
                pass
            if self.replacements > 0:
                self.replacements -= 1
                self._workers.append(self._start_worker())
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        log.warning("ditredundancy: Ray actor %s died (%s)", where or "(not started)", reason)
        if item is None:
            return
        retry = RetriedWork(item.part.label(item.job.request), str(where or "an actor that had not started"),
                            type(exc).__name__)
        self._retried.append(retry)
        item.failures.append(retry)
        if len(item.failures) > MAX_RETRIES or not self._workers:
            item.job.error = RemoteWorkError(
                f"{retry.work}: {len(item.failures)} Ray actors died computing it (last: {retry.failed_on}, "
                f"{reason}); not retried again")
            self._pending = [it for it in self._pending if it.job is not item.job]
            item.job.done.set()
        else:
            item.order = -1 - len(self._retried)  # first in line
            item.job.wanted = True
            self._pending.append(item)
        self._lock.notify_all()

    # -- the end --------------------------------------------------------------------------------------------
    def close(self, *, cancel: bool = False) -> None:
        """Stop the dispatcher, cancel what is queued or running, end the actors (and Ray, if this started it)."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            workers, self._workers = list(self._workers), []
            self._fail_all(RemoteWorkError("the run ended before this profile was computed"))
        self._thread.join(timeout=10)
        for worker in workers:
            try:
                if worker.ref is not None:
                    self.ray.cancel(worker.ref)
                self.ray.kill(worker.handle)
            except Exception:  # already gone
                pass
        if self.started:
            self.ray.shutdown()


def _cause(exc: BaseException) -> BaseException:
    """The exception an actor raised (a load failure names the node), without Ray's wrapper."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else RemoteWorkError(str(exc))


__all__ = ["INSTALL", "RayExecutor", "check_reachable", "import_ray"]
