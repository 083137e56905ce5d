"""The five step statistics in one fused pass over the current and previous tensor (inductor).

Eager :func:`~pytest_ditredundancy.capture.metrics.step_stats` needs about eight passes over ``x`` and ``p`` (five
reductions and their temporaries); the previous step's ``p`` comes from DRAM every time. Written as one
expression, inductor fuses the five row reductions into one loop that reads ``x`` and ``p`` once and writes
nothing but the ``(5, rows)`` result: a C++/OpenMP kernel on CPU (needs a C++ compiler), a Triton kernel on
CUDA. One kernel is compiled per shape, strides, dtype and device and shared by every capture of the process
(a model has a handful of distinct K/V/A shapes); :mod:`~pytest_ditredundancy.capture.batched_stats` compiles
one such kernel over all the tensors of a transformer call.

:class:`StepStatistics` chooses per call: the fused kernel where it is enabled and worth it, the eager path
otherwise, and for good after a compilation failure (the reason is kept). What ran is counted, so the profile
metadata and the benchmark can say which path produced the numbers.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .metrics import step_stats

#: Modes: ``auto`` fuses on CUDA, and on CPU for tensors of at least :data:`CPU_MIN_ELEMENTS` elements where
#: a C++ compiler exists; ``fused`` fuses every tensor (still falling back on failure); ``eager`` never fuses.
MODES = ("auto", "fused", "eager")
ENV_MODE = "DITREDUNDANCY_STATS"
#: CPU tensors smaller than this stay eager under ``auto``: the kernel is faster per call at almost every size (cold
#: cache, one thread: 0.50x eager's time at 65k elements, 0.48x at 98k, 0.39x at 262k, 0.31x at 1M), but its
#: compilation (about 7 s for a process's first shape, inductor's start-up included, then 1 to 1.5 s per shape)
#: is recovered within a 20-step profile only from about this size (520 µs saved per call). The tiny models'
#: largest tensors at their default batch of 8 prompts (up to 246k elements) stay below it.
CPU_MIN_ELEMENTS = 1 << 18


def _fused_rows(x: torch.Tensor, p: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """``(5, rows)`` float32: sum|d|, ||d||, <x,p>, sum|x|, ||x|| with d = x - p, accumulated in float32.

    With ``chunk`` (a divisor of the row length) each row is summed in chunks of that many elements and the
    chunks' sums are added: see :data:`CPU_CHUNK`."""
    x = x.float()
    p = p.float()
    rows, length = x.shape
    if chunk is not None and chunk < length:
        x = x.reshape(rows, length // chunk, chunk)
        p = p.reshape(rows, length // chunk, chunk)
    d = x - p
    sums = torch.stack((d.abs().sum(-1), (d * d).sum(-1), (x * p).sum(-1), x.abs().sum(-1), (x * x).sum(-1)))
    if sums.dim() == 3:
        sums = sums.sum(-1)
    return torch.stack((sums[0], sums[1].sqrt(), sums[2], sums[3], sums[4].sqrt()))


#: CPU kernels sum each row in chunks of at most this many elements, then add the chunks' sums. Inductor sums
#: a row longer than 64k elements with cascade summation, whose bookkeeping per vector cost a quarter of the
#: call kernel's time on the benchmark model (2.65 -> 2.0 ms per call); chunks of 1024 are summed directly and
#: are more accurate (1.4e-7 against 1.1e-6 relative to float64 there). Not on CUDA: a second reduction per
#: tensor would be a second kernel launch.
CPU_CHUNK = 1024
#: The shortest chunk worth it: a row with no divisor in [CPU_CHUNK_MIN, CPU_CHUNK] is summed in one piece.
CPU_CHUNK_MIN = 256


def row_chunk(length: int, device: torch.device) -> int | None:
    """The chunk :func:`_fused_rows` sums a row of ``length`` elements in on ``device`` (None: the whole row)."""
    if device.type != "cpu" or length <= CPU_CHUNK:
        return None
    return next((size for size in range(CPU_CHUNK, CPU_CHUNK_MIN - 1, -1) if length % size == 0), None)


#: Most compiled kernels one process keeps (one per shape, strides, dtype and device); beyond, eager.
MAX_KERNELS = 64


@dataclass
class StepStatistics:
    """Step statistics for one capture: fused where enabled and worth it, eager otherwise; counts what ran."""

    mode: str = "auto"
    calls: dict[str, int] = field(default_factory=lambda: {"fused": 0, "eager": 0})
    kernels: set[str] = field(default_factory=set)  # what ran the fused sums: per tensor or per call
    compile_seconds: float = 0.0
    fallback_reason: str | None = None
    #: Whether a C++ compiler exists, looked up once per capture: the lookup walks ``PATH`` (about 130 µs,
    #: more than the fused reduction itself), so per call it was most of the CPU capture's cost.
    cpu_compiler: bool | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown step statistics mode {self.mode!r}; choose from {', '.join(MODES)} "
                             f"(set with capture_redundancy(..., stats=...) or {ENV_MODE})")

    def __call__(self, current: torch.Tensor, previous: torch.Tensor | None, rows: int) -> torch.Tensor:
        """:func:`~pytest_ditredundancy.capture.metrics.step_stats`'s result. A series' first step (no ``previous``)
        needs only two reductions of ``x``: it always runs eagerly and is not counted."""
        if previous is None:
            return step_stats(current, None, rows)
        if self._use_fused(current):
            x, p = current.detach().reshape(rows, -1), previous.detach().reshape(rows, -1)
            try:
                kernel = self._kernel(x, p)
                if kernel is not None:
                    result = kernel([x, p])[0]
                    self.calls["fused"] += 1
                    self.kernels.add(INDUCTOR.get(x.device.type, x.device.type))
                    return result
            except Exception as exc:  # an inductor or compiler failure: eager from now on, reason kept
                text = str(exc).strip().splitlines()
                self.fallback_reason = f"{type(exc).__name__}: {text[0][:200] if text else ''}".rstrip(": ")
        self.calls["eager"] += 1
        return step_stats(current, previous, rows)

    def fuses_on(self, device: torch.device) -> bool:
        """Whether this capture may run fused kernels on ``device`` at all (size rules aside)."""
        if self.fallback_reason is not None or self.mode == "eager":
            return False
        if device.type == "cpu":
            if self.cpu_compiler is None:
                self.cpu_compiler = cpu_compiler_available()
            return self.cpu_compiler
        return device.type == "cuda"

    def _use_fused(self, tensor: torch.Tensor) -> bool:
        if self.fallback_reason is not None or self.mode == "eager":
            return False
        if tensor.device.type == "cpu":
            if self.cpu_compiler is None:
                self.cpu_compiler = cpu_compiler_available()
            if not self.cpu_compiler:
                self.fallback_reason = "no C++ compiler for inductor's CPU kernels"
                return False
            return self.mode == "fused" or tensor.numel() >= CPU_MIN_ELEMENTS
        return tensor.device.type == "cuda"

    def _kernel(self, x: torch.Tensor, p: torch.Tensor) -> Callable[[list], tuple] | None:
        key = (x.device, x.dtype, p.dtype, tuple(x.shape), x.stride(), p.stride())
        kernel = _KERNELS.get(key)
        if kernel is None:
            if len(_KERNELS) >= MAX_KERNELS:
                return None
            started = time.perf_counter()
            kernel = _KERNELS[key] = compile_fused(x, p)
            self.compile_seconds += time.perf_counter() - started
        return kernel

    def path(self) -> str:
        """What produced the numbers: ``fused``, ``eager``, or ``mixed`` (fused for large tensors only)."""
        fused, eager = self.calls["fused"], self.calls["eager"]
        if fused and not eager:
            return "fused"
        return "mixed" if fused else "eager"

    def summary(self) -> dict[str, Any]:
        """Plain, reproducible data for the profile metadata (``extra["step_stats"]``); the benchmark adds
        :attr:`compile_seconds` (timing varies from run to run, so it stays out of profiles)."""
        return {"mode": self.mode, "path": self.path(), "fused_calls": self.calls["fused"],
                "eager_calls": self.calls["eager"],
                "kernel": ", ".join(sorted(self.kernels)) or None,
                "fallback": self.fallback_reason}


#: Inductor's kernels by device type, as named in ``step_stats["kernel"]``.
INDUCTOR = {"cpu": "inductor C++", "cuda": "inductor Triton"}
#: Compiled kernels of this process, by (device, dtypes, shape, strides): every capture shares them.
_KERNELS: dict[tuple, Callable[[list], tuple]] = {}


def compile_fused(x: torch.Tensor, p: torch.Tensor) -> Callable[[list], tuple]:
    """Inductor's kernel for :func:`_fused_rows` at these inputs' shape, strides and dtypes.

    The graph goes straight to inductor's graph compiler (what ``torch.compile`` ends in): the frame-evaluation
    and autograd wrappers ``torch.compile`` puts around a compiled function cost about 100 µs per call on a
    CPU, more than the whole fused reduction of a 100k-element tensor. The kernel asserts the shape and
    strides it was built for (:func:`compile_graph`).
    """
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    meta = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta") for t in (x, p)]
    with torch.no_grad():
        chunk = row_chunk(x.shape[1], x.device)
        graph = make_fx(lambda a, b: (_fused_rows(a, b, chunk),), decomposition_table=select_decomp_table())(*meta)
    for node in graph.graph.nodes:
        node.meta = {}  # traced on meta tensors; inductor propagates the real device's fake values itself
    graph.recompile()
    return compile_graph(graph, [x, p])


def compile_graph(graph: torch.fx.GraphModule, example: list[torch.Tensor]) -> Callable[[list], tuple]:
    """Compile an ATen graph with inductor's graph compiler, specialised to ``example``'s shapes and strides.

    The compilation runs under a tracing context with a fake-tensor mode and a shape environment: without
    one, inductor bypasses its on-disk FX graph cache ("No shape env") and every process pays the whole
    compilation again (only the C++/Triton build is cached then). The first call happens here, so a failure
    surfaces now and not inside a hook later. The kernel empties the input list it is given."""
    from torch._guards import TracingContext, tracing
    from torch._inductor.compile_fx import compile_fx_inner
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    fake = FakeTensorMode(shape_env=ShapeEnv())
    with torch.no_grad():
        with tracing(TracingContext(fake)):
            kernel = compile_fx_inner(graph, [fake.from_tensor(t, static_shapes=True) for t in example])
        kernel(list(example))
    return kernel


def cpu_compiler() -> str | None:
    """The C++ compiler inductor (and the CPU call kernel) builds CPU kernels with: inductor's configured one,
    ``$CXX``, g++, clang++ or c++, the first found on ``PATH``; None when there is none."""
    from torch._inductor import config

    configured = config.cpp.cxx[0] if isinstance(config.cpp.cxx, (tuple, list)) else config.cpp.cxx
    for name in (configured, os.environ.get("CXX"), "g++", "clang++", "c++"):
        found = shutil.which(name) if name else None
        if found:
            return found
    return None


def cpu_compiler_available() -> bool:
    """Whether inductor can build CPU kernels here (it needs a C++ compiler)."""
    return cpu_compiler() is not None


def default_mode() -> str:
    """The mode of a capture that does not choose one: ``DITREDUNDANCY_STATS`` or ``auto``."""
    return os.environ.get(ENV_MODE, "auto") or "auto"
