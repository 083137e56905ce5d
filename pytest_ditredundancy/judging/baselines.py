"""Stored baselines: ``<baseline dir>/<model>/<settings key>.json``, one file per model × settings.

A baseline holds sections, each written by one suite: ``profile`` (mean and prompt-to-prompt spread of the
profile, per kind × layer × step; the regression suite) and ``suites.<name>`` (a suite's statistics and
bounds). ``--dit-update-baselines`` rewrites only the sections of the tests that ran and keeps the rest.
Writes are atomic and merged under a file lock, so parallel workers never lose each other's sections.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..io import FileReadError, atomic_write_text, plain, read_json, stale_temporaries, temporary_target, write_target
from .baseline_schema import SchemaProblem, validate_baseline
from .tolerances import Tolerance, default_table, resolve

SCHEMA = "pytest-ditredundancy/baseline"
SCHEMA_VERSION = 2  # 2: tolerance levels; suite sections store values, bounds come from the tolerances

class BaselineError(ValueError):
    """A baseline file that cannot be used; the message names the file and the fix."""


@dataclass
class Baseline:
    path: Path
    model: str
    settings_key: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def metadata(self) -> dict[str, Any]:
        return self.data.get("metadata", {})

    @property
    def profile(self) -> dict[str, Any] | None:
        return self.data.get("profile")

    def suite(self, name: str) -> dict[str, Any] | None:
        return self.data.get("suites", {}).get(name)

    def tolerance(self, level: str, device_class: str) -> Tolerance:
        """The tolerance this file stores for ``level`` on ``device_class`` (validated when it was read)."""
        return resolve(self.data.get("tolerances"), level, device_class)

    def profile_arrays(self) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
        """(kinds, layers, mean [kind, layer, step], spread [kind, layer, step]); null cells become NaN."""
        section = self.profile
        if section is None:
            raise BaselineError(f"{self.path} has no profile section")
        kinds, layers = section["kinds"], section["layers"]  # shapes checked by validate_baseline
        mean = np.array([[_row(section["mean"][k][l]) for l in range(len(layers))] for k in kinds], dtype=np.float64)
        spread = np.array([[_row(section["spread"][k][l]) for l in range(len(layers))] for k in kinds], dtype=np.float64)
        return kinds, layers, mean, spread


def _row(values: list) -> list[float]:
    return [np.nan if v is None else float(v) for v in values]


def safe_name(model: str) -> str:
    """A directory name for any model reference (HF ids and paths contain slashes)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "--", model).strip("-") or "model"


def _require_same_run(path: Path, data: dict[str, Any], model: str, settings_key: str,
                      metadata: dict[str, Any]) -> None:
    """An update rewrites only the sections of the tests that ran: into another run's file (copied or renamed
    from another model, settings key or protocol) it would relabel that run's other sections as this one's."""
    stored_settings = (data.get("metadata") or {}).get("settings") or {}
    found = {"model": data.get("model"), "settings key": data.get("settings_key"),
             "protocol": stored_settings.get("protocol") if isinstance(stored_settings, dict) else None}
    wanted = {"model": model, "settings key": settings_key, "protocol": (metadata.get("settings") or {}).get("protocol")}
    differ = [f"{what} {found[what]!r} in the file, {wanted[what]!r} for this run" for what in found
              if found[what] is not None and wanted[what] is not None and found[what] != wanted[what]]
    if differ:
        raise BaselineError(
            f"Refusing to update {path}: it is the baseline of another run ({'; '.join(differ)}). An update rewrites "
            "only the sections of the tests that ran, so the file would keep the other run's sections under this "
            "run's name. Move the file back where it belongs, or delete it and re-create every section with "
            "--dit-update-baselines and no -k filter")


class BaselineStore:
    """Reads and writes baselines under ``root``; remembers which files the session used."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.used: set[Path] = set()

    def path_for(self, model: str, settings_key: str) -> Path:
        return self.root / safe_name(model) / f"{settings_key}.json"

    def load(self, model: str, settings_key: str) -> Baseline | None:
        """The baseline, or None when there is none. Damaged files raise :class:`BaselineError`."""
        path = self.path_for(model, settings_key)
        if not path.exists():
            return None
        self.used.add(path.resolve())
        data = read_baseline_file(path)
        for field_name, expected in (("model", model), ("settings_key", settings_key)):
            if data[field_name] != expected:
                raise BaselineError(
                    f"baseline {path} belongs to {field_name} {data[field_name]!r}, not {expected!r}: it was copied or "
                    f"renamed from another {field_name.replace('_', ' ')}, and comparing against it would report the "
                    f"difference between two {field_name.replace('_', ' ')}s as drift. Restore the right file, or "
                    "re-create it with --dit-update-baselines")
        return Baseline(path, model, settings_key, data)

    def update(self, model: str, settings_key: str, *, metadata: dict[str, Any], sections: dict[str, Any],
               merge: bool = False) -> Path:
        """Merge ``sections`` (``profile`` and/or ``suites.<name>``) into the file, keeping the others.

        ``merge``: a ``suites.<name>`` dict is merged key by key into the stored one (under the lock), for
        suites whose entries are written by separate tests (the cache gate: one entry per strategy)."""
        named = self.path_for(model, settings_key)
        named.parent.mkdir(parents=True, exist_ok=True)
        path = write_target(named)  # a symbolic link is written through: its target changes, the link stays
        if not path.exists() and path != named:
            raise BaselineError(f"Refusing to update {named}: it is a symbolic link to {path}, which does not exist. "
                                "Restore the target, or remove the link to write a new baseline in its place")
        with _locked(path):
            _remove_leftovers(path)
            try:
                data = read_baseline_file(path) if path.exists() else {}
            except BaselineError as exc:
                # Rewriting would keep only the sections of the tests that ran and drop every other one.
                raise BaselineError(
                    f"{exc}\nRefusing to update {path}: its other sections could not be read and would be lost. "
                    "Repair the file (e.g. restore it from version control), or delete it and re-create every "
                    "section with --dit-update-baselines and no -k filter") from None
            if data:
                _require_same_run(path, data, model, settings_key, metadata)
            data.update({"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "model": model,
                         "settings_key": settings_key})
            data["metadata"] = {**data.get("metadata", {}), **plain(metadata, _rounded),
                                "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
            data.setdefault("tolerances", default_table())
            for name, value in sections.items():
                value = plain(value, _rounded)  # floats to 7 significant digits: readable files
                if name.startswith("suites."):
                    suites, key = data.setdefault("suites", {}), name.split(".", 1)[1]
                    if merge and isinstance(value, dict) and isinstance(suites.get(key), dict):
                        value = {**suites[key], **value}
                    suites[key] = value
                else:
                    data[name] = value
            atomic_write_text(path, dumps_readable(data) + "\n")
        self.used.add(path.resolve())
        return named

    def files_of(self, models: list[str]) -> list[Path]:
        out: list[Path] = []
        for model in models:
            folder = self.root / safe_name(model)
            if folder.is_dir():
                out += sorted(p.resolve() for p in folder.glob("*.json"))
        return out


def read_baseline_file(path: Path) -> dict[str, Any]:
    """The parsed, validated document; :class:`BaselineError` naming the file, the spot and the fix."""
    fix = "re-create it with --dit-update-baselines (after checking why it changed)"
    try:
        data = read_json(path, "baseline", fix=fix)  # NaN/Infinity are caught, with their place, below
    except FileReadError as exc:
        raise BaselineError(str(exc)) from None
    if data.get("schema") != SCHEMA:
        raise BaselineError(f"{path} is not a pytest-ditredundancy baseline (schema {SCHEMA!r} missing); {fix}")
    version = data.get("schema_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        raise BaselineError(f"baseline {path} has schema version {version}, written by a newer pytest-ditredundancy "
                            f"(this one reads version {SCHEMA_VERSION}); upgrade the plugin to use it")
    if version != SCHEMA_VERSION:
        raise BaselineError(f"baseline {path} has schema version {version!r}, this plugin reads "
                            f"version {SCHEMA_VERSION}; {fix}")
    try:
        validate_baseline(data)
    except SchemaProblem as exc:
        raise BaselineError(f"baseline {path} is not usable: {exc}; repair that value or {fix}") from None
    return data


def _lock_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def _locked(path: Path, *, wait: bool = True) -> Iterator[bool]:
    """An exclusive lock beside ``path`` (read-merge-write by parallel workers stays consistent); yields
    whether it is held: always with ``wait``, without it only when no live process holds it.

    The lock is an ``flock`` on ``.<name>.lock``, which the kernel releases when its holder dies, so a lock
    file nobody holds is provably stale. The holder removes the lock file before releasing it (a waiter that
    then holds the lock of a removed file sees so and locks the path's new file), and removes the temporaries
    a writer killed mid-write left (no other writer of ``path`` is active under the lock). A killed holder
    leaves its lock file: :func:`_remove_leftovers` takes such locks over and removes them. Both kinds of
    file are in .gitignore too."""
    lock_path = _lock_name(path)
    try:
        import fcntl
    except ImportError:  # Windows: no fcntl; per-model files keep workers apart there, and nothing is swept
        yield wait
        return
    while True:
        with open(lock_path, "a+") as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:  # a live writer holds it
                yield False
                return
            try:
                current = os.stat(lock_path).st_ino == os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:
                current = False
            if not current:
                continue  # the previous holder removed this file: lock the one at the path now
            try:
                for stale in stale_temporaries(path):
                    stale.unlink(missing_ok=True)
                yield True
            finally:
                lock_path.unlink(missing_ok=True)
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            return


def _remove_leftovers(path: Path) -> None:
    """Lock files and temporaries that writers killed mid-write left beside the other files of ``path``'s
    directory. Each file's lock is taken without waiting, as its next writer would: one a live writer holds
    is skipped, with its temporaries; one nobody holds is removed on release, and its temporaries with it."""
    targets = {temporary_target(entry) for entry in path.parent.glob(".*.json.*.tmp")}
    targets |= {entry.with_name(entry.name[1:-len(".lock")]) for entry in path.parent.glob(".*.json.lock")}
    for target in sorted(t for t in targets if t is not None and t.suffix == ".json" and t != path):
        with _locked(target, wait=False):
            pass


def profile_section(kinds: list[str], layers: list[str], mean: np.ndarray, spread: np.ndarray, *,
                    metric: str, branch: str, times: list[float]) -> dict[str, Any]:
    """The ``profile`` section: per kind, one row per layer of per-step values (7 significant digits)."""
    def rows(array: np.ndarray) -> dict[str, list[list[float | None]]]:
        return {kind: [[_number(v) for v in array[k, l]] for l in range(len(layers))] for k, kind in enumerate(kinds)}

    return {"metric": metric, "branch": branch, "kinds": kinds, "layers": layers, "step_pairs": int(mean.shape[-1]),
            "normalized_times": [_number(t) for t in times], "mean": rows(mean), "spread": rows(spread)}


def _rounded(value: Any) -> Any:
    return _number(value) if isinstance(value, float) else value


def _number(value: float) -> float | None:
    value = float(value)
    return None if not np.isfinite(value) else float(f"{value:.7g}")


def dumps_readable(data: Any, indent: int = 0) -> str:
    """JSON with nested structure indented and innermost lists on one line: easy to read and to diff."""
    pad = " " * indent
    if isinstance(data, dict):
        if not data:
            return "{}"
        items = [f'{pad} {json.dumps(str(k))}: {dumps_readable(v, indent + 1)}' for k, v in data.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(data, (list, tuple)):
        if all(not isinstance(v, (dict, list, tuple)) for v in data):
            return json.dumps(list(data), allow_nan=False)
        items = [f"{pad} {dumps_readable(v, indent + 1)}" for v in data]
        return "[\n" + ",\n".join(items) + f"\n{pad}]"
    return json.dumps(data, allow_nan=False)


def stale_baselines(store: BaselineStore, models: list[str]) -> list[Path]:
    """Baseline files of the selected models that no test of this session used."""
    return [p for p in store.files_of(models) if p not in store.used]


def relative(path: Path, root: Path) -> str:
    try:
        return os.path.relpath(path, root)
    except ValueError:
        return str(path)
