"""The CPU call kernel (``capture/cpu_kernel.py``): the five sums of every pair of a call in one OpenMP loop.

It must agree with float64 within 1e-6 relative on mixed shapes, rows and dtypes, give the same bits on any
thread count, let a NaN through, refuse what it cannot read (the call then goes to inductor, and the capture
says why), and fall back cleanly when it cannot be built.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from brute_force import activations, exact_stats
from pytest_ditredundancy import capture_redundancy
from pytest_ditredundancy.capture import batched_stats, cpu_kernel, fused_stats

needs_compiler = pytest.mark.skipif(not fused_stats.cpu_compiler_available(), reason="no C++ compiler")


def pairs(seed: int = 0):
    # lengths below, at and above a chunk, not multiples of the 16 lanes, several rows, bfloat16
    shapes = [((1, 7, 3), 1), ((2, 1024), 2), ((3, 50, 41), 3), ((1, 256, 384), 1), ((4, 9, 130), 2)]
    xs, ps, rows = [], [], []
    for i, (shape, count) in enumerate(shapes):
        dtype = torch.bfloat16 if i == 2 else torch.float32
        x = activations(shape, seed + i, dtype)
        xs.append(x)
        ps.append((x.float() + 1e-2 * activations(shape, seed + 50 + i)).to(dtype))
        rows.append(count)
    return [t for pair in zip(xs, ps) for t in pair], rows


@needs_compiler
def test_agrees_with_float64_within_1e6_on_mixed_shapes_rows_and_dtypes():
    flat, rows = pairs()
    kernel = cpu_kernel.pair_kernel(flat, rows)
    result = kernel(flat)
    assert result.shape == (5, sum(rows)) and result.dtype == torch.float32
    for i, part in enumerate(result.split(rows, dim=1)):
        np.testing.assert_allclose(part.double().numpy(), exact_stats(flat[2 * i], flat[2 * i + 1], rows[i]).numpy(),
                                   rtol=1e-6)


@needs_compiler
def test_the_same_bits_on_any_thread_count():
    flat, rows = pairs(3)
    plan = cpu_kernel.plan_call(flat, rows)
    one = cpu_kernel.run_call(plan, flat, threads=1)
    for threads in (2, 3, 7):
        assert torch.equal(cpu_kernel.run_call(plan, flat, threads=threads), one)


@needs_compiler
def test_calls_of_other_sizes_in_turn_share_the_scratch_buffer_without_mixing():
    # the chunks' sums go to one buffer per thread, kept between calls: a smaller call after a larger one reads
    # only its own part, a larger one grows it, and a stale buffer's contents never reach a result
    small, small_rows = [t[..., :40].contiguous() for t in pairs(7)[0][:2]], [1]
    large, large_rows = pairs(8)
    plans = {"small": cpu_kernel.plan_call(small, small_rows), "large": cpu_kernel.plan_call(large, large_rows)}
    expected = {"small": cpu_kernel.run_call(plans["small"], small), "large": cpu_kernel.run_call(plans["large"], large)}
    cpu_kernel._SCRATCH.buffer.fill_(float("nan"))
    for name in ("small", "large", "small", "large"):
        flat = small if name == "small" else large
        assert torch.equal(cpu_kernel.run_call(plans[name], flat), expected[name]), name
    np.testing.assert_allclose(expected["small"].double().numpy(), exact_stats(small[0], small[1], 1).numpy(),
                               rtol=1e-6)


@needs_compiler
def test_a_nan_or_inf_reaches_its_own_row_only():
    flat, rows = pairs(5)
    flat[6] = flat[6].clone()
    flat[6].view(-1)[100] = float("nan")  # pair 3 (one row)
    flat[8] = flat[8].clone()
    flat[8].view(-1)[0] = float("inf")  # pair 4, first of its two rows
    result = cpu_kernel.pair_kernel(flat, rows)(flat)
    columns = np.cumsum([0] + rows)
    assert torch.isnan(result[:3, columns[3]]).all()
    assert torch.isinf(result[3, columns[4]]) and torch.isfinite(result[:, columns[4] + 1]).all()
    assert torch.isfinite(result[:, : columns[3]]).all()


@pytest.mark.parametrize("change", ["fp16", "mixed", "strided", "uneven rows"])
def test_refuses_what_it_cannot_read(change):
    x, p = activations((2, 8, 16), 1), activations((2, 8, 16), 2)
    rows = [2]
    if change == "fp16":
        x, p = x.half(), p.half()
    elif change == "mixed":
        p = p.bfloat16()
    elif change == "strided":
        x = activations((2, 8, 32), 3)[..., ::2]
    else:
        rows = [3]
    assert cpu_kernel.plan_call([x, p], rows) is None


@needs_compiler
def test_a_call_it_cannot_read_goes_to_inductor_and_says_why(monkeypatch):
    monkeypatch.setattr(batched_stats, "_CALL_KERNELS", {})
    statistics = fused_stats.StepStatistics("fused")
    batch = batched_stats.CallBatch(statistics)
    flat = [activations((1, 8, 16), i, torch.float16) for i in range(4)]

    series = [SimpleNamespace(stats=[None]) for _ in range(2)]  # stands in for the capture's series
    for i, s in enumerate(series):
        batch.add(batched_stats.Pending(s, 0, flat[2 * i], flat[2 * i + 1], 1, None))
    batch.flush(True, lambda item: None)
    assert batch.backends == {"inductor C++"} and "fp16" in batch.cpu_kernel_note
    for i, s in enumerate(series):
        np.testing.assert_allclose(s.stats[0].double().numpy(), exact_stats(flat[2 * i], flat[2 * i + 1], 1).numpy(),
                                   rtol=1e-3)


def test_a_compiler_that_fails_is_reported_and_nothing_is_left_behind(monkeypatch, tmp_path):
    monkeypatch.setenv(cpu_kernel.ENV_CACHE, str(tmp_path / "kernels"))
    monkeypatch.setattr(cpu_kernel, "_LIBRARY", None)
    monkeypatch.setattr(cpu_kernel, "_FAILURE", None)
    fake = tmp_path / "broken-cxx"
    fake.write_text("#!/bin/sh\necho 'fatal error: cannot run the compiler' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(cpu_kernel, "_compiler", lambda: str(fake))
    with pytest.raises(cpu_kernel.KernelUnavailable, match="broken-cxx failed to build the CPU call kernel: fatal"):
        cpu_kernel.library()
    assert list((tmp_path / "kernels").iterdir()) == []  # no half-written library
    with pytest.raises(cpu_kernel.KernelUnavailable, match="cannot run the compiler"):  # remembered, not retried
        cpu_kernel.library()


@needs_compiler
def test_built_once_per_machine_and_loaded_from_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv(cpu_kernel.ENV_CACHE, str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "_LIBRARY", None)
    cpu_kernel.library()
    built = list(tmp_path.glob("call_stats_*.so"))
    assert len(built) == 1
    monkeypatch.setattr(cpu_kernel, "_LIBRARY", None)
    monkeypatch.setattr(cpu_kernel, "_build", lambda compiler, target: pytest.fail("rebuilt a cached kernel"))
    cpu_kernel.library()


@needs_compiler
def test_the_capture_uses_it_on_cpu_and_matches_the_eager_path(tiny_pipeline_cache):
    pipe = tiny_pipeline_cache("tiny-pixart-alpha")
    call = dict(prompt=["a red bus", "a cat"], num_inference_steps=4, height=32, width=32, output_type="latent",
                use_resolution_binning=False, clean_caption=False)

    def profile(**options):
        with capture_redundancy(pipe, **options) as cap:
            pipe(**call, generator=[torch.Generator().manual_seed(i) for i in range(2)])
        return cap.profile()

    fast, eager = profile(memory="fast", stats="fused"), profile(memory="low", stats="eager")
    assert fast.metadata.extra["step_stats"]["call_kernel"] == cpu_kernel.BACKEND
    for metric in fast.values:
        np.testing.assert_allclose(fast.values[metric], eager.values[metric], rtol=5e-6, atol=1e-9)


def test_a_cache_that_cannot_be_written_is_reported_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv(cpu_kernel.ENV_CACHE, str(tmp_path / "kernels"))
    monkeypatch.setattr(cpu_kernel, "_LIBRARY", None)
    monkeypatch.setattr(cpu_kernel, "_FAILURE", None)
    monkeypatch.setattr(cpu_kernel, "_compiler", lambda: "/usr/bin/c++")

    def denied(compiler, target):
        raise PermissionError(13, "Permission denied", str(target.parent))

    monkeypatch.setattr(cpu_kernel, "_build", denied)
    with pytest.raises(cpu_kernel.KernelUnavailable, match=f"Permission denied.*set {cpu_kernel.ENV_CACHE} to a "
                                                           "writable folder"):
        cpu_kernel.library()


@needs_compiler
def test_a_cache_folder_that_cannot_be_made_falls_back_to_the_temporary_folder(monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(cpu_kernel.ENV_CACHE, str(blocker / "kernels"))
    monkeypatch.setattr(cpu_kernel, "_LIBRARY", None)
    monkeypatch.setattr(cpu_kernel, "_FAILURE", None)
    flat, rows = pairs(7)
    result = cpu_kernel.pair_kernel(flat, rows)(flat)
    assert torch.isfinite(result).all() and blocker.read_text() == "not a folder"
