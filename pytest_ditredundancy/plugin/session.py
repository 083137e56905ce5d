"""Per-session state: one loaded pipeline at a time, cached profiles, baseline store, and suite records.

Workers (pytest-xdist) and the controller each have a :class:`DitSession`. Where tests run, checks emit their
records into the test item's data (``relay.emit``), which reaches the controller's session as one packet
per test (``relay``), whatever the distribution mode.

The session asks its executor for every profile (``--dit-executor``: ``local``, this process and its loaded
pipeline; ``ray``, a pool of actors on a cluster), resolved once; once the tests are collected it hands a
pool the run's known requests (:meth:`DitSession.prefetch`), so every actor is busy while tests judge.
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import pytest
import torch

from ..capture.environment import device_class
from ..capture.profile import RedundancyProfile
from ..judging.baselines import BaselineStore, safe_name
from ..judging.suites import SuiteJudge
from ..profiling.executor_registry import get_executor
from ..profiling.executors import Executor, ExecutorError, ExecutorSettings, LocalExecutor, RemoteWorkError
from ..profiling.protocol_registry import get_protocol
from ..profiling.protocols import Protocol, ProtocolError
from ..profiling.settings import RunRequest, RunSettings, resolve_run
from ..zoo.loading import ModelLoadError, hub_problem, load_model, resolve_spec
from ..zoo.registry import ModelSpec, UnknownModelError, get_spec, registered_models, tiny_model_names
from .options import DitConfig
from .shard import ShardError, check_shard_fits, shard_range

#: keys of a test's data (``relay.emit``): suite records, and baseline files used
RECORD_KEY = "ditredundancy"
BASELINE_USED_KEY = "ditredundancy-baseline"


@dataclass
class PipelineSlot:
    """Holds at most one loaded pipeline, so two large models never sit on one device together. A model that
    failed to load fails every later test of it at once, with the same short message (no retried download)."""

    device: str
    dtype: str
    seed: int
    name: str | None = None
    pipeline: Any = None
    failed: dict[str, str] = field(default_factory=dict)

    def get(self, spec: ModelSpec) -> Any:
        """The pipeline of ``spec`` (as its protocol runs it: the paper protocol loads the study's dtype)."""
        if spec.name in self.failed:
            pytest.fail(f"{self.failed[spec.name]}\n(this model failed to load earlier in the session; not retried)",
                        pytrace=False)
        if self.name != spec.name:
            self.release()
            try:
                self.pipeline = load_model(spec, device=self.device, dtype=self.dtype, seed=self.seed)
            except ModelLoadError as exc:
                self.failed[spec.name] = str(exc)
            else:
                self.name = spec.name
        if spec.name in self.failed:  # outside the except: the message alone, not the loader's exception chain
            pytest.fail(self.failed[spec.name], pytrace=False)
        return self.pipeline

    def release(self) -> None:
        if self.pipeline is None:
            return
        self.pipeline, self.name = None, None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@dataclass
class DitSession:
    config: DitConfig
    store: BaselineStore
    slot: PipelineSlot
    profiles: dict[tuple, RedundancyProfile] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    baselines_used: set[str] = field(default_factory=set)
    deselected: int = 0
    progress: Callable[[str], None] | None = None
    #: profiles used since the report last looked: (cache key) -> its run; see plugin.report_collector
    touched: dict[tuple, RunRequest] = field(default_factory=dict)
    #: spec name -> the model as the user typed it (``./new-ckpt``), for the commands messages suggest
    references: dict[str, str] = field(default_factory=dict)
    _specs: dict[str, ModelSpec] = field(default_factory=dict)
    _requests: dict[tuple, RunRequest] = field(default_factory=dict)
    _executor: Executor | None = None

    @classmethod
    def from_config(cls, config: DitConfig, specs: dict[str, ModelSpec] | None = None) -> "DitSession":
        """The session of ``config``; ``specs`` are the selected models as :func:`check_models` resolved them.
        The executor starts here: an unusable one (Ray missing, a cluster unreachable) is a usage error."""
        slot = PipelineSlot(device=config.device, dtype=config.dtype, seed=config.seed)
        session = cls(config=config, store=BaselineStore(config.baseline_dir), slot=slot)
        for model, spec in (specs or {}).items():
            session.spec(model, resolved=spec)
        settings = ExecutorSettings(device=config.device, dtype=config.dtype, seed=config.seed,
                                    address=config.ray_address, actors=config.ray_actors)
        try:
            session._executor = get_executor(config.executor)(settings, slot.get)
        except ExecutorError as exc:
            raise pytest.UsageError(f"--dit-executor={config.executor}: {exc}") from None
        return session

    @property
    def executor(self) -> Executor:
        """Where profiles are computed (a session built without :meth:`from_config`, e.g. a merge: here)."""
        if self._executor is None:
            self._executor = LocalExecutor(ExecutorSettings(device=self.config.device, dtype=self.config.dtype,
                                                            seed=self.config.seed), self.slot.get)
        return self._executor

    @property
    def protocol(self) -> Protocol:
        return get_protocol(self.config.protocol)

    # -- models -------------------------------------------------------------------------------------------
    def selected_models(self) -> list[str]:
        """The models as typed (``--dit-model``), else every tiny model (under the paper protocol: the tiny twins
        of the study's seven)."""
        if self.config.models:
            return list(self.config.models)
        return default_models(self.protocol)

    def spec(self, model: str, *, resolved: ModelSpec | None = None) -> ModelSpec:
        """The spec of a selected model (as typed), resolved once per session and as its protocol runs it. With
        ``--dit-baseline-name`` naming a registered model, the spec runs with that model's settings
        (:meth:`ModelSpec.with_settings_of`, as ``profile_model(..., as_model=)``), so its profile is comparable
        with that model's baselines."""
        if model not in self._specs:
            spec = resolved or resolve_spec(model)
            other = self.config.baseline_name
            if other and other != spec.name and other in registered_models():
                spec = spec.with_settings_of(registered_models()[other])
            self.protocol.check_model(spec)
            self._specs[model] = self.protocol.spec(spec)
            self.references.setdefault(spec.name, model)
        return self._specs[model]

    def reference(self, spec: ModelSpec) -> str:
        """How the user named ``spec`` (what a suggested command must repeat)."""
        return self.references.get(spec.name, spec.name)

    def baseline_name_for(self, spec: ModelSpec) -> str:
        """The name ``spec``'s baselines are stored under: its own, or ``--dit-baseline-name``."""
        return self.config.baseline_name or spec.name

    def command(self, spec: ModelSpec, *extra: str) -> str:
        """The pytest command that reruns this session's settings for ``spec``, as the user typed them."""
        return self.config.command(self.reference(spec), *extra)

    @property
    def device(self) -> torch.device:
        """Where profiles are computed: this machine's device, or the pool's (``cuda`` on a GPU cluster)."""
        return self.executor.device

    @property
    def device_class(self) -> str:
        return device_class(self.device)

    # -- profiles -----------------------------------------------------------------------------------------
    def request(self, spec: ModelSpec, *, steps: int | None = None, scheduler: str | None = None) -> RunRequest:
        """The run of ``spec`` under the session's options, resolved once per model and variant (``steps`` /
        ``scheduler``: the stability suites' variants)."""
        key = (spec.name, steps or None, scheduler or None)
        if key not in self._requests:
            base = self._requests.get((spec.name, None, None)) or self._resolve(spec)
            self._requests[(spec.name, None, None)] = base
            self._requests[key] = base.variant(steps=steps, scheduler=scheduler)
        return self._requests[key]

    def _resolve(self, spec: ModelSpec) -> RunRequest:
        """The options as a :class:`RunRequest`: prompts the user named (``--dit-prompts``) or the model's own
        set (its protocol's choice: the trained models run their ``shapes`` captions)."""
        config = self.config
        named = bool(config.prompt_source)
        return resolve_run(spec, protocol=self.protocol, prompts=config.prompts if named else None,
                           prompt_source=config.prompt_source or None, prompt_tag=config.prompt_tag,
                           num_prompts=None if named else config.num_prompts, steps=config.steps,
                           scheduler=config.scheduler, seed=config.noise_seed, batch_size=config.batch_size,
                           capture_memory=config.capture_memory)

    def profile_key(self, request: RunRequest) -> tuple:
        return (request.spec.name, request.settings, request.prompts, self.config.device, self.config.dtype)

    def work(self, request: RunRequest) -> RunRequest:
        """What this session profiles of ``request``: its block of the prompts under ``--dit-shard``, else all
        (seeds stay seed + global index)."""
        try:
            check_shard_fits(self.config.shard, request.spec.name, len(request.prompts))
        except ShardError as exc:
            pytest.fail(str(exc), pytrace=False)
        start, end = shard_range(len(request.prompts), self.config.shard)
        return request.shard(start, end)

    def prompt_lists(self) -> dict[str, tuple[str, ...]]:
        """The prompts each selected model runs (named ones, or its own set), in order; resolved here for models
        this process did not run (an xdist controller), skipping any that cannot be resolved."""
        lists = {request.spec.name: tuple(request.prompts) for request in self._requests.values()}
        for model in self.selected_models():
            try:
                spec = self.spec(model)
                if spec.name not in lists:
                    lists[spec.name] = tuple(self.request(spec).prompts)
            except Exception:  # noqa: BLE001 - the model's own tests report why it cannot be resolved
                continue
        return lists

    def profile(self, request: RunRequest) -> RedundancyProfile:
        """The profile of ``request`` (computed once per session by the executor). A model that failed to load
        where it ran, or work no worker could finish, fails the test with the message (which names the node)."""
        key = self.profile_key(request)
        if key not in self.profiles:
            problem = None
            try:
                self.profiles[key] = self.executor.profile(
                    self.work(request), progress=self._progress_callback(request.spec.name, request.settings))
            except (ModelLoadError, RemoteWorkError) as exc:  # local load failures fail in PipelineSlot.get
                problem = str(exc)
            if problem is not None:  # outside the except: the message alone, not Ray's exception chain
                pytest.fail(problem, pytrace=False)
        self.touched.setdefault(key, request)
        return self.profiles[key]

    def prefetch(self, items: Iterable[pytest.Item]) -> None:
        """Hand the executor the requests the collected tests will ask for: each tested model's own (every
        selected model when the cross-model suite runs), then, as speculative work, the stability suites'
        variants. Only a pool that spreads the work wants them; it starts on them at once."""
        if not self.executor.spreads_work:
            return
        models: dict[str, None] = {}
        for item in items:
            model = getattr(getattr(item, "callspec", None), "params", {}).get("dit_model")
            if model is not None:
                models.setdefault(model)
            if "dit_distinctness" in getattr(item, "fixturenames", ()):
                models.update(dict.fromkeys(self.selected_models()))
        requests, variants = [], []
        for model in models:
            try:
                spec = self.spec(model)
                requests.append(self.work(self.request(spec)))
            except Exception:  # an unknown or broken model: its tests report the error themselves
                continue
            judge = SuiteJudge(self, spec, "")
            for overrides in self._variants(judge):
                try:
                    variants.append(self.work(self.request(spec, **overrides)))
                except ValueError:  # a variant the suite reports itself
                    continue
        self.executor.prepare(requests, speculative=variants)

    @staticmethod
    def _variants(judge: SuiteJudge) -> list[dict[str, Any]]:
        found = []
        for variants in (judge.step_variants, judge.scheduler_variants):
            try:
                found += list(variants().values())
            except Exception:  # SuiteSkipped, or a problem the suite reports itself when it runs
                continue
        return found

    def _progress_callback(self, model: str, settings: RunSettings):
        if self.progress is None:
            return None
        report, interval = self.progress, self.config.progress_interval
        started = last = time.monotonic()

        def callback(done: int, total: int, steps_per_second: float) -> None:
            nonlocal last
            now = time.monotonic()  # throttled; the last batch is shown when the whole profile took long
            if interval < 0 or (now - last < interval and not (done == total and now - started >= interval)):
                return
            last = now
            report(f"{model} [{settings.scheduler}, {settings.steps} steps]: {done}/{total} prompts, "
                   f"{steps_per_second:.1f} steps/s")

        return callback

    def baseline_metadata(self, profile: RedundancyProfile, request: RunRequest) -> dict[str, Any]:
        meta = profile.metadata
        return {"device_class": self.device_class, "device_name": self.executor.device_name, "dtype": meta.dtype,
                "settings": {**request.settings.__dict__, "prompt_source": request.prompt_source},
                "versions": meta.versions, "pipeline_class": meta.pipeline_class,
                "transformer_class": meta.transformer_class, "scheduler_class": meta.scheduler_class}

    def close(self) -> None:
        """The end of the run: the loaded pipeline released, the executor's unfinished work cancelled."""
        self.slot.release()
        if self._executor is not None:
            self._executor.close()


def check_models(config: DitConfig, *, probe_hub: bool) -> tuple[DitConfig, dict[str, ModelSpec]]:
    """The selected models, resolved and checked before anything runs: the config (duplicates dropped) and
    each model's spec (as typed -> spec), which the session keeps. Every problem is one
    :class:`pytest.UsageError`.

    Unknown names (with close names), directories without a pipeline, two different checkpoints with one name,
    a model the protocol cannot measure, and (``probe_hub``: once, on the controller) Hugging Face models that
    are neither cached nor reachable and, with ``--dit-update-baselines``, baseline folders that cannot be
    written. A model selected twice (also under two spellings) runs once."""
    kept: dict[tuple[str, str | None], str] = {}
    names: dict[str, str] = {}
    specs: dict[str, ModelSpec] = {}
    protocol = get_protocol(config.protocol)
    for model in config.models:
        try:
            spec = resolve_spec(model)
        except (UnknownModelError, ModelLoadError) as exc:
            raise pytest.UsageError(f"--dit-model={model}: {exc}") from None
        try:
            protocol.check_model(spec)
        except ProtocolError as exc:
            raise pytest.UsageError(f"{exc} (--dit-protocol={protocol.name}, --dit-model)") from None
        identity = (spec.name, spec.checkpoint if spec.build is None else None)
        if identity in kept:
            continue
        if spec.name in names:
            raise pytest.UsageError(f"--dit-model={names[spec.name]} and --dit-model={model} are two models named "
                                    f"{spec.name!r}: their baselines and report entries would collide; rename one "
                                    "directory")
        kept[identity], names[spec.name], specs[model] = model, model, spec
        problem = hub_problem(spec) if probe_hub and config.models else None
        if problem:
            raise pytest.UsageError(f"--dit-model={model}: {problem}")
    if config.update_baselines and probe_hub:
        models = [spec.name for spec in specs.values()] or default_models(protocol)
        check_baseline_folders(config.baseline_dir, [config.baseline_name] if config.baseline_name else models)
    return replace(config, models=tuple(kept.values())), specs


def default_models(protocol: Protocol) -> list[str]:
    """The models a run without ``--dit-model`` selects: every tiny model the protocol measures."""
    return [name for name in tiny_model_names() if protocol.selects(get_spec(name))]


def check_baseline_folders(root: Path, models: Iterable[str]) -> None:
    """``--dit-update-baselines``: a file can be written in each model's baseline folder, checked before
    anything runs (a failed write would otherwise come after the model was profiled). Every problem is in one
    :class:`pytest.UsageError`; the check leaves the disk as it found it."""
    folders = dict.fromkeys(Path(root) / safe_name(model) for model in models)
    problems = [f"{folder}: {problem}" for folder in folders if (problem := _cannot_write(folder))]
    if problems:
        raise pytest.UsageError("--dit-update-baselines cannot write baselines to " + "; ".join(problems)
                                + ". Make each a writable folder (move away the file in the way, or make the folder "
                                "writable), or write the baselines elsewhere with --dit-baseline-dir=DIR")


def _cannot_write(folder: Path) -> str | None:
    """Why no file can be created in ``folder``, or None. A missing folder is created for the test and removed
    again. Permission bits are read with ``os.access``; the file written and removed catches what they do not
    say (a read-only mount, an immutable folder, and every folder when running as root)."""
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    created = [path for path in (folder, *folder.parents) if not path.exists()]  # the deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-check-", suffix=".tmp", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        return f"{existing} is not writable ({exc.strerror})"
    finally:
        for path in created:
            try:
                path.rmdir()
            except OSError:
                break
    return None
