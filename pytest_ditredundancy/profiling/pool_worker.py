"""What runs inside one pool worker (a Ray actor, one per GPU): it loads pipelines, keeps them between
requests, and returns profiles as arrays plus metadata, never a module.

The class is plain Python: :mod:`pytest_ditredundancy.profiling.ray_executor` turns it into an actor, and the
tests can drive it without a cluster. Everything a worker is sent (a :class:`RunRequest`: spec, protocol,
settings, prompts) is data; the worker resolves nothing from the controller's disk, so a model directory must
be on a filesystem its node sees (the error says which path and which node when it is not).
"""

from __future__ import annotations

import gc
import os
import socket
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch

from ..capture.environment import device_name
from ..capture.profile import RedundancyProfile
from ..zoo.loading import ModelLoadError, load_model, resolve_device
from ..zoo.registry import ModelSpec
from .protocol_registry import PROTOCOLS, register_protocol
from .runner import run_profile
from .settings import RunRequest


def local_directory(spec: ModelSpec) -> str | None:
    """The directory ``spec`` loads from when it is a local checkpoint (an absolute path, as the controller
    resolved it), else None (a registered tiny model, shipped weights, an HF repo id)."""
    checkpoint = spec.checkpoint
    if spec.build is not None or spec.trained or not checkpoint:
        return None
    return checkpoint if os.path.isabs(checkpoint) else None


class PoolWorker:
    """One worker's pipelines and profiles. ``keep``: how many loaded pipelines stay (one by default, so two
    large models never share a GPU); the least recently used goes first. A model that failed to load here
    fails again at once, with the same message, naming this node."""

    def __init__(self, *, device: str = "auto", dtype: str = "auto", seed: int = 0, threads: int | None = None,
                 node: str | None = None, keep: int = 1) -> None:
        if threads:
            torch.set_num_threads(threads)  # a CPU worker's share of the node; results differ between counts
        self.device = str(resolve_device(device))
        self.dtype, self.seed, self.keep = dtype, seed, max(1, keep)
        self.node = node or socket.gethostname()
        self.pipelines: OrderedDict[str, Any] = OrderedDict()
        self.failed: dict[str, str] = {}

    def where(self) -> dict[str, Any]:
        """The node, process, device and loaded models of this worker."""
        return {"node": self.node, "pid": os.getpid(), "device": self.device,
                "device_name": device_name(self.device), "loaded": list(self.pipelines)}

    def profile(self, request: RunRequest) -> RedundancyProfile:
        """The profile of ``request`` (a part of a request: its prompts carry their offset)."""
        if request.protocol.name not in PROTOCOLS:  # a protocol the controller's conftest registered
            register_protocol(request.protocol)
        return run_profile(self.pipeline(request.spec), request)

    def call(self, spec: ModelSpec, function: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """``function(pipeline, *args, **kwargs)`` with this worker's pipeline of ``spec``."""
        return function(self.pipeline(spec), *args, **kwargs)

    def pipeline(self, spec: ModelSpec) -> Any:
        if spec.name in self.failed:
            raise ModelLoadError(self.failed[spec.name])
        if spec.name in self.pipelines:
            self.pipelines.move_to_end(spec.name)
            return self.pipelines[spec.name]
        while len(self.pipelines) >= self.keep:
            self.pipelines.popitem(last=False)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        try:
            directory = local_directory(spec)
            if directory is not None and not Path(directory).is_dir():
                raise ModelLoadError(
                    f"{spec.name}: the model directory {directory} does not exist on node {self.node}: a local "
                    "directory must be on a filesystem every node mounts at the same path (a shared volume), or "
                    "be pushed to the Hugging Face Hub and named by its repo id")
            pipe = load_model(spec, device=self.device, dtype=self.dtype, seed=self.seed)
        except ModelLoadError as exc:
            self.failed[spec.name] = self._on_node(str(exc))
        except Exception as exc:  # a broken checkpoint, out of memory: named, not retried on this worker
            self.failed[spec.name] = self._on_node(f"could not load {spec.name}: {type(exc).__name__}: {exc}")
        if spec.name in self.failed:  # raised outside the except: the message alone, not the loader's chain
            raise ModelLoadError(self.failed[spec.name])
        self.pipelines[spec.name] = pipe
        return pipe

    def _on_node(self, message: str) -> str:
        where = f"on node {self.node}"
        return message if where in message else f"{message}\n(loading failed {where}, worker pid {os.getpid()})"


__all__ = ["PoolWorker", "local_directory"]
