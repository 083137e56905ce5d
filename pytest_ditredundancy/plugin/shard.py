"""Prompt sharding (``--dit-shard=K/N``): each machine profiles one contiguous block of the prompt list.

Shard ``K`` (1..N) of ``P`` prompts holds prompts ``[(K-1)·P//N, K·P//N)``. Contiguous blocks keep the
generator seeds identical to an unsharded run (prompt ``i`` always uses ``seed + i``, through
``prompt_offset``), so concatenating the shards' profiles gives the unsharded profile.

A shard sees only some prompts, so its suite statistics (CV across prompts, the mean profile against the
baseline) are not the run's. Under sharding the ``dit_check`` fixture therefore only computes the profiles a
suite needs, notes the call, and skips; ``python -m pytest_ditredundancy merge`` replays the noted calls on
the merged profiles and judges them there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import pytest

from ..zoo.registry import ModelSpec
from .relay import emit

#: key (in a test's data, ``relay.emit``) of a suite call a shard deferred to the merge
DEFERRED_KEY = "ditredundancy-deferred"
#: SuiteCheck attributes that are plumbing, not suites: handed through unchanged
PLUMBING = frozenset({"profile", "baseline", "settings", "key", "request", "tolerance", "baseline_name", "session",
                      "spec", "item", "judge"})
#: the ModelSpec fields a merge needs to rebuild the spec without the model's registry entry
SPEC_FIELDS = ("name", "family", "pipeline_class", "checkpoint", "steps", "height", "width", "guidance_scale",
               "scheduler", "dtype", "num_frames", "frames_argument", "conditioning", "prediction", "branch_layout",
               "in_paper", "description", "prompt_set")


class ShardError(ValueError):
    """A shard specification that cannot be used."""


def parse_shard(text: str, total: int | None) -> tuple[int, int]:
    """``"K/N"`` -> ``(K, N)``, checked against the number of prompts (no shard may be empty; ``None``: not
    known yet). A model running a prompt set of its own is checked by :func:`check_shard_fits`."""
    try:
        k, n = (int(part) for part in str(text).strip().split("/"))
    except ValueError:
        raise ShardError(f"expected K/N with whole numbers, e.g. 2/8, got {text!r}") from None
    if n < 1 or not 1 <= k <= n:
        raise ShardError(f"shard {k}/{n} does not exist: K counts from 1 to N")
    if total is not None and n > total:
        raise ShardError(f"{n} shards of {total} prompts would leave some empty: use at most {total} shards or "
                         "more prompts (--dit-num-prompts)")
    return k, n


def check_shard_fits(shard: tuple[int, int] | None, model: str, total: int) -> None:
    """A model running its own prompt set (the trained models' ``shapes`` captions) must have a prompt for every
    shard: :class:`ShardError` naming the model, its count and the fix."""
    if shard is not None and shard[1] > total:
        raise ShardError(f"--dit-shard={shard[0]}/{shard[1]}: {model} runs its own set of {total} prompts, so "
                         f"{shard[1]} shards would leave some empty: use at most {total} shards for it, or name "
                         "a larger prompt set for every model (--dit-prompts)")


def shard_range(total: int, shard: tuple[int, int] | None) -> tuple[int, int]:
    """``(start, end)`` of the prompts shard ``(K, N)`` profiles; everything without a shard."""
    if shard is None:
        return 0, total
    k, n = shard
    return (k - 1) * total // n, k * total // n


def spec_fields(spec: ModelSpec) -> dict[str, Any]:
    return {name: getattr(spec, name) for name in SPEC_FIELDS}


def spec_from_fields(fields: dict[str, Any]) -> ModelSpec:
    return ModelSpec(**{k: v for k, v in fields.items() if k in SPEC_FIELDS})


@dataclass
class ScratchItem:
    """Stands in for a test item where a check's own records must not reach the report (or, in a merge, are
    collected from it: ``relay.emitted``)."""

    nodeid: str
    stash: dict = field(default_factory=dict)


def _note(item: Any, model: str, spec: ModelSpec | None, call: str, args: tuple, kwargs: dict) -> None:
    emit(item, DEFERRED_KEY, {
        "nodeid": item.nodeid, "model": model, "spec": spec_fields(spec) if spec else None, "call": call,
        "args": [_plain(a) for a in args], "kwargs": {k: _plain(v) for k, v in kwargs.items()}})


def _plain(value: Any) -> Any:
    """Suite arguments travel to the controller and into JSON: plain scalars as they are, the rest as text."""
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


def _skip(shard: tuple[int, int], what: str) -> None:
    pytest.skip(f"shard {shard[0]}/{shard[1]}: profiles recorded; {what} is judged on every prompt by "
                "'python -m pytest_ditredundancy merge'")


class DeferredChecks:
    """What ``dit_check`` returns under ``--dit-shard``: every suite method computes its profiles, notes the
    call for the merge, and skips; failures on the shard's partial statistics are not reported."""

    def __init__(self, make_check: Callable[[Any], Any], item: Any, shard: tuple[int, int]) -> None:
        self._check = make_check(ScratchItem(item.nodeid))
        self._item, self._shard = item, shard

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._check, name)
        if name.startswith("_") or name in PLUMBING or not callable(attr):
            return attr

        def deferred(*args: Any, **kwargs: Any) -> None:
            spec = self._check.spec
            _note(self._item, spec.name, spec, name, args, kwargs)
            try:
                attr(*args, **kwargs)
            except (pytest.fail.Exception, pytest.skip.Exception):
                pass  # the shard's own verdict: partial data, not reported
            _skip(self._shard, f"{name} of {spec.name}")

        deferred.__name__ = name
        return deferred


def deferred_distinctness(session: Any, item: Any, shard: tuple[int, int]) -> None:
    """The cross-model suite under sharding: profile every selected model, note the call, skip."""
    models = session.selected_models()
    if len(models) < 2:
        pytest.skip("model distinctness needs two or more models (--dit-model=a,b)")
    for name in models:
        session.profile(session.request(session.spec(name)))
    _note(item, "", None, "model_distinctness", (), {})
    _skip(shard, "model distinctness")
