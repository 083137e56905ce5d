"""Does a stored baseline fit this run? Settings, the checkpoint's scheduler, and the profile's layout.

A baseline recorded under other settings, for another scheduler or for another layer list is not wrong, it
is not comparable: judging against it would report drift that is no drift (or hide some). Each check returns
``None`` when the baseline fits, else the message that says what differs; the message holds :data:`FIX` where
the command that re-creates the baseline goes (only the caller knows the model's command line).
"""

from __future__ import annotations

from typing import Any

from ..io import plain
from ..profiling.schedulers import comparable_scheduler
from ..profiling.settings import RunSettings
from .baselines import Baseline, _rounded

#: placeholder for the re-creating command in the messages below
FIX = "<fix command>"


def settings_mismatch(baseline: Baseline, settings: RunSettings) -> str | None:
    """The file's recorded run settings must be this run's (a renamed or hand-copied file is caught here)."""
    stored = baseline.metadata.get("settings")
    if not isinstance(stored, dict):
        return (f"baseline {baseline.path} does not record its run settings (metadata.settings); re-create it "
                f"with:\n    {FIX}")
    current = plain(settings.__dict__, _rounded)
    differ = [f"{k}: {stored.get(k)!r} there, {v!r} now" for k, v in current.items() if stored.get(k) != v]
    if differ:
        return (f"baseline {baseline.path} was recorded with other settings ({'; '.join(differ)}): its numbers are "
                f"not comparable with this run. Restore the right file, or re-create it with:\n    {FIX}")
    return None


def scheduler_mismatch(baseline: Baseline, profile: Any, model: str, scheduler: str | None) -> str | None:
    """A checkpoint that ships another scheduler class or config than its baseline recorded. Runs build
    their scheduler from the checkpoint's config (``profiling.schedulers.make_scheduler``) as the class the
    settings name (``scheduler``), so a config change moves the numbers while a class change alone would not
    show."""
    stored = baseline.metadata.get("checkpoint_scheduler")
    current = profile.metadata.extra.get("checkpoint_scheduler")
    if stored is None or current is None:
        return None
    stored, current = comparable_scheduler(stored), comparable_scheduler(current)
    class_changed = stored.get("class") != current.get("class")
    if class_changed:
        problem = f"class {stored.get('class')} in the baseline, {current.get('class')} now"
    else:
        a, b = stored.get("config") or {}, current.get("config") or {}
        changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if not changed:
            return None
        problem = "config " + "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed[:6])
    if scheduler in (None, "", "default"):
        effect = (f"Every run uses a copy of the checkpoint's scheduler (settings scheduler {scheduler or 'default'!r}), "
                  "so this change moves the numbers: the other suites may fail on them too.")
    else:
        effect = (f"Every run builds its scheduler as the class the settings name ({scheduler!r}) from the checkpoint's "
                  "scheduler config, so " + (
                      "the class alone does not show in the numbers (config values that changed with it can)."
                      if class_changed else
                      "this change moves the numbers wherever that class reads the changed keys (flow-matching "
                      "schedulers ignore the checkpoint's prediction_type): the other suites may fail on them too."))
    return (f"{model} ships another scheduler than its baseline {baseline.path.name} recorded ({problem}). {effect} "
            f"If the change is intended, re-create the baseline:\n    {FIX}\nIf not, restore the checkpoint's "
            "scheduler (the class and config the baseline records as metadata.checkpoint_scheduler).")


def layout_mismatch(baseline: Baseline, kinds: list[str], layers: list[str], steps: int, profile: Any,
                    model: str) -> str | None:
    """The baseline's layers (in order), step pairs and kinds must be the profile's."""
    fix = f"if the model changed on purpose, re-create it:\n    {FIX}"
    if len(layers) != len(profile.layers) or layers != profile.layers:
        first = next((f"{a} vs {b}" for a, b in zip(layers, profile.layers) if a != b), "count")
        return (f"baseline {baseline.path} has {len(layers)} attention layers, {model} now has "
                f"{len(profile.layers)} (first difference: {first}); {fix}")
    if steps != profile.num_step_pairs:
        return f"baseline {baseline.path} has {steps} step pairs, this run has {profile.num_step_pairs}; {fix}"
    missing = [k for k in kinds if k not in profile.kinds]
    if missing:
        return f"baseline {baseline.path} has kinds {missing} that this run did not capture; {fix}"
    extra = [k for k in profile.kinds if k not in kinds]
    if extra:
        return f"this run captured kinds {extra} that baseline {baseline.path} does not have; {fix}"
    return None
