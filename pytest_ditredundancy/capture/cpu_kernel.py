"""The CPU call kernel: every pair of a transformer call reduced in one OpenMP loop with a single barrier.

Inductor's CPU kernel for a call (:func:`~pytest_ditredundancy.capture.batched_stats.compile_call`) runs one
loop per pair: on one thread it leaves the second core idle for the whole reduction (and a main thread busy
on its own while torch's worker waits cost the pipeline about 2.5 times the busy time on the 2-core
benchmark machine), on two threads it meets one barrier per pair. Here the work is a flat list of chunks of
:data:`CHUNK` elements over all pairs, shared out statically over torch's own OpenMP threads (the same
``libgomp``, so the same worker threads): one parallel loop, one barrier. Each chunk's five sums are
accumulated in float32 over 16 independent lanes, the lanes and chunks are added in float64 in a fixed order,
so the result does not depend on the thread count.

The kernel is a small C++ file compiled once per machine with the C++ compiler inductor uses and kept in
:func:`cache_dir`; inputs must be contiguous float32 or bfloat16 CPU tensors (the pair's dtypes equal).
Anything else, or a build that fails, falls back to inductor's kernel (the reason is kept).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .fused_stats import cpu_compiler

#: Elements per work item: 64 float32 additions per lane, as accurate as torch's own sums (1e-7 relative).
CHUNK = 1024
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
ENV_CACHE = "DITREDUNDANCY_KERNEL_CACHE"
BACKEND = "OpenMP C++ (one loop per call)"

SOURCE = r"""
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {
inline float value(const float* base, int64_t i) { return base[i]; }
inline float value(const uint16_t* base, int64_t i) {
    uint32_t bits = static_cast<uint32_t>(base[i]) << 16;
    float out;
    std::memcpy(&out, &bits, sizeof(out));
    return out;
}

template <typename T>
void chunk_sums(const T* x, const T* p, int64_t n, double* out) {
    constexpr int L = 16;
    float a0[L] = {0}, a1[L] = {0}, a2[L] = {0}, a3[L] = {0}, a4[L] = {0};
    int64_t i = 0;
    for (; i + L <= n; i += L) {
        for (int j = 0; j < L; ++j) {
            float xv = value(x, i + j), pv = value(p, i + j), d = xv - pv;
            a0[j] += std::fabs(d);
            a1[j] += d * d;
            a2[j] += xv * pv;
            a3[j] += std::fabs(xv);
            a4[j] += xv * xv;
        }
    }
    for (int j = 0; i < n; ++i, ++j) {
        float xv = value(x, i), pv = value(p, i), d = xv - pv;
        a0[j] += std::fabs(d);
        a1[j] += d * d;
        a2[j] += xv * pv;
        a3[j] += std::fabs(xv);
        a4[j] += xv * xv;
    }
    double s[5] = {0, 0, 0, 0, 0};
    for (int j = 0; j < L; ++j) {
        s[0] += a0[j]; s[1] += a1[j]; s[2] += a2[j]; s[3] += a3[j]; s[4] += a4[j];
    }
    for (int k = 0; k < 5; ++k) out[k] = s[k];
}
}  // namespace

// items: (pair, offset, length, output column) per chunk; pointers: (x, p) per pair; dtypes: one per pair.
// Writes the (5, columns) float32 statistics: sum|d|, ||d||, <x,p>, sum|x|, ||x||.
extern "C" int ditredundancy_call_stats(const int64_t* items, int64_t n_items, const int64_t* pointers,
                                        const int32_t* dtypes, double* scratch, float* result,
                                        int64_t columns, int threads) {
    if (threads < 1) threads = 1;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t w = 0; w < n_items; ++w) {
        const int64_t* item = items + 4 * w;
        const int64_t pair = item[0], offset = item[1], length = item[2];
        if (dtypes[pair] == 0) {
            const float* x = reinterpret_cast<const float*>(pointers[2 * pair]) + offset;
            const float* p = reinterpret_cast<const float*>(pointers[2 * pair + 1]) + offset;
            chunk_sums(x, p, length, scratch + 5 * w);
        } else {
            const uint16_t* x = reinterpret_cast<const uint16_t*>(pointers[2 * pair]) + offset;
            const uint16_t* p = reinterpret_cast<const uint16_t*>(pointers[2 * pair + 1]) + offset;
            chunk_sums(x, p, length, scratch + 5 * w);
        }
    }
    for (int64_t c = 0; c < columns; ++c) {
        for (int k = 0; k < 5; ++k) result[k * columns + c] = 0.0f;
    }
    int64_t w = 0;
    while (w < n_items) {  // items of one column are adjacent: add them in order, in float64
        const int64_t column = items[4 * w + 3];
        double s[5] = {0, 0, 0, 0, 0};
        for (; w < n_items && items[4 * w + 3] == column; ++w) {
            for (int k = 0; k < 5; ++k) s[k] += scratch[5 * w + k];
        }
        result[0 * columns + column] = static_cast<float>(s[0]);
        result[1 * columns + column] = static_cast<float>(std::sqrt(s[1]));
        result[2 * columns + column] = static_cast<float>(s[2]);
        result[3 * columns + column] = static_cast<float>(s[3]);
        result[4 * columns + column] = static_cast<float>(std::sqrt(s[4]));
    }
    return 0;
}
"""


class KernelUnavailable(RuntimeError):
    """The CPU call kernel could not be built or loaded here (the message says why)."""


def cache_dir() -> Path:
    """Where the compiled kernel is kept: ``$DITREDUNDANCY_KERNEL_CACHE``, else ``~/.cache/pytest-ditredundancy``."""
    configured = os.environ.get(ENV_CACHE)
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pytest-ditredundancy" / "kernels"


def _compiler() -> str:
    found = cpu_compiler()
    if found is None:
        raise KernelUnavailable("no C++ compiler found (set CXX or install g++)")
    return found


def _machine() -> str:
    """What the build depends on beyond the source: compiler and CPU features (the build uses -march=native)."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            flags = next((line for line in info if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{flags}|{torch.__version__}"


_LOCK = threading.Lock()
_LIBRARY: ctypes.CDLL | None = None
_FAILURE: str | None = None


def library() -> ctypes.CDLL:
    """The loaded kernel, built on first use (about a second) and cached on disk; :class:`KernelUnavailable`
    with the reason when it cannot be built or loaded."""
    global _LIBRARY, _FAILURE
    with _LOCK:
        if _LIBRARY is not None:
            return _LIBRARY
        if _FAILURE is not None:
            raise KernelUnavailable(_FAILURE)
        try:
            _LIBRARY = _load()
        except KernelUnavailable as exc:
            _FAILURE = str(exc)
            raise
        return _LIBRARY


def _load() -> ctypes.CDLL:
    compiler = _compiler()
    digest = hashlib.sha256(f"{SOURCE}|{compiler}|{_machine()}".encode()).hexdigest()[:16]
    folder = cache_dir()
    target = folder / f"call_stats_{digest}.so"
    if not target.exists():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            folder = Path(tempfile.gettempdir()) / "pytest-ditredundancy-kernels"
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / target.name
    if not target.exists():
        try:
            _build(compiler, target)
        except (OSError, subprocess.SubprocessError) as exc:
            raise KernelUnavailable(f"could not build the CPU call kernel into {folder}: {exc}; set {ENV_CACHE} "
                                    "to a writable folder") from exc
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as exc:
        raise KernelUnavailable(f"could not load {target}: {exc}") from exc
    function = lib.ditredundancy_call_stats
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                         ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    return lib


def _build(compiler: str, target: Path) -> None:
    """Compile into a temporary file next to ``target`` and rename it: a concurrent build (xdist workers)
    never sees a half-written library."""
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        source = Path(work) / "call_stats.cpp"
        source.write_text(SOURCE, encoding="utf-8")
        built = Path(work) / target.name
        base = [compiler, "-O3", "-fopenmp", "-shared", "-fPIC", "-std=c++17", str(source), "-o", str(built)]
        errors = ""
        for extra in (["-march=native"], []):
            done = subprocess.run(base[:1] + extra + base[1:], capture_output=True, text=True, timeout=300)
            if done.returncode == 0:
                os.replace(built, target)
                return
            errors = done.stderr.strip()
        raise KernelUnavailable(f"{Path(compiler).name} failed to build the CPU call kernel: {errors[-300:]}")


@dataclass(frozen=True)
class CallPlan:
    """The work list of one call signature: chunks of every row of every pair, and each pair's dtype code."""

    items: torch.Tensor  # (n, 4) int64: pair, element offset, length, output column
    dtypes: torch.Tensor  # (pairs,) int32
    columns: int


def takes(flat: list[torch.Tensor], rows: list[int]) -> bool:
    """Whether this kernel reads the pairs of ``flat = [x0, p0, x1, p1, ...]``: contiguous CPU tensors of one
    supported dtype per pair, of equal sizes that split into the pair's rows."""
    for pair, count in enumerate(rows):
        x, p = flat[2 * pair], flat[2 * pair + 1]
        if (x.device.type != "cpu" or p.device.type != "cpu" or x.dtype != p.dtype or x.dtype not in DTYPES
                or x.numel() != p.numel() or not x.is_contiguous() or not p.is_contiguous()
                or x.numel() % count):
            return False
    return True


def plan_call(flat: list[torch.Tensor], rows: list[int]) -> CallPlan | None:
    """The plan for ``flat = [x0, p0, x1, p1, ...]``, or None where this kernel cannot take the pairs
    (:func:`takes`)."""
    if not takes(flat, rows):
        return None
    items: list[tuple[int, int, int, int]] = []
    codes = []
    column = 0
    for pair, count in enumerate(rows):
        x = flat[2 * pair]
        codes.append(DTYPES[x.dtype])
        length = x.numel() // count
        for row in range(count):
            for start in range(0, length, CHUNK):
                items.append((pair, row * length + start, min(CHUNK, length - start), column))
            column += 1
    return CallPlan(torch.tensor(items, dtype=torch.int64).reshape(-1, 4), torch.tensor(codes, dtype=torch.int32),
                    column)


_SCRATCH = threading.local()


def _scratch(size: int) -> torch.Tensor:
    """This thread's float64 buffer for the chunks' sums, grown as needed and kept between calls. A fresh one per
    call (553 KiB for the benchmark model's call) came from newly mapped pages each time: measured alone, the
    call took 3.0 ms instead of 1.8."""
    buffer = getattr(_SCRATCH, "buffer", None)
    if buffer is None or buffer.numel() < size:
        buffer = _SCRATCH.buffer = torch.empty(size, dtype=torch.float64)
    return buffer


def run_call(plan: CallPlan, flat: list[torch.Tensor], threads: int | None = None) -> torch.Tensor:
    """The ``(5, columns)`` float32 statistics of every pair of ``flat`` (checked against ``plan`` by the
    caller's signature key), on ``threads`` threads (default: torch's)."""
    function = library().ditredundancy_call_stats
    pointers = torch.tensor([t.data_ptr() for t in flat], dtype=torch.int64)
    scratch = _scratch(plan.items.shape[0] * 5)
    result = torch.empty(5, plan.columns, dtype=torch.float32)
    function(plan.items.data_ptr(), plan.items.shape[0], pointers.data_ptr(), plan.dtypes.data_ptr(),
             scratch.data_ptr(), result.data_ptr(), plan.columns, threads or torch.get_num_threads())
    return result


def pair_kernel(flat: list[torch.Tensor], rows: list[int]) -> Callable[[list[torch.Tensor]], torch.Tensor] | None:
    """A kernel for inputs with ``flat``'s shapes, dtypes and ``rows`` (None: this kernel cannot take them);
    :class:`KernelUnavailable` when it cannot be built here."""
    plan = plan_call(flat, rows)
    if plan is None:
        return None
    library()
    kernel = functools.partial(run_call, plan)
    kernel.backend = BACKEND
    return kernel
