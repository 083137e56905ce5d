"""Gathers the report's data during the run and writes ``--dit-report`` / ``--dit-json`` once, on the controller.

Where tests run (the serial process, or each xdist worker) the collector adds to each test's data (``relay``;
never ``user_properties``, which JUnit XML would carry) a compact summary of each profile the test used,
once per process and profile, and under ``--dit-shard`` the full per-prompt profile. The controller receives
the data with the suite records and also tracks every test's outcome, so a crashed worker's tests are named
as missing instead of silently absent. Workers never write the files.

A report that cannot be written fails the run: a location that cannot be a file is a usage error before
anything runs, and a write that fails at the end turns a passing exit status into 1.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from ..capture.environment import device_name
from ..judging.baselines import Baseline, BaselineError, read_baseline_file
from ..profiling.settings import RunRequest
from ..report.document import build_document, config_dict, controller_environment, jsonable, write_json
from ..report.html import write_html
from ..report.summary import profile_summary
from .relay import emit
from .session import DitSession
from .shard import DEFERRED_KEY, shard_range, spec_fields

SUMMARY_KEY = "ditredundancy-summary"  # compact per-(model, settings) summary, every test that used it
PROFILE_KEY = "ditredundancy-shard-profile"  # full per-prompt profile, shard runs, once per worker
WORKER_KEY = "ditredundancy-worker"  # where a worker ran (device, threads), once per worker
MESSAGE_LIMIT = 2000


def portable(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when inside it (as POSIX text), else absolute."""
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix() or "."
    except ValueError:
        return str(Path(path).resolve())


def shown(path: Path, base: Path) -> str:
    """Relative to ``base`` when inside it, else absolute: the path the user can paste."""
    try:
        return str(Path(path).resolve().relative_to(base.resolve()))
    except ValueError:
        return str(Path(path).resolve())


class DitReportWarning(UserWarning):
    """The report could not be assembled or written; the tests' results are unaffected."""


def unwritable(path: Path) -> str | None:
    """Why a report cannot be written to ``path`` (checked before the run), or None."""
    path = Path(path)
    if path.is_dir():
        return f"{path} is a directory"
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is a file, not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent} is not writable"
    return None


class ReportCollector:
    def __init__(self, config: pytest.Config, dit: DitSession) -> None:
        self.config, self.dit = config, dit
        self.worker_id = getattr(config, "workerinput", {}).get("workerid")
        self.wanted = bool(dit.config.report or dit.config.json)
        if self.worker_id is None:
            for flag, path in (("--dit-report", dit.config.report), ("--dit-json", dit.config.json)):
                problem = unwritable(path) if path is not None else None
                if problem:
                    raise pytest.UsageError(f"{flag}={path}: cannot write the report there ({problem})")
        self.started = time.time()
        self.summaries: dict[tuple[str, str], dict] = {}
        self.shard_profiles: dict[tuple[str, str], dict] = {}
        self.deferred: dict[str, dict] = {}
        self.results: dict[str, str] = {}
        self.messages: dict[str, str] = {}
        self.collected: dict[str, None] = {}  # ordered set of node ids
        self.workers: dict[str, dict] = {}
        self.written: list[tuple[str, Path]] = []
        self.error: str | None = None
        self._cache: dict[tuple, dict] = {}
        self._sent: set[tuple] = set()
        self._announced = False

    # -- where tests run ------------------------------------------------------------------------------------
    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_setup(self, item: pytest.Item):
        self.dit.touched.clear()
        return (yield)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item):
        try:
            return (yield)
        finally:
            if self.wanted:
                try:
                    self._attach(item)
                except Exception as exc:  # the report is secondary: never turn a test's result into an error
                    warnings.warn(DitReportWarning(f"report data of {item.nodeid} lost: {type(exc).__name__}: {exc}"))
            self.dit.touched.clear()

    def _attach(self, item: pytest.Item) -> None:
        """Add what the report needs from this test to its data: each profile once per process."""
        if not self._announced:
            emit(item, WORKER_KEY, self._worker_facts())
            self._announced = True
        for key, request in list(self.dit.touched.items()):
            if key in self._sent:
                continue
            emit(item, SUMMARY_KEY, self._summary(key, request))
            if self.dit.config.shard:
                emit(item, PROFILE_KEY, self._full_profile(key, request))
            self._sent.add(key)

    def _worker_facts(self) -> dict[str, Any]:
        try:
            device = self.dit.device
            name = device_name(device)
        except Exception as exc:  # e.g. cuda requested on a machine without one: the tests say so themselves
            device, name = self.dit.config.device, f"unavailable ({exc})"
        return {"worker": self.worker_id or "main", "device": str(device), "device_name": name,
                "torch_threads": torch.get_num_threads(), "pid": os.getpid()}

    def _summary(self, key: tuple, request: RunRequest) -> dict[str, Any]:
        if key not in self._cache:
            spec, settings = request.spec, request.settings
            default = self.dit.request(spec).settings
            baseline = None
            if settings == default and not self.dit.config.update_baselines and not self.dit.config.shard:
                name = self.dit.baseline_name_for(spec)
                path = self.dit.store.path_for(name, request.key)
                try:
                    baseline = Baseline(path, name, request.key, read_baseline_file(path)) if path.exists() else None
                except BaselineError:
                    baseline = None  # the regression suite reports the damage itself
            self._cache[key] = jsonable(profile_summary(
                self.dit.profiles[key], model=spec.name, family=spec.family, in_paper=spec.in_paper,
                settings=settings, settings_key=request.key, default=default, baseline=baseline,
                device_class=self.dit.device_class))
        return self._cache[key]

    def _full_profile(self, key: tuple, request: RunRequest) -> dict[str, Any]:
        spec = request.spec
        start, end = shard_range(len(request.prompts), self.dit.config.shard)
        return {"model": spec.name, "reference": self.dit.reference(spec),
                "baseline_name": self.dit.baseline_name_for(spec), "settings_key": request.key,
                "settings": dict(request.settings.__dict__),
                "spec": spec_fields(spec), "shard": list(self.dit.config.shard), "start": start, "end": end,
                "total": len(request.prompts), "profile": json.loads(self.dit.profiles[key].to_json())}

    # -- the controller -------------------------------------------------------------------------------------
    def add_collected(self, ids: list[str]) -> None:
        for nodeid in ids:
            self.collected.setdefault(nodeid)

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        if self.worker_id is None:
            self.add_collected([item.nodeid for item in session.items])

    def ingest(self, packet: dict[str, Any]) -> None:
        """One test's data (``relay``), on the controller."""
        for name, value in packet["data"]:
            if name == SUMMARY_KEY:
                self.summaries.setdefault((value["model"], value["settings_key"]), value)
            elif name == PROFILE_KEY:
                self.shard_profiles.setdefault((value["model"], value["settings_key"]), value)
            elif name == DEFERRED_KEY:
                self.deferred.setdefault(json.dumps(value, sort_keys=True, default=str), value)
            elif name == WORKER_KEY:
                self.workers.setdefault(value["worker"], value)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self.worker_id is None:
            self._outcome(report)

    def _outcome(self, report: pytest.TestReport) -> None:
        nodeid, when, previous = report.nodeid, report.when, self.results.get(report.nodeid)
        if when == "???":  # xdist: the worker died while running this test
            self.results[nodeid] = "crashed"
            self.messages[nodeid] = str(report.longrepr)
            return
        if when == "call":
            outcome = report.outcome
            if hasattr(report, "wasxfail"):
                outcome = "xfailed" if report.skipped else "xpassed"
        elif when == "setup" and not report.passed:
            outcome = "error" if report.failed else "skipped"
        elif when == "teardown" and report.failed:
            outcome = "error"
        else:
            return
        self.results[nodeid] = outcome
        if outcome in ("failed", "error", "skipped") and outcome != previous:
            text = report.longreprtext if outcome != "skipped" else (
                report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr))
            self.messages[nodeid] = str(text)[:MESSAGE_LIMIT]

    def tests_section(self) -> dict[str, Any]:
        missing = [{"nodeid": nodeid, "reason": self.messages.get(nodeid, "crashed")}
                   for nodeid, outcome in self.results.items() if outcome == "crashed"]
        missing += [{"nodeid": nodeid, "reason": "collected but never reported a result (a worker crashed or the "
                     "run was interrupted)"} for nodeid in self.collected if nodeid not in self.results]
        return {"collected": len(self.collected) or len(self.results), "results": dict(sorted(self.results.items())),
                "messages": dict(sorted(self.messages.items())), "missing": missing}

    def document(self) -> dict[str, Any]:
        cfg = self.dit.config
        run = config_dict(cfg, self.dit.selected_models())
        lists = self.dit.prompt_lists()
        if lists and not cfg.prompt_source:  # no prompts named: each model ran its own set, not the option's list
            run["prompts"] = list(dict.fromkeys(p for prompts in lists.values() for p in prompts))
            run["num_prompts"] = len(run["prompts"])
            run["prompts_by_model"] = {model: len(prompts) for model, prompts in sorted(lists.items())}
        # portable: a merge on another machine or checkout finds the baselines relative to where it runs
        run["baseline_dir"] = portable(cfg.baseline_dir, Path(self.config.rootpath))
        for name, flag in (("report", "--dit-report"), ("json", "--dit-json")):
            if run.get(name):
                run[name] = cfg.given.get(flag) or portable(Path(run[name]), Path(self.config.rootpath))
        run["command"] = " ".join(str(a) for a in self.config.invocation_params.args)
        run["workers"] = getattr(self.config.option, "numprocesses", None) or None
        workers = [self.workers[w] for w in sorted(self.workers)]
        environment = {**controller_environment(), "workers": workers,
                       "devices": sorted({f"{w['device']} ({w['device_name']})" for w in workers}),
                       "executor": self.dit.executor.facts()}  # where profiles ran, and any work retried
        shard = None
        if cfg.shard:  # the prompts each model ran (named ones, or its own set), not the option's default list
            totals = {len(prompts) for prompts in lists.values()} or {len(cfg.prompts)}
            total = totals.pop() if len(totals) == 1 else None
            start, end = shard_range(total, cfg.shard) if total is not None else (None, None)
            shard = {"index": cfg.shard[0], "count": cfg.shard[1], "prompts": [start, end], "total": total}
        return build_document(
            run=run, records=list(self.dit.records), summaries=list(self.summaries.values()), tests=self.tests_section(),
            environment=environment, started=self.started, finished=time.time(), shard=shard,
            shard_profiles=list(self.shard_profiles.values()) if cfg.shard else None,
            deferred=list(self.deferred.values()) if cfg.shard else None)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.worker_id is not None or not self.wanted:
            return
        try:
            doc = self.document()
            if self.dit.config.report:
                self.written.append(("HTML report", write_html(doc, self.dit.config.report)))
            if self.dit.config.json:
                self.written.append(("JSON report", write_json(doc, self.dit.config.json)))
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            warnings.warn(DitReportWarning(f"the report was not written: {self.error}"))
            if session.exitstatus == pytest.ExitCode.OK:  # asked for and missing: the run failed
                session.exitstatus = pytest.ExitCode.TESTS_FAILED

    @pytest.hookimpl(trylast=True)
    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.worker_id is not None or not self.wanted:
            return
        if not self.dit.records:
            terminalreporter.section("ditredundancy")
        missing = self.tests_section()["missing"]
        if missing:
            terminalreporter.write_line(f"{len(missing)} test{'s' if len(missing) != 1 else ''} without a result "
                                        "(worker crash or interruption); the report names them", red=True)
        for kind, path in self.written:
            terminalreporter.write_line(f"{kind}: {shown(path, Path(self.config.invocation_params.dir))}")
        if self.error:
            terminalreporter.write_line(f"report not written: {self.error}", red=True)
