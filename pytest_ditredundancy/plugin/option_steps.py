"""The steps that read :class:`~pytest_ditredundancy.plugin.options.DitConfig` from the parsed options.

Each step gets the options as read and returns the fields it derives or corrects; a value that cannot be used
is a :class:`pytest.UsageError` (exit 4) that names the option and the fix. The order of :data:`STEPS` is the
order of dependence: numbers before the protocol that may set the batch size, prompts before the shard that
splits them. Torch, the zoo and the profiling registries are imported inside the steps: this module is loaded
only when the plugin is in use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from .declared import Step, build
from .options import _DIT, DEVICES, DTYPES, MAX_STEP_FACTOR, MAX_STEPS, OPTIONS, DitConfig


def _check_numbers(config: pytest.Config, values: dict[str, Any]) -> dict[str, Any]:
    """Counts and bounds that a number's type alone does not check."""
    if values["batch_size"] < 1:
        raise pytest.UsageError(f"--dit-batch-size (ini dit_batch_size) must be at least 1, got {values['batch_size']}")
    if values["steps"] is not None and values["steps"] < 2:
        raise pytest.UsageError(f"--dit-steps must be at least 2 (a profile compares consecutive steps), "
                                f"got {values['steps']}")
    if values["steps"] is not None and values["steps"] > MAX_STEPS:
        raise pytest.UsageError(f"--dit-steps must be at most {MAX_STEPS} (more than any sampler uses), "
                                f"got {values['steps']}")
    bounds = values["cv_bounds"]
    if len(bounds) != 2 or bounds[0] > bounds[1] or bounds[0] < 0:
        raise pytest.UsageError(f"--dit-cv-bounds expects LO,HI with 0 <= LO <= HI, got {list(bounds)}")
    correlation = values["min_shape_correlation"]
    if not -1.0 <= correlation <= 1.0:
        raise pytest.UsageError(f"--dit-min-shape-correlation must lie in [-1, 1], got {correlation}")
    if any(not 0 < f <= MAX_STEP_FACTOR for f in values["step_factors"]):
        raise pytest.UsageError(f"--dit-step-factors must be positive and at most {MAX_STEP_FACTOR} (multiples of "
                                f"the default step count), got {list(values['step_factors'])}")
    return {}


def _select_models(config: pytest.Config, values: dict[str, Any]) -> dict[str, Any]:
    """Each model once (the same model twice runs once); ``--dit-baseline-name`` judges exactly one model."""
    models = tuple(dict.fromkeys(values["models"]))
    if values["baseline_name"] is not None and len(models) != 1:
        selected = ", ".join(models) or "every tiny model (no --dit-model)"
        raise pytest.UsageError(f"--dit-baseline-name={values['baseline_name']} judges one model against another "
                                f"model's baselines: select exactly one model with --dit-model (selected: {selected})")
    return {"models": models}


def _apply_protocol(config: pytest.Config, values: dict[str, Any]) -> dict[str, Any]:
    """``--dit-protocol``: a registered protocol; it sets the batch size when none is given, and may allow only
    its own (the paper protocol: one prompt per call). The protocol checks the models in ``check_models``."""
    from ..profiling.protocol_registry import get_protocol
    from ..profiling.protocols import ProtocolError

    try:
        protocol = get_protocol(values["protocol"])
    except ProtocolError as exc:
        raise pytest.UsageError(f"{exc} (--dit-protocol)") from None
    given = values["batch_size"] if _DIT["batch_size"].given(config) else None
    try:
        return {"batch_size": protocol.batch_size(given)}
    except ProtocolError as exc:
        raise pytest.UsageError(f"{exc}: --dit-batch-size does not apply under --dit-protocol={protocol.name} "
                                "(leave it out)") from None


def _check_device_and_dtype(config: pytest.Config, values: dict[str, Any]) -> dict[str, Any]:
    return {"device": _check_device(values["device"]), "dtype": DTYPES[values["dtype"]]}


def _check_schedulers(config: pytest.Config, values: dict[str, Any]) -> dict[str, Any]:
    """``--dit-scheduler`` and ``--dit-schedulers``: aliases or diffusers classes that exist."""
    from ..profiling.schedulers import UnknownSchedulerError, scheduler_class_and_overrides

    for name in [values["scheduler"], *values["schedulers"]]:
        if name and name != "default":
            try:
                scheduler_class_and_overrides(name)
            except UnknownSchedulerError as exc:
                raise pytest.UsageError(str(exc)) from None
    return {}


def _select_prompts(config: pytest.Config, values: dict[str, Any]) -> dict[str, Any]:
    """``--dit-prompts`` and ``--dit-num-prompts``: the prompt set (the protocol's default set when none is
    given; ``default`` names the shipped one) and its first N prompts (the protocol's count for a named set,
    every prompt of a file)."""
    from ..profiling.prompts import PROMPT_SETS, PromptFileError, resolve_prompts, select_prompts
    from ..profiling.protocol_registry import get_protocol

    protocol = get_protocol(values["protocol"])
    source = values["prompt_source"] or protocol.default_prompt_set
    source = "" if source == "default" else source  # the shipped set by its name
    count = values["num_prompts"]
    try:
        pool = resolve_prompts(source or "default")
        if count is None and (not source or source in PROMPT_SETS):
            count = protocol.num_prompts(source or "default")
        if count is not None and count < 1:
            raise ValueError(f"--dit-num-prompts must be at least 1, got {count}")
        prompts = select_prompts(pool, count, f"prompt set {source}" if source else "the shipped prompt set")
    except (PromptFileError, ValueError) as exc:
        raise pytest.UsageError(f"{exc} (--dit-prompts / --dit-num-prompts)") from None
    return {"prompt_source": source, "prompts": tuple(prompts), "num_prompts": len(prompts)}


def _parse_shard(config: pytest.Config, values: dict[str, Any]) -> dict[str, Any]:
    """``--dit-shard=K/N`` -> (K, N), checked against the prompts; a shard cannot update baselines."""
    from .shard import ShardError, parse_shard

    if values["shard"] is None:
        return {}
    try:
        # a model running a smaller set of its own (the trained models' captions) is checked when resolved
        shard = parse_shard(values["shard"], len(values["prompts"]))
    except ShardError as exc:
        raise pytest.UsageError(f"{exc} (--dit-shard)") from None
    if values["update_baselines"]:
        raise pytest.UsageError("--dit-update-baselines needs every prompt: run it without --dit-shard")
    return {"shard": shard}


def _resolve_paths(config: pytest.Config, values: dict[str, Any]) -> dict[str, Any]:
    """The baseline directory relative to the rootdir; report paths relative to the invocation directory when
    given on the command line, else (the ini file's) to the rootdir."""
    root = Path(config.rootpath)
    paths = {"baseline_dir": root / values["baseline_dir"]}  # an absolute path stays as it is
    for name in ("report", "json"):
        if values[name] is not None:
            base = Path(config.invocation_params.dir) if _DIT[name].on_command_line(config) else root
            paths[name] = base / values[name]
    if "report" in paths and "json" in paths and paths["report"].resolve() == paths["json"].resolve():
        raise pytest.UsageError(f"--dit-report and --dit-json both name {paths['report'].resolve()}: the JSON would "
                                "overwrite the HTML report; give them different paths (e.g. reports/index.html and "
                                "reports/index.json)")
    return paths


def _check_executor(config: pytest.Config, values: dict[str, Any]) -> dict[str, Any]:
    """``--dit-executor``: a registered executor; an executor's own options only with it; a pool that spreads
    the work itself is not run under pytest-xdist's ``-n``. Ray is not imported here."""
    from ..profiling.executor_registry import EXECUTORS, get_executor
    from ..profiling.executors import ExecutorError

    try:
        executor = get_executor(values["executor"])
    except ExecutorError as exc:
        raise pytest.UsageError(f"{exc} (--dit-executor)") from None
    for name in dict.fromkeys(name for cls in EXECUTORS.values() for name in cls.options):
        if values[name] is not None and name not in executor.options:
            users = ", ".join(f"--dit-executor={cls.name}" for cls in EXECUTORS.values() if name in cls.options)
            raise pytest.UsageError(f"{_DIT[name].flag} applies to {users} only; this run's executor is "
                                    f"{executor.name}: add {users} or leave {_DIT[name].flag} out")
    if values["ray_actors"] is not None and values["ray_actors"] < 1:
        raise pytest.UsageError(f"--dit-ray-actors must be at least 1, got {values['ray_actors']}")
    if executor.spreads_work and getattr(config.option, "numprocesses", None):
        raise pytest.UsageError(f"--dit-executor={executor.name} spreads the profiles over the cluster itself; run "
                                "it without pytest-xdist's -n")
    return {}


def _record_given(config: pytest.Config, values: dict[str, Any]) -> dict[str, Any]:
    """What the command line gave, as typed (the update flag is the caller's to add), and whether a seed was
    given at all (ini too)."""
    given: dict[str, str | None] = {}
    for declared in OPTIONS:
        if declared.flag != "--dit-update-baselines":
            given.update(declared.as_typed(config))
    return {"given": given, "seed_given": _DIT["seed"].given(config)}


STEPS: tuple[Step, ...] = (_check_numbers, _select_models, _apply_protocol, _check_device_and_dtype,
                           _check_schedulers, _select_prompts, _parse_shard, _resolve_paths, _check_executor,
                           _record_given)


def _check_device(text: str) -> str:
    """``--dit-device``: a device torch knows, of a kind the plugin runs on, present on this machine."""
    if text == "auto":
        return text
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise pytest.UsageError(f"--dit-device={text} is not a device; valid values: {DEVICES}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise pytest.UsageError(f"--dit-device={text}: torch sees no CUDA GPU on this machine; use "
                                    "--dit-device=cpu or auto")
        if device.index is not None and device.index >= count:
            raise pytest.UsageError(f"--dit-device={text}: torch sees {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise pytest.UsageError(f"--dit-device={text}: MPS is not available on this machine; use --dit-device=cpu "
                                "or auto")
    return text


def read_config(config: pytest.Config) -> DitConfig:
    """Every option, parsed and checked by :data:`STEPS`; a bad value is a :class:`pytest.UsageError` (exit 4)."""
    return build(config, DitConfig, STEPS)
