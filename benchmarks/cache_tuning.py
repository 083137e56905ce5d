"""Cache tuning on the trained models: the tuned value of each strategy, what it buys and costs, the runs the search
took, the cliffs, the prediction's error, and whether the value holds at other step counts.

``python -m benchmarks.cache_tuning [--models trained-pixart,trained-sd3] [--floors psnr:35,ssim:0.95,adherence:1.0]
[--scheduler trained-pixart=euler ...] [--out benchmarks/out/cache_tuning.json]``

Runs the tuning suite (``suites/test_cache_tune.py``) with ``--dit-update-baselines`` into a temporary baseline
folder (the shipped baselines are never touched), four shapes captions, the models' own settings, for FBCache,
cache-dit DBCache, MagCache and the profile schedule, with transfer to 0.5x and 2x steps and one other scheduler
per model (each transfer is a search of its own; ``--scheduler MODEL=NAME,...`` picks them). Reads the recommendation files the suite writes, prints a table and writes JSON. A search that a
model cannot run (FBCache on SD3 in diffusers 0.42) is a row that says so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SEARCHES = ("fbcache:threshold=0.02..0.5", "cachedit:rdt=0.02..0.8,Fn=1,Bn=0,warmup=2",
            "magcache:threshold=0.01..0.5", "profile:budget=0.05..0.6")


#: the other scheduler each model's tuned value is re-checked under
SCHEDULERS = {"trained-pixart": "euler", "trained-sd3": "flow-dpm-solver"}


def run_suite(model: str, floors: str, folder: Path, prompts: int, schedulers: str) -> tuple[int, str, float]:
    command = [sys.executable, "-m", "pytest", str(ROOT / "suites" / "test_cache_tune.py"), f"--dit-model={model}",
               f"--dit-schedulers={schedulers}",
               "--dit-prompts=shapes", f"--dit-num-prompts={prompts}", f"--dit-cache-floor={floors}",
               f"--dit-baseline-dir={folder / 'baselines'}", f"--dit-cache-tune-dir={folder / 'tune'}",
               "--dit-update-baselines", "-p", "no:cacheprovider", "-q", "-rs",
               *(f"--dit-cache-tune={search}" for search in SEARCHES)]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return done.returncode, done.stdout + done.stderr, time.perf_counter() - started


def row(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    chosen = data.get("recommendation")
    predicted = (chosen or {}).get("predicted") or {}
    transfer = {t["variant"]: t for t in data.get("transfer") or []}
    return {
        "model": data["model"], "search": f"{data['strategy']}:{data['parameter']}", "value": chosen and chosen["value"],
        "skipped": chosen and chosen["skipped"]["transformer"], "speedup": data.get("speedup"),
        "psnr": chosen and chosen["quality"]["psnr"], "ssim": chosen and chosen["quality"]["ssim"],
        "adherence": chosen and chosen["quality"]["adherence"], "runs": data["runs"], "cliffs": data.get("cliffs") or [],
        "prediction_raw": predicted.get("raw"), "prediction_calibrated": predicted.get("calibrated"),
        "transfer": {label: {"holds": t.get("holds"), "tuned_value": t.get("tuned_value")} for label, t in transfer.items()},
        "best": None if chosen else data["best"]["setting"], "notes": data.get("notes"),
    }


def fmt(value: Any, spec: str = ".3g") -> str:
    return "–" if value is None else format(value, spec)


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | search | tuned | skipped | speed-up | PSNR | SSIM | adherence | runs | cliffs | prediction "
             "(steps wrong, raw / calibrated) | 0.5x steps | 2x steps |", "|" + " --- |" * 13]
    for r in rows:
        raw, cal = r["prediction_raw"] or {}, r["prediction_calibrated"] or {}
        pred = f"{raw.get('wrong', '–')}/{raw.get('steps', '–')} / {cal.get('wrong', '–')}" if raw else "–"
        steps = {label.split(" (")[0]: t for label, t in r["transfer"].items() if label.startswith("steps")}

        def held(key: str) -> str:
            t = steps.get(key)
            if not t:
                return "–"
            return ("holds" if t["holds"] else "breaks") + f" (tuned {fmt(t['tuned_value'])})"

        cliffs = "; ".join(f"{c['below']:.3g}→{c['above']:.3g} −{c['drop_db']:.0f} dB" for c in r["cliffs"]) or "none"
        tuned = fmt(r["value"]) if r["value"] is not None else f"none keeps the floors (best {r['best']})"
        lines.append(f"| {r['model']} | {r['search']} | {tuned} | {fmt(r['skipped'], '.0%') if r['skipped'] is not None else '–'} "
                     f"| {('x' + fmt(r['speedup'], '.2f')) if r['speedup'] else '–'} | {fmt(r['psnr'], '.1f')} "
                     f"| {fmt(r['ssim'], '.3f')} | {fmt(r['adherence'], '.2f')} | {r['runs']} | {cliffs} | {pred} "
                     f"| {held('steps x0.5')} | {held('steps x2')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="trained-pixart,trained-sd3")
    parser.add_argument("--floors", default="psnr:35,ssim:0.95,adherence:1.0")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--scheduler", action="append", default=[], metavar="MODEL=NAME[,NAME]",
                        help="the other schedulers a model's tuned value is re-checked under (default: "
                             + ", ".join(f"{m}={s}" for m, s in SCHEDULERS.items()) + ")")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "cache_tuning.json")
    args = parser.parse_args(argv)
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.exit(4, f"cannot write {args.out}: {exc}\n")
    schedulers = dict(SCHEDULERS)
    for item in args.scheduler:
        model, sep, names = item.partition("=")
        if not sep or not names:
            parser.exit(4, f"--scheduler {item!r}: give MODEL=NAME[,NAME]\n")
        schedulers[model] = names
    code, output, seconds = 0, "", 0.0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for model in args.models.split(","):
            if model not in schedulers:
                parser.exit(4, f"no other scheduler named for {model}: give --scheduler {model}=NAME\n")
            status, text, took = run_suite(model, args.floors, folder, args.prompts, schedulers[model])
            code, output, seconds = max(code, status), output + text, seconds + took
        rows = [row(path) for path in sorted((folder / "tune").glob("*.json")) if not path.name.endswith(".schedule.json")]
    skipped = [line for line in output.splitlines() if line.startswith("SKIPPED")]
    print(table(rows))
    for line in skipped:
        print(line)
    print(f"pytest exit status {code}, {seconds:.0f} s")
    args.out.write_text(json.dumps({"models": args.models, "floors": args.floors, "prompts": args.prompts,
                                    "schedulers": schedulers,
                                    "rows": rows, "skipped": skipped, "exit_status": code, "seconds": seconds,
                                    "output_tail": output[-4000:]}, indent=2) + "\n")
    return 0 if rows else 1


if __name__ == "__main__":
    raise SystemExit(main())
