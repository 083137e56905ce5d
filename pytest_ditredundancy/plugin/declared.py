"""How an option is declared once and what is generated from the declaration.

:func:`option` makes a field of a typed config (a dataclass) that is also a command-line option with its ini
twin; :func:`declarations` finds them again, :meth:`Option.add` registers them with pytest,
:meth:`Option.read` reads and checks a value, :func:`build` calls the config's constructor after the named
steps that check and derive values, and :func:`reference_markdown` writes the options reference. Imported at
pytest start-up: the standard library and pytest only.
"""

from __future__ import annotations

import math
import re
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar, get_args, get_origin

import pytest

#: kind -> (how a text becomes a value, what the option expects in a usage error: one value, several)
_PARSERS: dict[Any, tuple[Callable[[str], Any], str, str]] = {
    str: (str, "text", "texts"),
    int: (int, "a whole number", "whole numbers"),
    float: (float, "a number", "numbers"),
    Path: (lambda text: Path(text).expanduser(), "a path", "paths"),
}
_KIND_NAMES = {str: "text", int: "integer", float: "number", bool: "flag", Path: "path"}
_METADATA_KEY = "option"
ConfigT = TypeVar("ConfigT")
#: a step of reading a config: the values read so far -> the values it checks, derives or replaces
Step = Callable[[pytest.Config, dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class Option:
    """One setting: a command-line option with its ini twin. ``kind`` is ``str``, ``int``, ``float``, ``bool``,
    ``Path``, or ``list[...]`` of one of those (repeatable, comma lists allowed); ``default`` is the value when
    neither the command line nor the ini file gives one (``None``: unset, the help says what that means);
    ``choices`` are the valid values where they are a fixed set, ``valid`` says them in words where not."""

    flag: str
    ini: str
    kind: Any
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    valid: str = ""

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")

    @property
    def negation(self) -> str | None:
        """The ``--no-`` form of a boolean flag."""
        return f"--no-{self.flag[2:]}" if self.kind is bool else None

    @property
    def repeatable(self) -> bool:
        return get_origin(self.kind) is list

    @property
    def item_kind(self) -> Any:
        return get_args(self.kind)[0] if self.repeatable else self.kind

    @property
    def kind_name(self) -> str:
        name = _KIND_NAMES[self.item_kind]
        return f"list of {name}" if self.repeatable else name

    def register(self, group: pytest.OptionGroup, parser: pytest.Parser) -> None:
        """Add the option (and its ``--no-`` form) to ``group`` and its ini twin to ``parser``. Defaults are
        None on both sides, so :meth:`given` can tell a value the user gave (even the default value) from none;
        :meth:`read` supplies the default."""
        if self.kind is bool:
            group.addoption(self.flag, action="store_true", default=None, dest=self.dest, help=self.help)
            group.addoption(self.negation, action="store_false", default=None, dest=self.dest,
                            help=f"turn {self.flag} off (when the ini file turns it on)")
            parser.addini(self.ini, self.help, type="bool", default=None)
        elif self.repeatable:
            group.addoption(self.flag, action="append", default=None, dest=self.dest, metavar="VALUE", help=self.help)
            parser.addini(self.ini, self.help, type="args", default=None)
        else:
            group.addoption(self.flag, action="store", default=None, dest=self.dest,
                            metavar=self.item_kind.__name__.upper(), help=self.help)
            parser.addini(self.ini, self.help, default=None)

    def on_command_line(self, config: pytest.Config) -> bool:
        return config.getoption(self.dest, None) is not None

    def given(self, config: pytest.Config) -> bool:
        """Whether the run gives this option (on the command line or in the ini file), whatever its value."""
        return self.on_command_line(config) or config.getini(self.ini) is not None

    def read(self, config: pytest.Config) -> Any:
        """The value: the command line's, else the ini file's, else :attr:`default`. A given value that is
        empty, holds an empty list item, does not parse, is not finite (numbers) or is not one of :attr:`choices`
        is a usage error naming the option."""
        value, where = config.getoption(self.dest), self.flag
        if value is None:
            value, where = config.getini(self.ini), f"{self.ini} (ini)"
            if value is None:
                return self.default
        if self.kind is bool:
            return bool(value)
        given = value if isinstance(value, list) else [value]
        if not any(str(text).strip() for text in given):
            raise pytest.UsageError(f"{where} is empty (an unset variable?): give a value, or leave the option out "
                                    f"for its default{_default_text(self.default)}")
        texts = [str(value)]
        if self.repeatable:
            # the command line repeats the option; the ini file separates values by spaces, commas or both
            separator = "," if where == self.flag else "\0"
            texts = _split(separator.join(map(str, given)))
            typed = separator.replace("\0", " ").join(map(str, given))
            if "" in texts:
                raise pytest.UsageError(f"{where} has an empty item in {typed!r} (two commas in a row, a comma at "
                                        "the start or end, or a blank item): remove the extra comma")
        parse, one, several = _PARSERS[self.item_kind]
        try:
            values = [parse(text) for text in texts]
        except (TypeError, ValueError):
            if self.repeatable:
                raise pytest.UsageError(f"{where} expects {several} separated by commas, "
                                        f"got {','.join(texts)!r}") from None
            raise pytest.UsageError(f"{where} expects {one}, got {value!r}") from None
        if self.item_kind is float and not all(map(math.isfinite, values)):  # NaN passes every bound it meets
            wanted = "finite numbers separated by commas" if self.repeatable else "a finite number"
            raise pytest.UsageError(f"{where} expects {wanted}, got {','.join(texts)!r}")
        unknown = [text for text in texts if self.choices and text not in self.choices]
        if unknown:  # e.g. "--dit-dtype=int8 is not a dtype the plugin runs"
            raise pytest.UsageError(f"{self.flag}={unknown[0]} is not a {self.flag[6:].replace('-', ' ')} the "
                                    f"plugin runs; valid values: {', '.join(self.choices)}")
        return tuple(values) if self.repeatable else values[0]

    def as_typed(self, config: pytest.Config) -> dict[str, str | None]:
        """The option as the command line gave it ({flag: value}; a boolean flag: {flag or --no- form: None}),
        for the commands messages suggest; empty when only the ini file (or nothing) gives it."""
        raw = config.getoption(self.dest)
        if raw is None or raw == []:
            return {}
        if self.kind is bool:
            return {self.flag if raw else str(self.negation): None}
        return {self.flag: ",".join(map(str, raw)) if isinstance(raw, list) else str(raw)}


def option(flag: str, *, ini: str, kind: Any, default: Any, help: str, choices: tuple[str, ...] = (),
           valid: str = "", required: bool = False) -> Any:
    """A config field that is an option (see :class:`Option`); the field's default is the option's, unless
    ``required`` (a field whose value a step of reading always derives, so a default would only mislead)."""
    declared = Option(flag=flag, ini=ini, kind=kind, default=default, help=help, choices=choices, valid=valid)
    return field(default=MISSING if required else default, metadata={_METADATA_KEY: declared})


def declarations(config_class: type) -> dict[str, Option]:
    """Field name -> option, for the option fields of a typed config, in declaration order."""
    return {f.name: f.metadata[_METADATA_KEY] for f in fields(config_class) if _METADATA_KEY in f.metadata}


def read_options(config: pytest.Config, config_class: type) -> dict[str, Any]:
    """Field name -> value, for every option field of ``config_class`` (see :meth:`Option.read`)."""
    return {name: declared.read(config) for name, declared in declarations(config_class).items()}


def build(config: pytest.Config, config_class: type[ConfigT], steps: Sequence[Step]) -> ConfigT:
    """``config_class`` from the options as read, each step checking, deriving or replacing some values."""
    values = read_options(config, config_class)
    for step in steps:
        values.update(step(config, values))
    return config_class(**values)


def _split(text: str) -> list[str]:
    """The items of a list option, stripped; an empty item stays (as ``""``) for the caller to refuse. Commas
    separate items; ``\\0`` separates the ini file's words, with or without a comma (``a, b`` is two items)."""
    return [part.strip() for part in re.split(r"\0*,\0*|\0+", text)]


def _default_text(default: Any) -> str:
    if default is None or default == "" or default == ():
        return ""
    return f" ({_value_text(default)})"


def _value_text(value: Any) -> str:
    """A value as a user would give it (``0.5,2.0``, ``false``)."""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value).lower() if isinstance(value, bool) else str(value)


# -- the options reference ------------------------------------------------------------------------------------
MARKDOWN_INTRO = """\
# Options

<!-- Generated from the option declarations in pytest_ditredundancy/plugin/options.py; do not edit by hand.
     Regenerate: python -m pytest_ditredundancy options --markdown > docs/options.md -->

Every option of the `ditredundancy` group (`pytest --help`) has an ini twin (`[pytest]` or
`[tool.pytest.ini_options]`); the command line wins over the ini file. A boolean flag also has a `--no-` form
that turns an ini `true` off. A list option can be repeated and takes comma lists (in the ini file: values
separated by spaces or commas). A value given is a value used, or a usage error (exit 4) that names the option:
an empty value (an unset variable) never means the default, an empty item of a list (`a,,b`, a comma at either
end) is never dropped, and a number is finite (`nan`, `inf` are refused). Giving any option or ini key turns the
plugin on.
"""


def reference_table(options: Sequence[Option]) -> list[list[str]]:
    """One row per option: option (and its ``--no-`` form), ini key, type, default, valid values, help."""
    rows = [["option", "ini key", "type", "default", "valid values", "help"]]
    for declared in options:
        names = " / ".join(f"`{name}`" for name in (declared.flag, declared.negation) if name)
        default = "" if declared.default in (None, "", ()) else f"`{_value_text(declared.default)}`"
        valid = ", ".join(f"`{choice}`" for choice in declared.choices) or declared.valid
        rows.append([names, f"`{declared.ini}`", declared.kind_name, default, valid, declared.help])
    return rows


def reference_markdown(options: Sequence[Option]) -> str:
    """The options reference as markdown (the text of ``docs/options.md``)."""
    rows = [[cell.replace("|", "\\|") for cell in row] for row in reference_table(options)]
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "---|" * len(rows[0]))
    return MARKDOWN_INTRO + "\n" + "\n".join(lines) + "\n"
