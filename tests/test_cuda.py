"""The capture on a CUDA GPU: fused Triton statistics equal the eager ones, the output is untouched, and the
capture's callbacks never wait for the GPU.

These run only where torch sees a CUDA GPU (nightly GPU CI); on a CPU machine they skip, since there is no GPU
to ask about. ``python -m benchmarks.capture --device cuda`` measures the same path's speed and memory.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pytest_ditredundancy import capture_redundancy, load_model
from pytest_ditredundancy.capture.fused_stats import StepStatistics
from pytest_ditredundancy.capture.metrics import step_stats

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")

CALL = dict(prompt=["a red bus", "a cat"], num_inference_steps=4, height=32, width=32, output_type="latent",
            use_resolution_binning=False, clean_caption=False)


def activations(shape, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    magnitude = 10 ** (torch.rand(shape, generator=generator) * 6 - 3)
    sign = torch.where(torch.rand(shape, generator=generator) < 0.5, -1.0, 1.0)
    return sign * magnitude


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_triton_statistics_equal_the_exact_sums(dtype):
    rows, shape = 2, (2, 4096, 1152)  # one PixArt-XL-1024 attention output per guidance branch
    x = activations(shape, 1).to(dtype)
    p = (x.float() + activations(shape, 2) * 1e-2).to(dtype)
    exact_x, exact_p = x.double().reshape(rows, -1), p.double().reshape(rows, -1)
    d = exact_x - exact_p
    exact = torch.stack((d.abs().sum(1), d.norm(dim=1), (exact_x * exact_p).sum(1), exact_x.abs().sum(1),
                         exact_x.norm(dim=1)))
    stats = StepStatistics("fused")
    fused = stats(x.cuda(), p.cuda(), rows)
    assert stats.fallback_reason is None and stats.calls == {"fused": 1, "eager": 0}
    assert fused.device.type == "cuda" and fused.dtype == torch.float32
    assert stats.summary()["kernel"] == "inductor Triton"
    eager = step_stats(x.cuda(), p.cuda(), rows)
    # float32 accumulation in a different order: within ~1e-5 of the exact sums (GPU reductions are trees)
    np.testing.assert_allclose(fused.double().cpu().numpy(), exact.numpy(), rtol=1e-5)
    np.testing.assert_allclose(fused.cpu().numpy(), eager.cpu().numpy(), rtol=1e-5)


@pytest.fixture(scope="module")
def cuda_pipeline():
    return load_model("tiny-pixart-alpha", device="cuda", dtype="float32")


def run(pipe, stats: str | None):
    generators = [torch.Generator("cpu").manual_seed(i) for i in range(2)]
    if stats is None:
        return pipe(**CALL, generator=generators)[0], None
    with capture_redundancy(pipe, stats=stats) as cap:
        out = pipe(**CALL, generator=generators)[0]
    return out, cap.profile()


def test_capture_on_cuda_leaves_the_output_untouched_and_fused_equals_eager(cuda_pipeline):
    plain, _ = run(cuda_pipeline, None)
    fused_out, fused = run(cuda_pipeline, "auto")
    eager_out, eager = run(cuda_pipeline, "eager")
    assert plain.device.type == "cuda"
    assert torch.equal(plain, fused_out) and torch.equal(plain, eager_out)
    summary = fused.metadata.extra["step_stats"]
    assert summary["path"] == "fused" and summary["kernel"] == "inductor Triton" and summary["fallback"] is None
    assert eager.metadata.extra["step_stats"]["path"] == "eager"
    for metric in ("abs_l1", "rel_l1", "cosine"):
        np.testing.assert_allclose(fused.values[metric], eager.values[metric], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("stats", ["auto", "eager"])
def test_capture_callbacks_never_wait_for_the_gpu(cuda_pipeline, stats):
    """Every callback the capture installs runs under sync debug mode "error": a ``.item()``, ``.cpu()`` or
    ``nonzero`` inside them raises. The pipeline's own syncs (the scheduler's step index) stay allowed."""
    run(cuda_pipeline, stats)  # compile this shape's kernels first: compilation may sync, steady state must not
    cap = capture_redundancy(cuda_pipeline, stats=stats).fail_on_host_sync()
    with cap:
        cuda_pipeline(**CALL, generator=[torch.Generator("cpu").manual_seed(i) for i in range(2)])
    profile = cap.profile()  # the one host transfer, after the run
    assert np.isfinite(profile.values["abs_l1"]).all()


def test_a_capture_that_waits_for_the_gpu_fails_the_check(cuda_pipeline):
    """The check above can fail: step statistics that read a value back to the host raise inside the hook."""
    run(cuda_pipeline, "eager")
    cap = capture_redundancy(cuda_pipeline, stats="eager").fail_on_host_sync()
    statistics = cap.step_statistics

    def syncing(current, previous, rows):
        current.sum().item()  # a host read-back, as a .item()-per-tensor capture does
        return statistics(current, previous, rows)

    cap.step_statistics = syncing
    with pytest.raises(RuntimeError, match="synchroniz"), cap:
        cuda_pipeline(**CALL, generator=[torch.Generator("cpu").manual_seed(i) for i in range(2)])
    assert torch.cuda.get_sync_debug_mode() == 0  # the mode is restored after the failing callback


def test_a_sync_inside_a_callback_is_caught():
    """Sync debug mode "error" itself: a value read back to the host raises."""
    x = torch.ones(4, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            x.sum().item()
    finally:
        torch.cuda.set_sync_debug_mode(0)
