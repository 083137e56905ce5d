"""One reduction per transformer call: every captured tensor of the call against its previous step, at once.

The per-tensor path (:class:`~pytest_ditredundancy.capture.fused_stats.StepStatistics` in each site hook) issues
one reduction per captured tensor: on a GPU at one prompt that is 85 µs of CPU per reduction against ~12 µs of
GPU work, and on a CPU one kernel call's fixed cost per tensor. Here the site hooks only take note of each
``(current, previous)`` pair; when the transformer call returns, :class:`CallBatch` reduces all of them with
one compiled multi-tensor kernel (inductor: a C++ function with one loop per pair on CPU, Triton kernels
issued from one generated wrapper on CUDA), producing the same five sums per row
(:func:`~pytest_ditredundancy.capture.fused_stats._fused_rows`, float32 accumulation) without any host sync.

The price is memory: a pair's previous-step tensor stays alive until the call ends instead of being dropped
when its successor arrives, so the capture may hold up to one step's captured tensors plus one call's
(twice one step's for a one-call-per-step model). :data:`MEMORY_MODES`: ``fast`` allows that, ``low`` keeps
the per-tensor path (one step's tensors), ``auto`` decides at the end of the capture's first transformer call,
from the bytes that call captured and the device's free memory (:func:`choose_memory`).

The graph of a call is stitched from one traced graph per distinct pair signature (shape, strides, dtypes,
rows), so building it costs milliseconds, and it is compiled under a fake-tensor tracing context so that
inductor's on-disk FX graph cache serves later processes.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import cpu_kernel
from .fused_stats import INDUCTOR, _fused_rows, compile_graph, row_chunk

MEMORY_MODES = ("auto", "fast", "low")
ENV_MEMORY = "DITREDUNDANCY_CAPTURE_MEMORY"
#: ``auto`` on CUDA: one more call's captured tensors must fit below this share of what torch can use
#: (the allocator's reserve plus the driver's free memory), counted from the peak allocated so far.
CUDA_SHARE = 0.9
#: ``auto`` on CPU: one call's captured tensors must be at most this share of the available RAM.
CPU_SHARE = 0.25
#: ``auto`` on CPU, where the CPU call kernel (:mod:`~pytest_ditredundancy.capture.cpu_kernel`, no per-shape
#: compilation) cannot take the call, batches it with inductor's kernel only from this many captured elements
#: per call: compiling that costs 2 to 20 s once (a second process reads inductor's disk cache), recovered
#: within a 20-step profile only from a few million elements. The benchmark model has 5.8 M.
CPU_MIN_CALL_ELEMENTS = 1 << 21
#: Threads of the CPU call kernel. One: an OpenMP loop per tensor meets a barrier per tensor, and on a shared
#: machine a thread that loses its core stalls every one of them (p90 of a call 25.6 ms against 9.1 ms on one
#: thread, 2 cores at load 6); one thread also leaves no second OpenMP pool spinning beside torch's own.
CPU_KERNEL_THREADS = 1
#: Most compiled call kernels one process keeps; beyond, the per-tensor path.
MAX_CALL_KERNELS = 32


def default_memory() -> str:
    """The memory mode of a capture that does not choose one: ``DITREDUNDANCY_CAPTURE_MEMORY`` or ``auto``."""
    return os.environ.get(ENV_MEMORY, "auto") or "auto"


def check_memory_mode(mode: str) -> str:
    if mode not in MEMORY_MODES:
        raise ValueError(f"unknown capture memory mode {mode!r}; choose from {', '.join(MEMORY_MODES)} (set with "
                         f"capture_redundancy(..., memory=...), --dit-capture-memory or {ENV_MEMORY})")
    return mode


@dataclass(slots=True)
class Pending:
    """A recorded tensor waiting for its call's end: where its statistics go, and what they are of."""

    series: Any  # the capture's series; its ``stats[slot]`` receives the (5, rows) result
    slot: int
    current: torch.Tensor
    previous: torch.Tensor | None
    rows: int
    version: int | None  # the current tensor's version counter when recorded (None: a private copy)


@dataclass
class MemoryChoice:
    """The memory mode asked for, what it resolved to and why (``auto`` resolves at the first call's end)."""

    mode: str
    chosen: str | None = None
    reason: str = ""

    def __post_init__(self) -> None:
        check_memory_mode(self.mode)
        if self.mode == "low":
            self.chosen, self.reason = "low", "asked for"

    def decide(self, call_bytes: int, call_elements: int, device: torch.device, fused: bool, size_rule: bool,
               no_compile: bool = False) -> None:
        """Resolve ``auto`` (and check ``fast``) at the end of the first call that recorded anything."""
        if self.mode == "fast":
            self.chosen, self.reason = ("fast", "asked for") if fused else (
                "low", "asked for fast, but the fused kernel is off or unavailable here, so nothing is batched")
        else:
            self.chosen, self.reason = choose_memory(call_bytes, call_elements, device, fused, size_rule, no_compile)


def choose_memory(call_bytes: int, call_elements: int, device: torch.device, fused: bool,
                  size_rule: bool = True, no_compile: bool = False) -> tuple[str, str]:
    """``auto``: ``fast`` where the fused kernel runs on this device and one more call's captured tensors fit;
    on CPU (``size_rule``: the statistics mode is ``auto`` too) only for calls large enough to pay for the
    compilation, unless the call's kernel needs none (``no_compile``: the CPU call kernel takes the call)."""
    if not fused:
        return "low", "the fused kernel is off or unavailable here, so nothing is batched"
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        usable = free + torch.cuda.memory_reserved(device)
        need = torch.cuda.max_memory_allocated(device) + call_bytes
        if need <= CUDA_SHARE * usable:
            return "fast", f"peak {need / 2**30:.2f} GiB with one more call held <= {CUDA_SHARE:.0%} of " \
                           f"{usable / 2**30:.2f} GiB usable"
        return "low", f"one more call's tensors ({call_bytes / 2**30:.2f} GiB) would bring the peak to " \
                      f"{need / 2**30:.2f} GiB, over {CUDA_SHARE:.0%} of {usable / 2**30:.2f} GiB usable"
    if device.type == "cpu":
        if size_rule and not no_compile and call_elements < CPU_MIN_CALL_ELEMENTS:
            return "low", f"{call_elements} elements per call: below {CPU_MIN_CALL_ELEMENTS}, compiling " \
                          "inductor's call kernel would not pay off (the CPU call kernel cannot take this call)"
        available = _available_ram()
        if available is not None and call_bytes > CPU_SHARE * available:
            return "low", f"one call's tensors ({call_bytes / 2**20:.0f} MiB) exceed {CPU_SHARE:.0%} of the " \
                          f"available RAM ({available / 2**20:.0f} MiB)"
        kernel = "the CPU call kernel" if no_compile else "inductor's call kernel"
        return "fast", f"{call_elements} elements per call, {call_bytes / 2**20:.1f} MiB, {kernel}"
    return "low", f"no batched kernel for {device.type}"


def _available_ram() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


@dataclass
class CallBatch:
    """The pairs of the running transformer call, and their reduction when it ends."""

    statistics: Any  # the capture's StepStatistics: per-tensor fallback, counts, fallback reason
    pending: list[Pending] = field(default_factory=list)
    launches: int = 0  # multi-tensor kernel calls
    compile_seconds: float = 0.0
    backends: set[str] = field(default_factory=set)  # which call kernels ran
    cpu_kernel_note: str | None = None  # why inductor ran instead of the CPU call kernel

    def add(self, item: Pending) -> None:
        self.pending.append(item)

    def kernel_names(self) -> str | None:
        """The call kernels that ran, as named in ``step_stats["call_kernel"]`` (None: none ran)."""
        return ", ".join(sorted(self.backends)) or None

    def cpu_kernel_takes(self) -> bool:
        """Whether the CPU call kernel can reduce the pending pairs (CPU tensors it reads, and a kernel that
        builds here): such a call needs no compilation of its own. Why not is kept in :attr:`cpu_kernel_note`."""
        flat = _kernel_inputs(self.pending)
        if not flat or not cpu_kernel.takes(flat, [item.rows for item in self.pending]):
            return False
        try:
            cpu_kernel.library()
        except cpu_kernel.KernelUnavailable as exc:
            self.cpu_kernel_note = str(exc)
            return False
        return True

    def nbytes(self) -> tuple[int, int]:
        """(bytes, elements) of the pending current tensors: what one call captures."""
        elements = sum(p.current.numel() for p in self.pending)
        return sum(p.current.numel() * p.current.element_size() for p in self.pending), elements

    def flush(self, batched: bool, on_mutated: Callable[[Pending], None]) -> None:
        """Reduce every pending pair into its slot: with the call's kernel where ``batched``, else one by one.

        A series' first step (no previous tensor) goes into the call's kernel too, paired with itself, its dot
        product then zeroed: the same numbers as :func:`~pytest_ditredundancy.capture.metrics.step_stats` with no
        previous step, without one eager reduction per tensor in the first call. A current tensor the model
        changed in place after its hook (its version moved) has lost the value it had: ``on_mutated`` marks
        that step, and it is reduced as a first step (no pair)."""
        pending, self.pending = self.pending, []
        by_device: dict[torch.device, list[Pending]] = {}  # a model split over devices: one kernel per device
        for item in pending:
            if item.version is not None and item.current._version != item.version:
                on_mutated(item)
                item.previous = None
            by_device.setdefault(item.current.device, []).append(item)
        for group in by_device.values():
            if batched and len(group) > 1 and self._batched(group):
                continue
            for item in group:
                item.series.stats[item.slot] = self.statistics(item.current, item.previous, item.rows)

    def _batched(self, pairs: list[Pending]) -> bool:
        stats = self.statistics
        if stats.fallback_reason is not None:
            return False
        flat = _kernel_inputs(pairs)
        device = flat[0].device
        rows = [item.rows for item in pairs]
        key = (device, tuple((t.shape, t.stride(), t.dtype) for t in flat), tuple(rows))
        try:
            kernel = _CALL_KERNELS.get(key)
            if kernel is None:
                if len(_CALL_KERNELS) >= MAX_CALL_KERNELS:
                    return False
                started = time.perf_counter()
                kernel = _CALL_KERNELS[key] = self._build(flat, rows)
                self.compile_seconds += time.perf_counter() - started
            result = kernel(flat)
        except Exception as exc:  # an inductor or compiler failure: per tensor from now on, reason kept
            text = str(exc).strip().splitlines()
            stats.fallback_reason = f"{type(exc).__name__}: {text[0][:200] if text else ''}".rstrip(": ")
            return False
        first_steps = 0
        for item, part in zip(pairs, result.split(rows, dim=1)):
            if item.previous is None:  # paired with itself: differences are zero, the dot product is not
                part[2].zero_()
                first_steps += 1
            item.series.stats[item.slot] = part
        stats.calls["fused"] += len(pairs) - first_steps  # first steps are not counted, as per tensor
        backend = getattr(kernel, "backend", INDUCTOR.get(device.type, device.type))
        stats.kernels.add(backend)
        self.launches += 1
        self.backends.add(backend)
        return True

    def _build(self, flat: list[torch.Tensor], rows: list[int]) -> Callable[[list], torch.Tensor]:
        """The call's kernel: the CPU call kernel (:mod:`~pytest_ditredundancy.capture.cpu_kernel`) where it
        takes the pairs, else inductor's; why the CPU kernel was not used is kept in :attr:`cpu_kernel_note`."""
        if flat[0].device.type == "cpu":
            try:
                kernel = cpu_kernel.pair_kernel(flat, rows)
            except cpu_kernel.KernelUnavailable as exc:
                kernel, self.cpu_kernel_note = None, str(exc)
            if kernel is not None:
                return kernel
            self.cpu_kernel_note = self.cpu_kernel_note or "inputs it does not take (fp16, mixed dtypes or strided)"
        inductor = compile_call([t.detach() for t in flat], rows)
        return lambda inputs: inductor([t.detach() for t in inputs])[0]  # the kernel empties the list it gets


def _kernel_inputs(pairs: list[Pending]) -> list[torch.Tensor]:
    """``[x0, p0, x1, p1, ...]`` of a call's kernel: a series' first step (no previous tensor) is paired with
    itself (see :meth:`CallBatch.flush`)."""
    return [t for item in pairs for t in (item.current, item.current if item.previous is None else item.previous)]


#: Compiled call kernels of this process, by (device, every input's shape/strides/dtype, rows per pair).
_CALL_KERNELS: dict[tuple, Callable[[list], tuple]] = {}
#: Traced one-pair graphs by signature: the pieces call graphs are stitched from.
_PAIR_GRAPHS: dict[tuple, torch.fx.GraphModule] = {}


def _pair_graph(x: torch.Tensor, p: torch.Tensor, rows: int) -> torch.fx.GraphModule:
    """The decomposed ATen graph of one pair's five row sums, traced once per signature on meta tensors."""
    key = (x.device.type, tuple(x.shape), x.stride(), x.dtype, tuple(p.shape), p.stride(), p.dtype, rows)
    graph = _PAIR_GRAPHS.get(key)
    if graph is None:
        from torch._inductor.decomposition import select_decomp_table
        from torch.fx.experimental.proxy_tensor import make_fx

        meta = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta") for t in (x, p)]
        chunk = row_chunk(x.numel() // rows, x.device)
        with torch.no_grad():
            graph = make_fx(lambda a, b: (_fused_rows(a.reshape(rows, -1), b.reshape(rows, -1), chunk),),
                            decomposition_table=select_decomp_table())(*meta)
        graph = _PAIR_GRAPHS[key] = graph
    return graph


def call_graph(flat: list[torch.Tensor], rows: list[int]) -> torch.fx.GraphModule:
    """One graph over ``flat = [x0, p0, x1, p1, ...]`` returning the ``(5, sum(rows))`` statistics of every
    pair, side by side in pair order."""
    graph = torch.fx.Graph()
    inputs = [graph.placeholder(f"arg{i}") for i in range(len(flat))]
    outputs = []
    for i, count in enumerate(rows):
        piece = _pair_graph(flat[2 * i], flat[2 * i + 1], count).graph
        holders = [node for node in piece.nodes if node.op == "placeholder"]
        result = graph.graph_copy(piece, {holders[0]: inputs[2 * i], holders[1]: inputs[2 * i + 1]})
        outputs.append(result[0])
    graph.output((graph.call_function(torch.ops.aten.cat.default, (outputs, 1)),))
    for node in graph.nodes:
        node.meta = {}  # traced on meta tensors; inductor propagates the real device's fake values itself
    return torch.fx.GraphModule(torch.nn.Module(), graph)


def compile_call(flat: list[torch.Tensor], rows: list[int]) -> Callable[[list], tuple]:
    """Inductor's kernel for :func:`call_graph` at these inputs (see :func:`fused_stats.compile_graph`); on CPU
    with :data:`CPU_KERNEL_THREADS` threads."""
    from torch._inductor import config

    threads = CPU_KERNEL_THREADS if flat[0].device.type == "cpu" else config.cpp.threads
    with config.patch({"cpp.threads": threads}):
        return compile_graph(call_graph(flat, rows), flat)
