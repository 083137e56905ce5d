"""Baseline files after a writer was killed (its lock and temporary file are removed by the next write into the
directory, unless a live writer holds them) and through a symbolic link (the target is updated, the link stays)."""

from __future__ import annotations

import fcntl
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pytest_ditredundancy.judging.baselines import BaselineError, BaselineStore

KEY, OTHER = "steps6-dpm-solver-seed0-p3-32x32-g4.5", "steps12-dpm-solver-seed0-p3-32x32-g4.5"
MODEL = "tiny-x"

KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from pytest_ditredundancy.io import temporary_name
from pytest_ditredundancy.judging.baselines import _locked

path = Path(sys.argv[1])
with _locked(path):
    temporary_name(path).write_text('{"half": ')
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _kill_a_writer_of(path: Path) -> None:
    """What ``kill -9`` of a process during an update leaves: its lock file and a half-written temporary."""
    path.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_WRITER), str(path)])
    assert result.returncode == -9
    assert any(name.endswith(".lock") for name in _names(path.parent))
    assert any(name.endswith(".tmp") for name in _names(path.parent))


def test_a_killed_writers_lock_and_temporary_file_go_with_the_next_write_into_the_directory(tmp_path):
    store = BaselineStore(tmp_path)
    killed = store.path_for(MODEL, OTHER)
    _kill_a_writer_of(killed)
    path = store.update(MODEL, KEY, metadata={}, sections={"suites.a": {"value": 1}})
    assert _names(path.parent) == [path.name]  # the other file's leftovers are gone too
    assert json.loads(path.read_text())["suites"] == {"a": {"value": 1}}


def test_a_lock_a_live_writer_holds_and_its_temporary_file_are_kept(tmp_path):
    store = BaselineStore(tmp_path)
    busy = store.path_for(MODEL, OTHER)
    busy.parent.mkdir(parents=True)
    lock = busy.with_name(f".{busy.name}.lock")
    temporary = busy.with_name(f".{busy.name}.1a2b3c4d.tmp")
    with open(lock, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # a live writer, mid-write
        temporary.write_text('{"half": ')
        path = store.update(MODEL, KEY, metadata={}, sections={"suites.a": {"value": 1}})
        assert lock.exists() and temporary.exists()
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    store.update(MODEL, KEY, metadata={}, sections={"suites.b": {"value": 2}})
    assert _names(path.parent) == [path.name]


def test_an_update_through_a_symlink_writes_the_target_and_keeps_the_link(tmp_path):
    store = BaselineStore(tmp_path / "baselines")
    target = BaselineStore(tmp_path / "shared").update(MODEL, KEY, metadata={}, sections={"suites.a": {"value": 1}})
    link = store.path_for(MODEL, KEY)
    link.parent.mkdir(parents=True)
    link.symlink_to(target)
    store.update(MODEL, KEY, metadata={}, sections={"suites.b": {"value": 2}})
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert set(json.loads(target.read_text())["suites"]) == {"a", "b"}
    assert _names(link.parent) == [link.name] and _names(target.parent) == [target.name]  # no lock or temporary


def test_an_update_through_a_dangling_symlink_is_refused_naming_link_and_target(tmp_path):
    store = BaselineStore(tmp_path)
    link = store.path_for(MODEL, KEY)
    link.parent.mkdir(parents=True)
    gone = tmp_path / "gone.json"
    link.symlink_to(gone)
    with pytest.raises(BaselineError) as info:
        store.update(MODEL, KEY, metadata={}, sections={"suites.a": {"value": 1}})
    assert str(link) in str(info.value) and str(gone) in str(info.value) and "does not exist" in str(info.value)
    assert link.is_symlink() and not gone.exists()
