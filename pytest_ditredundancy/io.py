"""Safe file writes (nothing on disk is ever left half-written) and JSON reads whose every failure is one
message naming the file, the problem and the fix; and :func:`lazy_exports`, the packages' public names imported
on first use."""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path
from importlib import import_module
from typing import Any, Callable, Iterator

_TEMPORARY = re.compile(r"\.(?P<name>.+)\.[0-9a-f]{8}\.tmp")


def temporary_name(path: Path) -> Path:
    """Where :func:`atomic_write_text` writes ``path`` first: ``.<name>.<random>.tmp`` beside it."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


def stale_temporaries(path: Path) -> list[Path]:
    """Temporary files of ``path`` left by writers that died before their ``os.replace``."""
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


def temporary_target(temporary: Path) -> Path | None:
    """The file a :func:`temporary_name` file was written for (None for any other name): which lock guards it."""
    match = _TEMPORARY.fullmatch(temporary.name)
    return temporary.with_name(match["name"]) if match else None


def write_target(path: Path) -> Path:
    """The file a write of ``path`` replaces: a symbolic link's target (the link stays a link), else ``path``."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same directory and ``os.replace``.

    Readers see either the old file or the new one, never a partial write, and a failure leaves the old
    file untouched. The file keeps the mode of the file it replaces, and a new file gets the usual mode
    (0666 less the umask, like any file the user creates), not a temporary file's private 0600. A symbolic
    link is written through, like ``open(path, "w")`` does: its target is replaced and the link stays.
    """
    given, path = Path(path), write_target(path)
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
    return given


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


class FileReadError(ValueError):
    """A file that cannot be read as asked. ``problem`` tags the kind (``missing``, ``directory``,
    ``unreadable``, ``not-text``, ``invalid-json``, ``wrong-type``) for callers that map it to their own error."""

    def __init__(self, message: str, path: Path | str, problem: str) -> None:
        super().__init__(message)
        self.path, self.problem = path, problem


def read_text(path: str | Path, what: str = "file", *, fix: str = "re-create it",
              path_fix: str = "check the path") -> str:
    """The file's UTF-8 text (a leading byte-order mark dropped); :class:`FileReadError` for every way that fails.

    ``what`` names the file in messages (``baseline``), ``fix`` says what to do about damaged content and
    ``path_fix`` what to do about a path that is missing or a directory.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileReadError(f"no {what} at {path}: the file does not exist; {path_fix}", path, "missing") from None
    except IsADirectoryError:
        raise FileReadError(f"{what} {path} is a directory, not a file; {path_fix}", path, "directory") from None
    except OSError as exc:
        raise FileReadError(f"{what} {path} cannot be read ({exc.strerror or exc}); check its permissions", path,
                            "unreadable") from None
    nul = data.find(b"\0")
    if nul >= 0:
        raise FileReadError(f"{what} {path} is binary, not UTF-8 text (a NUL byte at offset {nul}); {fix}", path,
                            "not-text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise FileReadError(f"{what} {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}: "
                            f"a binary file, or text in another encoding); {fix}", path, "not-text") from None


def parse_json(text: str, source: str | Path, what: str = "file", *, fix: str = "re-create it",
               expect: type | None = dict) -> Any:
    """``text`` (the content of ``source``) parsed; :class:`FileReadError` for invalid JSON or a top-level value
    that is not an ``expect`` (None: any). NaN and Infinity pass, for callers that name where they stand."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        ends = "; it is empty" if not text.strip() else "; it ends before the JSON does" \
            if exc.pos >= len(text.rstrip()) else ""
        raise FileReadError(f"{what} {source} is corrupt or truncated: not valid JSON ({exc.msg} at line "
                            f"{exc.lineno}, column {exc.colno}{ends}); {fix}", source, "invalid-json") from None
    _expect(data, expect, f"{what} {source}", fix, source)
    return data


def read_json(path: str | Path, what: str = "file", *, fix: str = "re-create it", path_fix: str = "check the path",
              expect: type | None = dict) -> Any:
    """The parsed JSON file: :func:`read_text`, then :func:`parse_json`, with their messages."""
    return parse_json(read_text(path, what, fix=fix, path_fix=path_fix), Path(path), what, fix=fix, expect=expect)


def json_lines(text: str, source: str | Path, what: str = "file", *, fix: str = "re-create it",
               expect: type | None = dict) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` of each non-blank line of JSON Lines text; errors name ``source:line``."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FileReadError(f"{what} {source}:{number} is not valid JSON ({exc.msg} at column {exc.colno}); {fix}",
                                source, "invalid-json") from None
        _expect(value, expect, f"{what} {source}:{number}", fix, source)
        yield number, value


_JSON_KINDS = ((bool, "true or false"), (dict, "an object"), (list, "an array"), (str, "a string"),
               ((int, float), "a number"), (type(None), "null"))


def _expect(value: Any, expect: type | None, where: str, fix: str, source: str | Path) -> None:
    if expect is None or isinstance(value, expect):
        return
    found = next(name for kind, name in _JSON_KINDS if isinstance(value, kind))
    wanted = next((name for kind, name in _JSON_KINDS if kind is expect), expect.__name__)
    raise FileReadError(f"{where} holds {found} where {wanted} is expected; {fix}", source, "wrong-type")


def lazy_exports(package: str, namespace: dict[str, Any], exports: dict[str, str]) -> tuple[Callable, Callable]:
    """A package's module ``__getattr__`` and ``__dir__`` (PEP 562) for ``exports`` (public name -> the module,
    relative to ``package``, that defines it): each name is imported on first use and then kept in
    ``namespace``, so importing the package costs nothing it does not use (the plugin's entry point and its
    option parsing must not pay for torch)."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(f".{module}", package), name)
        namespace[name] = value  # looked up once
        return value

    def __dir__() -> list[str]:
        return sorted([*namespace, *exports])

    return __getattr__, __dir__
