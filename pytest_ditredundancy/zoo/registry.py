"""Named model specs: what to load and how the paper ran it.

A :class:`ModelSpec` says which diffusers pipeline a model uses, which checkpoint, and the settings of the
redundancy study (steps, resolution, guidance, scheduler, dtype). Every family also has a ``tiny-<name>``
spec whose ``build`` callable makes a randomly initialised, offline copy of the same architecture, so the
whole product can be tested on a CPU without a model hub.

Third-party packages add models with :func:`register_model` or through the ``pytest_ditredundancy.models``
entry-point group (each entry point is a callable that returns an iterable of specs, or registers them).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace
from importlib.metadata import entry_points
from typing import Any, Callable

ENTRY_POINT_GROUP = "pytest_ditredundancy.models"

#: How the transformer's batch rows / calls map to classifier-free-guidance branches.
#: ``auto``: infer from the pipeline (a doubled batch is [uncond, cond], as diffusers concatenates it).
BRANCH_LAYOUTS = ("auto", "batched-uncond-cond", "batched-cond-uncond", "sequential-cond-uncond", "single")

#: The run settings of a spec: what a checkpoint takes from a registered model to be profiled (and judged) as
#: that model's saved copy (:meth:`ModelSpec.with_settings_of`; ``--dit-baseline-name``, ``profile_model``'s
#: ``as_model=``). Identity (name, checkpoint, pipeline class, family) and how it is loaded stay its own.
RUN_SETTINGS = ("steps", "height", "width", "num_frames", "guidance_scale", "scheduler", "dtype", "call_kwargs",
                "frames_argument", "conditioning", "prediction", "branch_layout", "prompt_set")


@dataclass(frozen=True)
class ModelSpec:
    """One model the zoo knows by name.

    ``build`` makes the pipeline without a hub (tiny variants); when it is ``None`` the pipeline is loaded
    with ``pipeline_class.from_pretrained(checkpoint)``.
    """

    name: str
    family: str
    pipeline_class: str
    checkpoint: str | None
    steps: int
    height: int | None  # None: the pipeline's default
    width: int | None
    guidance_scale: float | None
    scheduler: str
    dtype: str = "bfloat16"
    num_frames: int | None = None
    frames_argument: str = "num_frames"  # the pipeline's name for it (Latte: video_length)
    conditioning: str = "text"  # "text" prompts, or "class" labels (DiT)
    prediction: str = "flow"  # "epsilon" / "v_prediction" / "flow": which schedulers suit it
    branch_layout: str = "auto"
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    build: Callable[[int], Any] | None = None
    in_paper: bool = False
    description: str = ""
    trained: bool = False  # weights trained on the procedural shapes data, shipped in the package (no tiny twin)
    #: the named prompt set it runs unless told otherwise (None: the shipped set); the trained models know only
    #: the captions of their data (``shapes``)
    prompt_set: str | None = None
    #: settings inferred from the pipeline class, for a checkpoint the zoo does not name (a saved directory, an
    #: unregistered repo id): its family's, not known to be the ones it was made for
    inferred: bool = False

    def __post_init__(self) -> None:
        if self.branch_layout not in BRANCH_LAYOUTS:
            raise ValueError(f"{self.name}: branch_layout {self.branch_layout!r} is not one of {BRANCH_LAYOUTS}")
        if self.steps < 2:
            raise ValueError(f"{self.name}: steps must be >= 2 to have a step pair, got {self.steps}")

    @property
    def is_tiny(self) -> bool:
        return self.build is not None

    @property
    def is_video(self) -> bool:
        return self.num_frames is not None

    def with_settings_of(self, other: "ModelSpec") -> "ModelSpec":
        """This checkpoint run with ``other``'s settings (:data:`RUN_SETTINGS`), so its profile is comparable with
        ``other``'s profiles and baselines: a saved copy of ``other``, a fine-tune, a re-export."""
        return replace(self, inferred=False, **{name: getattr(other, name) for name in RUN_SETTINGS})

    def tiny(self, build: Callable[[int], Any], **overrides: Any) -> "ModelSpec":
        """The ``tiny-<name>`` twin of this spec: same family and pipeline class, built offline."""
        settings = dict(
            name=f"tiny-{self.name}", checkpoint=None, build=build, dtype="float32", in_paper=False,
            description=f"offline random-weight variant of {self.name}",
        )
        settings.update(overrides)
        return replace(self, **settings)


class UnknownModelError(LookupError):
    """Raised for a model name that is neither registered, a local directory, nor an HF repo id."""


_REGISTRY: dict[str, ModelSpec] = {}
_entry_points_loaded = False


def register_model(spec: ModelSpec, *, replace_existing: bool = False) -> ModelSpec:
    """Add ``spec`` to the zoo. Re-registering a name is an error unless ``replace_existing``.

    Example::

        register_model(ModelSpec(name="my-dit", family="my-dit", pipeline_class="PixArtAlphaPipeline",
                                 checkpoint="me/my-dit", steps=20, height=512, width=512,
                                 guidance_scale=4.5, scheduler="dpm-solver"))
    """
    if spec.name in _REGISTRY and not replace_existing and _REGISTRY[spec.name] != spec:
        raise ValueError(f"model {spec.name!r} is already registered; pass replace_existing=True to override it")
    _REGISTRY[spec.name] = spec
    return spec


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        provider = ep.load()
        specs = provider() if callable(provider) else provider
        for spec in specs or ():
            register_model(spec, replace_existing=True)


def registered_models() -> dict[str, ModelSpec]:
    """All registered specs by name (built-in zoo plus entry points)."""
    _load_entry_points()
    return dict(_REGISTRY)


def tiny_model_names() -> list[str]:
    """Names of every offline tiny model, in registration order."""
    return [name for name, spec in registered_models().items() if spec.is_tiny]


def get_spec(name: str) -> ModelSpec:
    """Look a registered name up; the error lists the closest registered names."""
    models = registered_models()
    if name in models:
        return models[name]
    close = difflib.get_close_matches(name, list(models), n=5, cutoff=0.4)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UnknownModelError(
        f"unknown model {name!r}.{hint} Registered models: {', '.join(sorted(models))}. "
        "You can also pass an HF repo id ('org/name') or a directory saved with save_pretrained()."
    )
