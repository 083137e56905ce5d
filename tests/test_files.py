"""Files the plugin writes: baselines keep the usual mode, leave no lock or temporary file behind (and those
are git-ignored), parallel writers still merge; a report that cannot be written fails the run."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from pytest_ditredundancy.judging.baselines import BaselineStore
from pytest_ditredundancy.io import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
KEY = "steps6-dpm-solver-seed0-p3-32x32-g4.5"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_files_get_the_usual_mode_and_keep_a_chosen_one(tmp_path):
    path = atomic_write_text(tmp_path / "new.json", "{}\n")
    assert _mode(path) == 0o666 & ~_umask()  # not the 0600 of a temporary file
    path.chmod(0o640)
    atomic_write_text(path, "[]\n")
    assert _mode(path) == 0o640 and path.read_text() == "[]\n"


def test_a_baseline_update_keeps_the_mode_and_leaves_no_lock_or_temporary_file(tmp_path):
    store = BaselineStore(tmp_path / "baselines")
    path = store.update("tiny-x", KEY, metadata={}, sections={"suites.a": {"bounds": [0, 1]}})
    assert _mode(path) == 0o666 & ~_umask()
    # what a writer killed mid-write leaves: a lock file and a temporary file
    (path.parent / f".{path.name}.lock").write_text("")
    (path.parent / f".{path.name}.1a2b3c4d.tmp").write_text('{"half": ')
    store.update("tiny-x", KEY, metadata={}, sections={"suites.b": {"bounds": [0, 2]}})
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    assert set(json.loads(path.read_text())["suites"]) == {"a", "b"}


def _write_sections(root: str, worker: int, count: int) -> None:
    store = BaselineStore(Path(root))
    for i in range(count):
        store.update("tiny-x", KEY, metadata={}, sections={f"suites.w{worker}-{i}": {"value": i}})


def test_parallel_writers_merge_their_sections_although_the_lock_file_is_removed(tmp_path):
    workers, count = 4, 5
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_write_sections, args=(str(tmp_path), w, count)) for w in range(workers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
        assert process.exitcode == 0
    path = tmp_path / "tiny-x" / f"{KEY}.json"
    assert len(json.loads(path.read_text())["suites"]) == workers * count  # no update lost
    assert [p.name for p in path.parent.iterdir()] == [path.name]


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_lock_and_temporary_files_are_ignored_by_git():
    for name in ("baselines/tiny-x/.steps20-a.json.lock", "baselines/tiny-x/.steps20-a.json.1a2b3c4d.tmp"):
        result = subprocess.run(["git", "check-ignore", "-q", name], cwd=ROOT)
        assert result.returncode == 0, f"{name} is not ignored"
    tracked = subprocess.run(["git", "ls-files", "baselines"], cwd=ROOT, capture_output=True, text=True).stdout
    assert not [line for line in tracked.splitlines() if line.endswith((".lock", ".tmp"))]


def test_an_unwritable_report_location_fails_the_run(pytester):
    pytester.makepyfile(test_ok="def test_ok():\n    pass\n")
    pytester.path.joinpath("afile").write_text("not a directory")
    result = pytester.runpytest("--dit-report=afile/index.html", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR  # found before anything runs
    assert "--dit-report=" in result.stderr.str() and "afile is a file, not a directory" in result.stderr.str()

    # the location goes bad during the run: the tests passed, the report is missing, the run fails
    pytester.makepyfile(test_ok="from pathlib import Path\n\ndef test_ok():\n    Path('out').write_text('x')\n")
    result = pytester.runpytest("--dit-json=out/report.json", "-p", "no:cacheprovider", "-W",
                                "ignore::UserWarning")
    result.assert_outcomes(passed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*report not written: *"])
