"""From raw per-series step statistics to a :class:`RedundancyProfile`.

The capture records, per run (pipeline call), per (site, transformer call of the step), a
``(steps, fields, rows)`` array of step statistics. Here rows and calls are mapped to prompts and
classifier-free-guidance branches:

=========================== =====================================================================
layout                      meaning
=========================== =====================================================================
``batched-uncond-cond``     one call per step, batch ``[uncond prompts, cond prompts]`` (diffusers default)
``batched-cond-uncond``     one call per step, batch ``[cond, uncond]`` (DiT)
``sequential-cond-uncond``  two calls per step, first cond then uncond (Wan, Lumina2)
``single``                  one call per step, no guidance batch
``auto``                    ``batched-uncond-cond`` if the pipeline reports guidance on (or, when it
                            does not say, the batch holds an even number of rows per prompt) and a
                            single call per step has an even batch; ``sequential-cond-uncond`` for two
                            calls with guidance on; otherwise ``single``
=========================== =====================================================================

Calls beyond the layout (e.g. skip-layer guidance) become branches ``call<N>``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .metrics import METRICS, metrics_from_stats
from .profile import ProfileMetadata, RedundancyProfile
from .sites import KINDS, CaptureSite


@dataclass
class RawSeries:
    steps: list[int]
    valid: list[bool]
    stats: np.ndarray  # (captured steps, 4, rows)
    numel: int


@dataclass
class RawRun:
    steps: int
    batch_sizes: dict[int, int]
    series: dict[tuple[int, int], RawSeries]
    timesteps: list[float | None]
    prompts: list[str] | None
    cfg: bool | None


def _layout_for(run: RawRun, layout: str) -> tuple[int, dict[int, list[tuple[str, slice]]]]:
    """Samples in the run, and per call the (branch, row slice) pieces of its batch."""
    calls = sorted(run.batch_sizes)
    first = run.batch_sizes[calls[0]]
    if layout == "auto":
        cfg = run.cfg
        if cfg is None and run.prompts and first % len(run.prompts) == 0:
            cfg = (first // len(run.prompts)) % 2 == 0  # pipeline does not say: an even batch per prompt is CFG
        if len(calls) == 1 and cfg and first % 2 == 0:
            layout = "batched-uncond-cond"
        elif len(calls) >= 2 and run.cfg:
            layout = "sequential-cond-uncond"
        else:
            layout = "single"
    if layout.startswith("batched") and run.prompts and (first // len(run.prompts)) % 2:
        layout = "single"  # an odd number of rows per prompt: this run had no guidance batch
    if layout in ("batched-uncond-cond", "batched-cond-uncond"):
        if first % 2:
            raise ValueError(f"branch layout {layout!r} needs an even batch, but the transformer saw {first} rows; "
                             "pass branch_layout='single' for a pipeline run without guidance")
        samples = first // 2
        names = ("uncond", "cond") if layout == "batched-uncond-cond" else ("cond", "uncond")
        pieces = {calls[0]: [(names[0], slice(0, samples)), (names[1], slice(samples, first))]}
        extra_from = 1
    elif layout == "sequential-cond-uncond":
        samples = first
        pieces = {calls[0]: [("cond", slice(0, samples))]}
        if len(calls) > 1:
            pieces[calls[1]] = [("uncond", slice(0, samples))]
        extra_from = 2
    else:
        samples = first
        pieces = {calls[0]: [("cond", slice(0, samples))]}
        extra_from = 1
    for call in calls[extra_from:]:
        rows = run.batch_sizes[call]
        if rows == samples:
            pieces[call] = [(f"call{call}", slice(0, samples))]
        elif rows == 2 * samples:
            pieces[call] = [(f"call{call}-a", slice(0, samples)), (f"call{call}-b", slice(samples, rows))]
        else:
            raise ValueError(f"transformer call {call} of each step has batch {rows}, which does not match "
                             f"{samples} samples; pass an explicit branch_layout")
    return samples, pieces


def assemble_profile(runs: Sequence[RawRun], sites: Sequence[CaptureSite], layout: str, context: Any = None,
                     **metadata: Any) -> RedundancyProfile:
    step_counts = sorted({run.steps for run in runs})
    if len(step_counts) != 1:
        raise ValueError(f"the captured pipeline calls ran different step counts {step_counts}; "
                         "capture each step count separately")
    steps = step_counts[0]
    if steps < 2:
        raise ValueError(f"the pipeline ran {steps} denoising step(s); at least 2 are needed for a step pair")
    layers = list(dict.fromkeys(site.layer for site in sites))
    kinds = [k for k in KINDS if any(site.kind == k for site in sites)]
    plans = [_layout_for(run, layout) for run in runs]
    branches = list(dict.fromkeys(name for _, pieces in plans for call in sorted(pieces) for name, _ in pieces[call]))
    total = sum(samples for samples, _ in plans)
    shape = (total, len(branches), len(kinds), len(layers), steps - 1)
    values = {m: np.full(shape, np.nan, dtype=np.float32) for m in METRICS}
    computed = np.zeros(shape, dtype=bool)
    prompts: list[str] = []
    offset = 0
    for run, (samples, pieces) in zip(runs, plans):
        prompts += _prompt_labels(run.prompts, samples, offset)
        for (site_index, call), series in run.series.items():
            if call not in pieces:
                continue
            site = sites[site_index]
            full = np.full((steps, *series.stats.shape[1:]), np.nan)
            full[series.steps] = series.stats
            valid = np.zeros(steps, dtype=bool)
            valid[series.steps] = series.valid
            per_row = metrics_from_stats(np.moveaxis(full, 2, 0), series.numel)  # metric -> (rows, steps-1)
            ok = valid[1:]
            k, l = kinds.index(site.kind), layers.index(site.layer)
            for name, rows in pieces[call]:
                b = branches.index(name)
                target = slice(offset, offset + samples)
                for metric in METRICS:
                    values[metric][target, b, k, l] = np.where(ok, per_row[metric][rows], np.nan)
                computed[target, b, k, l] = ok
        offset += samples
    meta = _metadata(runs, steps, prompts, context, metadata)
    return RedundancyProfile(layers, kinds, branches, values, computed, meta)


def _prompt_labels(prompts: list[str] | None, samples: int, offset: int) -> list[str]:
    if prompts and samples % len(prompts) == 0:
        per = samples // len(prompts)
        return [p for p in prompts for _ in range(per)]
    return [f"sample {offset + i}" for i in range(samples)]


def _metadata(runs: Sequence[RawRun], steps: int, prompts: list[str], context: Any, given: dict) -> ProfileMetadata:
    from . import environment

    warnings = list(getattr(context, "messages", []))
    timesteps = runs[0].timesteps
    if any(run.timesteps != timesteps for run in runs[1:]):
        warnings.append("captured runs used different timesteps; metadata lists the first run's")
    meta = ProfileMetadata(steps=steps, timesteps=[t for t in timesteps if t is not None], prompts=prompts,
                           warnings=warnings, versions=environment.versions())
    if context is not None:
        environment.describe_components(meta, getattr(context, "pipeline", None), context.transformer,
                                        getattr(context, "scheduler", None))
    known = {f.name for f in dataclasses.fields(ProfileMetadata)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise TypeError(f"unknown profile metadata field(s) {unknown}; known fields: {sorted(known)}")
    for key, value in given.items():
        if value is not None:
            setattr(meta, key, value)
    return meta
