"""Bad inputs get one clear error that names the problem and the fix, before any work, and change nothing on disk.

pytest options: a usage error (exit 4) at start-up. ``python -m pytest_ditredundancy ...`` commands: a one-line
message and exit 2, before the shards are read or a model is trained.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from pytest_ditredundancy.cache.spec import STRATEGIES, CacheSpecError, parse_spec
from pytest_ditredundancy.plugin.options import OPTIONS

TWO_MODELS = "tiny-pixart-alpha,tiny-sd3-medium"
TEST_FILE = "def test_model(dit_model):\n    pass\n"


def usage_error(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """A run that must stop at start-up: exit 4, no traceback."""
    pytester.makepyfile(test_model=TEST_FILE)
    result = pytester.runpytest("--collect-only", "-q", "-p", "no:cacheprovider", *args)
    assert result.ret == 4, result.stdout.str() + result.stderr.str()
    assert "Traceback" not in result.stdout.str() + result.stderr.str()
    return result


def command(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def one_line_error(done: subprocess.CompletedProcess, *expected: str) -> None:
    """Exit 2 and a message on one line that says each of ``expected``; no traceback."""
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and all(text in lines[0] for text in expected), done.stderr


def tree(path: Path) -> dict[str, str]:
    """What lies under ``path``: relative path -> content (folders: '/')."""
    return {str(p.relative_to(path)): "/" if p.is_dir() else p.read_text() for p in sorted(path.rglob("*"))}


# -- comma lists: an empty piece is a usage error naming the option ---------------------------------------------
@pytest.mark.parametrize("value", ["tiny-pixart-alpha,,tiny-sd3-medium", "tiny-pixart-alpha,", ",tiny-pixart-alpha",
                                   "tiny-pixart-alpha, ,tiny-sd3-medium"])
def test_an_empty_piece_of_a_model_list_is_a_usage_error(pytester, value):
    # before: the empty piece was dropped and the run went on with the other models
    result = usage_error(pytester, f"--dit-model={value}")
    result.stderr.fnmatch_lines([f"*--dit-model has an empty item in {value!r}*remove the extra comma*"])


def test_an_empty_piece_of_any_comma_list_is_a_usage_error(pytester):
    usage_error(pytester, "--dit-step-factors=0.5,,2").stderr.fnmatch_lines(["*--dit-step-factors has an empty item*"])
    usage_error(pytester, "--dit-model=tiny-pixart-alpha", "--dit-cache=none,,fbcache").stderr.fnmatch_lines(
        ["*--dit-cache has an empty item*"])
    usage_error(pytester, "--dit-model=tiny-pixart-alpha", "--dit-model=").stderr.fnmatch_lines(
        ["*--dit-model has an empty item*"])


def test_ini_lists_take_spaces_or_commas_but_no_empty_piece(pytester):
    from pytest_ditredundancy.plugin.declared import read_options
    from pytest_ditredundancy.plugin.options import DitConfig

    pytester.makeini("[pytest]\ndit_models = tiny-pixart-alpha, tiny-sd3-medium tiny-dit-xl-2-256 ,tiny-flux-dev\n")
    models = read_options(pytester.parseconfig(), DitConfig)["models"]
    assert models == ("tiny-pixart-alpha", "tiny-sd3-medium", "tiny-dit-xl-2-256", "tiny-flux-dev")
    for value in ("tiny-pixart-alpha,, tiny-sd3-medium", "tiny-pixart-alpha, , tiny-sd3-medium", "tiny-pixart-alpha,"):
        pytester.makeini(f"[pytest]\ndit_models = {value}\n")
        usage_error(pytester).stderr.fnmatch_lines(["*dit_models (ini) has an empty item*"])


def test_the_plan_command_refuses_an_empty_piece(capsys):
    from pytest_ditredundancy.profiling.capture_plan_text import run_plan

    # before: planned flux-dev and sana, exit 0
    assert run_plan("flux-dev,,sana") == 2
    assert "plan: error: --dit-model has an empty item in 'flux-dev,,sana'" in capsys.readouterr().err
    assert run_plan("flux-dev", kinds="a,,a_text") == 2
    assert "plan: error: --kinds has an empty item in 'a,,a_text'" in capsys.readouterr().err
    assert run_plan("flux-dev,") == 2
    assert "empty item" in capsys.readouterr().err


# -- numbers: finite, within documented bounds ------------------------------------------------------------------
def test_steps_have_an_upper_bound_checked_at_start_up(pytester):
    # before: numpy's "Maximum allowed size exceeded" inside every test
    usage_error(pytester, "--dit-model=tiny-pixart-alpha", "--dit-steps=99999999999999999999").stderr.fnmatch_lines(
        ["*--dit-steps must be at most 10000 (more than any sampler uses), got 99999999999999999999*"])
    usage_error(pytester, "--dit-model=tiny-pixart-alpha", "--dit-step-factors=1e30").stderr.fnmatch_lines(
        ["*--dit-step-factors must be positive and at most 100*"])


FLOAT_OPTIONS = [declared.flag for declared in OPTIONS if declared.item_kind is float]


@pytest.mark.parametrize("flag", FLOAT_OPTIONS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_number_option_refuses_a_non_finite_value(pytester, flag, value):
    from pytest_ditredundancy.plugin.declared import read_options
    from pytest_ditredundancy.plugin.options import CacheOptions, DitConfig

    # before: nan and inf passed (--dit-progress-interval=nan, --dit-cv-bounds=nan,nan, --dit-cache-min-psnr=inf)
    text = f"{value},0.5" if flag in ("--dit-cv-bounds", "--dit-step-factors", "--dit-cache-budgets") else value
    config = pytester.parseconfig(f"{flag}={text}")
    config_class = CacheOptions if flag.startswith("--dit-cache") else DitConfig
    with pytest.raises(pytest.UsageError, match=rf"^{flag} expects (a finite number|finite numbers)"):
        read_options(config, config_class)


def test_a_non_finite_number_stops_the_run(pytester):
    usage_error(pytester, "--dit-cv-bounds=nan,nan").stderr.fnmatch_lines(
        ["*--dit-cv-bounds expects finite numbers separated by commas, got 'nan,nan'*"])
    usage_error(pytester, "--dit-progress-interval=nan").stderr.fnmatch_lines(
        ["*--dit-progress-interval expects a finite number, got 'nan'*"])


def test_a_negative_progress_interval_still_means_never(pytester):
    from pytest_ditredundancy.plugin.declared import read_options
    from pytest_ditredundancy.plugin.options import DitConfig

    assert read_options(pytester.parseconfig("--dit-progress-interval=-1"), DitConfig)["progress_interval"] == -1.0


def _number_parameters() -> list[tuple[str, str]]:
    """(strategy, parameter) for every cache parameter that reads a number (0.5 or 1 parses)."""
    found = []
    for strategy in STRATEGIES.values():
        for name, parse in strategy.params.items():
            for sample in ("0.5", "1"):
                try:
                    if isinstance(parse(sample), (int, float)) and not isinstance(parse(sample), bool):
                        found.append((strategy.name, name))
                        break
                except ValueError:
                    pass
    return found


@pytest.mark.parametrize("strategy,name", _number_parameters())
def test_every_number_cache_parameter_refuses_nan_and_inf(strategy, name):
    # before: fbcache:threshold=nan parsed, and 'fbcache:threshold=nan' became a baseline key
    for value in ("nan", "inf", "-inf"):
        with pytest.raises(CacheSpecError, match=rf"bad value for {name}: expected a (finite|whole) number, got '{value}'"):
            parse_spec(f"{strategy}:{name}={value}")


@pytest.mark.parametrize("text", ["pab:spatial_attention_timestep_skip_range=nan..800",
                                  "pab:spatial_attention_timestep_skip_range=100..inf"])
def test_a_cache_range_refuses_non_finite_ends(text):
    with pytest.raises(CacheSpecError, match="finite"):
        parse_spec(text)


def test_a_nan_cache_parameter_stops_the_run(pytester):
    usage_error(pytester, "--dit-model=tiny-pixart-alpha", "--dit-cache=fbcache:threshold=nan").stderr.fnmatch_lines(
        ["*--dit-cache=fbcache:threshold=nan: bad value for threshold: expected a finite number, got 'nan'*"])
    assert math.isclose(parse_spec("fbcache:threshold=0.05").get("threshold"), 0.05)


# -- report paths -----------------------------------------------------------------------------------------------
def test_the_report_and_its_json_cannot_share_a_path(pytester):
    # before: both were written to out.html, the JSON over the HTML
    (pytester.path / "reports").mkdir()
    result = usage_error(pytester, "--dit-report=out.html", "--dit-json=reports/../out.html")
    result.stderr.fnmatch_lines(["*--dit-report and --dit-json both name *out.html: the JSON would overwrite the "
                                 "HTML report; give them different paths*"])
    assert not (pytester.path / "out.html").exists()


# -- --dit-update-baselines: every baseline folder is checked at start-up ---------------------------------------
def updating(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    pytester.makepyfile(test_model=TEST_FILE)
    before = tree(pytester.path)
    result = usage_error(pytester, "--dit-model=tiny-pixart-alpha", "--dit-update-baselines", *args)
    assert tree(pytester.path) == before  # nothing created or changed
    return result


def test_update_baselines_into_a_file_is_a_usage_error(pytester):
    # before: NotADirectoryError in each test, after its model had been profiled
    pytester.path.joinpath("bfile").write_text("not a folder")
    updating(pytester, "--dit-baseline-dir=bfile").stderr.fnmatch_lines(
        ["*--dit-update-baselines cannot write baselines to *bfile/tiny-pixart-alpha: *bfile is a file, not a folder*"
         "--dit-baseline-dir*"])
    (pytester.path / "baselines").mkdir()
    pytester.path.joinpath("baselines", "tiny-pixart-alpha").write_text("not a folder")
    updating(pytester).stderr.fnmatch_lines(
        ["*cannot write baselines to *baselines/tiny-pixart-alpha: *baselines/tiny-pixart-alpha is a file, not a "
         "folder*"])


@contextmanager
def immutable(path: Path):
    """``path`` made unwritable in a way root respects too (``chattr +i``: no file can be created in it)."""
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("chattr +i is not available here (needs CAP_LINUX_IMMUTABLE and an ext2/3/4-like filesystem)")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.mark.parametrize("which", ["model folder", "baseline root"])
def test_update_baselines_into_a_read_only_folder_is_a_usage_error(pytester, which):
    """Real read-only folders: the immutable attribute stops root as well (permission bits would not)."""
    root = pytester.path / "baselines"
    folder = root / "tiny-pixart-alpha"
    folder.mkdir(parents=True) if which == "model folder" else root.mkdir()
    with immutable(folder if which == "model folder" else root):
        updating(pytester).stderr.fnmatch_lines(
            ["*cannot write baselines to *baselines/tiny-pixart-alpha: * is not writable*--dit-baseline-dir*"])


def test_the_writability_check_uses_the_permissions(tmp_path, monkeypatch):
    """Read-only by permission bits, simulated: os.access says no (running as root, the bits would not stop a
    write)."""
    from pytest_ditredundancy.plugin.session import check_baseline_folders

    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != tmp_path and real_access(path, mode))
    with pytest.raises(pytest.UsageError, match=rf"{tmp_path}/m: {tmp_path} is not writable"):
        check_baseline_folders(tmp_path, ["m"])
    assert list(tmp_path.iterdir()) == []


def test_the_writability_check_writes_a_file(tmp_path, monkeypatch):
    """What the permission bits do not say (a read-only mount), the file written and removed finds."""
    import tempfile

    from pytest_ditredundancy.plugin.session import check_baseline_folders

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(pytest.UsageError, match=rf"{tmp_path}/m: {tmp_path} is not writable \(Read-only file system\)"):
        check_baseline_folders(tmp_path, ["m"])
    assert list(tmp_path.iterdir()) == []


def test_the_writability_check_leaves_nothing_behind(tmp_path):
    from pytest_ditredundancy.plugin.session import check_baseline_folders

    (tmp_path / "kept").mkdir()
    check_baseline_folders(tmp_path / "new" / "root", ["a", "b/c"])
    check_baseline_folders(tmp_path, ["kept"])
    assert tree(tmp_path) == {"kept": "/"}


# -- python -m pytest_ditredundancy merge: output paths before the shards ---------------------------------------
def test_merge_checks_its_output_paths_before_reading_the_shards(tmp_path):
    """The shard does not exist: an error about the output shows it was checked first (before: the shards were
    loaded and replayed, then the write failed)."""
    (tmp_path / "out").mkdir()
    (tmp_path / "file").write_text("x")
    merge = ("pytest_ditredundancy", "merge", "missing-shard.json")
    one_line_error(command(*merge, "--json", "out", cwd=tmp_path), "--json out", "is a directory", "file path")
    one_line_error(command(*merge, "--report", "file/x.html", cwd=tmp_path), "--report file/x.html",
                   "file is a file, not a directory")
    one_line_error(command(*merge, "--report", "r.html", "--json", "r.html", cwd=tmp_path),
                   "--report and --json both name", "different paths")
    one_line_error(command(*merge, "--json", "missing-shard.json", cwd=tmp_path), "--json missing-shard.json",
                   "is one of the shards")
    assert tree(tmp_path) == {"file": "x", "out": "/"}


def test_merge_output_check_in_process(tmp_path, monkeypatch, capsys):
    import pytest_ditredundancy.plugin.merge as merge_module
    from pytest_ditredundancy.__main__ import main

    monkeypatch.setattr(merge_module, "merge", lambda *a, **k: pytest.fail("the shards were read"))
    (tmp_path / "p").write_text("x")
    assert main(["merge", str(tmp_path / "s.json"), "--profiles-dir", str(tmp_path / "p")]) == 2
    assert f"--profiles-dir {tmp_path / 'p'}" in capsys.readouterr().err


# -- python -m pytest_ditredundancy.train: --out and --weights before training ----------------------------------
def test_train_checks_out_and_weights_before_training(tmp_path, monkeypatch, capsys):
    import pytest_ditredundancy.train as train_module

    monkeypatch.setattr(train_module, "_train_into", lambda *a, **k: pytest.fail("training started"))
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "other").write_text("x")
    cases = [
        (["vae", "--out", str(tmp_path / "file")], "is a file"),
        (["vae", "--out", str(tmp_path / "file" / "vae")], "is a file, not a folder"),
        (["vae", "--out", str(tmp_path / "full")], "holds no earlier training run"),
        (["trained-pixart", "--weights", str(tmp_path / "missing")], "missing/vae"),
        (["trained-pixart-ft", "--weights", str(tmp_path / "full")], "full/trained-pixart"),
        (["all", "--weights", str(tmp_path / "file")], "is a file"),
    ]
    for argv, expected in cases:
        with pytest.raises(SystemExit) as stopped:
            train_module.main(argv)
        assert stopped.value.code == 2, argv
        err = capsys.readouterr().err
        assert expected in err and "--" in err.splitlines()[-1], (argv, err)
    assert tree(tmp_path) == {"file": "x", "full": "/", "full/other": "x"}


def test_train_errors_are_one_line_without_traceback(tmp_path):
    (tmp_path / "outfile").write_text("x")
    # before: a FileExistsError traceback
    one_line_error(command("pytest_ditredundancy.train", "vae", "--out", "outfile", cwd=tmp_path),
                   "--out outfile: outfile is a file", "new or empty folder")
    # before: a FileNotFoundError traceback, after the data had been prepared
    one_line_error(command("pytest_ditredundancy.train", "trained-pixart", "--out", "new", "--weights", "missing",
                           cwd=tmp_path), "--weights missing", "missing/vae", "train vae")
    assert tree(tmp_path) == {"outfile": "x"}
