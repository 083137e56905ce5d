"""Detection power of the suites: which real changes each one catches, and which benign ones it never flags.

``python -m benchmarks.gate_power [--model tiny-pixart-alpha] [--prompt-set NAME] [--quick]``

Takes a model, records in-memory baselines from its profiles (default step count, one other step count, one
other scheduler), then re-profiles graded, realistic changes — one layer's ``to_k`` scaled by 1.001…1.2,
relative weight noise 1e-4…1e-2, a zeroed attention output projection, a bf16 round trip, another scheduler
class or config shipped in the checkpoint, another guidance scale — and benign ones (thread count, batch
size, prompt order, a save/load round trip, a fresh process). Each is judged by the same verdict functions
the suites use (:mod:`pytest_ditredundancy.judging.verdicts`) at both tolerance levels. Prints a table and writes
JSON (default ``benchmarks/out/gate_power.json``): per change and suite, detected or not and the largest
excess over tolerance (1.0 = on the edge); per suite and level, the smallest change detected in each graded
family and the false alarms.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pytest_ditredundancy import load_model, profile_model
from pytest_ditredundancy.judging import statistics as stats
from pytest_ditredundancy.judging import verdicts
from pytest_ditredundancy.judging.baselines import _rounded
from pytest_ditredundancy.io import plain
from pytest_ditredundancy.profiling.prompts import PROMPT_SETS, named_prompts, select_prompts
from pytest_ditredundancy.capture.profile import RedundancyProfile
from pytest_ditredundancy.plugin.merge import merge_profiles
from pytest_ditredundancy.profiling.schedulers import comparable_scheduler, compatible_schedulers
from pytest_ditredundancy.judging.tolerances import LEVELS, resolve
from pytest_ditredundancy.zoo import get_spec

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "out" / "gate_power.json"
SUITES = ("baseline_regression", "prompt_stability", "step_stability", "scheduler_stability")


@dataclass
class Change:
    """One change to the checkpoint or the run. ``apply`` edits a fresh pipeline in place; ``run`` overrides
    profile arguments; ``benign`` changes must never be flagged."""

    family: str
    label: str
    magnitude: float | None
    apply: Callable[[Any], Any] | None = None
    run: dict[str, Any] = field(default_factory=dict)
    benign: bool = False
    subprocess: bool = False


def _attention_layer(pipe: Any) -> torch.nn.Module:
    """The middle transformer block's first attention module (the layer the graded changes touch)."""
    blocks = getattr(pipe.transformer, "transformer_blocks")
    block = blocks[len(blocks) // 2]
    return getattr(block, "attn1", None) or getattr(block, "attn")


def scale_to_k(factor: float) -> Callable[[Any], None]:
    def apply(pipe: Any) -> None:
        with torch.no_grad():
            _attention_layer(pipe).to_k.weight.mul_(factor)
    return apply


def weight_noise(relative: float, seed: int = 1) -> Callable[[Any], None]:
    def apply(pipe: Any) -> None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in pipe.transformer.parameters():
                p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * p.abs().mean() * relative)
    return apply


def zero_output_projection(pipe: Any) -> None:
    with torch.no_grad():
        _attention_layer(pipe).to_out[0].weight.zero_()


def bf16_round_trip(pipe: Any) -> None:
    with torch.no_grad():
        for p in pipe.transformer.parameters():
            p.copy_(p.to(torch.bfloat16).to(p.dtype))


def ship_scheduler_class(pipe: Any) -> None:
    from diffusers import EulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

    other = FlowMatchHeunDiscreteScheduler if "FlowMatch" in type(pipe.scheduler).__name__ else EulerDiscreteScheduler
    pipe.scheduler = other.from_config(pipe.scheduler.config)


def ship_scheduler_config(pipe: Any) -> None:
    config = dict(pipe.scheduler.config)
    if "shift" in config:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, shift=float(config["shift"]) * 1.5)
    else:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, beta_end=config["beta_end"] * 1.1)


def changes(spec: Any, quick: bool) -> list[Change]:
    scales = (1.003, 1.03, 1.2) if quick else (1.001, 1.003, 1.01, 1.03, 1.1, 1.2)
    noises = (1e-3, 1e-2) if quick else (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
    out = [Change("to_k scale", f"to_k x{f:g}", f - 1.0, scale_to_k(f)) for f in scales]
    out += [Change("weight noise", f"noise {n:g}", n, weight_noise(n)) for n in noises]
    out += [Change("zeroed projection", "to_out zeroed", 1.0, zero_output_projection),
            Change("bf16 round trip", "bf16 round trip", None, bf16_round_trip),
            Change("scheduler class", "scheduler class shipped", None, ship_scheduler_class),
            Change("scheduler config", "scheduler config shipped", None, ship_scheduler_config)]
    if spec.guidance_scale:
        for delta in ((-0.5,) if quick else (-0.1, -0.5, -1.0)):
            g = spec.guidance_scale + delta
            out.append(Change("guidance", f"guidance {g:g}", abs(delta), run={"guidance_scale": g}))
    out += [Change("benign", "2 threads", None, run={"threads": 2}, benign=True),
            Change("benign", "batch size 1", None, run={"batch_size": 1}, benign=True),
            Change("benign", "prompt halves run in reverse order", None, run={"reverse": True}, benign=True),
            Change("benign", "save/load round trip", None, run={"round_trip": True}, benign=True),
            Change("benign", "fresh process (as under -n 2)", None, benign=True, subprocess=True)]
    return out


@dataclass
class Profiles:
    default: RedundancyProfile
    steps: RedundancyProfile
    scheduler: RedundancyProfile


def _in_subprocess(model: str, prompts: list[str], kwargs: dict[str, Any]) -> RedundancyProfile:
    """The profile computed by a fresh interpreter (another worker process, as pytest-xdist starts)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "profile.json"
        code = ("import json, sys, torch; torch.set_num_threads(1)\n"
                "from pytest_ditredundancy import profile_model\n"
                "a = json.loads(sys.argv[1])\n"
                "profile_model(a['model'], device='cpu', prompts=a['prompts'], **a['kwargs']).save(a['out'])\n")
        args = json.dumps({"model": model, "prompts": prompts, "kwargs": kwargs, "out": str(out)})
        subprocess.run([sys.executable, "-c", code, args], check=True, capture_output=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
        return RedundancyProfile.load(out)


def profiles_of(model: str, change: Change | None, prompts: list[str], steps: int, other_steps: int,
                scheduler: str, other_scheduler: str) -> Profiles:
    run = dict(change.run) if change else {}
    threads = run.pop("threads", 1)
    batch_size = run.pop("batch_size", len(prompts))
    reverse = run.pop("reverse", False)
    pipe = load_model(model, device="cpu")
    if change is not None and change.apply is not None:
        change.apply(pipe)
    if run.pop("round_trip", False):
        with tempfile.TemporaryDirectory() as tmp:
            pipe.save_pretrained(tmp)
            pipe = load_model(tmp, device="cpu")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        def one(n: int, name: str) -> RedundancyProfile:
            kwargs = dict(steps=n, scheduler=name, seed=0, batch_size=batch_size, **run)
            if change is not None and change.subprocess:
                return _in_subprocess(model, prompts, kwargs)
            if not reverse:
                return profile_model(pipe, prompts=prompts, **kwargs)
            # the second half of the prompts first, each prompt keeping its own seed (prompt_offset)
            half = len(prompts) // 2
            late = profile_model(pipe, prompts=prompts[half:], prompt_offset=half, **kwargs)
            early = profile_model(pipe, prompts=prompts[:half], **kwargs)
            return merge_profiles([(0, half, early), (half, len(prompts), late)], len(prompts), model)
        return Profiles(one(steps, scheduler), one(other_steps, scheduler), one(steps, other_scheduler))
    finally:
        torch.set_num_threads(previous)


def _shape_values(reference: RedundancyProfile, other: RedundancyProfile, label: str) -> dict[str, float]:
    out = {}
    for kind in reference.kinds:
        a, ta = stats.step_curves(reference, kind)
        b, tb = stats.step_curves(other, kind)
        out[f"{label}/{kind}"] = stats.compare_shapes(a, ta, b, tb).correlation
    return out


@dataclass
class Baseline:
    mean: np.ndarray
    spread: np.ndarray
    prompt: dict[str, Any]
    steps: dict[str, Any]
    scheduler: dict[str, Any]
    checkpoint_scheduler: Any


def record(p: Profiles, labels: tuple[str, str]) -> Baseline:
    prof = p.default
    b = prof.branches.index(prof.default_branch)
    data = np.where(prof.computed, prof.values["abs_l1"], np.nan)[:, b].astype(np.float64)
    return Baseline(prof.mean_over_prompts("abs_l1")[b], np.nanstd(data, axis=0),
                    plain(verdicts.prompt_section(stats.prompt_stability(prof)), _rounded),
                    plain(verdicts.shape_section(_shape_values(prof, p.steps, labels[0])), _rounded),
                    plain(verdicts.shape_section(_shape_values(prof, p.scheduler, labels[1])), _rounded),
                    comparable_scheduler(prof.metadata.extra.get("checkpoint_scheduler")))


def judge(base: Baseline, p: Profiles, labels: tuple[str, str], level: str) -> dict[str, dict[str, Any]]:
    """Per suite: detected (a regression finding failed) and the largest excess over its tolerance."""
    tol = resolve(None, level, "cpu")
    prof = p.default
    b = prof.branches.index(prof.default_branch)
    mean = prof.mean_over_prompts("abs_l1")[b]
    finding, _ = verdicts.judge_cells(mean, prof.kinds, prof.layers, base.mean, base.spread, tol)
    scheduler_changed = comparable_scheduler(prof.metadata.extra.get("checkpoint_scheduler")) != base.checkpoint_scheduler
    out = {"baseline_regression": {
        "detected": (not finding.passed) or scheduler_changed, "checkpoint_scheduler_changed": scheduler_changed,
        "excess": verdicts.max_excess(mean, base.mean, base.spread, tol)}}

    def excess_of(findings: list[verdicts.Finding], half: Callable[[float], float]) -> float:
        worst = 0.0
        for f in findings:
            if f.question == "regression" and f.value is not None and "baseline" in f.details:
                was = f.details["baseline"]
                worst = max(worst, abs(f.value - was) / max(half(was), 1e-300))
        return worst

    prompt = verdicts.judge_prompt_stability(stats.prompt_stability(prof), base.prompt, tol, (0.0, 1e9))
    out["prompt_stability"] = {"detected": any(not f.passed for f in prompt if f.question == "regression"),
                               "excess": excess_of(prompt, lambda v: tol.statistic_bounds(v)[1] - v)}
    for suite, other, stored, label in (("step_stability", p.steps, base.steps, labels[0]),
                                         ("scheduler_stability", p.scheduler, base.scheduler, labels[1])):
        found = verdicts.judge_shapes(suite, _shape_values(prof, other, label), stored, tol, -1.0, unsupported={},
                                      requested=set())
        out[suite] = {"detected": any(not f.passed for f in found if f.question == "regression"),
                      "excess": excess_of(found, lambda v: tol.correlation)}
    return out


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for level in LEVELS:
        for suite in SUITES:
            smallest: dict[str, Any] = {}
            for row in rows:
                if row["benign"] or row["magnitude"] is None:
                    continue
                if row["verdicts"][level][suite]["detected"]:
                    known = smallest.get(row["family"])
                    if known is None or row["magnitude"] < known["magnitude"]:
                        smallest[row["family"]] = {"label": row["label"], "magnitude": row["magnitude"]}
            caught = [r["label"] for r in rows if r["magnitude"] is None and not r["benign"]
                      and r["verdicts"][level][suite]["detected"]]
            false_alarms = [r["label"] for r in rows if r["benign"] and r["verdicts"][level][suite]["detected"]]
            summary.setdefault(level, {})[suite] = {"smallest_detected": smallest, "caught": caught,
                                                   "false_alarms": false_alarms}
    return summary


def _fmt_cell(verdict: dict[str, Any]) -> str:
    excess = verdict["excess"]
    shown = "inf" if not np.isfinite(excess) else (f"{excess:.2g}" if excess < 100 else f"{excess:.0f}")
    return f"{'FAIL' if verdict['detected'] else 'pass'} {shown}"


def print_table(rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    short = {"baseline_regression": "regression", "prompt_stability": "prompt CV", "step_stability": "steps",
             "scheduler_stability": "scheduler"}
    header = ["change"] + [f"{short[s]} ({level})" for level in LEVELS for s in SUITES]
    table = [header] + [[r["label"]] + [_fmt_cell(r["verdicts"][level][s]) for level in LEVELS for s in SUITES]
                        for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    print("\n(cell: verdict, then the largest |change| / tolerance; 1.0 is the edge)")
    for level in LEVELS:
        for suite in SUITES:
            s = summary[level][suite]
            found = ", ".join(f"{fam}: {v['label']}" for fam, v in s["smallest_detected"].items()) or "none"
            print(f"{level:8s} {short[suite]:10s} smallest detected: {found}; also caught: "
                  f"{', '.join(s['caught']) or 'none'}; false alarms: {len(s['false_alarms'])}"
                  f"{' (' + ', '.join(s['false_alarms']) + ')' if s['false_alarms'] else ''}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gate_power", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-pixart-alpha", help="registered model name (default %(default)s)")
    parser.add_argument("--prompts", type=int, default=6, help="prompts per profile (default %(default)s)")
    parser.add_argument("--prompt-set", default=None, choices=sorted(PROMPT_SETS),
                        help="named prompt set (default: 'shapes' for the trained models, which know no other "
                             "text; the benchmark's own captions otherwise)")
    parser.add_argument("--quick", action="store_true", help="fewer graded steps (a smoke run)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output (default %(default)s)")
    args = parser.parse_args(argv)
    if args.prompts < 3:
        parser.error("--prompts must be at least 3 (the prompt-stability interval needs three)")
    torch.set_num_threads(1)
    spec = get_spec(args.model)
    from benchmarks.model import PROMPTS

    prompt_set = args.prompt_set or ("shapes" if spec.trained else None)
    if prompt_set is None:
        prompts = (PROMPTS * 2)[:args.prompts]
    else:
        prompts = select_prompts(named_prompts(prompt_set), args.prompts, f"the prompt set {prompt_set!r}")
    print(f"{args.model}: {len(prompts)} prompts from {prompt_set or 'the benchmark captions'}", file=sys.stderr)
    others = [s for s in compatible_schedulers(spec.prediction) if s != spec.scheduler]
    steps, other_steps = spec.steps, spec.steps * 2
    labels = (f"steps{other_steps}", others[0])
    started = time.perf_counter()
    reference = profiles_of(args.model, None, prompts, steps, other_steps, spec.scheduler, others[0])
    base = record(reference, labels)
    rows = []
    for change in changes(spec, args.quick):
        p = profiles_of(args.model, change, prompts, steps, other_steps, spec.scheduler, others[0])
        rows.append({"family": change.family, "label": change.label, "magnitude": change.magnitude,
                     "benign": change.benign, "verdicts": {level: judge(base, p, labels, level) for level in LEVELS}})
        print(f"  measured {change.label}", file=sys.stderr, flush=True)
    summary = summarize(rows)
    print_table(rows, summary)
    report = {"model": args.model, "prompts": len(prompts), "prompt_set": prompt_set, "steps": steps,
              "other_steps": other_steps, "other_scheduler": others[0], "seconds": time.perf_counter() - started,
              "rows": rows, "summary": summary,
              "tolerances": {level: resolve(None, level, "cpu").__dict__ for level in LEVELS},
              "torch": torch.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(plain(report, lambda v: None if isinstance(v, float) and not np.isfinite(v) else v),
                                   indent=1) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
