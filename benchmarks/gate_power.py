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

The scheduler variant is the first of the model's compatible schedulers its pipeline accepts (FLUX, for one,
rejects Heun and DPM-Solver, which cannot take the custom sigmas it passes); the ones it rejects are listed
with the reason, and a change the pipeline cannot run is a skipped row, never a crash. The save/load round trip
profiles the reloaded directory as the model (``profile_model(..., as_model=)``), with its settings.

Bad input (an unknown model, a hub model that cannot be downloaded, too many or too few prompts, an output path
that cannot be written) is refused before the first profile, with exit status 4 and nothing written.
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
from pytest_ditredundancy.judging import shapes
from pytest_ditredundancy.judging import statistics as stats
from pytest_ditredundancy.judging import verdicts
from pytest_ditredundancy.judging.baselines import _rounded
from pytest_ditredundancy.io import plain
from pytest_ditredundancy.profiling.prompts import PROMPT_SETS, named_prompts, select_prompts
from pytest_ditredundancy.capture.profile import RedundancyProfile
from pytest_ditredundancy.plugin.merge import merge_profiles
from pytest_ditredundancy.profiling.schedulers import comparable_scheduler, compatible_schedulers, scheduler_rejection
from pytest_ditredundancy.judging.tolerances import LEVELS, resolve
from pytest_ditredundancy.zoo import ModelSpec, UnknownModelError, get_spec, registered_models
from pytest_ditredundancy.zoo.loading import hub_problem

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "out" / "gate_power.json"
SUITES = ("baseline_regression", "prompt_stability", "step_stability", "scheduler_stability")
#: exit status of a usage error (as pytest's)
USAGE_ERROR = 4


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
    scheduler: RedundancyProfile | None  # None: the pipeline runs no other scheduler (the suite is skipped)


def _in_subprocess(model: str, prompts: list[str], kwargs: dict[str, Any]) -> RedundancyProfile:
    """The profile computed by a fresh interpreter (another worker process, as pytest-xdist starts)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "profile.json"
        code = ("import json, sys, torch; torch.set_num_threads(1)\n"
                "from pytest_ditredundancy import profile_model\n"
                "a = json.loads(sys.argv[1])\n"
                "profile_model(a['model'], device='cpu', prompts=a['prompts'], **a['kwargs']).save(a['out'])\n")
        args = json.dumps({"model": model, "prompts": prompts, "kwargs": kwargs, "out": str(out)})
        done = subprocess.run([sys.executable, "-c", code, args], check=False, capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if done.returncode != 0:
            raise RuntimeError(f"the fresh process exited with status {done.returncode}:\n{done.stderr[-3000:]}")
        return RedundancyProfile.load(out)


def profiles_of(model: str, change: Change | None, prompts: list[str], steps: int, other_steps: int,
                scheduler: str, other_scheduler: str | None) -> Profiles:
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
        run["as_model"] = model  # the reloaded copy runs with the model's settings (e.g. max_sequence_length)
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
        return Profiles(one(steps, scheduler), one(other_steps, scheduler),
                        one(steps, other_scheduler) if other_scheduler else None)
    finally:
        torch.set_num_threads(previous)


def scheduler_variant(model: str, spec: ModelSpec, prompt: str) -> tuple[str | None, dict[str, str]]:
    """The first compatible scheduler other than the model's own that its pipeline runs (one prompt, the model's
    step count), and the reason of each one it rejects (FLUX: Heun and DPM-Solver cannot take its custom sigmas).
    ``None`` when it runs none: the scheduler suite is then skipped, with the reasons."""
    pipe = load_model(model, device="cpu")
    rejected: dict[str, str] = {}
    for name in compatible_schedulers(spec.prediction):
        if name == spec.scheduler:
            continue
        try:
            profile_model(pipe, prompts=[prompt], steps=spec.steps, scheduler=name, seed=0)
        except ValueError as exc:
            reason = scheduler_rejection(exc)
            if reason is None:
                raise
            rejected[name] = reason
            continue
        return name, rejected
    return None, rejected


def _shape_values(reference: RedundancyProfile, other: RedundancyProfile, label: str) -> dict[str, float]:
    out = {}
    for kind in reference.kinds:
        a, ta = shapes.step_curves(reference, kind)
        b, tb = shapes.step_curves(other, kind)
        out[f"{label}/{kind}"] = shapes.compare_shapes(a, ta, b, tb).correlation
    return out


@dataclass
class Baseline:
    mean: np.ndarray
    spread: np.ndarray
    prompt: dict[str, Any]
    steps: dict[str, Any]
    scheduler: dict[str, Any] | None
    checkpoint_scheduler: Any


def record(p: Profiles, labels: tuple[str, str | None]) -> Baseline:
    prof = p.default
    b = prof.branches.index(prof.default_branch)
    data = np.where(prof.computed, prof.values["abs_l1"], np.nan)[:, b].astype(np.float64)
    scheduler = None if p.scheduler is None else \
        plain(verdicts.shape_section(_shape_values(prof, p.scheduler, labels[1])), _rounded)
    return Baseline(prof.mean_over_prompts("abs_l1")[b], np.nanstd(data, axis=0),
                    plain(verdicts.prompt_section(stats.prompt_stability(prof)), _rounded),
                    plain(verdicts.shape_section(_shape_values(prof, p.steps, labels[0])), _rounded), scheduler,
                    comparable_scheduler(prof.metadata.extra.get("checkpoint_scheduler")))


def judge(base: Baseline, p: Profiles, labels: tuple[str, str | None], level: str) -> dict[str, dict[str, Any]]:
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
        if other is None or stored is None or label is None:
            out[suite] = {"detected": False, "excess": float("nan"), "skipped": True}
            continue
        found = verdicts.judge_shapes(suite, _shape_values(prof, other, label), stored, tol, -1.0, unsupported={},
                                      requested=set())
        out[suite] = {"detected": any(not f.passed for f in found if f.question == "regression"),
                      "excess": excess_of(found, lambda v: tol.correlation)}
    return out


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    measured = [r for r in rows if not r.get("skipped")]
    for level in LEVELS:
        for suite in SUITES:
            smallest: dict[str, Any] = {}
            for row in measured:
                if row["benign"] or row["magnitude"] is None:
                    continue
                if row["verdicts"][level][suite]["detected"]:
                    known = smallest.get(row["family"])
                    if known is None or row["magnitude"] < known["magnitude"]:
                        smallest[row["family"]] = {"label": row["label"], "magnitude": row["magnitude"]}
            caught = [r["label"] for r in measured if r["magnitude"] is None and not r["benign"]
                      and r["verdicts"][level][suite]["detected"]]
            false_alarms = [r["label"] for r in measured if r["benign"] and r["verdicts"][level][suite]["detected"]]
            summary.setdefault(level, {})[suite] = {
                "smallest_detected": smallest, "caught": caught, "false_alarms": false_alarms,
                "skipped": any(r["verdicts"][level][suite].get("skipped") for r in measured)}
    return summary


def _fmt_cell(verdict: dict[str, Any]) -> str:
    if verdict.get("skipped"):
        return "skip"
    excess = verdict["excess"]
    shown = "inf" if not np.isfinite(excess) else (f"{excess:.2g}" if excess < 100 else f"{excess:.0f}")
    return f"{'FAIL' if verdict['detected'] else 'pass'} {shown}"


def print_table(rows: list[dict[str, Any]], summary: dict[str, Any], skipped: dict[str, str]) -> None:
    """The table; ``skipped``: what was not measured (a scheduler the pipeline rejects, a change it cannot run)
    and why."""
    short = {"baseline_regression": "regression", "prompt_stability": "prompt CV", "step_stability": "steps",
             "scheduler_stability": "scheduler"}
    header = ["change"] + [f"{short[s]} ({level})" for level in LEVELS for s in SUITES]
    table = [header] + [[r["label"]] + [_fmt_cell(r["verdicts"][level][s]) if not r.get("skipped") else "skip"
                                        for level in LEVELS for s in SUITES] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    print("\n(cell: verdict, then the largest |change| / tolerance; 1.0 is the edge; skip: not measured)")
    for what, reason in skipped.items():
        print(f"skipped {what}: {reason}")
    for level in LEVELS:
        for suite in SUITES:
            s = summary[level][suite]
            found = ", ".join(f"{fam}: {v['label']}" for fam, v in s["smallest_detected"].items()) or "none"
            print(f"{level:8s} {short[suite]:10s} smallest detected: {found}; also caught: "
                  f"{', '.join(s['caught']) or 'none'}; false alarms: {len(s['false_alarms'])}"
                  f"{' (' + ', '.join(s['false_alarms']) + ')' if s['false_alarms'] else ''}"
                  f"{' (skipped)' if s['skipped'] else ''}")


class _Parser(argparse.ArgumentParser):
    """Usage errors exit with status 4 (as pytest's), before any work."""

    def error(self, message: str) -> Any:
        self.print_usage(sys.stderr)
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message}\n")


def output_problem(path: Path) -> str | None:
    """Why the JSON cannot be written to ``path``, or None: tried before the run (missing folders created, a
    temporary file opened beside it), so the results are never lost to a path found bad at the end. Folders it
    created are removed again when the path fails."""
    path = path.expanduser()
    if path.is_dir():
        return f"--out {path} is a directory; name a file in it, e.g. --out {path / 'gate_power.json'}"
    ancestors = [path.parent, *path.parent.parents]
    blocker = next((p for p in ancestors if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        return f"--out {path}: {blocker} is a file, not a directory"
    created = [p for p in ancestors if not p.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"):
            pass
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(f"{path} is not writable")
    except OSError as exc:
        for folder in created:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break
        return f"--out {path} cannot be written: {exc}"
    return None


def checked_model(name: str) -> str | None:
    """Why the benchmark cannot run ``name``, or None: registered, a diffusers pipeline, loadable here."""
    try:
        spec = get_spec(name)
    except UnknownModelError as exc:
        return str(exc).split(" Registered models:")[0] + \
            f" Registered models: {', '.join(sorted(registered_models()))}."
    if spec.family == "open-sora":
        return (f"{name} samples with its own loop (an adapter, not a diffusers pipeline): the benchmark swaps "
                "schedulers and reloads saved copies, which needs a diffusers pipeline")
    problem = hub_problem(spec)
    if problem is not None:
        twin = f"tiny-{name}"
        hint = f"; offline, measure its random-weight twin: --model {twin}" if twin in registered_models() else ""
        return f"{name} cannot be loaded: {problem}{hint}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m benchmarks.gate_power", description=__doc__.split("\n\n")[0])
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
    problem = checked_model(args.model)
    if problem is not None:
        parser.error(f"--model: {problem}")
    spec = get_spec(args.model)
    from benchmarks.model import PROMPTS

    prompt_set = args.prompt_set or ("shapes" if spec.trained else None)
    try:
        if prompt_set is None:
            prompts = select_prompts(PROMPTS * 2, args.prompts, "the benchmark captions")
        else:
            prompts = select_prompts(named_prompts(prompt_set), args.prompts, f"the prompt set {prompt_set!r}")
    except ValueError as exc:
        parser.error(f"--prompts: {exc}")
    problem = output_problem(args.out)
    if problem is not None:
        parser.error(problem)
    torch.set_num_threads(1)
    print(f"{args.model}: {len(prompts)} prompts from {prompt_set or 'the benchmark captions'}", file=sys.stderr)
    started = time.perf_counter()
    other, rejected = scheduler_variant(args.model, spec, prompts[0])
    skipped = {f"scheduler variant {name}": reason for name, reason in rejected.items()}
    if other is None:
        skipped["scheduler suite"] = f"{spec.pipeline_class} runs none of {', '.join(rejected)}"
    for what, reason in skipped.items():
        print(f"  skipped {what}: {reason}", file=sys.stderr)
    steps, other_steps = spec.steps, spec.steps * 2
    labels = (f"steps{other_steps}", other)
    reference = profiles_of(args.model, None, prompts, steps, other_steps, spec.scheduler, other)
    base = record(reference, labels)
    rows = []
    for change in changes(spec, args.quick):
        row: dict[str, Any] = {"family": change.family, "label": change.label, "magnitude": change.magnitude,
                               "benign": change.benign}
        try:
            p = profiles_of(args.model, change, prompts, steps, other_steps, spec.scheduler, other)
        except ValueError as exc:
            reason = scheduler_rejection(exc)
            if reason is None:
                raise
            row.update(skipped=reason, verdicts=None)
            skipped[change.label] = reason
            print(f"  skipped {change.label}: {reason}", file=sys.stderr, flush=True)
        else:
            row["verdicts"] = {level: judge(base, p, labels, level) for level in LEVELS}
            print(f"  measured {change.label}", file=sys.stderr, flush=True)
        rows.append(row)
    summary = summarize(rows)
    print_table(rows, summary, skipped)
    report = {"model": args.model, "prompts": len(prompts), "prompt_set": prompt_set, "steps": steps,
              "other_steps": other_steps, "other_scheduler": other, "skipped": skipped,
              "seconds": time.perf_counter() - started, "rows": rows, "summary": summary,
              "tolerances": {level: resolve(None, level, "cpu").__dict__ for level in LEVELS},
              "torch": torch.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(plain(report, lambda v: None if isinstance(v, float) and not np.isfinite(v) else v),
                                   indent=1) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
