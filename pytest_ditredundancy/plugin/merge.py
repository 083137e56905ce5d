"""Merge shard runs (``--dit-shard=K/N --dit-json=shard-K.json``) into one report and one profile per model.

Each shard JSON carries its per-prompt profiles and the suite calls it deferred. The merge checks that the
shards ran the same settings and cover every prompt exactly once, concatenates the profiles in prompt
order (the same arrays an unsharded run makes: prompt ``i`` used seed ``seed + i`` on every shard), then
replays the deferred suite calls on the merged profiles with the same code the plugin runs, so the
verdicts and numbers are those of a single-machine run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..capture.profile import ProfileMetadata, RedundancyProfile
from ..io import FileReadError, read_json
from ..judging.baselines import Baseline, BaselineError, BaselineStore, read_baseline_file, safe_name
from ..judging.suites import SuiteJudge, Verdict, judge_distinctness
from ..profiling.settings import RunSettings
from ..report.document import SCHEMA, build_document, write_json
from ..report.html import write_html
from ..report.summary import profile_summary
from ..zoo.registry import ModelSpec
from .options import DitConfig
from .session import DitSession, PipelineSlot
from .shard import spec_from_fields

#: run settings every shard must share (batch size, device index and baseline directory may differ)
AGREE = ("models", "dtype", "prompts", "prompt_source", "num_prompts", "steps", "scheduler", "seed",
         "step_factors", "schedulers", "cv_bounds", "min_shape_correlation", "enforce_claims", "tolerance",
         "protocol", "seed_given")
BAD = ("failed", "error", "crashed")


class MergeError(ValueError):
    """Shards that cannot be merged; the message names the files and what differs."""


@dataclass
class Shard:
    path: Path
    doc: dict[str, Any]

    @property
    def index(self) -> int:
        return int(self.doc["shard"]["index"])

    @property
    def count(self) -> int:
        return int(self.doc["shard"]["count"])


def load_shards(paths: list[str | Path]) -> list[Shard]:
    shards = []
    for path in map(Path, paths):
        try:
            doc = read_json(path, "shard file", fix="was the shard run interrupted? run that shard again",
                            path_fix="pass the files the shards wrote with --dit-json")
        except FileReadError as exc:
            raise MergeError(str(exc)) from None
        if doc.get("schema") != SCHEMA:
            raise MergeError(f"{path} is not a pytest-ditredundancy report (schema {SCHEMA!r})")
        if not doc.get("shard") or "shard_profiles" not in doc:
            raise MergeError(f"{path} is not a shard run: create shards with --dit-shard=K/N --dit-json=PATH")
        shards.append(Shard(path, doc))
    if not shards:
        raise MergeError("no shard files given")
    return sorted(shards, key=lambda s: s.index)


def check_shards(shards: list[Shard]) -> None:
    """Same shard count, same settings, every shard present exactly once."""
    counts = {s.count for s in shards}
    if len(counts) > 1:
        raise MergeError("shards were cut differently: " + ", ".join(f"{s.path.name} is {s.index}/{s.count}" for s in shards))
    for name in AGREE:
        values = {json.dumps(s.doc["run"].get(name), sort_keys=True) for s in shards}
        if len(values) > 1:
            raise MergeError(f"shards disagree on model settings: {name} is " + "; ".join(
                f"{s.doc['run'].get(name)!r} in {s.path.name}" for s in shards))
    seen: dict[int, Path] = {}
    for shard in shards:
        if shard.index in seen:
            raise MergeError(f"{seen[shard.index].name} and {shard.path.name} are both shard {shard.index}/{shard.count}: "
                             f"they overlap on prompts {_span(shard.doc['shard']['prompts'])}")
        seen[shard.index] = shard.path
    count, total = shards[0].count, shards[0].doc["shard"].get("total", len(shards[0].doc["run"]["prompts"]))
    missing = [k for k in range(1, count + 1) if k not in seen]
    if missing:
        spans = ", ".join(f"{k}/{count} (prompts {_span([(k - 1) * total // count, k * total // count])})"
                          if total is not None else f"{k}/{count}" for k in missing)
        raise MergeError(f"missing shard(s) {spans}: merge every shard of the run")


def _span(bounds: list[int | None]) -> str:
    if bounds[0] is None:  # models with prompt sets of different sizes: each has its own block
        return "of each model's own set"
    return f"{bounds[0]}–{bounds[1] - 1}"


def merge_profiles(parts: list[tuple[int, int, RedundancyProfile]], total: int, label: str) -> RedundancyProfile:
    """Concatenate ``(start, end, profile)`` parts in prompt order; they must cover ``0..total`` exactly once
    and agree on layout (layers, kinds, branches, steps, timesteps, dtype)."""
    parts = sorted(parts, key=lambda p: p[0])
    position = 0
    for start, end, profile in parts:
        if profile.num_prompts != end - start:
            raise MergeError(f"{label}: a shard claims prompts {start}–{end - 1} but holds {profile.num_prompts}")
        if start < position:
            raise MergeError(f"{label}: prompts {start}–{min(end, position) - 1} were profiled by two shards (overlap)")
        if start > position:
            raise MergeError(f"{label}: prompts {position}–{start - 1} are missing (no shard profiled them)")
        position = end
    if position != total:
        raise MergeError(f"{label}: prompts {position}–{total - 1} are missing (no shard profiled them)")
    first = parts[0][2]
    for _, _, other in parts[1:]:
        for what, a, b in (("layers", first.layers, other.layers), ("kinds", first.kinds, other.kinds),
                           ("branches", first.branches, other.branches),
                           ("step pairs", first.num_step_pairs, other.num_step_pairs),
                           ("dtype", first.metadata.dtype, other.metadata.dtype),
                           ("scheduler", first.metadata.scheduler_class, other.metadata.scheduler_class)):
            if a != b:
                raise MergeError(f"{label}: shards disagree on model settings ({what}: {a} vs {b})")
        if not np.allclose(first.metadata.timesteps, other.metadata.timesteps):
            raise MergeError(f"{label}: shards disagree on model settings (timesteps differ)")
    _require_complete(parts, label)
    meta = ProfileMetadata.from_dict({**first.metadata.__dict__, "prompts": [p for _, _, q in parts for p in q.metadata.prompts],
                                      "extra": {**first.metadata.extra, "prompt_offset": 0}})
    values = {m: np.concatenate([q.values[m] for _, _, q in parts]) for m in first.values}
    return RedundancyProfile(list(first.layers), list(first.kinds), list(first.branches), values,
                             np.concatenate([q.computed for _, _, q in parts]), meta)


def _require_complete(parts: list[tuple[int, int, RedundancyProfile]], label: str) -> None:
    """Every prompt of every shard must have measured every series some prompt measured: a shard that lost
    series (a crashed hook, a layer that stopped running) would otherwise merge into NaN cells read as drift."""
    union = np.zeros(parts[0][2].shape[1:], dtype=bool)
    for _, _, profile in parts:
        union |= profile.computed.any(axis=0)
    series = union.any(axis=-1)  # [branch, kind, layer]
    for start, end, profile in parts:
        lost = union[None] & ~profile.computed  # [prompt, branch, kind, layer, step]
        if not lost.any():
            continue
        lost_series = lost.any(axis=(0, -1)) & series
        b, k, l = np.argwhere(lost.any(axis=(0, -1)))[0]
        raise MergeError(
            f"{label}: the shard with prompts {start}-{end - 1} is incomplete: it lacks {int(lost_series.sum())} of "
            f"{int(series.sum())} series the other prompts measured (first: layer {profile.layers[l]}, kind "
            f"{profile.kinds[k]}, branch {profile.branches[b]}). Re-run that shard; a merge never fills gaps")


def config_from_run(run: dict[str, Any], baseline_dir: Path | None = None) -> DitConfig:
    """The shards' DitConfig, rebuilt from the report's run section."""
    known = {f.name for f in fields(DitConfig)}
    values = {k: v for k, v in run.items() if k in known}
    for name in ("models", "prompts", "step_factors", "schedulers"):
        values[name] = tuple(values.get(name) or ())
    for name in ("cv_bounds", "min_shape_correlation", "enforce_claims", "tolerance"):
        if name not in values:
            raise MergeError(f"the shards' run settings lack {name!r}: they were written by another version of the "
                             "plugin; re-run the shards with this one")
    values["cv_bounds"] = tuple(values["cv_bounds"])
    values["baseline_dir"] = Path(baseline_dir or values["baseline_dir"])
    given = {k: v for k, v in (values.get("given") or {}).items() if k not in ("--dit-shard", "--dit-json", "--dit-report")}
    values.update(report=None, json=None, shard=None, update_baselines=False, given=given)  # commands it suggests: unsharded
    return DitConfig(**values)


class _NoPipelines(PipelineSlot):
    """A merge never runs a model: a profile the shards did not send is an error, not a download."""

    def get(self, spec: ModelSpec) -> Any:
        raise MergeError(f"no shard sent a profile of {spec.name} with the settings a deferred check needs")


@dataclass
class MergeSession(DitSession):
    """A session whose profiles are the merged ones, on the shards' device class and models."""

    specs: dict[str, ModelSpec] = field(default_factory=dict)
    device_name: str = "cpu"

    @property
    def device(self) -> torch.device:  # the shards' device, not the merging machine's
        return torch.device(self.device_name)

    def spec(self, model: str) -> ModelSpec:
        """A model by name, or as the shards' user typed it (``--dit-model=./ckpt``)."""
        if model not in self.specs:
            model = next((name for name, typed in self.references.items() if typed == model), model)
        if model not in self.specs:
            raise MergeError(f"no shard profiled {model}")
        return self.specs[model]


def replay(session: DitSession, deferred: list[dict[str, Any]]) -> tuple[list[dict], dict[str, str], dict[str, str]]:
    """Run the deferred suite calls: (records, outcome per test, message per test)."""
    records, results, messages = [], {}, {}
    for call in sorted(deferred, key=lambda c: (c["nodeid"], c["call"])):
        try:
            if call["call"] == "model_distinctness":
                verdict = judge_distinctness(session, call["nodeid"])
            else:
                judge = SuiteJudge(session, session.spec(call["model"]), call["nodeid"])
                verdict = judge.run(call["call"], *call.get("args", ()), **call.get("kwargs", {}))
        except MergeError as exc:
            verdict = Verdict("error", str(exc))
        outcome, message = verdict.outcome, verdict.message
        records += verdict.records
        if results.get(call["nodeid"]) not in BAD:
            results[call["nodeid"]] = outcome
            if message:
                messages[call["nodeid"]] = message
    return records, results, messages


def merge(paths: list[str | Path], *, report: Path | None = None, json_path: Path | None = None,
          profiles_dir: Path | None = None, baseline_dir: Path | None = None) -> dict[str, Any]:
    """Merge shard JSONs; write the report / JSON / merged profiles that were asked for; return the document."""
    started = time.time()
    shards = load_shards(paths)
    check_shards(shards)
    run = dict(shards[0].doc["run"])
    config = config_from_run(run, baseline_dir)
    groups: dict[tuple[str, str], list[dict]] = {}
    for shard in shards:
        for entry in shard.doc["shard_profiles"]:
            groups.setdefault((entry["model"], entry["settings_key"]), []).append(entry)
    devices = {e["profile"]["metadata"].get("device") or "cpu" for g in groups.values() for e in g}
    check_device_classes(shards)
    specs = {model: spec_from_fields(group[0]["spec"]) for (model, _), group in groups.items()}
    session = MergeSession(config=config, store=BaselineStore(config.baseline_dir), slot=_NoPipelines("cpu", "float32", 0),
                           specs=specs, device_name=sorted(devices)[0] if devices else "cpu")
    session.references.update({model: group[0].get("reference", model) for (model, _), group in groups.items()})
    summaries, merged = [], {}
    for (model, key), group in sorted(groups.items()):
        label = f"{model} ({key})"
        parts = [(e["start"], e["end"], RedundancyProfile.from_json(json.dumps(e["profile"]), source=label)) for e in group]
        spec, settings = specs[model], RunSettings(**group[0]["settings"])
        request = session.request(spec, steps=settings.steps, scheduler=settings.scheduler)
        profile = merge_profiles(parts, len(request.prompts), label)
        profile.metadata.extra["settings_key"] = settings.key()
        merged[(model, key)] = profile
        session.profiles[session.profile_key(request)] = profile
        default = session.request(spec).settings
        summaries.append(profile_summary(profile, model=model, family=spec.family, in_paper=spec.in_paper,
                                         settings=settings, settings_key=key, default=default,
                                         baseline=_baseline(session.store, group[0].get("baseline_name", model), key)
                                         if settings == default else None,
                                         device_class=session.device_class))
        if profiles_dir is not None:
            profile.save(Path(profiles_dir) / safe_name(model) / f"{key}.json")
    deferred = {json.dumps(d, sort_keys=True): d for s in shards for d in s.doc.get("deferred", [])}
    records, replayed, messages = replay(session, list(deferred.values()))
    records += _undeferred_records(shards, {d["nodeid"] for d in deferred.values()})
    doc = build_document(run=run, records=records, summaries=summaries, tests=_tests(shards, replayed, messages),
                         environment=_environment(shards), started=started, finished=time.time())
    doc["merged_from"] = [s.path.name for s in shards]
    doc["run"]["command"] = "merge " + " ".join(s.path.name for s in shards)
    if report is not None:
        write_html(doc, report)
    if json_path is not None:
        write_json(doc, json_path)
    return doc


def check_device_classes(shards: list[Shard]) -> None:
    """Shards must have run on one device class: tolerances are per class (CPU runs repeat to ~1e-6, GPU
    kernels and half precision move values by percents), and one merged profile has one."""
    classes: dict[str, list[str]] = {}
    for shard in shards:
        for entry in shard.doc["shard_profiles"]:
            kind = str(entry["profile"]["metadata"].get("device") or "cpu").split(":")[0]  # cuda:3 -> cuda
            names = classes.setdefault(kind, [])
            if shard.path.name not in names:
                names.append(shard.path.name)
    if len(classes) > 1:
        raise MergeError("shards ran on different kinds of device (" + "; ".join(
            f"{kind} in {', '.join(names)}" for kind, names in sorted(classes.items())) + "): their values differ by "
            "more than the tolerances of either; run every shard on one kind of device (--dit-device)")


def _undeferred_records(shards: list[Shard], deferred: set[str]) -> list[dict[str, Any]]:
    """Records of suites a shard judged itself (not through ``dit_check``, e.g. the cache gate, which runs
    every prompt on every shard): carried over, once per test and statistic."""
    kept: dict[tuple, dict] = {}
    for shard in shards:
        for record in shard.doc.get("records", []):
            if record.get("nodeid") not in deferred:
                kept.setdefault((record.get("nodeid"), record["model"], record["suite"], record["statistic"]), record)
    return list(kept.values())


def _baseline(store: BaselineStore, model: str, key: str) -> Baseline | None:
    path = store.path_for(model, key)
    try:
        return Baseline(path, model, key, read_baseline_file(path)) if path.exists() else None
    except BaselineError:
        return None


def _tests(shards: list[Shard], replayed: dict[str, str], messages: dict[str, str]) -> dict[str, Any]:
    """Every shard ran every test: a test's merged outcome is the replayed verdict of a deferred suite, else
    the worst outcome any shard saw."""
    results: dict[str, str] = {}
    notes: dict[str, str] = {}
    rank = {"crashed": 5, "error": 4, "failed": 3, "xpassed": 2, "passed": 1, "xfailed": 1, "skipped": 0}
    for shard in shards:
        tests = shard.doc["tests"]
        for nodeid, outcome in tests["results"].items():
            if rank.get(outcome, 0) >= rank.get(results.get(nodeid, "skipped"), 0):
                results[nodeid] = outcome
                if nodeid in tests["messages"]:
                    notes[nodeid] = tests["messages"][nodeid]
    for nodeid, outcome in replayed.items():
        if results.get(nodeid) not in BAD:
            results[nodeid] = outcome
            notes.pop(nodeid, None)
            if nodeid in messages:
                notes[nodeid] = messages[nodeid]
    missing = {m["nodeid"]: {**m, "reason": f"{m['reason']} (shard {s.index}/{s.count})"}
               for s in shards for m in s.doc["tests"]["missing"]}
    return {"collected": max(s.doc["tests"]["collected"] for s in shards), "results": dict(sorted(results.items())),
            "messages": dict(sorted(notes.items())), "missing": list(missing.values())}


def _environment(shards: list[Shard]) -> dict[str, Any]:
    first = shards[0].doc["environment"]
    return {**first, "gpus": sorted({g for s in shards for g in s.doc["environment"].get("gpus", [])}),
            "devices": sorted({d for s in shards for d in s.doc["environment"].get("devices", [])}),
            "workers": [{**w, "worker": f"shard {s.index}/{s.count} {w['worker']}"} for s in shards
                        for w in s.doc["environment"].get("workers", [])]}
