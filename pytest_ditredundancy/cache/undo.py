"""A context manager that installs reversible changes and undoes every one of them on exit, also on errors."""

from __future__ import annotations

from typing import Any, Callable


class Reversible:
    """Base for hook sets: ``install`` registers undo callables in ``self._undo``; ``remove`` runs them in reverse.

    A failure half-way through ``install`` undoes what was already installed before the error propagates.
    """

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def install(self) -> None:
        raise TypeError(f"{type(self).__name__} must define install()")

    def __enter__(self) -> Any:
        try:
            self.install()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()
