"""Where profiles are computed: in this process (``local``, the default) or on a pool of workers elsewhere
(``ray``: :mod:`pytest_ditredundancy.profiling.ray_executor`).

An executor turns a :class:`RunRequest` into a :class:`RedundancyProfile`. The plugin's session resolves one
executor per run (``--dit-executor``) and asks it for every profile; :meth:`Executor.prepare` hands it the
run's known requests as soon as they are known, so a pool can keep every worker busy while the tests judge
what has arrived. What differs between executors is a class registered by name
(:mod:`pytest_ditredundancy.profiling.executor_registry`); nothing compares an executor's name.

A profile's values do not depend on how its prompts are split (prompt ``i`` keeps its seed through
``prompt_offset``), so a pool may profile a request in parts and join them (:func:`join_parts`); parts hold
whole batches of the request, so every pipeline call sees the same prompts as in one local run.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch

from ..capture.environment import device_name
from ..capture.profile import ProfileMetadata, RedundancyProfile
from ..zoo.loading import resolve_device
from ..zoo.registry import ModelSpec
from .runner import run_profile
from .settings import RunRequest

#: what ``progress(done, total, steps_per_second)`` receives while a profile is computed
Progress = Callable[[int, int, float], None]


class ExecutorError(RuntimeError):
    """An executor that cannot run with the given settings (a missing extra, an unreachable cluster); the
    message names the problem and the fix. The plugin reports it as a usage error before any test runs."""


class RemoteWorkError(RuntimeError):
    """Work that could not be finished anywhere (every retry failed); the message says where it failed."""


@dataclass(frozen=True)
class ExecutorSettings:
    """What every executor is given: where and how models run, and the pool's options (``ray`` only)."""

    device: str = "auto"
    dtype: str = "auto"
    #: seeds the random weights of tiny models (as ``load_model(seed=)``)
    seed: int = 0
    #: the cluster to join (``--dit-ray-address``, else ``RAY_ADDRESS``); None: start a local instance
    address: str | None = None
    #: actors in the pool; None: one per GPU of the cluster (one per CPU on a cluster without GPUs)
    actors: int | None = None


@dataclass
class RetriedWork:
    """A part of a profile whose worker died while computing it, and where it was computed instead."""

    work: str
    failed_on: str
    reason: str
    retried_on: str | None = None

    def line(self) -> str:
        where = f"retried on {self.retried_on}" if self.retried_on else "not finished"
        return f"{self.work}: worker {self.failed_on} died ({self.reason}); {where}"


class Executor(ABC):
    """What every executor answers; subclasses decide where the pipelines live and the profiles are computed."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    #: spreads the work over machines itself (pytest-xdist's ``-n`` would start one pool per xdist worker)
    spreads_work: ClassVar[bool] = False
    #: the ``ExecutorSettings`` fields beyond device, dtype and seed that it reads (their options apply to it)
    options: ClassVar[tuple[str, ...]] = ()
    #: keeps its pipelines in this process (``load`` gives them); else they live in its workers (``call``)
    pipelines_here: ClassVar[bool] = False

    def __init__(self, settings: ExecutorSettings, load: Callable[[ModelSpec], Any]) -> None:
        """``load(spec)``: the session's loaded pipeline of ``spec``, in this process (the local executor
        profiles with it; a pool's executor never loads a model here)."""
        self.settings = settings
        self.load = load

    # -- facts --------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the profiles are computed (tolerances and baselines are kept per device class)."""
        return resolve_device(self.settings.device)

    @property
    def device_name(self) -> str:
        return device_name(self.device)

    def describe(self) -> str:
        """Where the profiles are computed, in one line."""
        return f"executor {self.name} ({self.summary})"

    def header(self) -> list[str]:
        """Lines for the terminal header (none for the local executor: the header already says where)."""
        return [self.describe()]

    def facts(self) -> dict[str, Any]:
        """What the report says about the executor: its name, where it ran, and the work it retried."""
        return {"name": self.name, "description": self.describe(), "retried": [asdict(r) for r in self.retried()]}

    # -- work ---------------------------------------------------------------------------------------------
    def prepare(self, requests: Sequence[RunRequest], *, speculative: Sequence[RunRequest] = ()) -> None:
        """The run's known requests, as early as they are known; ``speculative`` ones may never be asked for.
        An executor that computes each profile when asked ignores them."""

    @abstractmethod
    def profile(self, request: RunRequest, *, progress: Progress | None = None) -> RedundancyProfile:
        """The profile of ``request``."""

    @abstractmethod
    def call(self, spec: ModelSpec, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``function(pipeline, *args, **kwargs)`` where ``spec``'s pipeline lives. ``function`` must be
        importable by name where it runs, and its result plain data (numbers, arrays, tensors, dataclasses of
        them; never a module)."""

    def retried(self) -> list[RetriedWork]:
        """Work whose worker died and that ran again elsewhere."""
        return []

    def close(self, *, cancel: bool = False) -> None:
        """Release what the executor holds; ``cancel``: drop work not finished (an interrupted run)."""


class LocalExecutor(Executor):
    """Profiles in this process with the session's loaded pipeline (one at a time): the default."""

    name = "local"
    summary = "in the pytest process (or each xdist worker), one loaded pipeline at a time"
    pipelines_here = True

    def header(self) -> list[str]:
        return []

    def profile(self, request: RunRequest, *, progress: Progress | None = None) -> RedundancyProfile:
        return run_profile(self.load(request.spec), request, progress=progress)

    def call(self, spec: ModelSpec, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return function(self.load(spec), *args, **kwargs)


# -- parts of a request ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Part:
    """Prompts ``start..end-1`` of a request (positions in its prompt list)."""

    start: int
    end: int

    def label(self, request: RunRequest) -> str:
        offset = request.prompt_offset
        return f"{request.spec.name} {request.key} prompts {offset + self.start}-{offset + self.end - 1}"


def split_request(request: RunRequest, parts: int) -> list[Part]:
    """``request`` as up to ``parts`` contiguous parts of whole batches (at least one batch each), so every
    pipeline call sees the prompts it sees in one run and the joined profile is the unsplit one."""
    total, batch = len(request.prompts), max(1, request.batch_size)
    batches = math.ceil(total / batch)
    per_part = math.ceil(batches / max(1, min(parts, batches)))
    bounds = list(range(0, total, per_part * batch)) + [total]
    return [Part(a, b) for a, b in zip(bounds, bounds[1:])]


def parts_for(requests: Sequence[RunRequest], workers: int, *, per_worker: int = 2) -> dict[int, int]:
    """How many parts each request (by position) is split into so that ``workers`` stay busy: about
    ``per_worker`` parts per worker over all requests, in proportion to each request's prompts."""
    total = sum(len(r.prompts) for r in requests) or 1
    wanted = max(1, workers * per_worker)
    return {i: max(1, math.ceil(wanted * len(r.prompts) / total)) for i, r in enumerate(requests)}


def join_parts(parts: Sequence[tuple[Part, RedundancyProfile]]) -> RedundancyProfile:
    """The profile of a whole request from the profiles of its parts (in any order): prompts concatenated,
    metadata of the first part with every prompt and the request's offset, the first non-finite value of the
    earliest part that had one (its prompt renumbered in the whole)."""
    ordered = sorted(parts, key=lambda p: p[0].start)
    if len(ordered) == 1:
        return ordered[0][1]
    first = ordered[0][1]
    nonfinite = next(((part, p.metadata.first_nonfinite) for part, p in ordered if p.metadata.first_nonfinite), None)
    extra = dict(first.metadata.extra)
    if isinstance(extra.get("step_stats"), dict):
        extra["step_stats"] = _joined_step_stats([p.metadata.extra.get("step_stats") or {} for _, p in ordered])
    meta = ProfileMetadata.from_dict({
        **asdict(first.metadata), "prompts": [text for _, p in ordered for text in p.metadata.prompts], "extra": extra,
        "first_nonfinite": None if nonfinite is None else {
            **nonfinite[1], "prompt": nonfinite[1].get("prompt", 0) + nonfinite[0].start - ordered[0][0].start}})
    values = {metric: np.concatenate([p.values[metric] for _, p in ordered]) for metric in first.values}
    return RedundancyProfile(list(first.layers), list(first.kinds), list(first.branches), values,
                             np.concatenate([p.computed for _, p in ordered]), meta)


def _joined_step_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """``extra["step_stats"]`` of the whole request: the parts' reduction calls and call kernels added up, and
    what produced the numbers (``fused``, ``eager``, ``mixed``) said of them all."""
    joined = dict(parts[0])
    for name in ("fused_calls", "eager_calls", "call_kernels"):
        joined[name] = sum(int(part.get(name) or 0) for part in parts)
    if "path" in joined:
        fused, eager = joined["fused_calls"], joined["eager_calls"]
        joined["path"] = "mixed" if fused and eager else "fused" if fused else "eager"
    return joined


@dataclass
class WorkerInfo:
    """Where a pool worker runs: its node, process and device (named in errors, retries and the report)."""

    node: str
    pid: int
    device: str
    device_name: str
    loaded: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.node} pid {self.pid}"


__all__ = ["Executor", "ExecutorError", "ExecutorSettings", "LocalExecutor", "Part", "RemoteWorkError", "RetriedWork", "WorkerInfo",
           "join_parts", "parts_for", "split_request"]
