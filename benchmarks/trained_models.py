"""Evidence and the paper's three experiments on the trained DiTs.

    python -m benchmarks.trained_models [--adherence-samples 120] [--prompts 16] [--figures docs]

Prints, and writes to benchmarks/out/trained_models.json:
  1. prompt adherence at each model's registered settings (shipped classifier, per attribute);
  2. CV across prompts per kind, the paper's formula and the robust one (``statistics.prompt_stability``);
  3. step-count stability (x0.5, x2) and scheduler stability: correlation of mean-normalised per-layer
     curves over normalised time (``statistics.compare_shapes``, as the suites compute it);
  4. distinctness between the families, and between trained-pixart and its fine-tuned checkpoint.
Experiments 2-4 also run on the random-weight twins (tiny-pixart-alpha, tiny-sd3-medium) for contrast.
With ``--figures DIR`` it also draws the sample grid and the loss curves the README shows.
Prompts are the dataset's captions (the models know no other text); prompt i uses seed i.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from pytest_ditredundancy import load_model, profile_model
from pytest_ditredundancy.judging import shapes
from pytest_ditredundancy.judging import statistics as stats
from pytest_ditredundancy.training.adherence import ATTRIBUTES
from pytest_ditredundancy.profiling.samples import adherence_of, evaluation_captions, generate, save_grid, save_loss_curves
from pytest_ditredundancy.zoo.trained import WEIGHTS

MODELS = ("trained-pixart", "trained-sd3", "trained-pixart-ft")
#: Random-weight twins of the same classes, run on the same captions: what the numbers were before training.
CONTRASTS = ("tiny-pixart-alpha", "tiny-sd3-medium")
SCHEDULERS = {"trained-pixart": ("euler", "ddim"), "trained-pixart-ft": ("euler", "ddim"),
              "trained-sd3": ("flow-heun", "flow-dpm-solver"), "tiny-pixart-alpha": ("euler", "ddim"),
              "tiny-sd3-medium": ("flow-heun", "flow-dpm-solver")}
KINDS = ("k", "v", "a")


def experiments(name: str, prompts: list[str]) -> dict:
    pipe = load_model(name, device="cpu")
    base = profile_model(pipe, prompts=prompts, batch_size=16)
    out = {"prompt_cv": {s.kind: {"paper": s.paper_cv, "robust": s.robust_cv, "ci": [s.ci_low, s.ci_high]}
                         for s in stats.prompt_stability(base) if s.kind in KINDS}}
    steps = base.metadata.steps
    correlations = {}
    variants = {f"steps x{f:g}": dict(steps=max(2, round(steps * f))) for f in (0.5, 2)}
    variants |= {f"scheduler {s}": dict(scheduler=s) for s in SCHEDULERS[name]}
    for label, kwargs in variants.items():
        other = profile_model(pipe, prompts=prompts, batch_size=16, **kwargs)
        correlations[label] = {}
        for kind in KINDS:
            a, ta = shapes.step_curves(base, kind)
            b, tb = shapes.step_curves(other, kind)
            correlations[label][kind] = shapes.compare_shapes(a, ta, b, tb).correlation
    out["shape_correlation"] = correlations
    out["signature"] = shapes.signature(base)
    return out


def figures(directory: Path) -> list[str]:
    """Sample grid (one row per model, same captions and seeds) and loss curves; returns the grid's captions."""
    captions = evaluation_captions(8, seed=3)
    rows = [generate(name, captions, seed=0) for name in MODELS]
    save_grid(np.concatenate(rows), directory / "trained-samples.png", columns=8, scale=3)
    save_loss_curves({n: WEIGHTS / n for n in ("vae", "trained-pixart", "trained-sd3", "trained-pixart-ft")},
                     directory / "trained-loss.png")
    return captions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adherence-samples", type=int, default=120)
    parser.add_argument("--prompts", type=int, default=16, help="captions per profile (paper experiments)")
    parser.add_argument("--figures", type=Path, default=None, help="write the sample grid and loss curves here")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "trained_models.json")
    parser.add_argument("--figures-only", action="store_true", help="only draw the figures (needs --figures)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.figures_only:
        if args.figures is None:
            parser.error("--figures-only needs --figures DIR")
        print("sample grid captions:", *figures(args.figures), sep="\n  ")
        return 0
    started = time.time()
    report: dict = {"adherence": {}, "experiments": {}, "distinctness": {}}
    for name in MODELS:
        result, _ = adherence_of(name, count=args.adherence_samples, seed=0)
        report["adherence"][name] = result.accuracy | {"shape_and_colour": float(result.all_correct.mean())}
    prompts = evaluation_captions(args.prompts, seed=7)
    signatures = {}
    for name in MODELS + CONTRASTS:
        report["experiments"][name] = experiments(name, prompts)
        signatures[name] = report["experiments"][name].pop("signature")
    for a, b in (("trained-pixart", "trained-sd3"), ("trained-pixart", "trained-pixart-ft"),
                 ("tiny-pixart-alpha", "tiny-sd3-medium")):
        d = shapes.distinctness(signatures[a], signatures[b])
        report["distinctness"][f"{a} vs {b}"] = {"between": d.between, "within": max(d.within_a, d.within_b),
                                                 "ratio": d.ratio}
    report["seconds"] = round(time.time() - started)
    report["settings"] = {"adherence_samples": args.adherence_samples, "prompts": args.prompts,
                          "threads": torch.get_num_threads()}
    if args.figures is not None:
        report["grid_captions"] = figures(args.figures)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    _print(report)
    return 0


def _print(report: dict) -> None:
    print("prompt adherence (share of samples the classifier reads as captioned)")
    print(f"  {'model':20}" + "".join(f"{a:>11}" for a in ATTRIBUTES) + f"{'shape+col':>11}")
    for name, acc in report["adherence"].items():
        print(f"  {name:20}" + "".join(f"{acc[a]:>11.1%}" for a in ATTRIBUTES) + f"{acc['shape_and_colour']:>11.1%}")
    print("CV across prompts, paper formula / robust (paper: 10-15%)")
    for name, exp in report["experiments"].items():
        cells = "  ".join(f"{k.upper()} {v['paper']:.1%} / {v['robust']:.1%}" for k, v in exp["prompt_cv"].items())
        print(f"  {name:20} {cells}")
    print("shape correlation with the default run (1 = same shape)")
    for name, exp in report["experiments"].items():
        for label, per_kind in exp["shape_correlation"].items():
            cells = "  ".join(f"{k.upper()} {v:+.3f}" for k, v in per_kind.items())
            print(f"  {name:20} {label:24} {cells}")
    print("distinctness (between / largest within-model spread; > 1 = distinct)")
    for pair, d in report["distinctness"].items():
        print(f"  {pair:42} {d['between']:.3f} / {d['within']:.3f} = {d['ratio']:.2f}")
    print(f"({report['seconds']} s)")


if __name__ == "__main__":
    raise SystemExit(main())
