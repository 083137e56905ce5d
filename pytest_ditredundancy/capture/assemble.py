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
``auto``                    decided by the pipeline call's guidance (its ``do_classifier_free_guidance``
                            flag, else its ``guidance_scale``: :func:`~pytest_ditredundancy.capture.guidance.
                            call_guidance`). On with one call per step: ``batched-uncond-cond`` (DiT:
                            ``batched-cond-uncond``); on with several calls: ``sequential-cond-uncond``
                            (or a batched layout plus extra calls when the first call holds twice the
                            samples); off: ``single``. When the call does not say, row counts decide:
                            rows per prompt (prompt strings) or per sample (the call's ``batch_size``),
                            even = a guidance pair. A batch that could still be read either way is
                            refused (:class:`AmbiguousLayoutError`, naming ``branch_layout=``).
=========================== =====================================================================

Calls beyond the layout (e.g. skip-layer guidance) become branches ``call<N>``. With ``whole_batch`` (the
study's definition) each sample's rows of both guidance halves are measured as one tensor: branch ``batch``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .metrics import ABS_SUM, DIFF_L2, METRICS, NORM, metrics_from_stats
from .profile import ProfileMetadata, RedundancyProfile
from .sites import KINDS, CaptureSite


@dataclass
class RawSeries:
    steps: list[int]
    valid: list[bool]
    stats: np.ndarray  # (captured steps, fields, rows)
    numel: int
    order: list[int] | None = None  # per captured step: its place in the run's hook order


@dataclass
class RawRun:
    steps: int
    batch_sizes: dict[int, int]
    series: dict[tuple[int, int], RawSeries]
    timesteps: list[float | None]
    prompts: list[str] | None
    cfg: bool | None
    samples: int | None = None  # samples the pipeline call makes, when it says (prompt_embeds calls)
    cond_first: bool = False  # the pipeline batches guidance as [cond, uncond] (DiT)


#: The branches a guidance layout splits a sample into; ``whole_batch`` measures them as one tensor.
GUIDANCE_BRANCHES = ("cond", "uncond")
WHOLE_BATCH = "batch"
LAYOUT_CHOICES = "'batched-uncond-cond' (diffusers' doubled batch), 'batched-cond-uncond', 'sequential-cond-uncond' or 'single'"


class AmbiguousLayoutError(ValueError):
    """``branch_layout="auto"`` cannot tell from the pipeline call how batch rows map to guidance branches."""


def _ambiguous(run: RawRun, why: str) -> AmbiguousLayoutError:
    calls = sorted(run.batch_sizes)
    sizes = ", ".join(str(run.batch_sizes[c]) for c in calls)
    return AmbiguousLayoutError(
        f"cannot tell how the transformer's batch maps to classifier-free-guidance branches: each step called it "
        f"{len(calls)} time(s) with {sizes} rows, and {why}. Say it with branch_layout= "
        f"(capture_redundancy(pipe, branch_layout=...), or ModelSpec.branch_layout): {LAYOUT_CHOICES}")


def _auto_layout(run: RawRun) -> str:
    calls = sorted(run.batch_sizes)
    first = run.batch_sizes[calls[0]]
    cfg, samples = run.cfg, run.samples
    if cfg is None and samples and first in (samples, 2 * samples):
        cfg = first == 2 * samples  # the call's own sample count: a doubled batch is the guidance pair
    if cfg is None and run.prompts and first % len(run.prompts) == 0:
        cfg = (first // len(run.prompts)) % 2 == 0  # pipeline does not say: an even batch per prompt is CFG
    if cfg is None:
        if len(calls) == 1 and first % 2:
            return "single"  # an odd batch holds no [uncond, cond] pairs
        raise _ambiguous(run, "neither the pipeline call (no do_classifier_free_guidance flag, no guidance_scale) "
                              "nor its prompts or batch size say whether guidance was on")
    if not cfg:
        return "single"
    batched = "batched-cond-uncond" if run.cond_first else "batched-uncond-cond"
    if len(calls) == 1:
        if first % 2:
            raise _ambiguous(run, "guidance is on, but an odd batch cannot hold [uncond, cond] pairs")
        return batched
    if samples and first == 2 * samples:
        return batched  # a guidance batch plus extra calls (e.g. skip-layer guidance)
    return "sequential-cond-uncond"


def _layout_for(run: RawRun, layout: str) -> tuple[int, dict[int, list[tuple[str, slice]]]]:
    """Samples in the run, and per call the (branch, row slice) pieces of its batch."""
    calls = sorted(run.batch_sizes)
    first = run.batch_sizes[calls[0]]
    if layout == "auto":
        layout = _auto_layout(run)
    if layout.startswith("batched") and ((run.prompts and (first // len(run.prompts)) % 2)
                                         or (run.samples and first == run.samples)):
        layout = "single"  # one row per sample: this run had no guidance batch
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
                     whole_batch: bool = False, **metadata: Any) -> RedundancyProfile:
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
    names = [name for _, pieces in plans for call in sorted(pieces) for name, _ in pieces[call]]
    if whole_batch:
        names = [WHOLE_BATCH if name in GUIDANCE_BRANCHES else name for name in names]
    branches = list(dict.fromkeys(names))
    total = sum(samples for samples, _ in plans)
    shape = (total, len(branches), len(kinds), len(layers), steps - 1)
    values = {m: np.full(shape, np.nan, dtype=np.float32) for m in METRICS}
    computed = np.zeros(shape, dtype=bool)
    prompts: list[str] = []
    offset = 0

    def store(branch: str, site: CaptureSite, per_sample: dict[str, np.ndarray], ok: np.ndarray, samples: int) -> None:
        b, k, l = branches.index(branch), kinds.index(site.kind), layers.index(site.layer)
        target = slice(offset, offset + samples)
        for metric in METRICS:
            values[metric][target, b, k, l] = np.where(ok, per_sample[metric], np.nan)
        computed[target, b, k, l] = ok

    for run, (samples, pieces) in zip(runs, plans):
        prompts += _prompt_labels(run.prompts, samples, offset)
        together: dict[int, list[tuple[np.ndarray, np.ndarray, int]]] = {}  # whole batch: site -> its pieces
        for (site_index, call), series in run.series.items():
            if call not in pieces:
                continue
            site = sites[site_index]
            full = np.full((steps, *series.stats.shape[1:]), np.nan)
            full[series.steps] = series.stats
            valid = np.zeros(steps, dtype=bool)
            valid[series.steps] = series.valid
            per_row = None
            for name, rows in pieces[call]:
                if whole_batch and name in GUIDANCE_BRANCHES:
                    together.setdefault(site_index, []).append((full[:, :, rows], valid, series.numel))
                    continue
                if per_row is None:
                    per_row = metrics_from_stats(np.moveaxis(full, 2, 0), series.numel)  # metric -> (rows, steps-1)
                store(name, site, {m: v[rows] for m, v in per_row.items()}, valid[1:], samples)
        for site_index, parts in together.items():
            stats, valid = _combined(parts)
            per_sample = metrics_from_stats(np.moveaxis(stats, 2, 0), sum(numel for _, _, numel in parts))
            store(WHOLE_BATCH, sites[site_index], per_sample, valid[1:], samples)
        offset += samples
    meta = _metadata(runs, steps, prompts, context, metadata)
    meta.first_nonfinite = _first_nonfinite(runs, plans, sites, prompts, whole_batch)
    return RedundancyProfile(layers, kinds, branches, values, computed, meta)


def _first_nonfinite(runs: Sequence[RawRun], plans: list, sites: Sequence[CaptureSite], prompts: list[str],
                     whole_batch: bool) -> dict[str, Any] | None:
    """The first captured tensor, in the order the model computed them, whose own statistics (sum|x|, ||x||)
    are NaN or inf, i.e. it holds a NaN or inf (or is too large for float32 sums); ``None`` when there is none.

    Step-pair differences cannot tell: a NaN a deep layer puts into step 1's input turns every layer's step
    pair 0 non-finite, the first layer's included. Order: run, step, transformer call, then hook order.
    """
    offset = 0
    for run, (samples, pieces) in zip(runs, plans):
        first = None
        for (site_index, call), series in run.series.items():
            if call not in pieces:
                continue
            bad = ~np.isfinite(series.stats[:, (ABS_SUM, NORM)]).all(axis=1)  # (captured steps, rows)
            hit = np.flatnonzero(bad.any(axis=1))
            if not hit.size:
                continue
            i = int(hit[0])
            key = (series.steps[i], call, series.order[i] if series.order else site_index)
            if first is None or key < first[0]:
                first = (key, site_index, call, bad[i])
        if first is not None:
            (step, call, _), site_index, _, rows = first
            row = int(np.flatnonzero(rows)[0])
            name, piece = next(((n, r) for n, r in pieces[call] if r.start <= row < r.stop),
                               (f"call{call}", slice(0, rows.size)))
            prompt = offset + (row - piece.start) % samples
            site = sites[site_index]
            return {"step": int(step), "layer": site.layer, "kind": site.kind,
                    "branch": WHOLE_BATCH if whole_batch and name in GUIDANCE_BRANCHES else name,
                    "prompt": prompt, "prompt_text": prompts[prompt], "call": int(call),
                    "nonfinite_rows": int(rows.sum()), "rows": int(rows.size)}
        offset += samples
    return None


def _combined(parts: list[tuple[np.ndarray, np.ndarray, int]]) -> tuple[np.ndarray, np.ndarray]:
    """One sample's step statistics over all its pieces (``(steps, fields, samples)`` each) as if they were one
    tensor: sums add, L2 norms add in quadrature; a step counts only where every piece was measured."""
    stack = np.stack([stats for stats, _, _ in parts])
    out = stack.sum(axis=0)
    for field in (DIFF_L2, NORM):
        out[:, field] = np.sqrt((stack[:, :, field] ** 2).sum(axis=0))
    return out, np.logical_and.reduce([valid for _, valid, _ in parts])


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


def to_host(tensors: list[torch.Tensor]) -> list:
    """Move all stats to the host with one transfer per device."""
    out: list = [None] * len(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    for indices in by_device.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in indices]).cpu().numpy()
        offset = 0
        for i in indices:
            n = tensors[i].numel()
            out[i] = flat[offset:offset + n].reshape(tuple(tensors[i].shape))
            offset += n
    return out


def timesteps_to_floats(values: list[Any]) -> list[float | None]:
    """The run's timesteps as floats, the tensors among them read back in one transfer."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    flat = iter(torch.stack([t.float().reshape(-1)[0] for t in tensors]).cpu().tolist()) if tensors else iter(())
    return [next(flat) if isinstance(v, torch.Tensor) else (None if v is None else float(v)) for v in values]
