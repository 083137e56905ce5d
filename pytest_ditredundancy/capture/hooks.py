"""Streaming capture of K/V/A redundancy around any diffusers DiT pipeline call.

``with capture_redundancy(pipe) as cap: pipe(...)`` installs forward hooks on every capture site
(:mod:`pytest_ditredundancy.capture.sites`) on top of the run/step/call boundaries of
:class:`~pytest_ditredundancy.capture.tracking.StepTracker` (whose transformer pre-hook also reads the batch
size). Everything is removed on exit, also when the pipeline raises.

Per series only the previous step's tensor is kept (a reference, not a copy, unless the model later
mutates it in place: the tensor version counter tells, and the series switches to copies). Each step is
reduced on the device to five numbers per sample (:func:`pytest_ditredundancy.capture.metrics.step_stats`):
per tensor in its hook, or (memory mode ``fast``) all tensors of a transformer call at once when the call
returns (:mod:`pytest_ditredundancy.capture.batched_stats`). Nothing leaves the device until
:meth:`RedundancyCapture.profile`, which does one transfer. Each recorded tensor
also gets its place in the order the hooks fired: with the tensor's own sums (non-finite when it holds a NaN or
inf) that names the first non-finite activation after the run, at no cost during it.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from .assemble import RawRun, RawSeries, assemble_profile, timesteps_to_floats, to_host
from .batched_stats import CallBatch, MemoryChoice, Pending, default_memory
from .fused_stats import StepStatistics, default_mode
from .guidance import COND_FIRST_PIPELINES, call_guidance
from .profile import RedundancyProfile
from .sites import DEFAULT_KINDS, CaptureSite, ModuleCall, discover_sites, validate_kinds
from .tracking import StepTracker, call_argument, first_tensor


@dataclass
class _Series:
    rows: int
    numel: int
    steps: list[int] = field(default_factory=list)
    valid: list[bool] = field(default_factory=list)
    stats: list[torch.Tensor] = field(default_factory=list)
    order: list[int] = field(default_factory=list)  # per step: when this tensor was recorded within its run
    previous: torch.Tensor | None = None
    previous_version: int | None = None
    previous_step: int = -2
    copy: bool = False


@dataclass
class _Run:
    step: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)
    series: dict[tuple[int, int], _Series] = field(default_factory=dict)
    timesteps: list[Any] = field(default_factory=list)
    prompts: list[str] | None = None
    cfg: bool | None = None
    samples: int | None = None
    cond_first: bool = False
    recorded: int = 0  # tensors recorded so far: the order the site hooks fired in, across steps and calls

    @property
    def empty(self) -> bool:
        return self.step == 0 and not self.series


class RedundancyCapture(StepTracker):
    """Hooks that measure step-to-step redundancy; use through :func:`capture_redundancy`."""

    def __init__(self, target: Any, *, kinds: Iterable[str] = DEFAULT_KINDS, sites: Sequence[CaptureSite] | None = None,
                 scheduler: Any = None, branch_layout: str = "auto", copy_tensors: bool = False,
                 stats: str | None = None, whole_batch: bool = False, memory: str | None = None) -> None:
        self.pipeline = None if isinstance(target, nn.Module) else target
        super().__init__(target if isinstance(target, nn.Module) else _transformer_of(target),
                         scheduler if scheduler is not None else getattr(self.pipeline, "scheduler", None))
        self.kinds = validate_kinds(kinds)
        self.sites = list(sites) if sites is not None else discover_sites(self.transformer, self.kinds)
        self.branch_layout = branch_layout
        self.copy_tensors = copy_tensors
        self.step_statistics = StepStatistics(stats or default_mode())  # fused kernel or eager: see fused_stats
        self.memory = MemoryChoice(memory or default_memory())  # per tensor, or per call: see batched_stats
        self.batch = CallBatch(self.step_statistics)
        self.whole_batch = whole_batch
        self.runs: list[_Run] = [_Run()]
        self._calls: dict[int, ModuleCall] = {}  # running calls of the sites' context modules
        self.messages: list[str] = []
        self._active_batch = 0
        self._active = False

    # -- context management -------------------------------------------------------------------------------
    def __enter__(self) -> "RedundancyCapture":
        if self._active:
            raise RuntimeError("this capture is already active; a capture can be entered once at a time")
        try:
            self.install()
        except BaseException:
            self.remove()
            raise
        self._active = True
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook and restore every wrapped method (idempotent)."""
        super().remove()
        self._active = False
        self.call_index = None

    def fail_on_host_sync(self) -> "RedundancyCapture":
        """Make every callback this capture installs raise where it would make the host wait for a CUDA device
        (``torch.cuda.set_sync_debug_mode("error")`` while the callback runs): how a GPU test or benchmark
        proves the capture never syncs. Call it before entering the capture; the pipeline's own syncs, outside
        the callbacks, stay allowed. Run once without it first: compiling the fused kernels may sync."""
        if self._active:
            raise RuntimeError("fail_on_host_sync() wraps the callbacks before they are installed: call it before "
                               "entering the capture")

        def strict(callback: Any) -> Any:
            @functools.wraps(callback)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                previous = torch.cuda.get_sync_debug_mode()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    return callback(*args, **kwargs)
                finally:
                    torch.cuda.set_sync_debug_mode(previous)
            return wrapper

        for name in ("call_started", "_enter_context", "_leave_context", "scheduler_stepped", "start_run",
                     "_on_check_inputs", "_call_finished"):
            setattr(self, name, strict(getattr(self, name)))
        make_site_hook = self._make_site_hook  # the site hooks: tensor extraction and recording
        self._make_site_hook = lambda group: strict(make_site_hook(group))
        return self

    def install(self) -> None:
        super().install()  # first: the transformer's call counter runs before any hook of a site on it
        by_module: dict[int, list[tuple[int, CaptureSite]]] = {}
        modules: dict[int, nn.Module] = {}
        for index, site in enumerate(self.sites):
            by_module.setdefault(id(site.module), []).append((index, site))
            modules[id(site.module)] = site.module
        contexts = {id(site.context): site.context for site in self.sites if site.context is not None}
        for module in contexts.values():
            self._undo.append(module.register_forward_pre_hook(self._enter_context, with_kwargs=True).remove)
        for key, module in modules.items():
            self._undo.append(module.register_forward_hook(self._make_site_hook(by_module[key])).remove)
        for module in contexts.values():  # after the site hooks: a site on the context module still sees its call
            self._undo.append(module.register_forward_hook(self._leave_context).remove)
        # last: the call's tensors are all recorded (a site on the transformer itself too) when its batch is reduced
        self._undo.append(self.transformer.register_forward_hook(self._call_finished, always_call=True).remove)
        if self.pipeline is not None and callable(getattr(self.pipeline, "check_inputs", None)):
            self.wrap(self.pipeline, "check_inputs", before=self._on_check_inputs)

    # -- boundaries ---------------------------------------------------------------------------------------
    @property
    def _run(self) -> _Run:
        return self.runs[-1]

    def start_run(self) -> None:
        """Begin a new pipeline run (called automatically when the scheduler's timesteps are set)."""
        super().start_run()
        if not self._run.empty:
            self.runs.append(_Run())

    def end_step(self, timestep: Any = None) -> None:
        """Mark the end of a denoising step (called automatically after ``scheduler.step``)."""
        run = self._run
        run.timesteps.append(timestep.detach() if isinstance(timestep, torch.Tensor) else timestep)
        run.step += 1
        super().end_step()

    def scheduler_stepped(self, args: tuple, kwargs: dict, result: Any) -> None:
        self.end_step(call_argument(self.scheduler.step, "timestep", args, kwargs))

    def _on_check_inputs(self, args: tuple, kwargs: dict) -> None:
        prompt = call_argument(self.pipeline.check_inputs, "prompt", args, kwargs)
        if isinstance(prompt, str):
            prompt = [prompt]
        if isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt):
            self.start_run()
            self._run.prompts = list(prompt)

    def call_started(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        run = self._run
        hidden = first_tensor(args, kwargs)
        self._active_batch = int(hidden.shape[0]) if hidden is not None and hidden.dim() > 0 else 1
        run.batch_sizes.setdefault(self.call_index, self._active_batch)
        if self.call_index == 0 and run.step == 0 and self.pipeline is not None:
            run.cfg, run.samples = call_guidance(self.pipeline, self.transformer)
            run.cond_first = type(self.pipeline).__name__ in COND_FIRST_PIPELINES

    def _enter_context(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._calls[id(module)] = ModuleCall(module, args, kwargs)

    def _leave_context(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._calls.pop(id(module), None)

    # -- recording ----------------------------------------------------------------------------------------
    def _make_site_hook(self, group: list[tuple[int, CaptureSite]]):
        # The hot path (one call per captured module and step): plain sites, read from the output with no
        # selector and no context, skip the site's generic extraction.
        plain = [(index, site.select is None and site.context is None and site.read == "output", site)
                 for index, site in group]

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if self.call_index is None:
                return
            for index, direct, site in plain:
                if direct:
                    tensor = output if isinstance(output, torch.Tensor) else None
                else:
                    seen = output if site.read == "output" else (args[0] if args else None)
                    call = self._calls.get(id(site.context)) if site.context is not None else None
                    tensor = site.tensor(seen, call)
                if tensor is not None:
                    self._record(index, tensor)

        return hook

    def _record(self, index: int, tensor: torch.Tensor) -> None:
        run = self.runs[-1]
        step = run.step
        key = (index, self.call_index)
        series = run.series.get(key)
        if series is None:
            batch = self._active_batch
            if tensor.dim() == 0 or tensor.shape[0] % batch:
                self._note(f"{self.sites[index].layer}/{self.sites[index].kind}: leading dim {tuple(tensor.shape)[:1]} "
                           f"is not a multiple of the batch {batch}; series skipped")
                return
            series = run.series[key] = _Series(rows=batch, numel=tensor.numel() // batch,
                                               copy=self.copy_tensors or tensor.is_inference())
        steps = series.steps
        if steps and steps[-1] == step:
            self._note(f"{self.sites[index].layer}/{self.sites[index].kind} ran twice in one transformer call; "
                       "only the first output is measured")
            return
        previous = series.previous
        valid = previous is not None and series.previous_step == step - 1
        if valid and series.previous_version is not None and previous._version != series.previous_version:
            self._note(f"{self.sites[index].layer}/{self.sites[index].kind} was modified in place after its step; "
                       "that step pair is not measured and the series now keeps copies")
            series.copy, valid = True, False
        deferred = self.memory.chosen != "low"  # undecided (the first call) or fast: reduced when the call ends
        series.stats.append(None if deferred else self.step_statistics(tensor, previous if valid else None, series.rows))
        steps.append(step)
        series.valid.append(valid)
        series.order.append(run.recorded)
        run.recorded += 1
        kept = tensor.detach() if tensor.requires_grad else tensor  # no autograd graph kept alive
        if series.copy:
            series.previous, series.previous_version = kept.clone(), None
        else:
            series.previous, series.previous_version = kept, kept._version
        series.previous_step = step
        if deferred:
            self.batch.add(Pending(series, len(series.stats) - 1, series.previous, previous if valid else None,
                                   series.rows, series.previous_version))

    def _call_finished(self, module: nn.Module, args: tuple, output: Any) -> None:
        """The transformer call returned (or raised): reduce its pending tensors; the first call decides ``auto``."""
        self._reduce_pending()

    def _reduce_pending(self) -> None:
        if not self.batch.pending:
            return
        if self.memory.chosen is None:
            device = self.batch.pending[0].current.device
            fused = self.step_statistics.fuses_on(device)
            self.memory.decide(*self.batch.nbytes(), device, fused, size_rule=self.step_statistics.mode == "auto",
                               no_compile=fused and device.type == "cpu" and self.batch.cpu_kernel_takes())
        self.batch.flush(self.memory.chosen == "fast", self._mutated_in_call)

    def _mutated_in_call(self, item: Pending) -> None:
        index = item.series.steps[item.slot]
        self._note(f"a captured tensor was modified in place during its transformer call (step {index}); that step "
                   "is not measured and the series now keeps copies")
        item.series.copy = True
        item.series.valid[item.slot] = False
        if item.series.previous is item.current:
            item.series.previous, item.series.previous_version = None, None

    def _note(self, message: str) -> None:
        if message not in self.messages:
            self.messages.append(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def held_bytes(self) -> dict[str, int]:
        """Bytes this capture's recorded state keeps alive, each storage counted once at its full size (a view
        keeps its whole storage): ``kept`` the previous-step tensors (one step's captured tensors), ``other``
        the per-step statistics and timestep references (a few floats per sample and step)."""
        found: dict[int, torch.Tensor] = {}
        _reachable_tensors(self.runs, set(), found)
        kept_ids = {id(s.previous) for run in self.runs for s in run.series.values() if s.previous is not None}
        storages: dict[int, tuple[int, bool]] = {}
        for key, tensor in found.items():
            storage = tensor.untyped_storage()
            kept = key in kept_ids or storages.get(storage.data_ptr(), (0, False))[1]
            storages[storage.data_ptr()] = (storage.nbytes(), kept)
        kept_total = sum(n for n, kept in storages.values() if kept)
        other = sum(n for n, kept in storages.values() if not kept)
        return {"kept": kept_total, "other": other, "total": kept_total + other}

    # -- result -------------------------------------------------------------------------------------------
    def profile(self, **metadata: Any) -> RedundancyProfile:
        """Build the :class:`RedundancyProfile` (one device-to-host transfer). ``metadata`` fills
        :class:`~pytest_ditredundancy.capture.profile.ProfileMetadata` fields such as ``model`` or ``seed``."""
        self._reduce_pending()  # a call that never returned (a capture left inside a call) keeps nothing back
        runs = [run for run in self.runs if not run.empty]
        if not runs:
            raise RuntimeError("nothing was captured: call the pipeline inside `with capture_redundancy(pipe)`")
        stacked = [torch.stack(s.stats) for run in runs for s in run.series.values()]
        host = to_host(stacked)
        raw_runs, position = [], 0
        for run in runs:
            raw = {}
            for key, series in run.series.items():
                raw[key] = RawSeries(steps=series.steps, valid=series.valid, stats=host[position], numel=series.numel,
                                     order=series.order)
                position += 1
            raw_runs.append(RawRun(steps=run.step, batch_sizes=dict(run.batch_sizes), series=raw,
                                   timesteps=timesteps_to_floats(run.timesteps), prompts=run.prompts, cfg=run.cfg,
                                   samples=run.samples, cond_first=run.cond_first))
        profile = assemble_profile(raw_runs, self.sites, self.branch_layout, context=self,
                                   whole_batch=self.whole_batch, **metadata)
        profile.metadata.extra = {**profile.metadata.extra, "step_stats": {
            **self.step_statistics.summary(), "memory": self.memory.mode, "memory_chosen": self.memory.chosen,
            "call_kernels": self.batch.launches, "call_kernel": self.batch.kernel_names()}}
        return profile


def capture_redundancy(target: Any, *, kinds: Iterable[str] = DEFAULT_KINDS, sites: Sequence[CaptureSite] | None = None,
                       scheduler: Any = None, branch_layout: str = "auto", copy_tensors: bool = False,
                       stats: str | None = None, whole_batch: bool = False,
                       memory: str | None = None) -> RedundancyCapture:
    """Capture K/V/A redundancy of every pipeline call made inside the ``with`` block.

    ``target`` is a diffusers pipeline (its ``transformer`` and ``scheduler`` are used) or a bare
    ``nn.Module`` (then pass ``scheduler`` or call :meth:`RedundancyCapture.end_step` after each step).
    ``kinds`` restricts what is measured (hooks for other kinds are not installed). ``branch_layout`` tells
    how batch rows / calls map to CFG branches (see :data:`pytest_ditredundancy.zoo.BRANCH_LAYOUTS`); with
    ``auto`` the pipeline call's own guidance decides (:mod:`pytest_ditredundancy.capture.guidance`), and a batch that could be read
    either way is refused with a message naming ``branch_layout=``. ``whole_batch`` measures each prompt over
    all its rows at once, both CFG halves together, as the redundancy study did: the profile then has one
    branch, ``batch``.
    ``stats`` picks how each step is reduced: ``auto`` (default, or ``$DITREDUNDANCY_STATS``), ``fused`` or
    ``eager`` (see :mod:`pytest_ditredundancy.capture.fused_stats`); the profile's ``extra["step_stats"]`` says which ran.
    ``memory`` says whether the capture may hold a transformer call's tensors until the call ends to reduce
    them in one kernel: ``auto`` (default, or ``$DITREDUNDANCY_CAPTURE_MEMORY``; decided from the first call's
    size and the free memory), ``fast`` (up to one step's captured tensors plus one call's) or ``low`` (one
    step's, per-tensor reductions; see :mod:`pytest_ditredundancy.capture.batched_stats`).

    Example::

        with capture_redundancy(pipe) as cap:
            pipe(["a red bus", "a cat on a sofa"], num_inference_steps=20)
        profile = cap.profile(model="pixart-alpha")
    """
    return RedundancyCapture(target, kinds=kinds, sites=sites, scheduler=scheduler, branch_layout=branch_layout,
                             copy_tensors=copy_tensors, stats=stats, whole_batch=whole_batch, memory=memory)


def _transformer_of(pipeline: Any) -> nn.Module:
    module = getattr(pipeline, "transformer", None)
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"{type(pipeline).__name__} has no `transformer` module to capture; pass the denoiser module itself "
            "(capture_redundancy(module, scheduler=...)) or use an adapter (pytest_ditredundancy.capture.adapters)"
        )
    return module


def _reachable_tensors(value: Any, seen: set[int], found: dict[int, torch.Tensor]) -> None:
    """Every tensor reachable from ``value`` through containers and objects (an audit, not a bookkeeping)."""
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        found[id(value)] = value
    elif isinstance(value, dict):
        for item in value.values():
            _reachable_tensors(item, seen, found)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            _reachable_tensors(item, seen, found)
    elif hasattr(value, "__dict__"):
        for item in vars(value).values():
            _reachable_tensors(item, seen, found)
