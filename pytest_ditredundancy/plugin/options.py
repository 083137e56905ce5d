"""Command-line options and ini settings, each declared once, read into typed configs.

Every option is one field of a typed config (:class:`DitConfig`, :class:`CacheOptions`) declared with
:func:`option`: its flag, ini key, kind, default, help and valid values. From those declarations come the
``ditredundancy`` option group and its ini twins (:func:`add_options`), the ``--no-`` form of every boolean
flag, the config's constructor call (:func:`build`) and the options reference ``docs/options.md``
(:func:`options_markdown`; ``python -m pytest_ditredundancy options --markdown > docs/options.md``).

The command line wins over the ini file, and a ``--no-dit-*`` form turns an ini ``true`` off. A value given
is a value used, or a usage error (exit 4) that names the option and the valid values: an empty value (an
unset CI variable) is never read as "the default". Giving any option or ini key is what turns the plugin on
(:func:`requested`).

This module is imported with the plugin in every pytest run of the environment: at module level it imports
only pytest and the standard library (prompts, schedulers, protocols, torch and the zoo are imported by the
steps of :func:`~pytest_ditredundancy.plugin.option_steps.read_config`, which runs only when the plugin is in use).
"""

from __future__ import annotations

import hashlib
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .cache_options import CacheOptions
from .declared import Option, declarations, option, reference_markdown, reference_table

DEVICES = "auto, cpu, cuda, cuda:N (N: the GPU's index), mps"
DTYPES = {"auto": "auto", "float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "fp32": "float32",
          "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
#: the valid values of --dit-tolerance (judging.tolerances.LEVELS; a test keeps the two in step)
TOLERANCES = ("default", "strict")
#: the valid values of --dit-capture-memory (capture.batched_stats.MEMORY_MODES; a test keeps the two in step)
CAPTURE_MEMORY = ("auto", "fast", "low")
#: the most denoising steps --dit-steps takes: more than any sampler uses, far below what exhausts memory
MAX_STEPS = 10000
#: the largest --dit-step-factors multiple
MAX_STEP_FACTOR = 100

@dataclass(frozen=True, kw_only=True)
class DitConfig:
    """The plugin's settings for this session: the options, as read and checked by
    :func:`~pytest_ditredundancy.plugin.option_steps.read_config`, and
    what the steps of reading derive from them (prompts, resolved paths, the parsed shard, what was given)."""

    models: tuple[str, ...] = option(
        "--dit-model", ini="dit_models", kind=list[str], default=(),
        help="model(s) to test: registered name, HF repo id or local directory; repeat the option or give a comma "
             "list (default: every tiny model)")
    device: str = option(
        "--dit-device", ini="dit_device", kind=str, default="auto", valid=DEVICES,
        help="device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps")
    dtype: str = option(
        "--dit-dtype", ini="dit_dtype", kind=str, default="auto", choices=tuple(DTYPES),
        help="dtype: auto (model's dtype on GPU, float32 on CPU), float32, float16, bfloat16")
    protocol: str = option(
        "--dit-protocol", ini="dit_protocol", kind=str, default="project",
        valid="project, paper, or a protocol registered with register_protocol",
        help="how redundancy is measured: 'project' (this package's definitions, the default) or 'paper' (the "
             "redundancy study's protocol, exactly: its seed for every prompt, whole-batch mean, self-attention "
             "only, its K/V/A tensors, step counts and schedulers; README 'Protocols')")
    #: the prompt set: "" (the shipped set), a named set or a file
    prompt_source: str = option(
        "--dit-prompts", ini="dit_prompts", kind=str, default="",
        help="prompt set: a named set (coco1000: the study's 1000 MS-COCO captions; shapes: the trained models' "
             "captions; default) or a file, one prompt per line or .jsonl with a 'prompt' field (default: each "
             "model's own set: the 72 shipped prompts, shapes for the trained models, coco1000 with "
             "--dit-protocol=paper)")
    prompts: tuple[str, ...]
    #: len(prompts): the first N of the set
    num_prompts: int = option(
        "--dit-num-prompts", ini="dit_num_prompts", kind=int, default=None, required=True,
        help="how many prompts to profile per model, the first N of the set (default: 8 of a named set, 10 "
             "of coco1000 with --dit-protocol=paper, or every prompt of a --dit-prompts file)")
    steps: int | None = option(
        "--dit-steps", ini="dit_steps", kind=int, default=None,
        help=f"denoising steps, 2 to {MAX_STEPS} (default: the model's own)")
    scheduler: str | None = option(
        "--dit-scheduler", ini="dit_scheduler", kind=str, default=None,
        help="scheduler alias or diffusers class (default: the model's own)")
    seed: int = option(
        "--dit-seed", ini="dit_seed", kind=int, default=0,
        help="seed; prompt i uses seed + i (--dit-protocol=paper: every prompt uses it; default there: the "
             "study's seed of each model)")
    #: --dit-seed given: under the paper protocol it replaces the study's seeds
    seed_given: bool = False
    batch_size: int = option(
        "--dit-batch-size", ini="dit_batch_size", kind=int, default=8,
        help="prompts per pipeline call (--dit-protocol=paper: 1, as the study)")
    baseline_dir: Path = option(
        "--dit-baseline-dir", ini="dit_baseline_dir", kind=Path, default=Path("baselines"),
        help="where baselines live, relative to the rootdir")
    baseline_name: str | None = option(
        "--dit-baseline-name", ini="dit_baseline_name", kind=str, default=None,
        help="judge the selected model against the baselines stored under this model name, e.g. "
             "--dit-model=./new-ckpt --dit-baseline-name=pixart-alpha (default: the model's own name)")
    update_baselines: bool = option(
        "--dit-update-baselines", ini="dit_update_baselines", kind=bool, default=False,
        help="rewrite the baseline sections of the selected tests instead of comparing against them")
    step_factors: tuple[float, ...] = option(
        "--dit-step-factors", ini="dit_step_factors", kind=list[float], default=(0.5, 2.0),
        help=f"step-count suite: multiples of the default step count, positive and at most {MAX_STEP_FACTOR}")
    schedulers: tuple[str, ...] = option(
        "--dit-schedulers", ini="dit_schedulers", kind=list[str], default=(),
        help="scheduler suite: schedulers to compare (default: those that suit the model's prediction type)")
    cv_bounds: tuple[float, float] = option(
        "--dit-cv-bounds", ini="dit_cv_bounds", kind=list[float], default=(0.0, 0.2),
        help="prompt-stability claim: robust CV across prompts must lie in LO,HI (the paper reports 10-15 "
             "percent); reported, and failing only with --dit-enforce-claims")
    min_shape_correlation: float = option(
        "--dit-min-shape-correlation", ini="dit_min_shape_correlation", kind=float, default=0.8,
        help="step/scheduler claim: minimum shape correlation of the profile under other step counts or "
             "schedulers; reported, and failing only with --dit-enforce-claims")
    enforce_claims: bool = option(
        "--dit-enforce-claims", ini="dit_enforce_claims", kind=bool, default=False,
        help="fail when a model breaks the paper's stability claims (--dit-cv-bounds, "
             "--dit-min-shape-correlation), not only when it changed from its baseline; without a baseline the "
             "claims alone judge the model")
    tolerance: str = option(
        "--dit-tolerance", ini="dit_tolerance", kind=str, default="default", choices=TOLERANCES,
        help="regression tolerance: default (device noise and benign changes never fail) or strict (calibrated "
             "on measured run-to-run noise; catches bf16 round trips and quantisation)")
    capture_memory: str = option(
        "--dit-capture-memory", ini="dit_capture_memory", kind=str, default="auto", choices=CAPTURE_MEMORY,
        help="what the capture may hold: fast (each transformer call's captured tensors until the call ends, "
             "reduced in one kernel: up to twice one step's captured tensors), low (one step's, one reduction per "
             "tensor) or auto (fast when one more call's tensors fit in the free memory; docs/capture.md)")
    report: Path | None = option(
        "--dit-report", ini="dit_report", kind=Path, default=None,
        help="write a self-contained HTML report to this path (e.g. reports/index.html)")
    json: Path | None = option(
        "--dit-json", ini="dit_json", kind=Path, default=None,
        help="write the report's content as JSON to this path (with --dit-shard: also the per-prompt profiles "
             "that 'python -m pytest_ditredundancy merge' combines)")
    #: (K, N), K from 1
    shard: tuple[int, int] | None = option(
        "--dit-shard", ini="dit_shard", kind=str, default=None,
        help="K/N: profile only shard K (1..N) of the prompt list, a contiguous block; suites are judged when the "
             "shards are merged")
    progress_interval: float = option(
        "--dit-progress-interval", ini="dit_progress_interval", kind=float, default=10.0,
        help="seconds between progress lines while profiling (0: after every batch, negative: never)")
    executor: str = option(
        "--dit-executor", ini="dit_executor", kind=str, default="local",
        valid="local, ray, or an executor registered with register_executor",
        help="where profiles are computed: local (this process, or each xdist worker; the default) or ray (a pool "
             "of Ray actors, one per GPU of the cluster; pip install 'pytest-ditredundancy[ray]'; docs/ray.md)")
    ray_address: str | None = option(
        "--dit-ray-address", ini="dit_ray_address", kind=str, default=None,
        help="--dit-executor=ray: the cluster to join, host:port of its head node (ray://host:10001, auto) "
             "(default: RAY_ADDRESS, else a local Ray instance)")
    ray_actors: int | None = option(
        "--dit-ray-actors", ini="dit_ray_actors", kind=int, default=None,
        help="--dit-executor=ray: actors in the pool (default: one per GPU of the cluster, one per CPU on a "
             "cluster without GPUs)")
    #: options the user set on the command line (flags: None), for the commands messages suggest
    given: dict[str, str | None] = field(default_factory=dict)

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
        from ..profiling.protocol_registry import get_protocol

        return get_protocol(self.protocol).seed_given(self.seed, self.seed_given)

    def command(self, model: str, *extra: str) -> str:
        """The pytest command line that reproduces this session's settings for ``model``: the model as the user
        typed it (``./new-ckpt``, not the directory's basename) and every option they gave, shell-quoted;
        ``extra`` is appended as is."""
        parts = ["pytest", "suites", shlex.quote(f"--dit-model={model}")]
        parts += [shlex.quote(flag if value is None else f"{flag}={value}") for flag, value in self.given.items()
                  if flag != "--dit-model"]
        return " ".join([*parts, *extra])


#: every option, in the order of ``pytest --help``
OPTIONS: tuple[Option, ...] = (*declarations(DitConfig).values(), *declarations(CacheOptions).values())
_DIT = declarations(DitConfig)


def add_options(parser: pytest.Parser) -> None:
    """Register every option and its ini twin, in one option group."""
    group = parser.getgroup("ditredundancy", "DiT redundancy profiling (pytest-ditredundancy)")
    for declared in OPTIONS:
        declared.register(group, parser)


def requested(config: pytest.Config) -> str | None:
    """Why the plugin is on from the start: the first ``--dit-*`` option or ``dit_*`` ini key (``-o`` too) the
    run gives, or None. Only reads what pytest parsed already: cheap, and imports nothing."""
    for declared in OPTIONS:
        if declared.on_command_line(config):
            return declared.flag
    for declared in OPTIONS:
        if config.getini(declared.ini) is not None:
            return f"ini {declared.ini}"
    return None


# -- the options reference (docs/options.md) -------------------------------------------------------------------
def options_table() -> list[list[str]]:
    """One row per option: option (and its ``--no-`` form), ini key, type, default, valid values, help."""
    return reference_table(OPTIONS)


def options_markdown() -> str:
    """The text of ``docs/options.md``."""
    return reference_markdown(OPTIONS)
