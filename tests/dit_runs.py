"""Helpers for tests that run the suites with tiny models in a subprocess and compare the reports they write.

Model runs go to a subprocess (an in-process run would re-import parts of torch that may only be imported
once per process), like ``pytester.runpytest_subprocess``; a module-scoped fixture can share one run.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

SUITES = Path(__file__).resolve().parent.parent / "suites"
FAST = ["--dit-steps=6", "--dit-num-prompts=3", "--dit-step-factors=2", "-p", "no:cacheprovider"]
NO_BASELINES = ["--dit-cv-bounds=0,1", "--dit-min-shape-correlation=-1", "--dit-enforce-claims"]  # claims alone judge: no baseline files
#: the suites the distributed tests run: two profiles per model (6 and 12 steps), no baseline files needed
QUICK_SUITES = ["suites/test_prompt_stability.py", "suites/test_step_stability.py"]
#: run settings that differ between runs of the same tests (how and where they were started)
RUN_DIFFERS = {"command", "json", "report", "given", "workers", "shard", "progress_interval"}


def use_suites(root: Path) -> Path:
    target = root / "suites"
    if not target.exists():
        shutil.copytree(SUITES, target, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    return target


def run_pytest(cwd: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT"))}  # under -n
    env.update(HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-m", "pytest", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def differences(a: Any, b: Any, path: str = "", rel: float = 1e-3, abs_tol: float = 1e-6) -> list[str]:
    """Where two JSON documents differ beyond float tolerance (paths like ``models[0]/profiles[1]/label``)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}/{k}: only in one" for k in sorted(set(a) ^ set(b))]
        for key in sorted(set(a) & set(b)):
            out += differences(a[key], b[key], f"{path}/{key}", rel, abs_tol)
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} items vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]", rel, abs_tol)]
    if isinstance(a, float) or isinstance(b, float):
        if "/excess/" in path:  # |now - baseline| / tolerance of values equal to ~1e-7: compare absolutely
            abs_tol = max(abs_tol, 1e-3)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=rel, abs_tol=abs_tol):
            return []
    elif a == b:
        return []
    return [f"{path}: {a!r} vs {b!r}"]


def same_results(a: dict, b: dict) -> list[str]:
    """Two report documents of the same tests, ignoring timing, environment and how the run was started."""
    a, b = dict(a), dict(b)
    for doc in (a, b):
        for key in ("created", "duration_s", "environment", "shard", "merged_from"):
            doc.pop(key, None)
        doc["run"] = {k: v for k, v in doc["run"].items() if k not in RUN_DIFFERS}
    return differences(a, b)
