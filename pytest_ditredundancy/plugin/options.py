"""Command-line options and ini settings, read once into a typed :class:`DitConfig`.

Every ``--dit-*`` option has an ini twin (``dit_*``); the command line wins over the ini file, and every
boolean flag has a ``--no-dit-*`` form that turns an ini ``true`` off. A value given is a value used, or a
usage error (exit 4) that names the option and the valid values: an empty value (an unset CI variable) is
never read as "the default". Giving any option or ini key is what turns the plugin on (:func:`requested`).

This module is imported with the plugin in every pytest run of the environment: at module level it imports
only pytest and the standard library (prompts, schedulers, the protocol, torch and the zoo are imported by
:func:`read_config`, which runs only when the plugin is in use).
"""

from __future__ import annotations

import hashlib
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

DEFAULT_NUM_PROMPTS = 8
DEVICES = "auto, cpu, cuda, cuda:N (N: the GPU's index), mps"
DTYPES = {"auto": "auto", "float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "fp32": "float32",
          "fp16": "float16", "half": "float16", "bf16": "bfloat16"}

#: (option, ini name, help, kind, default). kind: str, int, float, bool, list, floats. A default of None means
#: unset (the model's own value; no bound). Boolean flags also get a --no- form.
OPTIONS: list[tuple[str, str, str, str, Any]] = [
    ("--dit-model", "dit_models", "model(s) to test: registered name, HF repo id or local directory; repeat the "
     "option or give a comma list (default: every tiny model)", "list", []),
    ("--dit-device", "dit_device", "device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps", "str", "auto"),
    ("--dit-dtype", "dit_dtype", "dtype: auto (model's dtype on GPU, float32 on CPU), float32, float16, bfloat16",
     "str", "auto"),
    ("--dit-protocol", "dit_protocol", "how redundancy is measured: 'project' (this package's definitions, the "
     "default) or 'paper' (the redundancy study's protocol, exactly: its seed for every prompt, whole-batch mean, "
     "self-attention only, its K/V/A tensors, step counts and schedulers; README 'Protocols')", "str", "project"),
    ("--dit-prompts", "dit_prompts", "prompt set: a named set (coco1000: the study's 1000 MS-COCO captions; "
     "default) or a file, one prompt per line or .jsonl with a 'prompt' field (default: the 72 shipped prompts; "
     "coco1000 with --dit-protocol=paper)", "str", ""),
    ("--dit-num-prompts", "dit_num_prompts", "how many prompts to profile per model, the first N of the set "
     "(default: 8 of the shipped set, 10 of coco1000 with --dit-protocol=paper, or every prompt of a "
     "--dit-prompts file)", "int", None),
    ("--dit-steps", "dit_steps", "denoising steps, at least 2 (default: the model's own)", "int", None),
    ("--dit-scheduler", "dit_scheduler", "scheduler alias or diffusers class (default: the model's own)", "str", ""),
    ("--dit-seed", "dit_seed", "seed; prompt i uses seed + i (--dit-protocol=paper: every prompt uses it; "
     "default there: the study's seed of each model)", "int", 0),
    ("--dit-batch-size", "dit_batch_size", "prompts per pipeline call (--dit-protocol=paper: 1, as the study)",
     "int", 8),
    ("--dit-baseline-dir", "dit_baseline_dir", "where baselines live, relative to the rootdir", "str", "baselines"),
    ("--dit-baseline-name", "dit_baseline_name", "judge the selected model against the baselines stored under this "
     "model name, e.g. --dit-model=./new-ckpt --dit-baseline-name=pixart-alpha (default: the model's own name)",
     "str", None),
    ("--dit-update-baselines", "dit_update_baselines", "rewrite the baseline sections of the selected tests "
     "instead of comparing against them", "bool", False),
    ("--dit-step-factors", "dit_step_factors", "step-count suite: multiples of the default step count",
     "floats", [0.5, 2.0]),
    ("--dit-schedulers", "dit_schedulers", "scheduler suite: schedulers to compare (default: those that suit "
     "the model's prediction type)", "list", []),
    ("--dit-cv-bounds", "dit_cv_bounds", "prompt-stability claim: robust CV across prompts must lie in LO,HI "
     "(the paper reports 10-15 percent); reported, and failing only with --dit-enforce-claims", "floats", [0.0, 0.2]),
    ("--dit-min-shape-correlation", "dit_min_shape_correlation", "step/scheduler claim: minimum shape "
     "correlation of the profile under other step counts or schedulers; reported, and failing only with "
     "--dit-enforce-claims", "float", 0.8),
    ("--dit-enforce-claims", "dit_enforce_claims", "fail when a model breaks the paper's stability claims "
     "(--dit-cv-bounds, --dit-min-shape-correlation), not only when it changed from its baseline; without a "
     "baseline the claims alone judge the model", "bool", False),
    ("--dit-tolerance", "dit_tolerance", "regression tolerance: default (device noise and benign changes never "
     "fail) or strict (calibrated on measured run-to-run noise; catches bf16 round trips and quantisation)",
     "str", "default"),
    ("--dit-report", "dit_report", "write a self-contained HTML report to this path (e.g. reports/index.html)",
     "str", ""),
    ("--dit-json", "dit_json", "write the report's content as JSON to this path (with --dit-shard: also the "
     "per-prompt profiles that 'python -m pytest_ditredundancy merge' combines)", "str", ""),
    ("--dit-shard", "dit_shard", "K/N: profile only shard K (1..N) of the prompt list, a contiguous block; suites "
     "are judged when the shards are merged", "str", ""),
    ("--dit-progress-interval", "dit_progress_interval", "seconds between progress lines while profiling (0: after "
     "every batch, negative: never)", "float", 10.0),
    ("--dit-cache", "dit_caches", "cache suite: caching strategy to gate, repeatable: none, profile[:budget=0.3|"
     "threshold=0.05|schedule=FILE], fbcache[:threshold=0.05], pab, fastercache, magcache, taylorseer "
     "(see the README section Cache gate)", "list", []),
    ("--dit-cache-repeats", "dit_cache_repeats", "cache suite: timed runs per strategy (uncached and cached "
     "interleaved; the speedup is the ratio of the medians)", "int", 3),
    ("--dit-cache-budgets", "dit_cache_budgets", "cache suite: budgets of the profile schedule's error sweep",
     "floats", [0.1, 0.3, 0.5]),
    ("--dit-cache-min-psnr", "dit_cache_min_psnr", "cache suite: minimum PSNR (dB) used where no baseline "
     "exists", "float", None),
    ("--dit-cache-min-skipped", "dit_cache_min_skipped", "cache suite: minimum fraction of attention compute "
     "skipped, in [0, 1), used where no baseline exists", "float", None),
]


def dest_of(flag: str) -> str:
    return flag[2:].replace("-", "_")


def add_options(parser: pytest.Parser) -> None:
    """Register every option and its ini twin. Defaults are None on both sides, so :func:`requested` can tell
    a value the user gave (even the default value) from none; :func:`read_config` supplies the defaults."""
    group = parser.getgroup("ditredundancy", "DiT redundancy profiling (pytest-ditredundancy)")
    for flag, ini, help_text, kind, _default in OPTIONS:
        dest = dest_of(flag)
        if kind == "bool":
            group.addoption(flag, action="store_true", default=None, dest=dest, help=help_text)
            group.addoption(f"--no-{flag[2:]}", action="store_false", default=None, dest=dest,
                            help=f"turn {flag} off (when the ini file turns it on)")
            parser.addini(ini, help_text, type="bool", default=None)
        elif kind in ("list", "floats"):
            group.addoption(flag, action="append", default=None, dest=dest, metavar="VALUE", help=help_text)
            parser.addini(ini, help_text, type="args", default=None)
        else:
            group.addoption(flag, action="store", default=None, dest=dest, metavar=kind.upper(), help=help_text)
            parser.addini(ini, help_text, default=None)


def requested(config: pytest.Config) -> str | None:
    """Why the plugin is on from the start: the first ``--dit-*`` option or ``dit_*`` ini key (``-o`` too) the
    run gives, or None. Only reads what pytest parsed already: cheap, and imports nothing."""
    for flag, ini, _help, _kind, _default in OPTIONS:
        if config.getoption(dest_of(flag), None) is not None:
            return flag
    for _flag, ini, _help, _kind, _default in OPTIONS:
        if config.getini(ini) is not None:
            return f"ini {ini}"
    return None


def _split(values: list[str]) -> list[str]:
    return [part.strip() for value in values for part in str(value).split(",") if part.strip()]


def _raw(config: pytest.Config, flag: str, ini: str, kind: str, default: Any) -> Any:
    """The value of one option: the command line's, else the ini file's, else ``default``. A given value
    that is empty or does not parse is a usage error naming the option."""
    value, where = config.getoption(dest_of(flag)), flag
    if value is None:
        value, where = config.getini(ini), f"{ini} (ini)"
        if value is None:
            return default
    if kind == "bool":
        return bool(value)
    if kind in ("list", "floats"):
        parts = _split(value if isinstance(value, list) else [value])
        if not parts:
            raise pytest.UsageError(f"{where} is empty (an unset variable?): give a value, or leave the option out "
                                    f"for its default{_default_text(default)}")
        if kind == "floats":
            try:
                return [float(p) for p in parts]
            except ValueError:
                raise pytest.UsageError(f"{where} expects numbers separated by commas, "
                                        f"got {','.join(parts)!r}") from None
        return parts
    if not str(value).strip():
        raise pytest.UsageError(f"{where} is empty (an unset variable?): give a value, or leave the option out for "
                                f"its default{_default_text(default)}")
    if kind == "int":
        try:
            return int(value)
        except (TypeError, ValueError):
            raise pytest.UsageError(f"{where} expects a whole number, got {value!r}") from None
    if kind == "float":
        try:
            return float(value)
        except (TypeError, ValueError):
            raise pytest.UsageError(f"{where} expects a number, got {value!r}") from None
    return str(value)


def _default_text(default: Any) -> str:
    if default is None or default == "" or default == []:
        return ""
    return f" ({','.join(map(str, default)) if isinstance(default, list) else default})"


@dataclass(frozen=True)
class DitConfig:
    """The plugin's settings for this session (one place that reads options and ini)."""

    models: tuple[str, ...]
    device: str
    dtype: str
    prompts: tuple[str, ...]
    prompt_source: str
    num_prompts: int
    steps: int | None
    scheduler: str | None
    seed: int
    batch_size: int
    baseline_dir: Path
    update_baselines: bool
    step_factors: tuple[float, ...]
    schedulers: tuple[str, ...]
    cv_bounds: tuple[float, float]
    min_shape_correlation: float
    enforce_claims: bool = False
    tolerance: str = "default"
    given: dict[str, str | None] = field(default_factory=dict)  # options the user set (flags: None), for commands
    report: Path | None = None  # --dit-report
    json: Path | None = None  # --dit-json
    shard: tuple[int, int] | None = None  # --dit-shard K/N (K from 1)
    progress_interval: float = 10.0
    protocol: str = "project"  # --dit-protocol
    seed_given: bool = False  # --dit-seed set: under the paper protocol it replaces the study's seeds
    baseline_name: str | None = None  # --dit-baseline-name: the selected model's baselines are stored under it

    @property
    def prompt_digest(self) -> str | None:
        """Short hash of a custom prompt set (part of the baseline key); None for the shipped prompts."""
        if not self.prompt_source:
            return None
        return hashlib.sha256("\n".join(self.prompts).encode("utf-8")).hexdigest()[:8]

    @property
    def prompt_tag(self) -> str | None:
        """What the baseline key says about the prompts: nothing for the shipped set, the name of a named set
        (``coco1000``), ``prompts<hash>`` for a file."""
        if not self.prompt_source:
            return None
        from ..profiling.prompts import PROMPT_SETS

        return self.prompt_source if self.prompt_source in PROMPT_SETS else f"prompts{self.prompt_digest}"

    @property
    def noise_seed(self) -> int | None:
        """The seed profiles use: ``seed`` (prompt i then uses seed + i), or under the paper protocol ``None``
        (each model's study seed, the same for every prompt) unless ``--dit-seed`` was given."""
        return self.seed if self.protocol == "project" or self.seed_given else None

    def command(self, model: str, *extra: str) -> str:
        """The pytest command line that reproduces this session's settings for ``model``: the model as the user
        typed it (``./new-ckpt``, not the directory's basename) and every option they gave, shell-quoted;
        ``extra`` is appended as is."""
        parts = ["pytest", "suites", shlex.quote(f"--dit-model={model}")]
        parts += [shlex.quote(flag if value is None else f"{flag}={value}") for flag, value in self.given.items()
                  if flag != "--dit-model"]
        return " ".join([*parts, *extra])


def read_config(config: pytest.Config) -> DitConfig:
    """Every option, parsed and checked; a bad value is a :class:`pytest.UsageError` (exit 4)."""
    from ..profiling.paper import PAPER_NUM_PROMPTS, PAPER_PROMPTS, ProtocolError, check_protocol
    from ..profiling.prompts import PROMPT_SETS, PromptFileError, resolve_prompts, select_prompts
    from ..profiling.schedulers import UnknownSchedulerError, scheduler_class_and_overrides
    from .shard import ShardError, parse_shard
    from ..judging.tolerances import LEVELS

    values = {ini: _raw(config, flag, ini, kind, default) for flag, ini, _, kind, default in OPTIONS}
    given: dict[str, str | None] = {}
    for flag, ini, _, kind, _default in OPTIONS:
        raw = config.getoption(dest_of(flag))
        if kind == "bool":  # a flag: repeated as typed (--dit-x or --no-dit-x); the update flag is the caller's
            if raw is not None and flag != "--dit-update-baselines":
                given[flag if raw else f"--no-{flag[2:]}"] = None
        elif raw not in (None, []):
            given[flag] = ",".join(map(str, raw)) if isinstance(raw, list) else str(raw)
    values["dit_models"] = list(dict.fromkeys(values["dit_models"]))  # the same model twice runs once
    try:
        protocol = check_protocol(values["dit_protocol"])
    except ProtocolError as exc:
        raise pytest.UsageError(f"{exc} (--dit-protocol)") from None
    paper = protocol == "paper"
    if paper:
        batch_given = _given(config, "--dit-batch-size", "dit_batch_size")
        if batch_given and values["dit_batch_size"] != 1:
            raise pytest.UsageError(f"--dit-protocol=paper runs one prompt per pipeline call, as the study did; "
                                    f"--dit-batch-size={values['dit_batch_size']} does not apply (leave it out)")
        values["dit_batch_size"] = 1
        for model in values["dit_models"]:
            _check_paper_model(model)
    seed_given = _given(config, "--dit-seed", "dit_seed")
    for flag, name in (("--dit-batch-size", "dit_batch_size"),):
        if values[name] < 1:
            raise pytest.UsageError(f"{flag} (ini {name}) must be at least 1, got {values[name]}")
    if values["dit_steps"] is not None and values["dit_steps"] < 2:
        raise pytest.UsageError(f"--dit-steps must be at least 2 (a profile compares consecutive steps), got {values['dit_steps']}")
    device, dtype = _check_device(values["dit_device"]), _check_dtype(values["dit_dtype"])
    if values["dit_baseline_name"] is not None and len(values["dit_models"]) != 1:
        selected = ", ".join(values["dit_models"]) or "every tiny model (no --dit-model)"
        raise pytest.UsageError(f"--dit-baseline-name={values['dit_baseline_name']} judges one model against another "
                                f"model's baselines: select exactly one model with --dit-model (selected: {selected})")
    for name in [values["dit_scheduler"], *values["dit_schedulers"]]:
        if name and name != "default":
            try:
                scheduler_class_and_overrides(name)
            except UnknownSchedulerError as exc:
                raise pytest.UsageError(str(exc)) from None
    source = values["dit_prompts"] or (PAPER_PROMPTS if paper else "")
    source = "" if source == "default" else source  # the shipped set by its name
    try:
        pool = resolve_prompts(source or "default")
        named = not source or source in PROMPT_SETS
        count = values["dit_num_prompts"]
        if count is None:
            count = None if not named else PAPER_NUM_PROMPTS if paper else DEFAULT_NUM_PROMPTS
        if count is not None and count < 1:
            raise ValueError(f"--dit-num-prompts must be at least 1, got {count}")
        prompts = select_prompts(pool, count, f"prompt set {source}" if source else "the shipped prompt set")
    except (PromptFileError, ValueError) as exc:
        raise pytest.UsageError(f"{exc} (--dit-prompts / --dit-num-prompts)") from None
    bounds = values["dit_cv_bounds"]
    if len(bounds) != 2 or bounds[0] > bounds[1] or bounds[0] < 0:
        raise pytest.UsageError(f"--dit-cv-bounds expects LO,HI with 0 <= LO <= HI, got {bounds}")
    if not -1.0 <= values["dit_min_shape_correlation"] <= 1.0:
        raise pytest.UsageError(f"--dit-min-shape-correlation must lie in [-1, 1], got {values['dit_min_shape_correlation']}")
    if values["dit_tolerance"] not in LEVELS:
        raise pytest.UsageError(f"--dit-tolerance must be one of {', '.join(LEVELS)}, got {values['dit_tolerance']!r}")
    factors = values["dit_step_factors"]
    if any(f <= 0 for f in factors):
        raise pytest.UsageError(f"--dit-step-factors must be positive, got {factors}")
    try:
        shard = parse_shard(values["dit_shard"], len(prompts)) if values["dit_shard"] else None
    except ShardError as exc:
        raise pytest.UsageError(f"{exc} (--dit-shard)") from None
    if shard and values["dit_update_baselines"]:
        raise pytest.UsageError("--dit-update-baselines needs every prompt: run it without --dit-shard")
    baseline_dir = Path(values["dit_baseline_dir"]).expanduser()
    if not baseline_dir.is_absolute():
        baseline_dir = Path(config.rootpath) / baseline_dir
    return DitConfig(
        models=tuple(values["dit_models"]), device=device, dtype=dtype,
        prompts=tuple(prompts), prompt_source=source, num_prompts=len(prompts),
        steps=values["dit_steps"], scheduler=values["dit_scheduler"] or None, seed=values["dit_seed"],
        batch_size=values["dit_batch_size"], baseline_dir=baseline_dir,
        update_baselines=bool(values["dit_update_baselines"]), step_factors=tuple(factors),
        schedulers=tuple(values["dit_schedulers"]),
        cv_bounds=(bounds[0], bounds[1]), min_shape_correlation=values["dit_min_shape_correlation"],
        enforce_claims=bool(values["dit_enforce_claims"]), tolerance=values["dit_tolerance"], given=given,
        report=_output_path(config, "--dit-report", values["dit_report"]),
        json=_output_path(config, "--dit-json", values["dit_json"]), shard=shard,
        progress_interval=values["dit_progress_interval"], protocol=protocol, seed_given=seed_given,
        baseline_name=values["dit_baseline_name"],
    )


def _given(config: pytest.Config, flag: str, ini: str) -> bool:
    """Whether the run gives this option (on the command line or in the ini file), whatever its value."""
    return config.getoption(dest_of(flag)) is not None or config.getini(ini) is not None


def _check_paper_model(model: str) -> None:
    """A model the paper protocol can run: one of the study's seven families (tiny twins included)."""
    from ..profiling.paper import ProtocolError, paper_setup
    from ..zoo.loading import resolve_spec

    try:
        spec = resolve_spec(model)
    except Exception:  # unknown or unloadable: its tests report that themselves
        return
    try:
        paper_setup(spec.family, spec.name)
    except ProtocolError as exc:
        raise pytest.UsageError(f"{exc} (--dit-protocol=paper, --dit-model)") from None


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


def _check_dtype(text: str) -> str:
    if text not in DTYPES:
        raise pytest.UsageError(f"--dit-dtype={text} is not a dtype the plugin runs; valid values: "
                                f"{', '.join(DTYPES)}")
    return DTYPES[text]


def _output_path(config: pytest.Config, flag: str, value: str) -> Path | None:
    """Report paths: relative to the invocation directory when given on the command line, else to the rootdir."""
    if not value:
        return None
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    given = config.getoption(flag[2:].replace("-", "_")) not in (None, "")
    return Path(config.invocation_params.dir if given else config.rootpath) / path
