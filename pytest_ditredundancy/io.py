"""Safe file writes: nothing on disk is ever left half-written."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any, Callable


def temporary_name(path: Path) -> Path:
    """Where :func:`atomic_write_text` writes ``path`` first: ``.<name>.<random>.tmp`` beside it."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


def stale_temporaries(path: Path) -> list[Path]:
    """Temporary files of ``path`` left by writers that died before their ``os.replace``."""
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same directory and ``os.replace``.

    Readers see either the old file or the new one, never a partial write, and a failure leaves the old
    file untouched. The file keeps the mode of the file it replaces, and a new file gets the usual mode
    (0666 less the umask, like any file the user creates), not a temporary file's private 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        except FileNotFoundError:
            pass
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
