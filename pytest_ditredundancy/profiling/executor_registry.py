"""The executors by name: ``--dit-executor=NAME`` (ini ``dit_executor``) looks them up here.

Registering an executor imports its module only; an executor that needs an optional package (Ray) imports it
when it is constructed, so choosing ``local`` never imports Ray.
"""

from __future__ import annotations

from types import MappingProxyType

from .executors import Executor, ExecutorError, LocalExecutor
from .ray_executor import RayExecutor

_EXECUTORS: dict[str, type[Executor]] = {}
#: name -> executor class, read-only and live
EXECUTORS = MappingProxyType(_EXECUTORS)


def register_executor(executor: type[Executor]) -> type[Executor]:
    """Make ``executor`` available by its name (``--dit-executor=NAME``)."""
    if not executor.name or not executor.name.replace("-", "").isalnum():
        raise ValueError(f"an executor name must be a plain word, got {executor.name!r}")
    _EXECUTORS[executor.name] = executor
    return executor


def get_executor(name: str) -> type[Executor]:
    """The executor class of ``name``; an unknown name lists the known ones."""
    if name not in _EXECUTORS:
        known = ", ".join(f"{key!r} ({cls.summary})" for key, cls in _EXECUTORS.items())
        raise ExecutorError(f"unknown executor {name!r}; choose {known}")
    return _EXECUTORS[name]


register_executor(LocalExecutor)
register_executor(RayExecutor)


__all__ = ["EXECUTORS", "get_executor", "register_executor"]
