"""Train the shipped models: ``python -m pytest_ditredundancy.train NAME [--steps N] [--out DIR]``.

Names, in the order they depend on each other: ``vae`` (shared by the DiTs), ``classifier`` (the adherence
scorer), ``trained-pixart``, ``trained-sd3``, ``trained-pixart-ft`` (fine-tunes ``trained-pixart``).
Every run is seeded and single-process; ``--threads`` defaults to 2, the budget the recipes were sized for.
``--steps`` overrides the recipe's step count (a quick smoke run); ``--out`` writes somewhere else than the
package's ``weights/`` folder, ``--weights`` reads the runs this one depends on from another folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

WEIGHTS = Path(__file__).resolve().parent / "weights"
NAMES = ("vae", "classifier", "trained-pixart", "trained-sd3", "trained-pixart-ft")


def _with_steps(recipe, steps: int | None, batch_size: int | None = None):
    schedule = recipe.schedule
    if steps is not None:
        schedule = replace(schedule, steps=steps, warmup=min(schedule.warmup, max(1, steps // 4)))
    if batch_size is not None:
        schedule = replace(schedule, batch_size=batch_size)
    return replace(recipe, schedule=schedule)


def train(name: str, out: Path | None = None, steps: int | None = None, weights: Path = WEIGHTS,
          batch_size: int | None = None, pool_size: int | None = None) -> dict:
    """Train ``name`` and save it under ``out`` (default ``weights/<name>``); returns its summary numbers.

    ``steps``, ``batch_size`` and ``pool_size`` (DiTs: how many samples are encoded once) override the
    recipe, for quick smoke runs; the shipped weights use the recipes as they are.
    """
    if name not in NAMES:
        raise ValueError(f"unknown model {name!r}; train one of: {', '.join(NAMES)}")
    out = Path(out) if out is not None else weights / name
    problem = out_problem(out)
    if problem:
        raise FileExistsError(f"{problem}: pass a new or empty folder as --out")
    partial = out.parent / f".{out.name}.partial"  # written in full first: an interrupted run leaves `out` intact
    if partial.exists():
        shutil.rmtree(partial)
    result = _train_into(name, partial, steps, weights, batch_size, pool_size)
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    return result


def out_problem(out: Path) -> str | None:
    """Why ``out`` cannot take a training run, or None: a run replaces only an earlier run or an empty folder."""
    existing = next(path for path in (out, *out.parents) if path.exists())
    if not existing.is_dir():
        return f"{existing} is a file" + ("" if existing == out else ", not a folder")
    if existing == out and any(out.iterdir()) and not (out / "training.json").is_file():
        return f"{out} exists and holds no earlier training run (no training.json); it would be replaced"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def _dependencies(name: str) -> list[tuple[str, str]]:
    """What training ``name`` reads from ``--weights``: (folder, the file that shows a finished run)."""
    if name in ("vae", "classifier"):
        return []
    from .training.dit import RECIPES

    base = RECIPES[name].base
    return [(base, "model_index.json")] if base else [("vae", "config.json")]


def _paths_problem(names: tuple[str, ...], out: Path | None, weights: Path) -> str | None:
    """Why the run could not read what it builds on or write what it trains, found before any training."""
    if weights.exists() and not weights.is_dir():
        return f"--weights {weights} is a file; pass the folder that holds vae/ and the base models"
    trained: set[str] = set()  # earlier names of this run, written to --weights
    for name in names:
        if out is not None and (problem := out_problem(out)):
            return f"--out {out}: {problem}; pass a new or empty folder as --out"
        if out is None and (problem := out_problem(weights / name)):
            return (f"--weights {weights}: {problem}, and {name} is written there; move that away, or pass another "
                    "folder as --weights" + (" or --out" if len(names) == 1 else ""))
        for needed, marker in _dependencies(name):
            if needed not in trained and not (weights / needed / marker).is_file():
                return (f"--weights {weights}: no trained {needed} at {weights / needed} ({name} builds on it); train "
                        f"{needed} first (python -m pytest_ditredundancy.train {needed} --weights {weights}), or pass "
                        f"the folder that holds it as --weights")
        trained.add(name)
    return None


def _train_into(name: str, out: Path, steps: int | None, weights: Path, batch_size: int | None,
                pool_size: int | None) -> dict:
    if name == "vae":
        from .training.vae import VaeRecipe, train_vae

        return train_vae(_with_steps(VaeRecipe(), steps, batch_size), out)
    if name == "classifier":
        from .training.classifier import ClassifierRecipe, train_classifier

        return train_classifier(_with_steps(ClassifierRecipe(), steps, batch_size), out)
    from .training.dit import RECIPES, train_dit

    recipe = _with_steps(RECIPES[name], steps, batch_size)
    if pool_size is not None:
        recipe = replace(recipe, pool_size=pool_size)
    return train_dit(recipe, out, weights)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytest_ditredundancy.train", description=__doc__.split("\n")[0])
    parser.add_argument("name", choices=NAMES + ("all",), help="what to train ('all': every name, in order)")
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's optimisation steps")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: weights/<name>)")
    parser.add_argument("--weights", type=Path, default=WEIGHTS,
                        help="folder holding the vae/ and base models this run builds on")
    parser.add_argument("--batch-size", type=int, default=None, help="override the recipe's batch size")
    parser.add_argument("--pool-size", type=int, default=None, help="DiTs: samples encoded once (default 8192)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = parser.parse_args(argv)
    for option in ("steps", "batch_size", "pool_size", "threads"):
        value = getattr(args, option)
        if value is not None and value < 1:
            parser.error(f"--{option.replace('_', '-')} must be >= 1, got {value}")
    if args.out is not None and args.name == "all":
        parser.error("--out names one model's folder; with 'all' use --weights")
    names = NAMES if args.name == "all" else (args.name,)
    problem = _paths_problem(names, args.out, args.weights)
    if problem:
        parser.error(problem)
    torch.set_num_threads(args.threads)
    for name in names:
        start = time.time()
        result = train(name, args.out, args.steps, args.weights, args.batch_size, args.pool_size)
        print(f"{name}: {result} in {time.time() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
