"""Protocols: how redundancy is measured, as objects the runner asks (``profile_model(..., protocol=...)``).

A protocol owns everything that differs between ways of measuring: the spec it runs (the study changes steps
and guidance), the seeds (``seed + i`` per prompt, or one seed for every prompt), the default prompt set and
count, the batch size, which sites and kinds it captures, whether CFG halves are separate branches or one
whole-batch mean, where the generators live, and its prefix in the settings key. The runner never compares a
protocol's name: adding a protocol is one subclass and one
:func:`~pytest_ditredundancy.profiling.protocol_registry.register_protocol` call.

``project`` (the default) is this package's definitions; ``paper`` is the redundancy study's, exactly
(:mod:`pytest_ditredundancy.profiling.paper`).
"""

from __future__ import annotations

from typing import Any, ClassVar, Iterable, Sequence

import torch
from torch import nn

from ..capture.sites import CaptureSite
from ..zoo.registry import ModelSpec

class ProtocolError(ValueError):
    """A request the chosen protocol cannot serve (unknown protocol, a model the study did not measure...)."""


#: the prompt set a spec runs when neither the user nor its protocol names one
DEFAULT_PROMPT_SET = "default"
DEFAULT_NUM_PROMPTS = 8
DEFAULT_BATCH_SIZE = 8


class Protocol:
    """The project's protocol; subclasses override what their way of measuring changes."""

    name: ClassVar[str] = "project"
    summary: ClassVar[str] = "this package's definitions (the default)"
    #: prompts per pipeline call when none is given; ``batch_fixed``: the only batch size it runs
    default_batch_size: ClassVar[int] = DEFAULT_BATCH_SIZE
    batch_fixed: ClassVar[bool] = False
    #: one mean over the whole transformer batch (branch ``batch``) instead of one branch per CFG half
    whole_batch: ClassVar[bool] = False
    #: every prompt uses the run's seed (instead of ``seed + global prompt index``)
    same_seed: ClassVar[bool] = False
    #: the named prompt set of a run that names none (a spec may name its own: :meth:`prompt_set`)
    default_prompt_set: ClassVar[str] = DEFAULT_PROMPT_SET
    #: the cache gate can run on its profiles (it needs each CFG half and per-prompt seeds)
    runs_cache_gate: ClassVar[bool] = True

    # -- what it runs -------------------------------------------------------------------------------------------
    def spec(self, spec: ModelSpec) -> ModelSpec:
        """The spec this protocol runs ``spec`` with (idempotent)."""
        return spec

    def check_model(self, spec: ModelSpec) -> None:
        """Raise :class:`ProtocolError` for a model this protocol cannot measure."""

    def selects(self, spec: ModelSpec) -> bool:
        """Whether ``spec`` belongs to the default selection (no ``--dit-model``) among the tiny models."""
        return True

    def default_seed(self, spec: ModelSpec) -> int:
        """The seed when none is given (prompt ``i`` then uses ``i``)."""
        return 0

    def seed_given(self, seed: int, given: bool) -> int | None:
        """The seed a session passes on: the option's value, or ``None`` for the protocol's own default."""
        return seed

    def prompt_set(self, spec: ModelSpec) -> str:
        """The named prompt set a model runs by default: the spec's own (trained models: ``shapes``) or the
        shipped one."""
        return spec.prompt_set or self.default_prompt_set

    def num_prompts(self, prompt_set: str) -> int:
        """How many prompts of a named set run by default."""
        return DEFAULT_NUM_PROMPTS

    def batch_size(self, given: int | None) -> int:
        if given is None:
            return self.default_batch_size
        if given < 1:
            raise ValueError(f"batch size must be at least 1, got {given}")
        if self.batch_fixed and given != self.default_batch_size:
            raise ProtocolError(f"protocol {self.name!r} runs {self.default_batch_size} prompt(s) per pipeline call; "
                                f"got batch_size={given}")
        return given

    # -- how it measures ----------------------------------------------------------------------------------------
    def kinds(self, kinds: Iterable[str]) -> tuple[str, ...]:
        return tuple(kinds)

    def sites(self, transformer: nn.Module, spec: ModelSpec, kinds: Sequence[str]) -> list[CaptureSite] | None:
        """The capture sites, or ``None`` for the capture's own discovery (every attention layer)."""
        return None

    def seed_of(self, seed: int, index: int) -> int:
        """The generator seed of the prompt with global index ``index``."""
        return seed if self.same_seed else seed + index

    def generator_device(self, execution_device: torch.device) -> torch.device:
        """Where the per-prompt generators live (CPU keeps a profile identical across devices)."""
        return torch.device("cpu")

    def loop_run_kwargs(self, spec: ModelSpec) -> dict[str, Any]:
        """Extra arguments of an adapter loop's ``run`` (Open-Sora's sampler settings)."""
        return {}

    def metadata(self, seed: int) -> dict[str, Any]:
        """What the profile's metadata records about the protocol beyond its name."""
        return {}

    @property
    def key_prefix(self) -> str:
        """How the settings key names the protocol (the project's protocol: not at all)."""
        return "" if self.name == Protocol.name else f"{self.name}-"

    def __repr__(self) -> str:
        return f"<protocol {self.name}>"


__all__ = ["DEFAULT_BATCH_SIZE", "DEFAULT_NUM_PROMPTS", "DEFAULT_PROMPT_SET", "Protocol", "ProtocolError"]
