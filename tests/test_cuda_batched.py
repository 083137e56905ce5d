"""One reduction kernel per transformer call on a CUDA GPU: the same five sums as the per-tensor path (bit for
bit against the per-tensor Triton kernels, within 1e-6 of exact sums where float32 allows), one kernel per call,
the output untouched, and no host sync in any capture callback, the end-of-call reduction included.

These run only where torch sees a CUDA GPU (``python -m benchmarks.gpu_check`` runs them); the CPU twins of these
checks are in ``tests/test_batched_stats.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pytest_ditredundancy import capture_redundancy, load_model
from pytest_ditredundancy.capture.batched_stats import compile_call
from pytest_ditredundancy.capture.fused_stats import compile_fused
from test_cuda import activations  # values over six decades, both signs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")

CALL = dict(prompt=["a red bus", "a cat"], num_inference_steps=5, height=32, width=32, output_type="latent",
            use_resolution_binning=False, clean_caption=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_call_kernel_equals_per_tensor_kernels_and_exact_sums(dtype):
    # PixArt-XL-1024 sizes: self-attention K/V/A (2 rows x 4096 x 1152) and cross-attention K/V (2 x 120 x 1152)
    shapes = [(2, 4096, 1152)] * 3 + [(2, 120, 1152)] * 2
    xs = [activations(shape, i).to(dtype) for i, shape in enumerate(shapes)]
    ps = [(x.float() + 1e-2 * activations(x.shape, 10 + i)).to(dtype) for i, x in enumerate(xs)]
    flat = [t.cuda() for pair in zip(xs, ps) for t in pair]
    kernel = compile_call(flat, [2] * len(shapes))
    together = kernel(list(flat))[0]
    assert together.device.type == "cuda" and together.dtype == torch.float32 and together.shape == (5, 10)
    for i, (x, p) in enumerate(zip(xs, ps)):
        x2, p2 = flat[2 * i].reshape(2, -1), flat[2 * i + 1].reshape(2, -1)
        alone = compile_fused(x2, p2)([x2, p2])[0]
        part = together[:, 2 * i:2 * i + 2]
        np.testing.assert_allclose(part.cpu().numpy(), alone.cpu().numpy(), rtol=1e-6)
        xd, pd = x.double().reshape(2, -1), p.double().reshape(2, -1)
        d = xd - pd
        exact = torch.stack((d.abs().sum(1), d.norm(dim=1), (xd * pd).sum(1), xd.abs().sum(1), xd.norm(dim=1)))
        np.testing.assert_allclose(part.double().cpu().numpy(), exact.numpy(), rtol=1e-5)


@pytest.fixture(scope="module")
def cuda_pipeline():
    return load_model("tiny-pixart-alpha", device="cuda", dtype="float32")


def run(pipe, **options):
    generators = [torch.Generator("cpu").manual_seed(i) for i in range(2)]
    with capture_redundancy(pipe, **options) as cap:
        out = pipe(**CALL, generator=generators)[0]
    return out, cap.profile()


def test_fast_memory_on_cuda_equals_the_per_tensor_path_with_one_kernel_per_call(cuda_pipeline):
    plain = cuda_pipeline(**CALL, generator=[torch.Generator("cpu").manual_seed(i) for i in range(2)])[0]
    out_fast, fast = run(cuda_pipeline, memory="fast")
    out_low, low = run(cuda_pipeline, memory="low")
    assert torch.equal(plain, out_fast) and torch.equal(plain, out_low)
    summary = fast.metadata.extra["step_stats"]
    assert summary["memory_chosen"] == "fast" and summary["call_kernels"] == 4 and summary["fallback"] is None
    assert summary["kernel"] == "inductor Triton" and low.metadata.extra["step_stats"]["call_kernels"] == 0
    for metric in fast.values:
        np.testing.assert_allclose(fast.values[metric], low.values[metric], rtol=1e-6, atol=1e-9)


def test_auto_memory_on_cuda_picks_fast_when_it_fits(cuda_pipeline):
    _, profile = run(cuda_pipeline)
    assert profile.metadata.extra["step_stats"]["memory_chosen"] == "fast"


@pytest.mark.parametrize("memory", ["fast", "low"])
def test_no_host_sync_in_any_callback_including_the_call_end(cuda_pipeline, memory):
    run(cuda_pipeline, memory=memory)  # compile this call's kernel first: compilation may sync
    cap = capture_redundancy(cuda_pipeline, memory=memory).fail_on_host_sync()
    with cap:
        cuda_pipeline(**CALL, generator=[torch.Generator("cpu").manual_seed(i) for i in range(2)])
    profile = cap.profile()
    assert profile.metadata.extra["step_stats"]["memory_chosen"] == memory
    assert np.isfinite(profile.values["abs_l1"]).all()


def test_a_sync_in_the_call_end_reduction_fails_the_check(cuda_pipeline):
    """The check above can fail: an end-of-call reduction that reads a value back raises inside the hook."""
    run(cuda_pipeline, memory="fast")
    cap = capture_redundancy(cuda_pipeline, memory="fast").fail_on_host_sync()
    flush = cap.batch.flush

    def syncing(batched, on_mutated):
        if cap.batch.pending:
            cap.batch.pending[0].current.sum().item()
        return flush(batched, on_mutated)

    cap.batch.flush = syncing
    with pytest.raises(RuntimeError, match="synchroniz"), cap:
        cuda_pipeline(**CALL, generator=[torch.Generator("cpu").manual_seed(i) for i in range(2)])
    assert torch.cuda.get_sync_debug_mode() == 0
