"""RedundancyProfile: the typed result of a capture, and its JSON form.

Values are indexed ``[prompt, branch, kind, layer, step_pair]`` for each metric of
:data:`pytest_ditredundancy.capture.metrics.METRICS`; step pair ``j`` compares denoising steps ``j`` and ``j + 1``.
A cell that was not measured (a kind the layer does not have, a branch skipped at some steps) is NaN with
``computed`` False; a measured cell that came out NaN/inf is flagged in ``nonfinite``.

The JSON file is meant to be read and diffed by people: metadata first, then one line per series
(prompt × branch × kind × layer). Values are float32 written in their shortest exact form, so a
save/load round trip gives the identical array.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from ..io import FileReadError, atomic_write_text, parse_json, plain, read_text
from .metrics import METRICS

SCHEMA = "pytest-ditredundancy/profile"
SCHEMA_VERSION = 1


class ProfileFormatError(ValueError):
    """A profile file that is not valid JSON of this schema (or of another version of it)."""


@dataclass
class ProfileMetadata:
    """What was run: enough to reproduce the profile and to judge whether two profiles are comparable."""

    model: str = ""
    model_id: str | None = None
    pipeline_class: str | None = None
    transformer_class: str | None = None
    scheduler_class: str | None = None
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    steps: int = 0
    timesteps: list[float] = field(default_factory=list)
    sigmas: list[float] | None = None
    num_train_timesteps: int | None = None
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    guidance_scale: float | None = None
    dtype: str = ""
    device: str = ""
    seed: int | None = None
    #: how the numbers were measured: "project" (this package's definitions) or "paper" (the study's, exactly;
    #: see pytest_ditredundancy.profiling.paper)
    protocol: str = "project"
    prompts: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    #: the first captured tensor, in the order the model computed them, that held a NaN or inf: ``step``,
    #: ``layer``, ``kind``, ``branch``, ``prompt`` (index), ``prompt_text``, ``call`` and how many of the call's
    #: ``rows`` were ``nonfinite_rows``; None when every one was finite (or the profile predates the field).
    #: Step-pair values cannot name it: a NaN reaches every layer's next step through the model's input.
    first_nonfinite: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ProfileMetadata":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class RedundancyProfile:
    """Per-step, per-layer K/V/A redundancy of one model under one setting."""

    layers: list[str]
    kinds: list[str]
    branches: list[str]
    values: dict[str, np.ndarray]  # metric -> float32 [prompt, branch, kind, layer, step_pair]
    computed: np.ndarray  # bool, same shape
    metadata: ProfileMetadata = field(default_factory=ProfileMetadata)

    def __post_init__(self) -> None:
        shape = (self.num_prompts, len(self.branches), len(self.kinds), len(self.layers), self.num_step_pairs)
        for metric in METRICS:
            if metric not in self.values:
                raise ValueError(f"profile is missing metric {metric!r}")
            self.values[metric] = np.asarray(self.values[metric], dtype=np.float32)
            if self.values[metric].shape != shape:
                raise ValueError(f"metric {metric!r} has shape {self.values[metric].shape}, expected {shape}")
        self.computed = np.asarray(self.computed, dtype=bool)

    # -- shape -------------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.computed.shape)

    @property
    def num_prompts(self) -> int:
        return int(self.computed.shape[0])

    @property
    def num_step_pairs(self) -> int:
        return int(self.computed.shape[-1])

    @property
    def nonfinite(self) -> np.ndarray:
        """Cells that were measured but are NaN or infinite (non-finite activations)."""
        bad = np.zeros(self.shape, dtype=bool)
        for metric in METRICS:
            bad |= ~np.isfinite(self.values[metric])
        return bad & self.computed

    @property
    def constant(self) -> np.ndarray:
        """``[prompt, branch, kind, layer]``: series that never change (e.g. cross-attention K/V)."""
        measured = self.computed.any(axis=-1)
        unchanged = np.where(self.computed, self.values["abs_l1"] == 0, True).all(axis=-1)
        return measured & unchanged

    @property
    def present(self) -> np.ndarray:
        """``[branch, kind, layer]``: which series exist at all."""
        return self.computed.any(axis=(0, -1))

    # -- selection ---------------------------------------------------------------------------------------
    def _index(self, axis: list[str], label: str | int, what: str) -> int:
        if isinstance(label, int):
            return label
        try:
            return axis.index(label)
        except ValueError:
            raise KeyError(f"no {what} {label!r} in this profile; it has: {', '.join(axis)}") from None

    def series(self, metric: str = "abs_l1", *, kind: str, layer: str | int, branch: str | int | None = None,
               prompt: int | None = None) -> np.ndarray:
        """Values over step pairs (and prompts, unless ``prompt`` is given) for one kind and layer.

        ``branch`` defaults to ``cond`` when present, else the first branch.
        """
        b = self._index(self.branches, branch if branch is not None else self.default_branch, "branch")
        data = self.values[metric][:, b, self._index(self.kinds, kind, "kind"), self._index(self.layers, layer, "layer")]
        return data if prompt is None else data[prompt]

    @property
    def default_branch(self) -> str:
        return "cond" if "cond" in self.branches else self.branches[0]

    def kind_slice(self, kind: str, metric: str = "abs_l1") -> np.ndarray:
        """``[prompt, branch, layer, step_pair]`` for one kind."""
        return self.values[metric][:, :, self._index(self.kinds, kind, "kind")]

    def mean_over_prompts(self, metric: str = "abs_l1") -> np.ndarray:
        """``[branch, kind, layer, step_pair]`` mean across prompts, NaN where nothing was measured."""
        data = np.where(self.computed, self.values[metric], np.nan).astype(np.float64)
        with np.errstate(invalid="ignore"), _quiet_nan_warnings():
            return np.nanmean(data, axis=0)

    def select_prompts(self, indices) -> "RedundancyProfile":
        """A profile restricted to the given prompt indices (used for sharding and bootstrap)."""
        idx = np.asarray(indices, dtype=int)
        meta = ProfileMetadata.from_dict(asdict(self.metadata))
        if meta.prompts:
            meta.prompts = [meta.prompts[i] for i in idx]
        if meta.first_nonfinite is not None:  # its prompt's new index; without its prompt it names nothing
            kept = np.flatnonzero(idx == meta.first_nonfinite.get("prompt"))
            meta.first_nonfinite = {**meta.first_nonfinite, "prompt": int(kept[0])} if kept.size else None
        return RedundancyProfile(list(self.layers), list(self.kinds), list(self.branches),
                                 {m: v[idx] for m, v in self.values.items()}, self.computed[idx], meta)

    # -- persistence -------------------------------------------------------------------------------------
    def to_json(self) -> str:
        shape = {"prompts": self.num_prompts, "branches": self.branches, "kinds": self.kinds,
                 "layers": self.layers, "step_pairs": self.num_step_pairs}
        meta = plain(asdict(self.metadata), _finite_or_text)
        lines = ["{", f' "schema": {json.dumps(SCHEMA)},', f' "schema_version": {SCHEMA_VERSION},',
                 f' "shape": {json.dumps(shape)},', ' "metadata": {']
        lines.append(",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in meta.items()))
        lines.append(' },\n "series": [')
        rows = []
        for p in range(self.num_prompts):
            for b, branch in enumerate(self.branches):
                for k, kind in enumerate(self.kinds):
                    for l, layer in enumerate(self.layers):
                        cells = self.computed[p, b, k, l]
                        if not cells.any():
                            continue
                        key = json.dumps({"prompt": p, "branch": branch, "kind": kind, "layer": layer},
                                         separators=(",", ":"))[:-1]
                        numbers = "".join(f',"{m}":[{_numbers(self.values[m][p, b, k, l], cells)}]' for m in METRICS)
                        rows.append(f"  {key}{numbers}}}")
        lines.append(",\n".join(rows))
        lines.append(" ]\n}\n")
        return "\n".join(lines)

    def save(self, path: str | Path) -> Path:
        """Write the profile as JSON (atomically: a crash never leaves a half-written file)."""
        return atomic_write_text(Path(path), self.to_json())

    @classmethod
    def from_json(cls, text: str, source: str = "<string>") -> "RedundancyProfile":
        try:
            data = parse_json(text, source, "profile", fix="re-create it")
        except FileReadError as exc:
            raise ProfileFormatError(str(exc)) from None
        if data.get("schema") != SCHEMA:
            raise ProfileFormatError(f"{source} is not a pytest-ditredundancy profile (no schema {SCHEMA!r})")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ProfileFormatError(
                f"{source} has profile schema version {data.get('schema_version')!r}; this version of "
                f"pytest-ditredundancy reads version {SCHEMA_VERSION}. Re-create the profile with this version."
            )
        try:
            shape = data["shape"]
            branches, kinds, layers = shape["branches"], shape["kinds"], shape["layers"]
            dims = (shape["prompts"], len(branches), len(kinds), len(layers), shape["step_pairs"])
            values = {m: np.full(dims, np.nan, dtype=np.float32) for m in METRICS}
            computed = np.zeros(dims, dtype=bool)
            for entry in data["series"]:
                at = (entry["prompt"], branches.index(entry["branch"]), kinds.index(entry["kind"]),
                      layers.index(entry["layer"]))
                for metric in METRICS:  # null: not measured; "nan"/"inf": measured, non-finite
                    values[metric][at] = [np.nan if v is None else float(v) for v in entry[metric]]
                computed[at] = [v is not None for v in entry["abs_l1"]]
            metadata = ProfileMetadata.from_dict(data.get("metadata", {}))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ProfileFormatError(f"{source} is a damaged profile ({type(exc).__name__}: {exc}); re-create it") from None
        return cls(list(layers), list(kinds), list(branches), values, computed, metadata)

    @classmethod
    def load(cls, path: str | Path) -> "RedundancyProfile":
        path = Path(path)
        try:
            text = read_text(path, "profile", fix="re-create it",
                             path_fix=f"create one with profile_model(...).save({str(path)!r})")
        except FileReadError as exc:  # a missing file stays a FileNotFoundError, as for open()
            raise (FileNotFoundError if exc.problem == "missing" else ProfileFormatError)(str(exc)) from None
        return cls.from_json(text, source=str(path))


def _numbers(values: np.ndarray, computed: np.ndarray) -> str:
    """float32 values in their shortest exact form; null where unmeasured; non-finite as "nan"/"inf"."""
    out = []
    for v, ok in zip(values, computed):
        if not ok:
            out.append("null")
        elif np.isfinite(v):
            out.append(str(np.float32(v)))
        else:
            out.append(f'"{float(v)}"')
    return ",".join(out)


def _finite_or_text(value: Any) -> Any:
    """Strict JSON has no NaN/Infinity: non-finite floats (e.g. in scheduler configs) are written as strings."""
    return str(value) if isinstance(value, float) and not np.isfinite(value) else value


class _quiet_nan_warnings:
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)
