"""The capture benchmark runs end to end (``--quick``) and reports every row it promises, with real numbers.

Nothing here judges speed: timings live in the benchmark's table and JSON, not in tests. What is checked is
that each measurement ran and produced finite, positive values, so a broken stand-in or row cannot hide.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BREAKDOWN_MODES = ("hooks_only", "read_previous", "eager", "fused", "batched", "default")


def test_quick_benchmark_reports_every_row_with_finite_numbers(tmp_path):
    out = tmp_path / "capture.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.capture", "--quick", "--device", "cpu", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text(encoding="utf-8"))
    measures = [row["measure"] for row in report["rows"]]
    for expected in ("capture overhead, eager", "capture overhead, fused", "capture overhead, batched",
                     "capture overhead, default", "capture overhead at 8 prompts batched", "memory", "batching",
                     "vs reference, eager", "vs reference, fused", "vs reference, batched", "one reduction at",
                     "in the site hooks: hooks and bookkeeping alone", "in the site hooks: floor",
                     "in the site hooks: eager statistics", "in the site hooks: fused statistics",
                     "in the site hooks: batched statistics", "in the site hooks: default capture"):
        assert any(m.startswith(expected) for m in measures), (expected, measures)
        assert expected.split(",")[0].split(":")[0] in done.stdout
    results = report["results"]
    assert results["overhead"]["outputs_identical"] is True
    fused = results["overhead"]["paths"]["fused"]["stats"]
    assert fused["fused_calls"] > 0 or fused["fallback"], fused  # without a C++ compiler: eager, with the reason
    batched = results["overhead"]["paths"]["batched"]["stats"]
    assert batched["memory"] == "fast" and (batched["call_kernels"] > 0 or batched["fallback"]), batched
    modes = results["breakdown"]["modes"]
    assert set(modes) == set(BREAKDOWN_MODES)
    for mode in BREAKDOWN_MODES:
        for key in ("hook_cpu_seconds_per_step", "hook_cpu_share", "wall_overhead_paired_median"):
            value = modes[mode][key]
            assert math.isfinite(value) and value > 0, (mode, key, value)
