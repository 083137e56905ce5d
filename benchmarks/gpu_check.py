"""The one GPU check: ``python -m benchmarks.gpu_check --out DIR [--budget-s 540]``, or ``--device cpu --quick``
for the dry run the tests use.

On a machine with a CUDA GPU it runs, in one call and within ``--budget-s`` (about 9 minutes):

1. the CUDA tests (``tests/test_cuda.py``, ``tests/test_cuda_batched.py``: fused and batched statistics against
   exact sums and against the per-tensor path, outputs untouched, no host sync in any capture callback);
2. the capture benchmark at PixArt-XL size, fp16 (``benchmarks.capture --device cuda``: overhead per path at one
   prompt, at 8 prompts batched, memory, host syncs, where the time goes);
3. the real-scale benchmark (``benchmarks.real_scale --device cuda``) with the time that is left: models that
   would not fit in it are skipped and named.

Each part runs in its own process with a timeout; what it wrote is gathered into ``DIR/gpu_check.json`` (the
parts' own JSON files stay beside it), rewritten after every part, so a part that fails or runs out of time
still leaves the others' results. Exit status 0 when every part ran and the tests passed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CUDA_TESTS = ("tests/test_cuda.py", "tests/test_cuda_batched.py")
#: seconds each part may take at most, before the real-scale benchmark gets what is left
TESTS_LIMIT, CAPTURE_LIMIT, MARGIN = 150, 240, 20


def run_part(command: list[str], limit: float, log) -> dict[str, Any]:
    started = time.perf_counter()
    log(f"$ {' '.join(command)}  (limit {limit:.0f} s)")
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=max(limit, 1))
        status = {"returncode": done.returncode, "stdout_tail": done.stdout[-4000:], "stderr_tail": done.stderr[-4000:]}
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stdout or b"")[-4000:]
        status = {"returncode": None, "timed_out": True,
                  "stdout_tail": tail.decode(errors="replace") if isinstance(tail, bytes) else tail}
    status["seconds"] = time.perf_counter() - started
    log(f"  -> {status.get('returncode')} in {status['seconds']:.0f} s")
    return status


def junit_summary(path: Path) -> dict[str, Any]:
    """Counts and the failing tests' names from pytest's JUnit XML."""
    if not path.is_file():
        return {"error": "no JUnit report"}
    suite = ElementTree.parse(path).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {name: int(suite.get(name, 0)) for name in ("tests", "failures", "errors", "skipped")} | {"failed": failed}


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return {"error": f"{path.name}: {exc}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and the parts' JSON")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (the dry run, with --quick)")
    parser.add_argument("--quick", action="store_true", help="dry run: small models, every part exercised")
    parser.add_argument("--budget-s", type=float, default=540.0, help="wall-time budget of the whole check")
    args = parser.parse_args(argv)
    if args.device == "cpu" and not args.quick:
        parser.error("--device cpu is the dry run: add --quick")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    def left() -> float:
        return args.budget_s - (time.perf_counter() - started)

    report: dict[str, Any] = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                              "device": args.device, "quick": args.quick, "python": platform.python_version(),
                              "budget_s": args.budget_s, "parts": {}}
    out = args.out / "gpu_check.json"

    def save() -> None:
        report["wall_seconds"] = time.perf_counter() - started
        out.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")

    python = sys.executable
    env_note = {"HF_HUB_OFFLINE": os.environ.setdefault("HF_HUB_OFFLINE", "1")}
    report["environment"] = env_note

    junit = args.out / "cuda_tests.xml"
    tests = run_part([python, "-m", "pytest", *CUDA_TESTS, "-p", "no:cacheprovider", "-q", f"--junitxml={junit}"],
                     min(TESTS_LIMIT, left()), log)
    tests["summary"] = junit_summary(junit)
    report["parts"]["cuda_tests"] = tests
    save()

    capture_json = args.out / "capture.json"
    capture = [python, "-m", "benchmarks.capture", "--device", args.device, "--out", str(capture_json)]
    part = run_part(capture + (["--quick"] if args.quick else []), min(CAPTURE_LIMIT, left() - MARGIN), log)
    part["result"] = read_json(capture_json)
    report["parts"]["capture"] = part
    save()

    real_json = args.out / "real_scale.json"
    budget = max(left() - MARGIN, 1.0)
    real = [python, "-m", "benchmarks.real_scale", "--device", args.device, "--budget-s", f"{budget - 30:.0f}",
            "--out", str(real_json)]
    part = run_part(real + (["--quick"] if args.quick else []), budget, log)
    part["result"] = read_json(real_json)
    report["parts"]["real_scale"] = part
    save()

    summary = tests["summary"]
    passed = (tests.get("returncode") == 0 and not summary.get("failed") and "error" not in summary
              and all(p.get("returncode") == 0 for p in report["parts"].values()))
    report["ok"] = passed
    save()
    log(f"wrote {out} ({report['wall_seconds']:.0f} s): {'ok' if passed else 'something failed, see the parts'}")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
