"""What the Ray executor costs and what it buys: ``python -m benchmarks.ray_overhead [--quick] [--out PATH]``
and the study's workload on paper: ``python -m benchmarks.ray_overhead --plan [--step-times FILE]``.

Measured on this machine (run it from the repository root: the actors import this module):

1. throughput: the same profile requests (tiny-pixart-alpha, distinct seeds) computed by the local executor (one
   process, torch's default threads) and by the Ray executor (one CPU actor per core, one thread each, a local
   Ray instance), in profiles per minute; the pool's start (Ray, actors, first model load) is reported apart;
2. the time Ray adds per profile: a round trip to an idle actor; the transfer of a profile from an actor (a
   tiny one and a study-size one: 1000 prompts of PixArt-alpha's 28 layers x K/V/A x 19 step pairs); and end to
   end, the driver's wall time of ``RayExecutor.profile`` minus the same run timed inside the actor;
3. the controller's statistics on a study-size profile (prompt stability with its bootstrap, the fingerprint).

``--plan`` prints the study's nightly workload (seven models x 1,000 captions x the default run, two step
counts and two other schedulers, one prompt per call as the study ran them) as wall time on 1, 8 and 64
H200-class GPUs, from per-step times (measured for PixArt-alpha by ``benchmarks.capture --device cuda``, the
others scaled by their transformer FLOPs per step unless ``--step-times`` gives a ``benchmarks.real_scale``
JSON) and each model's memory from ``python -m pytest_ditredundancy plan``. Writes JSON (default
``benchmarks/out/ray_overhead.json``); the tables are in docs/ray.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "out" / "ray_overhead.json"
MODEL = "tiny-pixart-alpha"
#: the study's seven models and their runs (paper protocol): steps, and the per-step time of PixArt-alpha at
#: 1024 px, one prompt (two CFG rows), float16 on an H200: 38 to 52 ms (benchmarks/RESULTS.md, CUDA section)
STUDY = ("flux-dev", "pixart-alpha", "sd3-medium", "cogvideox-5b", "latte-1", "mochi-1", "open-sora-1.2")
PIXART_STEP_S = 0.045
CAPTIONS = 1000
#: one default run, steps x 0.5 and x 2 (the step-count suite), two other schedulers (the scheduler suite)
RUN_FACTOR = 1 + 0.5 + 2 + 2
#: a model's load on a node: fixed cost plus its weights read at this rate (local NVMe or a warm HF cache)
LOAD_FIXED_S, LOAD_BYTES_PER_S = 20.0, 2e9
GPU_COUNTS = (1, 8, 64)


# -- measured ------------------------------------------------------------------------------------------------------
def timed_profile(pipe: Any, request: Any) -> tuple[float, Any]:
    """Runs on an actor (``RayExecutor.call``): a profile and the seconds it took there."""
    from pytest_ditredundancy.profiling.runner import run_profile

    started = time.perf_counter()
    profile = run_profile(pipe, request)
    return time.perf_counter() - started, profile


def synthetic_profile(prompts: int, layers: int = 28, kinds: int = 3, pairs: int = 19) -> Any:
    from pytest_ditredundancy.capture.metrics import METRICS
    from pytest_ditredundancy.capture.profile import ProfileMetadata, RedundancyProfile

    rng = np.random.default_rng(0)
    shape = (prompts, 1, kinds, layers, pairs)
    values = {m: rng.random(shape, dtype=np.float32) for m in METRICS}
    return RedundancyProfile([f"transformer_blocks.{i}.attn1" for i in range(layers)], ["k", "v", "a"][:kinds],
                             ["batch"], values, np.ones(shape, dtype=bool),
                             ProfileMetadata(model="synthetic", steps=pairs + 1, timesteps=list(range(pairs + 1)),
                                             prompts=[f"prompt {i}" for i in range(prompts)]))


def _made_remotely(prompts: int) -> tuple[float, Any]:
    started = time.perf_counter()
    profile = synthetic_profile(prompts)
    return time.perf_counter() - started, profile


def measure(quick: bool) -> dict[str, Any]:
    import ray
    import torch

    from pytest_ditredundancy.profiling.executors import ExecutorSettings, LocalExecutor
    from pytest_ditredundancy.profiling.ray_executor import RayExecutor
    from pytest_ditredundancy.profiling.settings import resolve_run
    from pytest_ditredundancy.zoo.loading import load_model, resolve_spec

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    count, prompts, steps = (4, 4, 10) if quick else (12, 8, 20)
    spec = resolve_spec(MODEL)
    requests = [resolve_run(spec, num_prompts=prompts, steps=steps, seed=seed) for seed in range(count)]
    out: dict[str, Any] = {"workload": {"model": MODEL, "profiles": count, "prompts": prompts, "steps": steps},
                           "cores": cores}

    pipe = load_model(spec, device="cpu")
    local = LocalExecutor(ExecutorSettings(device="cpu"), lambda _: pipe)
    local.profile(requests[0])  # warm
    default_threads = torch.get_num_threads()
    for threads in dict.fromkeys((default_threads, 1)):  # torch's default, and one thread like each actor
        torch.set_num_threads(threads)
        started = time.perf_counter()
        for request in requests:
            local.profile(request)
        local_s = time.perf_counter() - started
        out[f"local_{threads}"] = {"seconds": local_s, "per_minute": 60 * count / local_s, "torch_threads": threads}
    torch.set_num_threads(default_threads)
    out["local"] = out[f"local_{default_threads}"]

    started = time.perf_counter()
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    pool = RayExecutor(ExecutorSettings(device="cpu", actors=cores), load=None)
    try:
        warm = resolve_run(spec, num_prompts=cores, steps=2, batch_size=1, seed=99)
        pool.profile(warm)  # every actor loads the model
        start_s = time.perf_counter() - started
        started = time.perf_counter()
        pool.prepare(requests)
        for request in requests:
            pool.profile(request)
        ray_s = time.perf_counter() - started
        out["ray"] = {"seconds": ray_s, "per_minute": 60 * count / ray_s, "actors": cores, "start_seconds": start_s}
        out["overhead"] = _overhead(ray, pool, spec, quick)
    finally:
        pool.close()
        ray.shutdown()
    out["statistics"] = _statistics(quick)
    return out


def _overhead(ray: Any, pool: Any, spec: Any, quick: bool) -> dict[str, Any]:
    from pytest_ditredundancy.profiling.settings import resolve_run

    worker = pool._workers[0].handle
    trips = []
    for _ in range(10 if quick else 50):
        started = time.perf_counter()
        ray.get(worker.where.remote())
        trips.append(time.perf_counter() - started)
    make = ray.remote(num_cpus=0)(_made_remotely)
    transfer = {}
    for prompts in (8, CAPTIONS):
        samples = []
        for _ in range(2 if quick else 5):
            started = time.perf_counter()
            inside, profile = ray.get(make.remote(prompts))
            samples.append(time.perf_counter() - started - inside)
        transfer[str(prompts)] = {"seconds": statistics.median(samples),
                                  "bytes": sum(v.nbytes for v in profile.values.values()) + profile.computed.nbytes}
    added = []
    for seed in range(5 if quick else 25):  # small runs: the difference is Ray's, not the machine's noise
        fresh = resolve_run(spec, num_prompts=1, steps=2, seed=1000 + seed)  # a profile the pool has not computed
        started = time.perf_counter()
        pool.profile(fresh)
        wall = time.perf_counter() - started
        inside, _ = pool.call(spec, timed_profile, fresh)  # the same run, timed inside an actor
        added.append(wall - inside)
    return {"round_trip_s": statistics.median(trips), "transfer": transfer,
            "added_per_profile_s": statistics.median(added), "added_samples_s": added}


def _statistics(quick: bool) -> dict[str, Any]:
    from pytest_ditredundancy.judging.statistics import prompt_stability, signature

    profile = synthetic_profile(CAPTIONS)
    timings = {}
    for name, work in (("prompt_stability", lambda: prompt_stability(profile)), ("signature", lambda: signature(profile))):
        samples = []
        for _ in range(1 if quick else 3):
            started = time.perf_counter()
            work()
            samples.append(time.perf_counter() - started)
        timings[name] = min(samples)
    return {"prompts": CAPTIONS, "seconds": timings}


# -- on paper -------------------------------------------------------------------------------------------------------
def study_runs() -> list[dict[str, Any]]:
    """Each study model as the paper protocol runs it, with its capture plan (memory) and FLOPs per step."""
    from pytest_ditredundancy.profiling.capture_plan import plan_capture
    from pytest_ditredundancy.profiling.protocol_registry import get_protocol
    from pytest_ditredundancy.zoo.registry import get_spec

    paper = get_protocol("paper")
    runs = []
    for name in STUDY:
        spec = paper.spec(get_spec(name))
        plan = plan_capture(name, height=spec.height, width=spec.width, num_frames=spec.num_frames)
        rows = max(s.rows * s.calls for s in plan.sites)
        tokens = plan.image_tokens + plan.text_tokens
        runs.append({"model": name, "steps": spec.steps, "tokens": tokens, "rows": rows,
                     "parameters": plan.parameters, "weight_bytes": plan.weight_bytes,
                     "peak_bytes": plan.model_bytes + plan.peak_bytes("fast"),
                     "linear_flops": 2 * plan.parameters * tokens * rows,
                     "cells": len(plan.sites)})  # layers x kinds: values per prompt and step pair
    return runs


def plan_rows(runs: list[dict[str, Any]], step_times: dict[str, float] | None = None,
              statistics_s: float | None = None) -> dict[str, Any]:
    """Wall time of the nightly workload on 1, 8 and 64 GPUs, and what bounds it.

    A model's step takes ``step_times[model]`` (measured) or PixArt-alpha's measured step scaled by its linear
    layers' FLOPs (attention grows faster with long video token counts: a lower bound there). Work is split into
    parts of whole prompts over every GPU; each GPU loads each model it works on once (counted as every model: an
    upper bound). The controller judges each model's default profile one after another (``statistics_s`` per
    1,000-prompt profile, measured) and receives every profile (at 1 GB/s)."""
    pixart = next(r for r in runs if r["model"] == "pixart-alpha")
    rows = []
    for run in runs:
        measured = (step_times or {}).get(run["model"])
        step_s = measured if measured else PIXART_STEP_S * run["linear_flops"] / pixart["linear_flops"]
        source = "measured" if measured or run is pixart else "scaled"  # PixArt-alpha's is the capture benchmark's
        rows.append({**run, "step_s": step_s, "step_source": source,
                     "gpu_hours": CAPTIONS * RUN_FACTOR * run["steps"] * step_s / 3600,
                     "load_s": LOAD_FIXED_S + run["weight_bytes"] / LOAD_BYTES_PER_S,
                     "longest_prompt_s": 2 * run["steps"] * step_s,  # one prompt of the 2x step-count run
                     "result_bytes": CAPTIONS * run["cells"] * RUN_FACTOR * run["steps"] * 13})
    compute_s = sum(r["gpu_hours"] for r in rows) * 3600
    loads_s = sum(r["load_s"] for r in rows)
    floor_s = max(r["longest_prompt_s"] for r in rows)
    # prompt stability and the fingerprint judge each model's default profile; the variants' step curves are
    # means over prompts (cheap); every profile crosses the network to the controller once
    controller_s = (statistics_s or 0.0) * len(rows) + sum(r["result_bytes"] for r in rows) / 1e9
    walls = {gpus: {"hours": (max(compute_s / gpus + loads_s, floor_s) + controller_s) / 3600,
                    "compute_hours": compute_s / gpus / 3600, "load_hours": loads_s / 3600,
                    "controller_hours": controller_s / 3600} for gpus in GPU_COUNTS}
    return {"models": rows, "gpu_hours": compute_s / 3600, "wall": walls, "longest_prompt_s": floor_s,
            "controller_s": controller_s}


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, smaller profiles (a smoke run)")
    parser.add_argument("--plan", action="store_true", help="only the study's workload on paper (no Ray needed)")
    parser.add_argument("--step-times", type=Path, help="benchmarks.real_scale JSON with measured step times")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    step_times = None
    if args.step_times:
        data = json.loads(args.step_times.read_text(encoding="utf-8"))
        step_times = {m["model"]: m["captured_s_per_step"] for m in data.get("models", [])
                      if m.get("captured_s_per_step")}
    report: dict[str, Any] = {"machine": {"platform": platform.platform(), "python": platform.python_version()}}
    statistics_s = None
    if not args.plan:
        report["measured"] = m = measure(args.quick)
        statistics_s = sum(m["statistics"]["seconds"].values())
        print(_table([["measure", "value"],
                      *[[f"local executor, {m[k]['torch_threads']} torch thread(s)",
                         f"{m[k]['per_minute']:.1f} profiles/min ({m[k]['seconds']:.1f} s for {m['workload']['profiles']})"]
                        for k in m if k.startswith("local_")],
                      ["ray executor", f"{m['ray']['per_minute']:.1f} profiles/min ({m['ray']['actors']} CPU actors, "
                                       f"{m['ray']['seconds']:.1f} s)"],
                      ["ray pool start (Ray, actors, model load)", f"{m['ray']['start_seconds']:.1f} s"],
                      ["round trip to an idle actor", f"{1000 * m['overhead']['round_trip_s']:.2f} ms"],
                      *[[f"transfer of a {p}-prompt profile ({t['bytes'] / 1e6:.2f} MB)", f"{1000 * t['seconds']:.1f} ms"]
                        for p, t in m["overhead"]["transfer"].items()],
                      ["added per profile (driver wall - time in the actor; median, 1-prompt runs)",
                       f"{1000 * m['overhead']['added_per_profile_s']:.1f} ms"],
                      *[[f"controller: {k} of a {CAPTIONS}-prompt profile", f"{v:.2f} s"]
                        for k, v in m["statistics"]["seconds"].items()]]))
    plan = report["plan"] = plan_rows(study_runs(), step_times, statistics_s)
    print(_table([["model", "steps", "tokens x rows", "step (s)", "GPU-hours", "load (s)", "peak GiB"],
                  *[[r["model"], str(r["steps"]), f"{r['tokens']} x {r['rows']}",
                     f"{r['step_s']:.3f} ({r['step_source']})", f"{r['gpu_hours']:.1f}", f"{r['load_s']:.0f}",
                     f"{r['peak_bytes'] / 2**30:.1f}"] for r in plan["models"]]]))
    print(_table([["GPUs", "wall (h)", "compute (h)", "model loads (h)", "controller (h)"],
                  *[[str(g), f"{w['hours']:.2f}", f"{w['compute_hours']:.2f}", f"{w['load_hours']:.2f}",
                     f"{w['controller_hours']:.3f}"] for g, w in plan["wall"].items()]]))
    print(f"longest single prompt run: {plan['longest_prompt_s']:.0f} s; GPU-hours in all: {plan['gpu_hours']:.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
