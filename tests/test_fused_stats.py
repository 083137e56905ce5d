"""The fused step statistics: equal to the eager path within float32 rounding, chosen and reported honestly.

Each distinct shape compiles one inductor kernel (about a second with a warm cache), so these tests use a few
fixed shapes rather than hypothesis-drawn sizes; ``tests/test_metrics.py`` covers the eager path's
properties over arbitrary vectors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pytest_ditredundancy import capture_redundancy
from pytest_ditredundancy.capture import fused_stats
from pytest_ditredundancy.capture.fused_stats import CPU_MIN_ELEMENTS, StepStatistics
from pytest_ditredundancy.capture.metrics import metrics_from_stats, step_stats

needs_compiler = pytest.mark.skipif(not fused_stats.cpu_compiler_available(), reason="no C++ compiler for inductor")


def activations(shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Values like real activations: zeros and magnitudes 1e-6..1e3, both signs."""
    generator = torch.Generator().manual_seed(seed)
    magnitude = 10 ** (torch.rand(shape, generator=generator) * 9 - 6)
    sign = torch.where(torch.rand(shape, generator=generator) < 0.5, -1.0, 1.0)
    values = sign * magnitude * (torch.rand(shape, generator=generator) > 0.05)
    return values.to(dtype)


def reference(x: torch.Tensor, p: torch.Tensor, rows: int) -> torch.Tensor:
    x, p = x.double().reshape(rows, -1), p.double().reshape(rows, -1)
    d = x - p
    return torch.stack((d.abs().sum(1), d.norm(dim=1), (x * p).sum(1), x.abs().sum(1), x.norm(dim=1)))


@needs_compiler
@pytest.mark.parametrize("shape, rows, dtype", [((2, 96, 40), 2, torch.float32), ((1, 300, 384), 1, torch.float32),
                                                ((3, 50, 64), 3, torch.bfloat16)])
def test_fused_equals_eager_within_float32_rounding(shape, rows, dtype):
    x = activations(shape, 1, dtype)
    p = (x.float() + activations(shape, 2) * 1e-2).to(dtype)
    stats = StepStatistics("fused")
    fused, eager, exact = stats(x, p, rows), step_stats(x, p, rows), reference(x, p, rows)
    assert stats.calls == {"fused": 1, "eager": 0} and stats.fallback_reason is None
    assert fused.dtype == torch.float32 and fused.shape == (5, rows)
    # float32 accumulation: both paths are within n * eps of the exact sums (eps of the magnitudes summed)
    numel = x[0].numel()
    bound = 4 * numel * torch.finfo(torch.float32).eps * reference(x.abs(), p.abs() * 0, rows).abs()[[3, 4, 3, 3, 4]]
    for got in (fused, eager):
        assert ((got.double() - exact).abs() <= bound + 1e-30).all(), (got, exact)
    assert torch.allclose(fused, eager, rtol=1e-5, atol=0)


@needs_compiler
def test_fused_metrics_match_eager_metrics():
    x0, x1 = activations((2, 64, 48), 3), activations((2, 64, 48), 4)
    x1 = x0 + 1e-3 * x1  # small step: the cosine distance needs the difference norm
    stats = StepStatistics("fused")
    fused = torch.stack([stats(x0, None, 2), stats(x1, x0, 2)]).permute(2, 0, 1).numpy()
    eager = torch.stack([step_stats(x0, None, 2), step_stats(x1, x0, 2)]).permute(2, 0, 1).numpy()
    a, b = metrics_from_stats(fused, x0[0].numel()), metrics_from_stats(eager, x0[0].numel())
    for metric in a:
        np.testing.assert_allclose(a[metric], b[metric], rtol=2e-5, atol=1e-9)


@needs_compiler
def test_captured_pipeline_fused_equals_eager_and_output_is_untouched(tiny_pipeline_cache):
    pipe = tiny_pipeline_cache("tiny-pixart-alpha")
    call = dict(prompt=["a red bus", "a cat"], num_inference_steps=4, height=32, width=32, output_type="latent",
                use_resolution_binning=False, clean_caption=False)

    def run(stats: str | None):
        generators = [torch.Generator().manual_seed(i) for i in range(2)]
        if stats is None:
            return pipe(**call, generator=generators)[0], None
        with capture_redundancy(pipe, stats=stats, memory="low") as cap:  # the per-tensor kernels
            out = pipe(**call, generator=generators)[0]
        return out, cap.profile()

    plain, _ = run(None)
    fused_out, fused = run("fused")
    eager_out, eager = run("eager")
    assert torch.equal(plain, fused_out) and torch.equal(plain, eager_out)
    assert fused.metadata.extra["step_stats"]["path"] == "fused"
    assert fused.metadata.extra["step_stats"]["kernel"] == "inductor C++"
    assert eager.metadata.extra["step_stats"]["path"] == "eager"
    for metric in ("abs_l1", "rel_l1", "cosine"):
        np.testing.assert_allclose(fused.values[metric], eager.values[metric], rtol=2e-5, atol=1e-7)


def test_auto_mode_keeps_small_cpu_tensors_eager(monkeypatch):
    monkeypatch.setattr(fused_stats, "compile_fused", lambda x, p: pytest.fail("compiled a small tensor"))
    stats = StepStatistics("auto")
    x = torch.ones(2, CPU_MIN_ELEMENTS // 2 - 1)
    stats(x, x, 2)
    assert stats.summary()["path"] == "eager"


def test_auto_mode_fuses_large_cpu_tensors(monkeypatch):
    monkeypatch.setattr(fused_stats, "cpu_compiler_available", lambda: True)
    monkeypatch.setattr(fused_stats, "_KERNELS", {})
    monkeypatch.setattr(fused_stats, "compile_fused", lambda x, p: lambda inputs: (step_stats(*inputs, 1),))
    stats = StepStatistics("auto")
    x = torch.ones(1, CPU_MIN_ELEMENTS)
    stats(x, x, 1)
    assert stats.calls == {"fused": 1, "eager": 0}


def test_the_compiler_lookup_runs_once_per_capture_not_once_per_tensor(monkeypatch):
    """The lookup walks PATH (about 130 µs); per call it cost more than the fused reduction it guarded."""
    lookups = []
    monkeypatch.setattr(fused_stats, "cpu_compiler_available", lambda: lookups.append(1) or True)
    monkeypatch.setattr(fused_stats, "_KERNELS", {})
    monkeypatch.setattr(fused_stats, "compile_fused", lambda x, p: lambda inputs: (step_stats(*inputs, 1),))
    stats = StepStatistics("fused")
    x = torch.ones(1, 64)
    for _ in range(5):
        stats(x, x, 1)
    assert stats.calls == {"fused": 5, "eager": 0} and len(lookups) == 1


def test_a_failing_compilation_falls_back_to_eager_and_says_why(monkeypatch):
    def broken(x, p):
        raise RuntimeError("C++ compile error: cannot find cpp_prefix.h")

    monkeypatch.setattr(fused_stats, "cpu_compiler_available", lambda: True)
    monkeypatch.setattr(fused_stats, "_KERNELS", {})
    monkeypatch.setattr(fused_stats, "compile_fused", broken)
    stats = StepStatistics("fused")
    x, p = torch.randn(2, 10), torch.randn(2, 10)
    assert torch.equal(stats(x, p, 2), step_stats(x, p, 2))
    assert torch.equal(stats(x, p, 2), step_stats(x, p, 2))
    summary = stats.summary()
    assert summary["path"] == "eager" and summary["eager_calls"] == 2
    assert summary["fallback"] == "RuntimeError: C++ compile error: cannot find cpp_prefix.h"


def test_no_compiler_means_eager(monkeypatch):
    monkeypatch.setattr(fused_stats, "cpu_compiler_available", lambda: False)
    stats = StepStatistics("fused")
    x = torch.randn(1, 8)
    stats(x, x, 1)
    assert stats.summary()["fallback"] == "no C++ compiler for inductor's CPU kernels"


def test_unknown_mode_names_the_choices(monkeypatch):
    with pytest.raises(ValueError, match="auto, fused, eager"):
        StepStatistics("fast")
    monkeypatch.setenv(fused_stats.ENV_MODE, "turbo")
    with pytest.raises(ValueError, match="DITREDUNDANCY_STATS"):
        capture_redundancy(torch.nn.Linear(2, 2), sites=[])
