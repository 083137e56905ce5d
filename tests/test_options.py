"""Options are declared once (plugin/options.py, with plugin/declared.py): the option group, the ini twins, the ``--no-`` forms, the typed
configs and the options reference docs/options.md all come from the declarations."""

from __future__ import annotations

import difflib
import re
from dataclasses import fields
from pathlib import Path

import pytest

from pytest_ditredundancy.plugin.declared import declarations, read_options
from pytest_ditredundancy.plugin.options import OPTIONS, TOLERANCES, CacheOptions, DitConfig, options_markdown

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "options.md"
REGENERATE = "python -m pytest_ditredundancy options --markdown > docs/options.md"


def test_the_options_reference_is_generated_from_the_declarations():
    expected = options_markdown()
    actual = REFERENCE.read_text(encoding="utf-8") if REFERENCE.is_file() else ""
    diff = "".join(difflib.unified_diff(actual.splitlines(keepends=True), expected.splitlines(keepends=True),
                                        "docs/options.md", "the declarations", n=0))
    assert actual == expected, f"docs/options.md differs from the option declarations; run {REGENERATE}\n{diff}"


def test_the_options_command_prints_the_reference(capsys):
    from pytest_ditredundancy.__main__ import main

    assert main(["options", "--markdown"]) == 0
    assert capsys.readouterr().out == options_markdown()
    assert main(["options"]) == 0
    assert "--dit-cache-min-psnr (ini dit_cache_min_psnr; number)" in capsys.readouterr().out


def test_every_option_is_declared_once_with_its_ini_twin():
    for attribute in ("flag", "ini", "dest"):
        names = [getattr(declared, attribute) for declared in OPTIONS]
        assert len(names) == len(set(names)), attribute
    assert all(d.flag.startswith("--dit-") and d.ini.startswith("dit_") and d.help for d in OPTIONS)
    # every option is a field of a typed config, so the constructor call is generated from the declarations
    assert len(OPTIONS) == len(declarations(DitConfig)) + len(declarations(CacheOptions))
    assert set(declarations(DitConfig)) < {f.name for f in fields(DitConfig)}


def test_fixed_sets_of_valid_values_match_what_the_plugin_runs():
    from pytest_ditredundancy.judging.tolerances import LEVELS

    assert TOLERANCES == LEVELS
    for declared in OPTIONS:
        if declared.choices:
            assert declared.default in declared.choices, declared.flag


def test_help_lists_every_option_its_ini_key_and_the_no_forms(pytester):
    text = pytester.runpytest("--help").stdout.str()
    for declared in OPTIONS:
        assert declared.flag in text and declared.ini in text, declared.flag
        if declared.kind is bool:
            assert f"--no-{declared.flag[2:]}" in text
    assert not re.search(r"--no-dit-(seed|cache)(?![-\w])", text)  # only booleans have --no- forms


def test_without_options_every_field_takes_its_declared_default(pytester):
    config = pytester.parseconfig()
    for config_class in (DitConfig, CacheOptions):
        values = read_options(config, config_class)
        assert values == {name: declared.default for name, declared in declarations(config_class).items()}


@pytest.mark.parametrize("args,message", [
    (["--dit-tolerance=loose"], "--dit-tolerance=loose is not a tolerance the plugin runs; valid values: default, "
                                "strict"),
    (["--dit-seed=two"], "--dit-seed expects a whole number, got 'two'"),
    (["--dit-cache-budgets=0.1,x"], "--dit-cache-budgets expects numbers separated by commas, got '0.1,x'"),
    (["--dit-report="], "--dit-report is empty (an unset variable?)"),
    (["--dit-step-factors="], "--dit-step-factors is empty (an unset variable?): give a value, or leave the option "
                              "out for its default (0.5,2.0)"),
])
def test_a_value_given_is_used_or_a_usage_error(pytester, args, message):
    from pytest_ditredundancy.plugin.cache_options import read_cache_options
    from pytest_ditredundancy.plugin.option_steps import read_config

    config = pytester.parseconfig(*args)
    with pytest.raises(pytest.UsageError, match=re.escape(message)):
        read_cache_options(config) if "cache" in args[0] else read_config(config)
