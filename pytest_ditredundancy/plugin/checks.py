"""The suites as pytest checks: the ``dit_check`` and ``dit_distinctness`` fixtures' objects.

The suites themselves are judged without pytest (:mod:`pytest_ditredundancy.judging.suites` returns a
:class:`~pytest_ditredundancy.judging.suites.Verdict`); here a verdict becomes the test's outcome: its
records and the baseline files it used reach the report (``relay.emit``), its warnings are raised in the test,
and a failed or skipped verdict fails or skips the test with the verdict's message.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import pytest

from ..judging.baselines import Baseline
from ..judging.suites import (PAPER_CV_RANGE, DitBaselineWarning, DitClaimWarning, SuiteJudge, Verdict,
                              judge_distinctness)
from ..zoo.registry import ModelSpec
from .relay import emit
from .session import BASELINE_USED_KEY, RECORD_KEY, DitSession

__all__ = ["DitBaselineWarning", "DitClaimWarning", "PAPER_CV_RANGE", "SuiteCheck", "conclude",
           "model_distinctness"]


def conclude(item: Any, verdict: Verdict, *, stacklevel: int = 3) -> Any:
    """Turn ``verdict`` into the outcome of test ``item``: records and baselines to the report, warnings into
    the test, then fail or skip with its message; returns the suite's statistics when it passed."""
    for record in verdict.records:
        emit(item, RECORD_KEY, record)
    for path in verdict.baselines_used:
        emit(item, BASELINE_USED_KEY, path)
    for warning in verdict.warnings:
        warnings.warn(warning, stacklevel=stacklevel)
    if verdict.outcome == "failed":
        pytest.fail(verdict.message, pytrace=False)
    if verdict.outcome == "skipped":
        pytest.skip(verdict.message)
    return verdict.result


@dataclass
class SuiteCheck:
    """The checks for one model. Obtained from the ``dit_check`` fixture::

        def test_prompt_stability(dit_check):
            dit_check.prompt_stability()
    """

    session: DitSession
    spec: ModelSpec
    item: Any
    judge: SuiteJudge = field(init=False)

    def __post_init__(self) -> None:
        self.judge = SuiteJudge(self.session, self.spec, self.item.nodeid)

    # -- the suites ---------------------------------------------------------------------------------------
    def prompt_stability(self) -> Any:
        """CV across prompts for every kind: the paper's statistic and a robust, mean-weighted one."""
        return conclude(self.item, self.judge.run("prompt_stability"))

    def step_stability(self) -> Any:
        """The profile's shape at other step counts (``--dit-step-factors``)."""
        return conclude(self.item, self.judge.run("step_stability"))

    def scheduler_stability(self) -> Any:
        """The profile's shape under other schedulers (``--dit-schedulers``)."""
        return conclude(self.item, self.judge.run("scheduler_stability"))

    def baseline_regression(self, metric: str = "abs_l1") -> Any:
        """The mean profile against the stored one, cell by cell, two-sided."""
        return conclude(self.item, self.judge.run("baseline_regression", metric))

    # -- plumbing other checks share (the cache gate) -------------------------------------------------------
    #: read-only facts of the run, answered by the judge: ``request``, ``settings``, ``key``, ``baseline_name``
    #: and ``tolerance(baseline)``
    SHARED = frozenset({"request", "settings", "key", "baseline_name", "tolerance"})

    def __getattr__(self, name: str) -> Any:
        if name in SuiteCheck.SHARED:
            return getattr(self.judge, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def profile(self, **overrides: Any) -> Any:
        """The session's profile; a non-finite one fails the test (naming where NaN first appeared)."""
        return self._plumbing(lambda: self.judge.profile(**overrides))

    def baseline(self) -> Baseline | None:
        """The model's baseline (checked against this run's settings), or None."""
        return self._plumbing(self.judge.baseline)

    def record(self, suite: str, statistic: str, value: float | None, bounds: list | None, passed: bool,
               **details: Any) -> None:
        """One finding of another check (the cache gate) for the report, in the suites' record format."""
        self._plumbing(lambda: self.judge.record(suite, statistic, value, bounds, passed, **details))

    def _plumbing(self, work: Any) -> Any:
        return conclude(self.item, self.judge.call(work), stacklevel=5)


def model_distinctness(session: DitSession, item: Any) -> Any:
    """Paper finding 1: different models have different redundancy distributions (the ``dit_distinctness``
    fixture's check)."""
    return conclude(item, judge_distinctness(session, item.nodeid))
