"""The report's content as one plain document: what ``--dit-json`` writes and what the HTML page shows.

Built on the controller (or by ``merge``) from plain builtins only: suite records, profile summaries,
test outcomes and environment facts, so it is the same whatever ran the tests (serial, xdist, shards).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterable


from ..capture.environment import versions
from ..io import atomic_write_text, plain
from ..judging.verdicts import PAPER_CV_RANGE
from . import tuning

SCHEMA = "pytest-ditredundancy/report"
SCHEMA_VERSION = 1
#: fields that differ between runs of the same tests (when and where they ran), left out of comparisons
TIMING_FIELDS = ("created", "duration_s", "environment")
SUITE_ORDER = ("prompt_stability", "step_stability", "scheduler_stability", "baseline_regression")
SUITE_TITLES = {"prompt_stability": "Prompt stability", "step_stability": "Step-count stability",
                "scheduler_stability": "Scheduler stability", "baseline_regression": "Baseline regression",
                "model_distinctness": "Model distinctness", "cache_tune": "Cache tuning"}


def jsonable(value: Any) -> Any:
    """Plain, strict-JSON builtins: numpy scalars unwrapped, NaN/inf as None, tuples and sets as lists."""
    return plain(value, lambda v: None if isinstance(v, float) and not math.isfinite(v) else v)


def config_dict(cfg: Any, models: list[str]) -> dict[str, Any]:
    """Every setting of the run (the plugin's ``DitConfig``: enough for ``merge`` to rebuild the session), models
    resolved."""
    out = {f.name: jsonable(getattr(cfg, f.name)) for f in fields(cfg)}
    out["models"] = list(models)
    out["prompt_digest"] = cfg.prompt_digest
    return out


def paper_families() -> list[str]:
    from ..zoo.registry import registered_models

    return sorted({spec.family for spec in registered_models().values() if spec.in_paper})


def controller_environment() -> dict[str, Any]:
    """Facts about the machine that wrote the report."""
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"versions": versions(), "python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "gpus": gpus, "cuda": torch.version.cuda}


def model_of(nodeid: str, models: Iterable[str]) -> str | None:
    """The model a parametrized test ran for: its id is the model name, alone or among other ids."""
    match = re.search(r"\[(.*)\]$", nodeid)
    if not match:
        return None
    parts = match.group(1)
    for model in sorted(models, key=len, reverse=True):
        if parts == model or parts.startswith(model + "-") or parts.endswith("-" + model) or f"-{model}-" in parts:
            return model
    return None


def kind_rank(kind: str | None) -> tuple:
    """K, V, A first, then their variants (k_text, v_text, a_text), then anything else."""
    base, _, rest = (kind or "").partition("_")
    return (rest, {"k": 0, "v": 1, "a": 2}.get(base, 3), kind or "")


def kind_label(kind: str | None) -> str:
    """``k`` -> ``K``, ``v_text`` -> ``V (text)``: the labels the charts use."""
    base, _, rest = (kind or "?").partition("_")
    label = {"k": "K", "v": "V", "a": "A"}.get(base, base)
    return f"{label} ({rest.replace('_', ' ')})" if rest else label


def _record_order(record: dict[str, Any]) -> tuple:
    return (record["model"], record["suite"], record.get("nodeid", ""), str(record.get("variant", "")),
            kind_rank(record.get("kind")), record["statistic"])


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)


def headline(suite: str, records: list[dict[str, Any]]) -> str:
    """The suite's key numbers in one short line."""
    values = [r for r in records if r.get("value") is not None]
    if suite == "prompt_stability":
        return "CV " + " · ".join(f"{kind_label(r.get('kind'))} {_fmt(r['value'])}" for r in values)
    if suite in ("step_stability", "scheduler_stability"):
        if not values:
            return "no comparable variant"
        worst = min(values, key=lambda r: r["value"])
        return f"r ≥ {_fmt(worst['value'])} ({worst.get('variant', '')}/{worst.get('kind', '')})"
    if suite == "baseline_regression":
        if any(r.get("updated") for r in records):
            return "baseline updated"
        return " · ".join(f"{int(r['value'])} of {r.get('cells', '?')} cells out of tolerance" for r in values)
    if suite == tuning.SUITE:
        return tuning.headline(records)
    failed = sum(not r["passed"] for r in records)
    return f"{len(records) - failed}/{len(records)} checks within bounds"


def claim_not_met(record: dict[str, Any]) -> bool:
    """A stability claim of the paper that the model breaks: reported (it passes unless claims are enforced),
    but never shown as met."""
    return record.get("question") == "claim" and record.get("met") is False


def bounds_text(records: list[dict[str, Any]]) -> str:
    texts = sorted({f"[{_fmt(r['bounds'][0])}, {_fmt(r['bounds'][1])}]" for r in records
                    if isinstance(r.get("bounds"), list) and len(r["bounds"]) == 2})
    return " ".join(texts[:2]) + (" …" if len(texts) > 2 else "")


#: how the report names each protocol
PROTOCOL_TITLES = {"project": "project (this package's definitions)",
                   "paper": "paper (the study's protocol, exactly)"}


def _model_entry(model: str, records: list[dict], summaries: list[dict], tests: dict[str, Any],
                 spec_info: dict[str, Any], paper: list[str], deferred: int, protocol: str = "project",
                 not_run: list[str] | None = None) -> dict[str, Any]:
    """``not_run``: the model's tests that never reported a result; a model with any is incomplete (unless
    failed), since its records speak only for the tests that ran."""
    suites: dict[str, dict[str, Any]] = {}
    for record in records:
        suites.setdefault(record["suite"], {"records": []})["records"].append(record)
    ordered = {name: suites[name] for name in [*SUITE_ORDER, *sorted(suites)] if name in suites}
    for name, suite in ordered.items():
        suite.update(title=SUITE_TITLES.get(name, name.replace("_", " ").capitalize()),
                     passed=all(r["passed"] for r in suite["records"]),
                     headline=headline(name, suite["records"]), bounds=bounds_text(suite["records"]),
                     claims_not_met=sum(claim_not_met(r) for r in suite["records"]))
    own_tests = {nodeid: outcome for nodeid, outcome in tests["results"].items() if tests["models"].get(nodeid) == model}
    bad = sorted(n for n, o in own_tests.items() if o in ("failed", "error", "crashed"))
    not_run = sorted(n for n in not_run or () if n not in own_tests)  # a crashed test is bad, not "not run"
    if bad or any(not s["passed"] for s in ordered.values()):
        status = "failed"
    elif not_run:
        status = "incomplete"
    elif ordered:
        status = "passed"
    else:
        status = "deferred" if deferred else ("no results" if not summaries else "profiled")
    family = spec_info.get("family", "")
    cvs = [r for r in suites.get("prompt_stability", {}).get("records", []) if r.get("paper_cv") is not None]
    protocols = sorted({item.get("protocol") or "project" for item in [*summaries, *records]})
    return {"model": model, "family": family, "in_paper": bool(spec_info.get("in_paper")),
            "protocol": ", ".join(protocols) or protocol,
            "paper_family": family in paper, "status": status, "suites": ordered,
            "paper_cv": {r.get("kind", "?"): r["paper_cv"] for r in cvs},
            "cache_tune": [tuning.search_summary(r) for r in suites.get(tuning.SUITE, {}).get("records", [])],
            "tests": {"total": len(own_tests), "bad": bad, "not_run": not_run},
            "profiles": sorted(summaries, key=lambda s: (not s["is_default"], s["label"]))}


def build_document(*, run: dict[str, Any], records: list[dict[str, Any]], summaries: list[dict[str, Any]],
                   tests: dict[str, Any], environment: dict[str, Any], started: float, finished: float,
                   shard: dict[str, Any] | None = None, shard_profiles: list[dict[str, Any]] | None = None,
                   deferred: list[dict[str, Any]] | None = None, title: str = "DiT redundancy report") -> dict[str, Any]:
    """Assemble the document; ``tests`` is ``{"collected", "results", "messages", "missing"}``."""
    records = sorted((jsonable(r) for r in records), key=_record_order)
    models = list(run.get("models") or [])
    for item in [*(r for r in records if r["suite"] != "model_distinctness"), *summaries]:
        if item["model"] not in models:
            models.append(item["model"])
    tests = dict(tests)
    tests["models"] = {nodeid: model_of(nodeid, models) for nodeid in tests["results"]}
    counts: dict[str, int] = {}
    for outcome in tests["results"].values():
        counts[outcome] = counts.get(outcome, 0) + 1
    tests["counts"] = counts
    spec_info = {s["model"]: s for s in summaries}
    for entry in shard_profiles or ():
        spec_info.setdefault(entry["model"], entry.get("spec") or {})
    for record in records:
        spec_info.setdefault(record["model"], {"family": record.get("family", "")})
    paper = paper_families()
    deferred_models = {d["model"] for d in deferred or ()}
    protocol = run.get("protocol") or "project"
    not_run: dict[str | None, list[str]] = {}
    for item in tests["missing"]:
        not_run.setdefault(model_of(item["nodeid"], models), []).append(item["nodeid"])
    entries = [_model_entry(m, [r for r in records if r["model"] == m and r["suite"] != "model_distinctness"],
                            [s for s in summaries if s["model"] == m], tests, spec_info.get(m, {}), paper,
                            int(m in deferred_models), protocol, not_run.get(m)) for m in models]
    cross = [r for r in records if r["suite"] == "model_distinctness"]
    failed = sum(e["status"] == "failed" for e in entries) + sum(not r["passed"] for r in cross)
    doc = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "title": title,
        "created": _dt.datetime.fromtimestamp(finished, _dt.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(finished - started, 3),
        "dtypes": sorted({s["metadata"]["dtype"] for s in summaries if s["metadata"].get("dtype")}),
        "status": "failed" if failed or tests["missing"] or counts.get("failed") or counts.get("error") else "passed",
        "run": run, "environment": environment,
        "paper": {"cv_range": list(PAPER_CV_RANGE), "families": paper},
        "protocol": protocol, "protocol_titles": dict(PROTOCOL_TITLES),
        "models": entries, "cross_model": cross, "records": records, "tests": tests,
        "shard": shard,
    }
    if shard_profiles is not None:
        doc["shard_profiles"] = shard_profiles
        doc["deferred"] = deferred or []
    return jsonable(doc)


def comparable(doc: dict[str, Any]) -> dict[str, Any]:
    """The document without its timing fields (for comparing two runs of the same tests)."""
    return {k: v for k, v in doc.items() if k not in TIMING_FIELDS}


def write_json(doc: dict[str, Any], path: Path) -> Path:
    return atomic_write_text(Path(path), json.dumps(doc, indent=1, allow_nan=False) + "\n")
