"""The cache tuning as a test: search, store and gate the fastest setting of one cache parameter that keeps the
floors (``--dit-cache-tune``, ``--dit-cache-floor``; docs/cache-tuning.md).

With ``--dit-update-baselines`` the search runs and its frontier, cliffs, recommendation and floors are stored in
the model's baseline (``suites.cache_tune.<search>``); nothing is stored when no setting keeps the floors.
Without it, the stored frontier's settings are measured again: the test fails when the recommendation no longer
keeps the floors or any point moved beyond the gate's tolerance. Either way the recommendation file (JSON, with
the line of code that applies it) is written, and the report receives the frontier.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ..cache.base import CacheBatchError, CacheDependencyError, CacheParameterError, UnsupportedStrategy
from ..cache.floors import FloorError, Floors
from ..cache.predict import BoundPredictor, PredictInputError, bind
from ..cache.schedule import ScheduleError
from ..cache.tune_runs import NonFiniteRun, Transfer, Tuner, require_finite, transfer
from ..cache.tune_verdict import FrontierTolerance, frontier_moves, recommendation_failure
from ..cache.tuning import TunePoint, TuneResult, TuneSpec, TuneSpecError
from ..cache import adherence
from ..cache.engines import engine_of
from ..judging.baselines import BaselineError, safe_name
from ..io import atomic_write_text
from .cache_gate import TOLERANCES
from .cache_runs import CacheInputs
from .relay import emit
from .session import BASELINE_USED_KEY

SUITE = "cache_tune"


@dataclass
class TuneCheck(CacheInputs):
    """One search on one model; obtained from the ``dit_cache_tune_check`` fixture::

        def test_cache_tune(dit_cache_tune_check):
            dit_cache_tune_check.tune()
    """

    search: TuneSpec = None  # type: ignore[assignment]  # always given by the fixture
    notes: list[str] = field(default_factory=list)

    def tune(self) -> dict[str, Any]:
        """Search (``--dit-update-baselines``) or re-measure the stored frontier, judge, record, write the file."""
        plan = self.runnable_plan("cache tuning")
        update = self.session.config.update_baselines
        baseline = self.suite.baseline()  # read on updates too: a re-tune keeps the stored floors unless given
        stored = ((baseline.suite(SUITE) or {}) if baseline else {}).get(self.search.text)
        floors = self._floors(stored)
        stored = None if update else stored
        reference = self.reference(plan)
        try:
            require_finite("uncached", reference)
            tuner = self.tuner(plan, reference, floors)
            if update:
                outcome = self._retune(tuner)
            else:
                outcome = self._regate(tuner, stored, floors)
        except (NonFiniteRun, TuneSpecError, adherence.AdherenceError, CacheParameterError, CacheDependencyError,
                CacheBatchError, ScheduleError) as exc:
            self._fail(str(exc))
        except UnsupportedStrategy as exc:
            self._unsupported(str(exc), stored)
        except Exception as exc:
            where = engine_of(self.search.setting(self.search.lo)).failure(exc)
            if where is None:
                raise
            self._unsupported(where, stored)
        return outcome

    def _unsupported(self, reason: str, stored: dict | None) -> None:
        """The model cannot run the strategy: a skip, unless a stored tuning says it ran before (a regression)."""
        if stored:
            self._fail(f"{self.search.strategy} no longer runs on {self.spec.name} ({reason}), but its baseline holds "
                       "a tuning of it")
        pytest.skip(f"{self.search.strategy} does not run on {self.spec.name}: {reason}")

    # -- inputs ---------------------------------------------------------------------------------------------
    def _floors(self, stored: dict | None) -> Floors:
        given, classifier = self.options.floors, adherence.applies_to(self.spec)
        try:
            kept = Floors.from_dict(stored.get("floors")) if stored else Floors()
            if given and kept and given != kept and not self.session.config.update_baselines:
                self._fail(f"the floors changed from {kept} (stored with the tuning) to {given}: the stored "
                           "recommendation was tuned for other floors. Tune again:\n    " + self._update_command())
            floors = given or kept
            if not floors:
                self._fail("no quality floors to tune against: give them with --dit-cache-floor (e.g. "
                           "psnr:35,ssim:0.95" + (",adherence:1.0" if classifier else "") + ")")
            floors.require_measurable(classifier, self.spec.name)
        except FloorError as exc:
            self._fail(str(exc))
        return floors

    def tuner(self, plan: Any, reference: Any, floors: Floors) -> Tuner:
        request = self.suite.request if plan.settings == self.suite.settings else self.suite.request.variant(
            steps=plan.settings.steps, scheduler=plan.settings.scheduler)
        profile = self.suite.profile(steps=request.settings.steps, scheduler=request.settings.scheduler)
        return Tuner(plan, self.search, floors, reference, adherence.applies_to(self.spec), profile=profile,
                     context_for=self.context_for(plan), predictor=self._predictor(plan, profile))

    def _predictor(self, plan: Any, profile: Any) -> BoundPredictor | None:
        """The profile's prediction of the skip pattern for this search (it proposes the candidates); None, with
        the reason in the result's notes, where the profile cannot predict this strategy."""
        setting = self.search.setting(self.search.lo)
        fixed = {k: v for k, v in setting.params.items() if k != self.search.param}
        options: dict[str, Any] = {}
        try:
            if setting.strategy == "magcache":
                options["ratios"] = self.context_for(plan)(setting).mag_ratios
            return bind(setting.strategy, profile, fixed, **options)
        except PredictInputError as exc:
            self.notes.append(f"no prediction from the profile: {exc}")
            return None

    def variants(self, floors: Floors) -> list[tuple[str, Tuner | None]]:
        """A tuner at each ``--dit-step-factors`` step count and each other scheduler the model accepts (None, with
        the reason in the label, for a scheduler this pipeline cannot run)."""
        from ..profiling.schedulers import compatible_schedulers, scheduler_rejection

        request, out = self.suite.request, []
        steps = request.settings.steps
        for factor in self.session.config.step_factors:
            count = max(3, round(steps * factor))
            if count != steps:
                out.append((f"steps x{factor:g} ({count})", request.variant(steps=count)))
        names = self.session.config.schedulers or compatible_schedulers(self.spec.prediction)
        out += [(f"scheduler {name}", request.variant(scheduler=name)) for name in names
                if name != request.settings.scheduler]
        tuners = []
        for label, variant in out:
            plan = self.plan(variant)
            try:
                reference = self.reference(plan)
            except (ValueError, TypeError) as exc:  # a scheduler this pipeline cannot run: said, not hidden
                reason = scheduler_rejection(exc) if label.startswith("scheduler") else None
                if reason is None:
                    raise
                tuners.append((f"{label}: does not run ({reason})", None))
                continue
            require_finite(f"uncached ({label})", reference)
            tuners.append((label, self.tuner(plan, reference, floors)))
        return tuners

    # -- update: search and store -----------------------------------------------------------------------------
    def _retune(self, tuner: Tuner) -> dict[str, Any]:
        result = tuner.search(self.options.cliff_db)
        chosen = result.recommendation
        timed = tuner.timed_speedup(chosen.value, self.options.repeats) if chosen else None
        transfers = self._transfer(tuner, chosen)
        entry = self._entry(result, tuner, timed, transfers)
        if chosen is None:
            self._write_file(entry)
            self._record(entry, passed=False, updated=False)
            self._fail(f"no setting in {self.search.text} keeps the floors {result.floors}; nothing was stored. The "
                       f"closest is {result.best.setting}: " + "; ".join(result.best.failures)
                       + ". Widen the range, lower the floors, or choose another strategy.")
        self._store(entry)
        self._write_file(entry)
        return self._record(entry, passed=True, updated=True)

    def _transfer(self, tuner: Tuner, chosen: TunePoint | None) -> list[Transfer | str]:
        if chosen is None or not self.options.transfer:
            return []
        variants = self.variants(tuner.floors)
        runnable = [(label, there) for label, there in variants if there is not None]
        broken = [label for label, there in variants if there is None]
        return [*transfer(chosen.value, runnable, self.options.cliff_db), *broken]

    # -- gate: re-measure the stored frontier ---------------------------------------------------------------------
    def _regate(self, tuner: Tuner, stored: dict | None, floors: Floors) -> dict[str, Any]:
        if stored is None:
            self._fail(f"no stored tuning {self.search.text} for {self.spec.name} (settings {self.suite.key}) in "
                       f"{self.session.store.path_for(self.suite.baseline_name, self.suite.key)}.\nTune and store it "
                       f"with:\n    {self._update_command()}")
        frontier = [TunePoint.from_dict(p) for p in stored.get("frontier", [])]
        chosen = TunePoint.from_dict(stored["recommendation"]) if stored.get("recommendation") else None
        measured = []
        for old in frontier:
            point = tuner.evaluate(old.value)
            point.failures = floors.failures(point.quality)
            measured.append(point)
        tol = FrontierTolerance.from_gate(TOLERANCES.get(self.session.device_class, TOLERANCES["cuda"]))
        failures = frontier_moves(frontier, measured, tol)
        broken = recommendation_failure(chosen, measured, floors)
        if broken:
            failures.insert(0, broken)
        result = TuneResult(self.search.text, floors, measured, _stored_cliffs(stored), None, measured[0],
                            len(measured), [p.value for p in frontier], True, ["re-measured the stored frontier"])
        if chosen is not None:
            result.recommendation = next((p for p in measured if round(p.value, 12) == round(chosen.value, 12)), None)
        timed = (tuner.timed_speedup(chosen.value, self.options.repeats) if chosen and not failures else None)
        entry = self._entry(result, tuner, timed, [])
        entry["stored"] = stored
        self._write_file(entry)
        record = self._record(entry, passed=not failures, updated=False)
        if failures:
            self._fail(f"cache tuning {self.search.text} on {self.spec.name} changed ({self.suite.key}):\n"
                       + "\n".join(failures) + f"\nIf the change is intended, tune again:\n    {self._update_command()}")
        return record

    # -- what is written --------------------------------------------------------------------------------------
    def _entry(self, result: TuneResult, tuner: Tuner, timed: tuple[float, dict] | None,
               transfers: list[Transfer | str]) -> dict[str, Any]:
        chosen = result.recommendation
        data = result.as_dict()
        data["notes"] = [*self.notes, *data["notes"]]
        data.update({
            "model": self.spec.name, "strategy": self.search.strategy, "parameter": self.search.param,
            "range": [self.search.lo, self.search.hi], "settings_key": self.suite.key,
            "settings": {k: v for k, v in vars(self.suite.settings).items()},
            "speedup": None if timed is None else timed[0], "seconds": None if timed is None else timed[1],
            "code": None if chosen is None else self.code_line(chosen, tuner),
            "transfer": [t.as_dict() if isinstance(t, Transfer) else {"variant": t, "holds": None} for t in transfers],
        })
        return data

    def code_line(self, point: TunePoint, tuner: Tuner) -> str:
        """The imports and the line that apply ``point``'s setting to a pipeline ``pipe`` outside this harness (the
        profile schedule is saved beside the recommendation file first)."""
        from ..cache.spec import parse_spec

        setting = parse_spec(point.setting)
        values: dict[str, Any] = {"transformer_class": tuner.plan.transformer_class(),
                                  "steps": tuner.plan.settings.steps}
        if setting.strategy == "magcache":
            values["mag_ratios"] = tuner.context_for(setting).mag_ratios if tuner.context_for else None
        if setting.strategy == "profile":
            path = self._output_path(".schedule.json")
            tuner.schedule_for(setting).save(path)
            values["schedule_path"] = path.name
        engine = engine_of(setting)
        return "\n".join([*engine.code_imports(setting, **values), engine.code_line(setting, **values)])

    def _store(self, entry: dict[str, Any]) -> None:
        stored = {k: v for k, v in entry.items() if k not in ("stored",)}
        try:
            path = self.session.store.update(
                self.suite.baseline_name, self.suite.key, sections={f"suites.{SUITE}": {self.search.text: stored}},
                merge=True, metadata=self.session.baseline_metadata(self.suite.profile(), self.suite.request))
        except BaselineError as exc:
            self._fail(str(exc))
        emit(self.item, BASELINE_USED_KEY, str(path))

    def _output_path(self, suffix: str) -> Path:
        """``<tune dir>/<model>--<search><suffix>``, the folder made if needed."""
        folder = Path(self.item.config.invocation_params.dir) / self.options.tune_dir
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{safe_name(self.spec.name)}--{safe_name(self.search.text)}{suffix}"

    def _write_file(self, entry: dict[str, Any]) -> Path:
        path = self._output_path(".json")
        keep = ("model", "strategy", "parameter", "range", "floors", "settings_key", "settings", "recommendation",
                "best", "speedup", "code", "cliffs", "runs", "notes", "transfer")
        atomic_write_text(path, json.dumps({k: entry.get(k) for k in keep}, indent=2, default=str) + "\n")
        return path

    def _record(self, entry: dict[str, Any], *, passed: bool, updated: bool) -> dict[str, Any]:
        chosen = entry.get("recommendation")
        value = None if chosen is None else chosen["quality"]["psnr"]
        details = {k: v for k, v in entry.items() if k != "stored"}
        details["stored_frontier"] = (entry.get("stored") or {}).get("frontier")
        details["updated"] = updated
        self.suite.record(SUITE, "psnr", value, None, passed, **details)
        return {"model": self.spec.name, **details, "passed": passed}

    def _update_command(self) -> str:
        return self.session.command(self.spec, "--dit-update-baselines", f"-k {SUITE}")

    def _fail(self, message: str) -> None:
        pytest.fail(message if message.startswith("cache tuning") else
                    f"cache tuning {self.search} on {self.spec.name}: {message}", pytrace=False)


def _stored_cliffs(stored: dict) -> list:
    from ..cache.tuning import Cliff

    return [Cliff(**{k: v for k, v in c.items() if k != "drop_db"}) for c in stored.get("cliffs", [])]
