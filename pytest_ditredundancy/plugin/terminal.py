"""What the plugin prints: the header, and the ``ditredundancy`` section of the terminal summary (one line per
model with its key numbers, one for the cross-model comparison, stale baselines)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ..capture.environment import versions
from ..judging.baselines import relative, stale_baselines
from ..report.document import model_of
from .session import BASELINE_USED_KEY, RECORD_KEY, DitSession


def header_lines(config: pytest.Config, session: DitSession) -> list[str]:
    cfg = session.config
    v = versions()
    models = ", ".join(session.selected_models())
    against = f" (judged against the baselines of {cfg.baseline_name})" if cfg.baseline_name else ""
    seed = f"seed {cfg.seed}" if cfg.noise_seed is not None else "each model's study seed"
    return [
        f"ditredundancy: models: {models}{against}",
        f"ditredundancy: device {session.device} ({cfg.dtype} dtype), protocol {cfg.protocol}, {cfg.num_prompts} prompts"
        f"{' from ' + cfg.prompt_source if cfg.prompt_source else ''}, {seed}, baselines in "
        f"{relative(cfg.baseline_dir, config.rootpath)}{' (UPDATING)' if cfg.update_baselines else ''}",
        f"ditredundancy: torch {v['torch']}, diffusers {v['diffusers']}, transformers {v['transformers']}",
        *(f"ditredundancy: {line}" for line in session.executor.header()),
    ]


class DitReporter:
    """Takes the suite records out of each test's data (local, or sent by xdist workers) and prints the summary."""

    def __init__(self, config: pytest.Config, dit: DitSession) -> None:
        self.config = config
        self.dit = dit
        self.whole_suite_ran = False

    def ingest(self, packet: dict[str, Any]) -> None:
        for name, value in packet["data"]:
            if name == RECORD_KEY:
                self.dit.records.append(value)
            elif name == BASELINE_USED_KEY:
                self.dit.baselines_used.add(value)

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        option = session.config.option
        self.whole_suite_ran = (not self.dit.deselected and not getattr(option, "keyword", "")
                                and not getattr(option, "markexpr", "") and not session.shouldstop
                                and not session.shouldfail and session.testscollected > 0)
        self.dit.close()

    def _by_model(self, nodeids: Any) -> dict[str, set[str]]:
        """``nodeids`` grouped by the model (spec name) each test ran for; tests of no model are left out."""
        models = self.dit.selected_models()
        names = {}
        for model in models:
            try:
                names[model] = self.dit.spec(model).name
            except Exception:  # an unknown model: its tests failed, and say why
                names[model] = model
        grouped: dict[str, set[str]] = {}
        for nodeid in nodeids:
            model = model_of(nodeid, models) if nodeid else None
            if model is not None:
                grouped.setdefault(names[model], set()).add(nodeid)
        return grouped

    def bad_tests(self, terminalreporter: Any) -> dict[str, set[str]]:
        """Per model (spec name), the tests that failed, errored or crashed (xdist reports a crash as failed)."""
        return self._by_model(getattr(report, "nodeid", "") for kind in ("failed", "error")
                              for report in terminalreporter.stats.get(kind, ()))

    def tests_not_run(self) -> dict[str, set[str]]:
        """Per model, the tests collected for it that never reported a result (an interrupted or stopped run);
        none under the options that run no test on purpose (``--collect-only``, ``--setup-only``, ``--setup-plan``)."""
        option = self.config.option
        collector = self.config.pluginmanager.get_plugin("ditredundancy-report")
        if collector is None or any(getattr(option, name, False) for name in ("collectonly", "setuponly", "setupplan")):
            return {}
        return self._by_model(n for n in collector.collected if n not in collector.results)

    def pytest_terminal_summary(self, terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
        bad, not_run = self.bad_tests(terminalreporter), self.tests_not_run()
        retried = self.dit.executor.retried()
        if not self.dit.records and not bad and not not_run and not retried:
            return
        terminalreporter.section("ditredundancy")
        for line in summary_lines(self.dit.records, {model: len(ids) for model, ids in bad.items()},
                                  {model: len(ids) for model, ids in not_run.items()}):
            terminalreporter.write_line(line)
        for retry in retried:  # a worker died: its work was computed again elsewhere (or not: then a test failed)
            terminalreporter.write_line(f"retried work: {retry.line()}", yellow=True)
        if self.whole_suite_ran:
            self.dit.store.used = {Path(p).resolve() for p in self.dit.baselines_used}
            names = {self.dit.baseline_name_for(self.dit.spec(model)) for model in self.dit.selected_models()}
            stale = stale_baselines(self.dit.store, sorted(names))
            if stale:
                terminalreporter.write_line("stale baselines (no test used them; delete them if their settings are gone):")
                for path in stale:
                    terminalreporter.write_line(f"  {relative(path, config.rootpath)}")


def summary_lines(records: list[dict], bad: dict[str, int] | None = None,
                  not_run: dict[str, int] | None = None) -> list[str]:
    """One line per model with its key numbers, and one line for the cross-model comparison. ``bad``: per
    model, how many of its tests failed, errored or crashed; such a model is FAIL whatever its records say.
    ``not_run``: per model, how many of its tests never ran (an interrupted run); such a model is incomplete
    (unless FAIL): its records speak only for the tests that ran."""
    bad, not_run = bad or {}, not_run or {}
    by_model: dict[str, list[dict]] = {}
    pairs = [r for r in records if r["suite"] == "model_distinctness"]
    for record in records:
        if record["suite"] != "model_distinctness":
            by_model.setdefault(record["model"], []).append(record)
    for model in [*bad, *not_run]:
        by_model.setdefault(model, [])
    lines = []
    for model, entries in by_model.items():
        parts = []
        judged = [e for e in entries if e.get("question") not in ("claim", "info")]
        if not any(e["suite"] == "prompt_stability" for e in judged):  # no baseline: the claims judged alone
            judged = [e for e in entries if e.get("question") != "info"]
        cvs = {e.get("kind"): e["value"] for e in judged  # one per kind
               if e["suite"] == "prompt_stability" and e.get("value") is not None}
        if cvs:
            parts.append("CV " + " ".join(f"{kind}={value:.3f}" for kind, value in cvs.items()))
        for suite, label in (("step_stability", "steps r>="), ("scheduler_stability", "schedulers r>=")):
            values = [e["value"] for e in judged if e["suite"] == suite and e.get("value") is not None]
            if values:
                parts.append(f"{label}{min(values):.3f}")
        drift = [e for e in entries if e["suite"] == "baseline_regression"]
        if drift:
            parts.append(f"baseline drift {int(drift[-1]['value'] or 0)} cells")
        parts += [f"cache {e['strategy']} PSNR {e['value']:.1f} skip {e['skipped']['attention']:.0%} "
                  f"x{e['speedup']:.2f}" + (f" adherence {e['adherence']['cached']:.0%}" if e.get("adherence") else "")
                  for e in entries if e["suite"] == "cache_gate" and e.get("value") is not None]
        parts += [_tuned(e) for e in entries if e["suite"] == "cache_tune"]
        broken = sum(e.get("question") == "claim" and e.get("met") is False for e in entries)
        if broken:
            parts.append(f"{broken} stability claim{'s' if broken != 1 else ''} not met")
        failed_tests = bad.get(model, 0)
        if failed_tests:
            parts.append(f"{failed_tests} test{'s' if failed_tests != 1 else ''} failed, errored or crashed")
        missing = not_run.get(model, 0)
        if missing:
            parts.append(f"{missing} test{'s' if missing != 1 else ''} did not run")
        failed = failed_tests or sum(not e["passed"] for e in entries)
        lines.append(f"{model}: {'FAIL' if failed else 'incomplete' if missing else 'ok'}; " + "; ".join(parts))
    if pairs:
        worst = min(pairs, key=lambda r: float("inf") if r["value"] is None else r["value"])
        failed = sum(not r["passed"] for r in pairs)
        value = "inf" if worst["value"] is None else f"{worst['value']:.2f}"
        lines.append(f"model distinctness: {'FAIL' if failed else 'ok'}; {len(pairs)} pairs, lowest "
                     f"between/within {value} ({worst['model']}){f'; {failed} pairs not distinct' if failed else ''}")
    return lines


def _tuned(entry: dict) -> str:
    """``tuned cachedit:rdt -> 0.316: skip 37% PSNR 37.8 (11 runs)``, or that nothing kept the floors."""
    chosen = entry.get("recommendation")
    head = f"tuned {entry.get('strategy')}:{entry.get('parameter')}"
    if not chosen:
        return f"{head}: nothing keeps the floors {entry.get('floors')}"
    return (f"{head} -> {chosen['value']:.4g}: skip {chosen['skipped']['transformer']:.0%} PSNR "
            f"{chosen['quality']['psnr']:.1f} ({entry.get('runs')} runs)")
