"""Performance properties of the capture that hold exactly, so they are tested without timing anything.

* No host transfer while the pipeline runs: every ``.item()``, ``.cpu()``, ``.tolist()``, ``.numpy()`` and
  Python number conversion of a tensor is counted with its calling module; the capture makes none during the
  denoising loop, and adds none to the pipeline's own. Its one transfer happens in ``cap.profile()``.
* Memory that does not grow with the step count: the tensors the capture keeps alive between steps (found by
  walking the capture's state) take the same bytes after 10 and after 30 steps, apart from the few bytes of
  per-step statistics.

The timed counterparts (overhead, memory peak, batching, reference comparison) are in ``benchmarks/capture.py``.
"""

from __future__ import annotations

import sys

import pytest
import torch

from pytest_ditredundancy import capture_redundancy
from pytest_ditredundancy.capture.metrics import STAT_FIELDS

MODEL = "tiny-pixart-alpha"
CALL = dict(use_resolution_binning=False, clean_caption=False, height=32, width=32, output_type="latent")
PROMPTS = ["a red bus on a bridge", "a cat on a green sofa"]
TRANSFERS = ("item", "cpu", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__")
PACKAGE = "pytest_ditredundancy"


def run(pipe, steps: int) -> torch.Tensor:
    generators = [torch.Generator("cpu").manual_seed(i) for i in range(len(PROMPTS))]
    return pipe(prompt=PROMPTS, num_inference_steps=steps, generator=generators, **CALL)[0]


@pytest.fixture
def transfers(monkeypatch):
    """A list that records ``(method, calling module)`` for every host transfer of a tensor."""
    calls: list[tuple[str, str]] = []

    def counting(name, original):
        def wrapper(self, *args, **kwargs):
            calls.append((name, sys._getframe(1).f_globals.get("__name__", "?")))
            return original(self, *args, **kwargs)

        return wrapper

    for name in TRANSFERS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    return calls


def test_capture_makes_no_host_transfer_during_the_loop(tiny_pipeline_cache, transfers):
    pipe = tiny_pipeline_cache(MODEL)
    run(pipe, 6)  # warm-up: one-time work of the pipeline is not counted below
    transfers.clear()
    plain = run(pipe, 6)
    pipeline_own = list(transfers)
    transfers.clear()
    with capture_redundancy(pipe) as cap:
        captured = run(pipe, 6)
    during = list(transfers)
    transfers.clear()

    assert torch.equal(plain, captured)
    assert [c for c in during if c[1].startswith(PACKAGE)] == []
    assert sorted(during) == sorted(pipeline_own), "the capture changed the pipeline's host transfers"
    profile = cap.profile()
    assert profile.num_step_pairs == 5
    assert any(module.startswith(PACKAGE) for _, module in transfers), "profile() should do the one transfer"


def held_bytes(cap) -> tuple[int, int]:
    held = cap.held_bytes()  # walks everything reachable from the capture's recorded state
    return held["kept"], held["other"]


def test_capture_memory_does_not_grow_with_steps(tiny_pipeline_cache):
    pipe = tiny_pipeline_cache(MODEL)
    measured = {}
    for steps in (10, 30):
        with capture_redundancy(pipe) as cap:
            run(pipe, steps)
        series = [s for r in cap.runs for s in r.series.values()]
        one_step = sum(s.previous.numel() * s.previous.element_size() for s in series)
        measured[steps] = (*held_bytes(cap), one_step, len(series), sum(s.rows for s in series))
        assert cap.profile().num_step_pairs == steps - 1

    kept_10, other_10, step_10, n_series, rows = measured[10]
    kept_30, other_30, step_30, _, _ = measured[30]
    assert kept_10 == kept_30 == step_10 == step_30, "kept tensors must be exactly one step's captured tensors"
    # Besides them only the per-step statistics (one float32 per field and row) and timestep references grow.
    per_step = (other_30 - other_10) / 20
    assert per_step <= 4 * len(STAT_FIELDS) * rows + 64, (per_step, n_series, rows)
    assert (kept_30 + other_30) / (kept_10 + other_10) - 1 < 0.05
