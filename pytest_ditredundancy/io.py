"""Safe file writes: nothing on disk is ever left half-written."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same directory and ``os.replace``.

    Readers see either the old file or the new one, never a partial write, and a failure leaves the old
    file untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def plain(value: Any, leaf: Callable[[Any], Any] = lambda v: v) -> Any:
    """``value`` as plain JSON builtins, ``leaf`` applied to every scalar (e.g. how to write NaN, or rounding).

    Dicts get string keys; lists, tuples and sets become lists; numpy values and tensors go through
    ``tolist()``; paths and other objects become strings (str subclasses too: execnet refuses them).
    """
    if isinstance(value, dict):
        return {str(k): plain(v, leaf) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v, leaf) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return plain(value.tolist(), leaf)
    if value is None or isinstance(value, bool):
        return leaf(value)
    if isinstance(value, int):
        return leaf(int(value))
    if isinstance(value, float):
        return leaf(float(value))
    return str(value)
