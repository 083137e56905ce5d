"""A deliberately naive reference capture: keeps every step's tensors and computes distances afterwards."""

from __future__ import annotations

import functools
from collections import defaultdict

import torch

from pytest_ditredundancy.capture.metrics import abs_l1, cosine_distance, rel_l1


def record_every_step(pipe, run, sites):
    """Run ``run()`` and return {(site index, call index): {step: tensor copy}}."""
    stored: dict = defaultdict(dict)
    state = {"step": 0, "call": -1}
    handles = []

    def on_call(module, args, kwargs):
        state["call"] += 1

    handles.append(pipe.transformer.register_forward_pre_hook(on_call, with_kwargs=True))
    for index, site in enumerate(sites):
        def hook(module, args, output, index=index, site=site):
            tensor = site.tensor(output)
            if tensor is not None:
                stored[(index, state["call"])].setdefault(state["step"], tensor.detach().clone())
        handles.append(site.module.register_forward_hook(hook))
    original = pipe.scheduler.step

    @functools.wraps(original)
    def step(*args, **kwargs):
        result = original(*args, **kwargs)
        state["step"] += 1
        state["call"] = -1
        return result

    pipe.scheduler.step = step
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
        del pipe.scheduler.step
    return stored


def reference_series(tensors: dict, rows: int, row: int) -> dict[str, list[float]]:
    """Metrics of one sample (``row`` of ``rows``, sample-major folding) over consecutive steps."""
    steps = sorted(tensors)
    per_step = [tensors[s].reshape(rows, -1)[row] for s in steps]
    out = {"abs_l1": [], "rel_l1": [], "cosine": []}
    for previous, current in zip(per_step, per_step[1:]):
        out["abs_l1"].append(abs_l1(current, previous))
        out["rel_l1"].append(rel_l1(current, previous))
        out["cosine"].append(cosine_distance(current, previous))
    return out


def cond_rows(layout: str, call: int, samples: int, prompt: int) -> tuple[int, int] | None:
    """(rows in the call's batch, row of ``prompt``'s cond branch) for a branch layout, or None."""
    if layout == "batched-uncond-cond":
        return (2 * samples, samples + prompt) if call == 0 else None
    if layout == "batched-cond-uncond":
        return (2 * samples, prompt) if call == 0 else None
    return (samples, prompt) if call == 0 else None


__all__ = ["cond_rows", "record_every_step", "reference_series", "torch"]


def activations(shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Seeded values spanning six orders of magnitude, both signs: what float32 summation must survive."""
    generator = torch.Generator().manual_seed(seed)
    magnitude = 10 ** (torch.rand(shape, generator=generator) * 6 - 3)
    sign = torch.where(torch.rand(shape, generator=generator) < 0.5, -1.0, 1.0)
    return (sign * magnitude).to(dtype)


def exact_stats(x: torch.Tensor, p: torch.Tensor, rows: int) -> torch.Tensor:
    """The five step statistics per row in float64: the reference every kernel is held to."""
    x, p = x.double().reshape(rows, -1), p.double().reshape(rows, -1)
    d = x - p
    return torch.stack((d.abs().sum(1), d.norm(dim=1), (x * p).sum(1), x.abs().sum(1), x.norm(dim=1)))
