"""Capture performance benchmark: ``python -m benchmarks.capture [--quick] [--device cpu|cuda] [--out PATH]``.

Measures, in one process on a benchmark-sized PixArt-alpha-architecture pipeline (random weights, tiny text
encoder, latents out), with plain and captured runs interleaved and the median of ``--repeats`` (>= 5) runs:

1. capture overhead of each path (:data:`PATHS`: per tensor eager or fused, one kernel per transformer call, and
   the default): captured / plain wall time, median and best of the rounds (target <= 1.05 for the default, on
   CPU and on CUDA at one prompt; ``benchmarks.default_overhead`` measures it across processes), next to the limits
   computed for the model: the FLOPs of the capture's reductions against the forward's FLOPs, and the time the
   capture needs at the device's measured memory bandwidth just to read each captured tensor twice (as the
   current step, and as the previous step of the next);
2. memory: extra memory of the (default) capture at 10, 20 and 50 steps (flat within 5%, at most one step's
   captured tensors plus one call's: 2.1x one step for memory mode fast). On CPU (torch has no CPU allocator statistics) the bytes the capture keeps alive, found by
   walking its state and counting each storage once, sampled after every step, plus the one transient of
   ``step_stats`` (a float32 difference of the largest tensor); on CUDA ``torch.cuda.max_memory_allocated``
   of a captured run minus that of a plain run;
3. batching: 8 prompts in one batched call against 8 one-prompt calls, captured, in prompts per second
   (target >= 2x on CPU), next to the same ratio without capture (what the model itself allows), and the
   capture's overhead on the batched call (target <= 1.03 on CUDA);
4. the reference approach (a DiTCacheAnalysis-style processor that ``.item()``s each distance, see
   :mod:`benchmarks.reference`): our time / its time (target <= 0.9) and agreement of ``abs_l1``;
5. CUDA only: the capture's hooks run under ``torch.cuda.set_sync_debug_mode("error")``;
6. where the overhead goes: one reduction's issue and wall time per path at the largest captured shape; and the
   CPU time spent in the site hooks per step (a share of a plain step's) with the reductions replaced by a
   constant (hooks and bookkeeping alone), by one read of each previous-step tensor (the floor of any capture
   that compares consecutive steps), and with each real path (the end-of-call reduction included; target for
   the default on CPU: at most 4.5% of a plain step).

Prints a table and writes JSON (default ``benchmarks/out/capture.json``). CPU runs use one intra-op thread
unless ``--threads`` says otherwise. Results and the history of optimisations: ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pytest_ditredundancy.capture.environment import package_version

from .model import FLOPS_PER_ELEMENT, PROMPTS, Config, CPU, CUDA, QUICK, TARGETS, build_pipeline, call_kwargs, capture, synchronize, timed, memory_bandwidth, forward_flops
from .reference import ReferenceCapture

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "out" / "capture.json"

def one_step_captured(cap) -> tuple[int, int]:
    """(elements, bytes) of one transformer call's captured tensors, from the capture's series."""
    elements = bytes_ = 0
    run = next(r for r in cap.runs if r.series)
    for series in run.series.values():
        if series.previous is not None:
            elements += series.previous.numel()
            bytes_ += series.previous.numel() * series.previous.element_size()
    return elements, bytes_


# -- the five measurements -----------------------------------------------------------------------------------
#: The ways the capture reduces a step, timed side by side: per tensor in each hook (``eager``, ``fused``:
#: memory mode low, see pytest_ditredundancy.capture.fused_stats), all tensors of a transformer call in one kernel
#: when it ends (``batched``: memory mode fast, capture.batched_stats), and what a capture without options does
#: (``default``: stats and memory ``auto``; the issue's targets are about this one).
PATHS: dict[str, dict[str, str]] = {"eager": {"stats": "eager", "memory": "low"},
                                    "fused": {"stats": "fused", "memory": "low"},
                                    "batched": {"stats": "fused", "memory": "fast"}, "default": {}}


def stats_summary(cap) -> dict[str, Any]:
    """What ran: the step statistics' counts plus the memory mode chosen and the call kernels launched."""
    return {**cap.step_statistics.summary(), "memory": cap.memory.chosen, "memory_reason": cap.memory.reason,
            "call_kernels": cap.batch.launches, "call_kernel": cap.batch.kernel_names(),
            "compile_seconds": cap.step_statistics.compile_seconds
            + cap.batch.compile_seconds}


def measure_overhead_and_reference(pipe, cfg: Config, device: torch.device, log) -> dict[str, Any]:
    prompts = PROMPTS[:1]
    modes_order = ["plain", *PATHS, "reference"]
    times: dict[str, list[float]] = {m: [] for m in modes_order}
    cpu: dict[str, list[float]] = {m: [] for m in modes_order}
    last: dict[str, Any] = {}

    def plain():
        return pipe(**call_kwargs(cfg, prompts, cfg.steps))[0]

    def ours(path: str):
        def run():
            with capture(pipe, cfg, **PATHS[path]) as cap:
                out = pipe(**call_kwargs(cfg, prompts, cfg.steps))[0]
            last[f"held_{path}"] = cap.held_bytes()
            last["one_step"] = one_step_captured(cap)
            last[f"stats_{path}"] = stats_summary(cap)
            return out, cap.profile()
        return run

    def reference():
        with ReferenceCapture(pipe.transformer) as ref:
            out = pipe(**call_kwargs(cfg, prompts, cfg.steps))[0]
            last["reference_held"] = ref.held_bytes()
        return out, ref.deltas

    modes = {"plain": plain, **{path: ours(path) for path in PATHS}, "reference": reference}
    for round_ in range(cfg.repeats):
        shift = round_ % len(modes_order)
        for name in modes_order[shift:] + modes_order[:shift]:  # rotate who goes first
            seconds, result = timed(device, modes[name], cpu[name])
            times[name].append(seconds)
            last[name] = result
        log(f"  round {round_ + 1}/{cfg.repeats}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))

    med = {k: statistics.median(v) for k, v in times.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    plain_out = last["plain"]
    ref_out, deltas = last["reference"]
    per_path = {}
    for path in PATHS:
        out, profile = last[path]
        added = med[path] - med["plain"]
        added_ref = med["reference"] - med["plain"]
        per_path[path] = {
            "overhead": med[path] / med["plain"],
            "overhead_paired_median": statistics.median(o / p for o, p in zip(times[path], times["plain"])),
            "overhead_min": min(times[path]) / min(times["plain"]),
            "overhead_cpu_time": cpu_med[path] / cpu_med["plain"],
            "ours_vs_reference": med[path] / med["reference"],
            "ours_vs_reference_paired_median": statistics.median(
                o / r for o, r in zip(times[path], times["reference"])),
            "added_seconds": added, "added_vs_reference": added / added_ref if added_ref > 0 else float("inf"),
            "agreement": compare_with_reference(profile, deltas), "stats": last[f"stats_{path}"],
            "held": last[f"held_{path}"], "output_identical": bool(torch.equal(plain_out, out)),
        }
    fused_vs_eager = statistics.median(f / e for f, e in zip(times["fused"], times["eager"]))
    return {
        "seconds": times, "median_seconds": med, "cpu_seconds": cpu, "median_cpu_seconds": cpu_med,
        "paths": per_path, "fused_vs_eager_paired_median": fused_vs_eager,
        "reference_overhead": med["reference"] / med["plain"],
        "reference_overhead_cpu_time": cpu_med["reference"] / cpu_med["plain"],
        "outputs_identical": bool(all(p["output_identical"] for p in per_path.values())
                                  and torch.equal(plain_out, ref_out)),
        "reference_held": last["reference_held"], "one_step": last["one_step"],
    }


def compare_with_reference(profile, deltas: dict[tuple[str, str], list[float]]) -> dict[str, Any]:
    """Max relative difference of ``abs_l1``: ours averaged over samples and branches (all rows have the same
    number of elements, so that is the whole-batch mean the reference computes) against the reference."""
    worst, compared, missing = 0.0, 0, []
    values = profile.values["abs_l1"]
    for (layer, kind), series in sorted(deltas.items()):
        if layer not in profile.layers or kind not in profile.kinds:
            missing.append(f"{layer}/{kind}")
            continue
        ours = values[:, :, profile.kinds.index(kind), profile.layers.index(layer), :].astype(np.float64)
        ours = ours.reshape(-1, ours.shape[-1]).mean(axis=0)
        ref = np.asarray(series, dtype=np.float64)
        if ours.shape != ref.shape:
            missing.append(f"{layer}/{kind} ({ours.shape} vs {ref.shape})")
            continue
        scale = np.maximum(np.abs(ref), 1e-12)
        worst = max(worst, float(np.max(np.abs(ours - ref) / scale)))
        compared += 1
    return {"series_compared": compared, "max_rel_diff": worst, "missing": missing,
            "ok": compared > 0 and not missing and worst <= TARGETS["agreement_rtol"]}


def time_site_hooks(cap) -> list[float]:
    """Make ``cap``'s site hooks (tensor extraction, bookkeeping, statistics) and its end-of-call hook (the
    batched reduction) add their thread CPU seconds to the one-element list returned; call before entering the
    capture. The capture's work runs in those hooks and, on
    CPU, synchronously, so this is its own cost without the noise of wall time."""
    spent = [0.0]
    make_site_hook = cap._make_site_hook

    def timed_site_hook(group):
        hook = make_site_hook(group)

        def wrapper(*args):
            started = time.thread_time()
            hook(*args)
            spent[0] += time.thread_time() - started
        return wrapper

    cap._make_site_hook = timed_site_hook
    finished = cap._call_finished  # the batched path reduces a call's tensors in the transformer's forward hook

    def timed_finish(*args):
        started = time.thread_time()
        finished(*args)
        spent[0] += time.thread_time() - started

    cap._call_finished = timed_finish
    return spent


def measure_memory(pipe, cfg: Config, device: torch.device, log) -> dict[str, Any]:
    rows = {}
    for steps in cfg.memory_steps:
        peak = {"total": 0}
        live: dict[str, Any] = {}

        def sample(step, timestep, latents):  # the pipeline's per-step callback
            held = live["cap"].held_bytes()
            if held["total"] > peak["total"]:
                peak.update(held)

        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            pipe(**call_kwargs(cfg, PROMPTS[:1], steps))
            synchronize(device)
            plain_peak = torch.cuda.max_memory_allocated(device) - base
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        cap = capture(pipe, cfg)
        hook_cpu = time_site_hooks(cap)
        with cap:
            live["cap"] = cap
            pipe(**call_kwargs(cfg, PROMPTS[:1], steps, callback=sample, callback_steps=1))
        synchronize(device)
        # the transient: memory mode fast holds one call's tensors until the call ends; per tensor, step_stats'
        # float32 difference of the largest captured tensor (freed at return)
        if cap.memory.chosen == "fast":
            scratch = one_step_captured(cap)[1] // max(len({c for r in cap.runs for _, c in r.series}), 1)
        else:
            scratch = max(s.rows * s.numel * 4 for r in cap.runs for s in r.series.values())
        row = {"steps": steps, "held_peak": peak["total"], "kept": peak.get("kept", 0),
               "other": peak.get("other", 0), "scratch": scratch, "extra_peak_estimate": peak["total"] + scratch,
               "one_step_bytes": one_step_captured(cap)[1]}
        if device.type == "cpu":
            row["record_cpu_seconds_per_step"] = hook_cpu[0] / steps
        if device.type == "cuda":
            captured_peak = torch.cuda.max_memory_allocated(device) - base
            row.update(plain_peak=plain_peak, captured_peak=captured_peak, extra_peak=captured_peak - plain_peak)
        rows[steps] = row
        for wrapped in ("_make_site_hook", "_call_finished"):  # drop the timing wrappers (reference cycles)
            cap.__dict__.pop(wrapped, None)
        live.clear()
        del cap  # before the next step count's plain run: its tensors must not count in that run's baseline
        log(f"  {steps} steps: capture holds {row['held_peak'] / 2**20:.2f} MiB (+{scratch / 2**20:.2f} MiB transient)"
            + (f", extra CUDA peak {row['extra_peak'] / 2**20:.2f} MiB" if device.type == "cuda" else ""))
    key = "extra_peak" if device.type == "cuda" else "extra_peak_estimate"
    extras = [r[key] for r in rows.values()]
    spread = max(extras) / max(min(extras), 1) - 1
    one_step = max(r["one_step_bytes"] for r in rows.values())
    vs_step = max(extras) / max(one_step, 1)
    result = {"rows": rows, "measure": key, "spread": spread, "one_step_bytes": one_step, "vs_one_step": vs_step,
              "ok": spread <= TARGETS["memory_flat"] and vs_step <= TARGETS["memory_vs_step"]}
    if device.type == "cpu":
        per_step = [r["record_cpu_seconds_per_step"] for r in rows.values()]
        result["record_cpu_seconds_per_step"] = statistics.median(per_step)
    return result


def measure_batching(pipe, cfg: Config, device: torch.device, log) -> dict[str, Any]:
    prompts = PROMPTS[: cfg.batch_prompts]
    seconds: dict[str, list[float]] = {"captured_batched": [], "captured_single": [], "plain_batched": [],
                                       "plain_single": []}

    def one_by_one(captured: bool):
        def run():
            context = capture(pipe, cfg) if captured else contextlib.nullcontext()
            with context as cap:
                for i, prompt in enumerate(prompts):
                    pipe(**call_kwargs(cfg, [prompt], cfg.batch_steps, seed=i))
            return cap.profile() if captured else None
        return run

    def batched(captured: bool):
        def run():
            context = capture(pipe, cfg) if captured else contextlib.nullcontext()
            with context as cap:
                pipe(**call_kwargs(cfg, prompts, cfg.batch_steps))
            return cap.profile() if captured else None
        return run

    modes = {"captured_batched": batched(True), "captured_single": one_by_one(True),
             "plain_batched": batched(False), "plain_single": one_by_one(False)}
    for round_ in range(cfg.batch_repeats):
        for name, run in modes.items():
            seconds[name].append(timed(device, run)[0])
        log(f"  round {round_ + 1}/{cfg.batch_repeats}: "
            + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in seconds.items()))
    med = {k: statistics.median(v) for k, v in seconds.items()}
    pps = {k: len(prompts) / v for k, v in med.items()}
    return {"prompts": len(prompts), "steps": cfg.batch_steps, "seconds": seconds, "prompts_per_second": pps,
            "speedup": pps["captured_batched"] / pps["captured_single"],
            "overhead_batched": med["captured_batched"] / med["plain_batched"],
            "plain_speedup": pps["plain_batched"] / pps["plain_single"]}


def measure_sync(pipe, cfg: Config, device: torch.device) -> dict[str, Any]:
    """Run every capture callback (transformer pre-hook, site hooks, context hooks, scheduler and input wrappers)
    under sync debug mode "error"."""
    if device.type != "cuda":
        return {"status": "skipped (no GPU)", "ok": None}
    with capture(pipe, cfg):  # compile this call's kernels first: compilation may sync, steady state must not
        pipe(**call_kwargs(cfg, PROMPTS[:2], 4))
    cap = capture(pipe, cfg).fail_on_host_sync()
    try:
        with cap:
            pipe(**call_kwargs(cfg, PROMPTS[:2], 4))
        cap.profile()
    except RuntimeError as exc:
        return {"status": f"host sync in capture: {exc}".splitlines()[0][:200], "ok": False}
    return {"status": "no host sync in capture hooks (sync debug mode 'error')", "ok": True}


# -- where the overhead goes ---------------------------------------------------------------------------------
class _NoStatistics:
    """Stands in for the step statistics so that a run times the capture's hooks and bookkeeping alone (the
    numbers it records are meaningless): the floor of any per-site design, whatever the reduction costs."""

    def __init__(self) -> None:
        self._results: dict[tuple, torch.Tensor] = {}

    def __call__(self, current: torch.Tensor, previous: torch.Tensor | None, rows: int) -> torch.Tensor:
        key = (current.device, rows)
        if key not in self._results:
            self._results[key] = torch.zeros(5, rows, device=current.device)
        return self._results[key]


class _ReadPrevious(_NoStatistics):
    """Hooks and bookkeeping plus one read of each previous-step tensor (``previous.sum()``): the least a capture
    that compares every step with the one before must spend. On CPU the previous step comes back from L3 or DRAM;
    on CUDA this is one kernel launch per captured tensor."""

    def __call__(self, current: torch.Tensor, previous: torch.Tensor | None, rows: int) -> torch.Tensor:
        if previous is not None:
            previous.sum()
        return super().__call__(current, previous, rows)


#: What part (b) of the breakdown runs, besides a plain run: the two stand-ins, then the real paths.
BREAKDOWN_MODES = ("hooks_only", "read_previous", *PATHS)


def measure_breakdown(pipe, cfg: Config, device: torch.device, log) -> dict[str, Any]:
    """Two questions the overhead rows cannot answer alone. (a) One reduction at the largest captured shape:
    the CPU time to issue it (no sync) and the wall time per call when issued back to back; on CUDA, a path
    whose issue time exceeds its GPU time is launch-bound. (b) The CPU time the capture spends in its site hooks
    per step, as a share of a plain step's CPU time, for the hooks alone, for the floor (:class:`_ReadPrevious`)
    and for each path; runs interleaved with plain runs, so the wall-time ratio of each is reported too. The
    in-hook time is robust where wall time is not (a shared machine moves plain runs by 10% or more)."""
    from pytest_ditredundancy.capture.fused_stats import StepStatistics

    rows = 2 if cfg.guidance_scale > 1 else 1
    shape = (rows, cfg.tokens, cfg.hidden)
    dtype = getattr(torch, cfg.dtype)
    x = torch.randn(shape, device=device).to(dtype)
    p = (x.float() + 0.01 * torch.randn(shape, device=device)).to(dtype)
    calls = 200 if device.type == "cuda" else 20
    per_call: dict[str, Any] = {}
    for path in ("eager", "fused"):  # per tensor; the batched path's cost per call is in part (b)
        stats = StepStatistics(path)
        for _ in range(3):
            stats(x, p, rows)
        synchronize(device)
        started = time.perf_counter()
        for _ in range(calls):
            stats(x, p, rows)
        issued = time.perf_counter() - started
        synchronize(device)
        total = time.perf_counter() - started
        per_call[path] = {"issue_us": issued / calls * 1e6, "wall_us": total / calls * 1e6,
                          "kernel": stats.summary()["kernel"], "fallback": stats.fallback_reason}
    log("  per call at " + "x".join(map(str, shape)) + ": " + ", ".join(
        f"{k} issue {v['issue_us']:.0f} us / wall {v['wall_us']:.0f} us" for k, v in per_call.items()))

    stand_ins = {"hooks_only": _NoStatistics, "read_previous": _ReadPrevious}
    times: dict[str, list[float]] = {m: [] for m in ("plain", *BREAKDOWN_MODES)}
    plain_cpu: list[float] = []
    in_hooks: dict[str, list[float]] = {m: [] for m in BREAKDOWN_MODES}

    def plain():
        return pipe(**call_kwargs(cfg, PROMPTS[:1], cfg.steps))[0]

    def captured(mode: str):
        def run():
            cap = capture(pipe, cfg, **PATHS.get(mode, {"stats": "eager", "memory": "low"}))
            if mode in stand_ins:
                cap.step_statistics = stand_ins[mode]()
            spent = time_site_hooks(cap)
            with cap:
                out = pipe(**call_kwargs(cfg, PROMPTS[:1], cfg.steps))[0]
            in_hooks[mode].append(spent[0] / cfg.steps)
            return out
        return run

    order = [("plain", plain), *((m, captured(m)) for m in BREAKDOWN_MODES)]
    for round_ in range(cfg.repeats):
        shift = round_ % len(order)
        for name, run in order[shift:] + order[:shift]:
            times[name].append(timed(device, run, plain_cpu if name == "plain" else None)[0])
    plain_step_cpu = statistics.median(plain_cpu) / cfg.steps
    modes = {}
    for mode in BREAKDOWN_MODES:
        own = statistics.median(in_hooks[mode])
        modes[mode] = {"wall_overhead_paired_median": statistics.median(
                           c / p for c, p in zip(times[mode], times["plain"])),
                       "hook_cpu_seconds_per_step": own, "hook_cpu_share": own / plain_step_cpu}
    log("  in the site hooks per step: " + ", ".join(
        f"{m} {v['hook_cpu_seconds_per_step'] * 1e3:.2f} ms ({v['hook_cpu_share']:.1%})" for m, v in modes.items()))
    return {"shape": list(shape), "dtype": cfg.dtype, "per_call": per_call, "seconds": times,
            "plain_step_cpu_seconds": plain_step_cpu, "modes": modes}


# -- limits --------------------------------------------------------------------------------------------------
def limits(pipe, cfg: Config, device: torch.device, overhead: dict[str, Any]) -> dict[str, Any]:
    flops = forward_flops(pipe, cfg, device)
    elements, captured_bytes = overhead["one_step"]
    capture_flops = FLOPS_PER_ELEMENT * elements
    bandwidth = memory_bandwidth(device, getattr(torch, cfg.dtype))
    plain_step = overhead["median_seconds"]["plain"] / cfg.steps
    read_twice = 2 * captured_bytes
    return {
        "forward_flops_per_step": flops, "capture_flops_per_step": capture_flops,
        "flop_limit": 1 + capture_flops / flops, "captured_elements_per_step": elements,
        "captured_bytes_per_step": captured_bytes, "bandwidth_bytes_per_s": bandwidth,
        "plain_seconds_per_step": plain_step,
        "bandwidth_limit": 1 + read_twice / bandwidth / plain_step,
    }


# -- report --------------------------------------------------------------------------------------------------
def verdict(ok: bool | None) -> str:
    return "skipped" if ok is None else ("pass" if ok else "FAIL")


def row_verdict(row: dict[str, Any]) -> str:
    """A row whose target is "report" has no verdict: it explains the others."""
    return "-" if row["target"] == "report" else verdict(row["pass"])


def build_rows(cfg: Config, device: torch.device, res: dict[str, Any]) -> list[dict[str, Any]]:
    ov, lim, mem, bat, sync = res["overhead"], res["limits"], res["memory"], res["batching"], res["sync"]
    target = TARGETS["overhead_cuda" if device.type == "cuda" else "overhead_cpu"]
    own = ""
    if "record_cpu_seconds_per_step" in mem:
        plain_cpu_step = ov["median_cpu_seconds"]["plain"] / cfg.steps  # the memory runs use the default path
        own = (f"; capture's own CPU {mem['record_cpu_seconds_per_step'] * 1e3:.1f} ms/step = "
               f"{mem['record_cpu_seconds_per_step'] / plain_cpu_step:.1%} of a plain step")
    rows = []
    for path in PATHS:
        po = ov["paths"][path]
        st = po["stats"]
        how = f"{st['path']} ({st.get('call_kernel') or st['kernel']})" if st["fused_calls"] else "eager"
        if st["fallback"]:
            how += f", fell back: {st['fallback']}"
        rows.append({
            "measure": f"capture overhead, {path} (captured / plain wall time, median; best of {cfg.repeats})",
            "value": f"{po['overhead']:.3f}; best {po['overhead_min']:.3f}", "target": f"<= {target} (best)",
            "note": f"ran: {how}, memory {st['memory']}, {st['call_kernels']} call kernels, {st['fused_calls']} fused / "
                    f"{st['eager_calls']} eager reductions per run; paired "
                    f"median {po['overhead_paired_median']:.3f}, CPU time {po['overhead_cpu_time']:.3f}"
                    + (f"; limits: FLOPs {lim['flop_limit']:.4f}, read-twice at "
                       f"{lim['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s {lim['bandwidth_limit']:.4f}{own}"
                       if path == "eager" else f"; fused/eager paired median {ov['fused_vs_eager_paired_median']:.3f}"),
            "pass": po["overhead_min"] <= target})
    unit = "CUDA extra peak" if mem["measure"] == "extra_peak" else "extra (held + transient)"
    sizes = ", ".join(f"{s}: {r[mem['measure']] / 2**20:.2f}" for s, r in mem["rows"].items())
    rows.append({"measure": f"memory {unit} MiB at {'/'.join(map(str, cfg.memory_steps))} steps", "value": sizes,
                 "target": f"flat within {TARGETS['memory_flat']:.0%}, <= {TARGETS['memory_vs_step']}x one step",
                 "note": f"spread {mem['spread']:.2%}, one step {mem['one_step_bytes'] / 2**20:.2f} MiB "
                         f"({mem['vs_one_step']:.3f}x)", "pass": mem["ok"]})
    batched_target = TARGETS["overhead_cuda_batched"] if device.type == "cuda" else None
    rows.append({"measure": f"capture overhead at {bat['prompts']} prompts batched (captured / plain, default)",
                 "value": f"{bat['overhead_batched']:.3f}", "target": f"<= {batched_target}" if batched_target
                 else "report", "note": f"median of {len(bat['seconds']['plain_batched'])} at {bat['steps']} steps",
                 "pass": bat["overhead_batched"] <= batched_target if batched_target else None})
    batching_target = TARGETS["batching"] if device.type == "cpu" else None
    rows.append({"measure": f"batching: {bat['prompts']} prompts batched vs one by one (prompts/s)",
                 "value": f"{bat['speedup']:.2f}x", "target": f">= {batching_target}x" if batching_target else "report",
                 "note": f"{bat['prompts_per_second']['captured_batched']:.2f} vs "
                         f"{bat['prompts_per_second']['captured_single']:.2f} prompts/s at {bat['steps']} steps; "
                         f"without capture {bat['plain_speedup']:.2f}x",
                 "pass": bat["speedup"] >= batching_target if batching_target else None})
    for path in PATHS:
        po = ov["paths"][path]
        agree = po["agreement"]
        rows.append({"measure": f"vs reference, {path} (DiTCacheAnalysis-style .item() per tensor)",
                     "value": f"{po['ours_vs_reference']:.3f}x its time", "target": f"<= {TARGETS['vs_reference']}",
                     "note": f"reference overhead {ov['reference_overhead']:.3f} (ours {po['overhead']:.3f}); paired "
                             f"median {po['ours_vs_reference_paired_median']:.3f}; added time ours/its "
                             f"{po['added_vs_reference']:.2f}; abs_l1 max rel diff {agree['max_rel_diff']:.1e} over "
                             f"{agree['series_compared']} series; outputs identical: {ov['outputs_identical']}",
                     "pass": po["ours_vs_reference"] <= TARGETS["vs_reference"] and agree["ok"]})
    rows.append({"measure": "no host sync in the denoising loop (CUDA)", "value": sync["status"],
                 "target": "no sync", "note": "", "pass": sync["ok"]})
    brk = res["breakdown"]
    calls = brk["per_call"]
    rows.append({"measure": "one reduction at " + "x".join(map(str, brk["shape"])) + f" {brk['dtype']} (issue / wall)",
                 "value": ", ".join(f"{k} {v['issue_us']:.0f}/{v['wall_us']:.0f} us" for k, v in calls.items()),
                 "target": "report", "pass": None,
                 "note": "issue: CPU time to launch one call; wall: per call, back to back"
                 + ("; issue close to wall: the CPU launching it is the bottleneck" if device.type == "cuda" else "")})
    names = {"hooks_only": "hooks and bookkeeping alone",
             "read_previous": "floor: hooks + one read of each previous step",
             "eager": "eager statistics", "fused": "fused statistics",
             "batched": "batched statistics (one kernel per call)", "default": "default capture (auto)"}
    share_target = TARGETS["hook_share_cpu"] if device.type == "cpu" else None
    for mode, m in brk["modes"].items():
        judged = mode == "default" and share_target is not None
        rows.append({"measure": f"in the site hooks: {names[mode]} (CPU per step, share of a plain step)",
                     "value": f"{m['hook_cpu_seconds_per_step'] * 1e3:.2f} ms = {m['hook_cpu_share']:.1%}",
                     "target": f"<= {share_target:.1%}" if judged else "report",
                     "pass": m["hook_cpu_share"] <= share_target if judged else None,
                     "note": f"wall time vs plain, paired median of {cfg.repeats}: "
                             f"{m['wall_overhead_paired_median']:.3f}"
                             + ("; the least any capture comparing consecutive steps spends" if mode == "read_previous"
                                else "")})
    return rows


def print_table(rows: list[dict[str, Any]], out=sys.stdout) -> None:
    headers = ("measure", "value", "target", "pass/fail", "note")
    cells = [(r["measure"], r["value"], r["target"], row_verdict(r), r["note"]) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    line = " | ".join(h.ljust(w) for h, w in zip(headers, widths))
    print(line, file=out)
    print("-+-".join("-" * w for w in widths), file=out)
    for c in cells:
        print(" | ".join(v.ljust(w) for v, w in zip(c, widths)), file=out)


def git_commit() -> str | None:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine(device: torch.device) -> dict[str, Any]:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "diffusers": package_version("diffusers"),
            "pytest-ditredundancy": package_version("pytest-ditredundancy"), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.capture", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when available)")
    parser.add_argument("--quick", action="store_true", help="fast smoke run on a small model (< 30 s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per mode (default 5, at least 5)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op CPU threads (default 1; 0 keeps torch's default). On a shared machine, "
                             "OpenMP threads that lose their core stall at every barrier and make runs 10x slower "
                             "at random; one thread keeps the plain/captured comparison stable")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU")
    if args.threads < 0:
        parser.error("--threads must be >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else (CUDA if device.type == "cuda" else CPU)
    if args.repeats is not None:
        if args.repeats < 5:
            parser.error("--repeats must be at least 5 (the benchmark reports medians of >= 5 runs)")
        cfg = replace(cfg, repeats=args.repeats)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    started = time.perf_counter()
    log(f"building {cfg.name} ({cfg.layers} layers, width {cfg.hidden}, {cfg.tokens} tokens) on {device}")
    pipe = build_pipeline(cfg, device)
    # Pipelines run under no_grad, not inference_mode: under inference_mode the capture must copy every tensor.
    pipe(**call_kwargs(cfg, PROMPTS[:1], 2))  # warm up kernels and allocator in every mode
    compile_seconds = {}
    for path in PATHS:  # the fused paths compile their kernels here, once per process: timed, not in the runs
        with capture(pipe, cfg, **PATHS[path]) as cap:
            pipe(**call_kwargs(cfg, PROMPTS[:1], 2))
        compile_seconds[path] = stats_summary(cap)["compile_seconds"]
    log("  kernels compiled in " + ", ".join(f"{k} {v:.1f} s" for k, v in compile_seconds.items()))
    with ReferenceCapture(pipe.transformer):
        pipe(**call_kwargs(cfg, PROMPTS[:1], 2))
    results: dict[str, Any] = {}
    log(f"1+4. overhead and reference: {cfg.repeats} interleaved rounds of {cfg.steps} steps")
    results["overhead"] = measure_overhead_and_reference(pipe, cfg, device, log)
    results["overhead"]["compile_seconds"] = compile_seconds
    results["limits"] = limits(pipe, cfg, device, results["overhead"])
    log("2. memory")
    results["memory"] = measure_memory(pipe, cfg, device, log)
    log(f"3. batching: {cfg.batch_prompts} prompts, {cfg.batch_steps} steps, {cfg.batch_repeats} rounds")
    results["batching"] = measure_batching(pipe, cfg, device, log)
    log("5. host synchronisation")
    results["sync"] = measure_sync(pipe, cfg, device)
    log("6. where the overhead goes")
    results["breakdown"] = measure_breakdown(pipe, cfg, device, log)
    rows = build_rows(cfg, device, results)
    print_table(rows)
    report = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine(device),
        "git_commit": git_commit(), "config": asdict(cfg) | {"hidden": cfg.hidden, "tokens": cfg.tokens},
        "quick": args.quick, "targets": TARGETS,
        "rows": [{**r, "pass": row_verdict(r)} for r in rows], "results": results,
        "wall_seconds": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(_jsonable(report), indent=2) + "\n", encoding="utf-8")
    log(f"wrote {args.out} ({report['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
