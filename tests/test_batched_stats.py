"""One reduction per transformer call (memory mode ``fast``): the same numbers as the per-tensor path, one
kernel per call, at most one call's tensors held on top of one step's, and ``auto`` choosing by size and memory.

Each distinct call signature compiles one inductor kernel, so these tests use the tiny PixArt and a few fixed
shapes. The CUDA twins of these checks are in ``tests/test_cuda_batched.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from brute_force import activations, exact_stats
from pytest_ditredundancy import capture_redundancy
from pytest_ditredundancy.capture import batched_stats, cpu_kernel, fused_stats
from pytest_ditredundancy.capture.batched_stats import CPU_MIN_CALL_ELEMENTS, MemoryChoice, choose_memory, compile_call
from pytest_ditredundancy.capture.fused_stats import compile_fused
from pytest_ditredundancy.capture.metrics import step_stats
from pytest_ditredundancy.capture.sites import CaptureSite

needs_compiler = pytest.mark.skipif(not fused_stats.cpu_compiler_available(), reason="no C++ compiler for inductor")
CALL = dict(prompt=["a red bus", "a cat"], num_inference_steps=5, height=32, width=32, output_type="latent",
            use_resolution_binning=False, clean_caption=False)


@needs_compiler
def test_one_call_kernel_equals_the_per_tensor_kernels_bit_for_bit():
    # mixed shapes, rows, dtypes and a non-contiguous view (a K slice of a fused projection)
    fused = activations((2, 40, 96), 9)
    xs = [activations((1, 64, 48), 1), activations((2, 30, 32), 2, torch.bfloat16), activations((3, 20, 16), 3),
          fused[..., 32:64]]
    rows = [1, 2, 3, 2]
    ps = [(x.float() + 1e-2 * activations(x.shape, 10 + i)).to(x.dtype) for i, x in enumerate(xs)]
    ps[3] = (fused + 1e-2 * activations(fused.shape, 20))[..., 32:64]
    flat = [t for pair in zip(xs, ps) for t in pair]
    kernel = compile_call(flat, rows)
    together = kernel(list(flat))[0]
    assert together.shape == (5, sum(rows)) and together.dtype == torch.float32
    parts = together.split(rows, dim=1)
    for x, p, r, part in zip(xs, ps, rows, parts):
        x2, p2 = x.reshape(r, -1), p.reshape(r, -1)
        alone = compile_fused(x2, p2)([x2, p2])[0]
        assert torch.equal(part, alone)
        np.testing.assert_allclose(part.double().numpy(), exact_stats(x, p, r).numpy(), rtol=1e-6)


def run(pipe, **capture_options):
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    with capture_redundancy(pipe, **capture_options) as cap:
        out = pipe(**CALL, generator=generators)[0]
    return out, cap.profile(), cap


@needs_compiler
def test_fast_memory_equals_the_per_tensor_path_with_one_kernel_per_call(tiny_pipeline_cache):
    pipe = tiny_pipeline_cache("tiny-pixart-alpha")
    plain = pipe(**CALL, generator=[torch.Generator().manual_seed(i) for i in range(2)])[0]
    out_fast, fast, cap = run(pipe, memory="fast", stats="fused")
    out_low, low, _ = run(pipe, memory="low", stats="fused")
    _, eager, _ = run(pipe, memory="low", stats="eager")
    assert torch.equal(plain, out_fast) and torch.equal(plain, out_low)
    summary = fast.metadata.extra["step_stats"]
    series = sum(len(r.series) for r in cap.runs)
    # one launch per transformer call (the first one's tensors paired with themselves), covering every series;
    # a first step is not counted as a fused reduction, as on the per-tensor path
    assert summary["call_kernels"] == 5 and summary["fused_calls"] == 4 * series
    assert summary["memory_chosen"] == "fast" and low.metadata.extra["step_stats"]["call_kernels"] == 0
    # on CPU the call kernel is the OpenMP one (cpu_kernel): same sums, other summation order
    assert summary["call_kernel"] == cpu_kernel.BACKEND and low.metadata.extra["step_stats"]["call_kernel"] is None
    for metric in fast.values:
        np.testing.assert_allclose(fast.values[metric], low.values[metric], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(fast.values[metric], eager.values[metric], rtol=5e-6, atol=1e-9)


@needs_compiler
def test_raw_sums_of_the_fast_path_are_within_1e6_of_the_eager_path(tiny_pipeline_cache):
    pipe = tiny_pipeline_cache("tiny-pixart-alpha")
    captured = {}
    for memory, stats in (("fast", "fused"), ("low", "eager")):
        _, _, cap = run(pipe, memory=memory, stats=stats)
        captured[memory] = torch.cat([torch.stack(s.stats).flatten() for r in cap.runs for s in r.series.values()])
    fast, eager = captured["fast"].double(), captured["low"].double()
    large = eager.abs() > 1e-3 * eager.abs().max()  # the dot field of unrelated first steps is ~0 and absolute
    assert ((fast - eager).abs()[large] / eager.abs()[large]).max() <= 1e-6


def held_during_call(cap) -> list[int]:
    """Bytes the capture keeps alive at each transformer call's end, before its batch is reduced."""
    peaks: list[int] = []
    reduce = cap._reduce_pending

    def measuring():
        found: dict[int, torch.Tensor] = {}
        batched_stats_reachable(cap, found)
        peaks.append(sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in found.values()}
                         .values()))
        reduce()

    cap._reduce_pending = measuring
    return peaks


def batched_stats_reachable(cap, found: dict) -> None:
    for run_ in cap.runs:
        for series in run_.series.values():
            if series.previous is not None:
                found[id(series.previous)] = series.previous
    for item in cap.batch.pending:
        for tensor in (item.current, item.previous):
            if tensor is not None:
                found[id(tensor)] = tensor


@needs_compiler
@pytest.mark.parametrize("memory, bound", [("fast", 2.0), ("low", 1.0)])
def test_memory_held_is_at_most_one_step_plus_one_call(tiny_pipeline_cache, memory, bound):
    pipe = tiny_pipeline_cache("tiny-pixart-alpha")
    cap = capture_redundancy(pipe, memory=memory, stats="fused")
    peaks = held_during_call(cap)
    with cap:
        pipe(**CALL, generator=[torch.Generator().manual_seed(i) for i in range(2)])
    one_step = sum(s.previous.numel() * s.previous.element_size() for r in cap.runs for s in r.series.values())
    assert cap.held_bytes()["kept"] == one_step  # between calls: one step's tensors, as before
    if memory == "fast":
        assert max(peaks) == pytest.approx(2 * one_step, rel=0.01)
    else:
        assert not peaks or max(peaks) <= one_step  # nothing waits for the call's end (the first call aside)


@pytest.mark.skipif(not fused_stats.cpu_compiler_available(), reason="no C++ compiler for the CPU call kernel")
def test_auto_batches_small_cpu_calls_with_the_cpu_kernel(tiny_pipeline_cache, monkeypatch):
    # the CPU call kernel compiles nothing per shape: a call of any size is batched
    pipe = tiny_pipeline_cache("tiny-pixart-alpha")
    monkeypatch.setattr(batched_stats, "_CALL_KERNELS", {})
    _, profile, cap = run(pipe, memory="auto", stats="auto")
    assert cap.memory.chosen == "fast" and "the CPU call kernel" in cap.memory.reason
    assert profile.metadata.extra["step_stats"]["call_kernels"] == 5
    assert cap.batch.backends == {cpu_kernel.BACKEND}
    assert profile.metadata.extra["step_stats"]["kernel"] == cpu_kernel.BACKEND  # what ran, not inductor


def test_auto_batches_with_inductor_only_from_a_call_size_on_cpu(tiny_pipeline_cache, monkeypatch):
    pipe = tiny_pipeline_cache("tiny-pixart-alpha")
    monkeypatch.setattr(fused_stats, "cpu_compiler_available", lambda: True)

    def unavailable():
        raise cpu_kernel.KernelUnavailable("no C++ compiler found (set CXX or install g++)")

    monkeypatch.setattr(cpu_kernel, "library", unavailable)  # inductor's kernel compiles per shape: too small
    _, profile, cap = run(pipe, memory="auto", stats="auto")
    assert cap.memory.chosen == "low" and "below" in cap.memory.reason and "cannot take" in cap.memory.reason
    assert cap.batch.cpu_kernel_note == "no C++ compiler found (set CXX or install g++)"
    assert profile.metadata.extra["step_stats"]["call_kernels"] == 0
    monkeypatch.setattr(batched_stats, "CPU_MIN_CALL_ELEMENTS", 0)
    monkeypatch.setattr(batched_stats, "compile_call", lambda flat, rows: lambda inputs: (torch.cat(
        [step_stats(inputs[2 * i], inputs[2 * i + 1], r) for i, r in enumerate(rows)], 1),))
    monkeypatch.setattr(batched_stats, "_CALL_KERNELS", {})
    _, profile, cap = run(pipe, memory="auto", stats="auto")
    assert cap.memory.chosen == "fast" and profile.metadata.extra["step_stats"]["call_kernels"] == 5


def test_choose_memory_on_cuda_counts_the_peak_and_one_more_call(monkeypatch):
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (40 * gib, 141 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 60 * gib)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 70 * gib)
    cuda = torch.device("cuda", 0)
    assert choose_memory(10 * gib, 0, cuda, fused=True)[0] == "fast"  # 80 <= 0.9 * 100
    chosen, reason = choose_memory(25 * gib, 0, cuda, fused=True)  # 95 > 90
    assert chosen == "low" and "over 90%" in reason
    assert choose_memory(1, 0, cuda, fused=False)[0] == "low"


def test_choose_memory_on_cpu_needs_size_and_ram(monkeypatch):
    cpu = torch.device("cpu")
    assert choose_memory(4 * CPU_MIN_CALL_ELEMENTS, CPU_MIN_CALL_ELEMENTS, cpu, fused=True)[0] == "fast"
    assert choose_memory(4, 1, cpu, fused=True)[0] == "low"
    assert choose_memory(4, 1, cpu, fused=True, size_rule=False)[0] == "fast"  # stats="fused": the user's call
    assert choose_memory(4, 1, cpu, fused=True, no_compile=True)[0] == "fast"  # the CPU call kernel takes it
    monkeypatch.setattr(batched_stats, "_available_ram", lambda: 1000)
    assert choose_memory(400, CPU_MIN_CALL_ELEMENTS, cpu, fused=True)[0] == "low"


def test_fast_without_a_fused_kernel_falls_back_to_low_and_says_why(tiny_pipeline_cache):
    pipe = tiny_pipeline_cache("tiny-pixart-alpha")
    _, profile, cap = run(pipe, memory="fast", stats="eager")
    assert cap.memory.chosen == "low" and "fused kernel is off" in cap.memory.reason
    assert profile.metadata.extra["step_stats"]["call_kernels"] == 0


def test_a_failing_call_compilation_falls_back_per_tensor(tiny_pipeline_cache, monkeypatch):
    pipe = tiny_pipeline_cache("tiny-pixart-alpha")
    monkeypatch.setattr(fused_stats, "cpu_compiler_available", lambda: True)
    monkeypatch.setattr(batched_stats, "_CALL_KERNELS", {})

    def broken(flat, rows):
        raise RuntimeError("C++ compile error: out of memory")

    def no_cpu_kernel(flat, rows):
        raise cpu_kernel.KernelUnavailable("no C++ compiler found")

    monkeypatch.setattr(cpu_kernel, "pair_kernel", no_cpu_kernel)
    monkeypatch.setattr(batched_stats, "compile_call", broken)
    monkeypatch.setattr(fused_stats, "_KERNELS", {})
    monkeypatch.setattr(fused_stats, "compile_fused", lambda x, p: lambda inputs: (step_stats(*inputs, x.shape[0]),))
    _, profile, _ = run(pipe, memory="fast", stats="fused")
    _, eager, _ = run(pipe, memory="low", stats="eager")
    summary = profile.metadata.extra["step_stats"]
    assert summary["fallback"] == "RuntimeError: C++ compile error: out of memory" and summary["call_kernels"] == 0
    for metric in profile.values:
        np.testing.assert_array_equal(profile.values[metric], eager.values[metric])


class Mutating(nn.Module):
    """A transformer whose captured projection output is scaled in place later in the same call at step 2."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.step = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.proj(x)
        if self.step == 2:
            out.mul_(3.0)  # after the site hook: the value the hook saw is gone by the call's end
        return out


@needs_compiler
def test_a_tensor_mutated_during_its_call_is_not_measured_and_later_steps_are_right():
    torch.manual_seed(0)
    inputs = [torch.randn(1, 4, 8) for _ in range(6)]

    def profile(memory: str):
        model = Mutating()
        torch.manual_seed(1)
        model.proj.reset_parameters()
        site = CaptureSite("proj", "a", model.proj)
        with torch.no_grad(), pytest.warns(RuntimeWarning, match="modified in place"), \
                capture_redundancy(model, sites=[site], branch_layout="single", memory=memory, stats="fused") as cap:
            for step, x in enumerate(inputs):
                model.step = step
                model(x)
                cap.end_step(step)
        return cap.profile(model="mutating")

    fast, low = profile("fast"), profile("low")
    # the pairs that involve step 2's lost value are not measured; from step 3 on the series keeps copies
    assert not fast.computed[..., 1].any() and not fast.computed[..., 2].any()
    assert fast.computed[..., 3:].all() and low.computed[..., 3:].all()
    for metric in fast.values:
        np.testing.assert_array_equal(fast.values[metric][..., 3:], low.values[metric][..., 3:])
        np.testing.assert_array_equal(fast.values[metric][..., 0], low.values[metric][..., 0])


def test_unknown_memory_mode_names_the_choices(monkeypatch):
    with pytest.raises(ValueError, match="auto, fast, low"):
        MemoryChoice("small")
    monkeypatch.setenv(batched_stats.ENV_MEMORY, "tiny")
    with pytest.raises(ValueError, match="DITREDUNDANCY_CAPTURE_MEMORY"):
        capture_redundancy(torch.nn.Linear(2, 2), sites=[])
