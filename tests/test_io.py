"""The JSON reader: each way a file can fail gives one message naming the file, the problem and the fix, and
every reader of the package (baselines, profiles, schedules, shard files, prompt files) says it the same way."""

from __future__ import annotations

import os

import pytest

from pytest_ditredundancy.cache.schedule import CacheSchedule, ScheduleError
from pytest_ditredundancy.capture.profile import ProfileFormatError, RedundancyProfile
from pytest_ditredundancy.io import FileReadError, json_lines, parse_json, read_json, read_text
from pytest_ditredundancy.judging.baselines import BaselineError, read_baseline_file
from pytest_ditredundancy.plugin.merge import MergeError, load_shards
from pytest_ditredundancy.profiling.prompts import PromptFileError, load_prompts

BINARY = bytes(range(256)) * 4  # every byte value: NUL bytes and invalid UTF-8


def read(tmp_path, content: bytes | str | None, **kwargs):
    path = tmp_path / "doc.json"
    if content is not None:
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(FileReadError) as info:
        read_json(path, "baseline", fix="re-create it", **kwargs)
    message = str(info.value)
    assert str(path) in message and "Traceback" not in message
    return info.value.problem, message


@pytest.mark.parametrize("content,problem,words", [
    (None, "missing", ["no baseline at", "does not exist", "check the path"]),
    (BINARY, "not-text", ["binary, not UTF-8 text", "NUL byte at offset 0", "re-create it"]),
    ("caf\xe9".encode("latin-1"), "not-text", ["not UTF-8 text", "byte 0xe9 at offset 3", "re-create it"]),
    ('{"a": 1,\n "b": [1, 2', "invalid-json", ["is corrupt or truncated", "not valid JSON", "line 2, column",
                                              "ends before the JSON does", "re-create it"]),
    ('{"a": 1,\n "b" 2}', "invalid-json", ["not valid JSON (Expecting ':' delimiter at line 2, column 6)"]),
    ("", "invalid-json", ["not valid JSON", "it is empty"]),
    ("[1, 2]", "wrong-type", ["holds an array where an object is expected", "re-create it"]),
    ('"text"', "wrong-type", ["holds a string where an object is expected"]),
])
def test_each_failure_names_the_file_the_problem_and_the_fix(tmp_path, content, problem, words):
    found, message = read(tmp_path, content)
    assert found == problem
    for word in words:
        assert word in message


def test_a_directory_and_an_unreadable_file(tmp_path, monkeypatch):
    with pytest.raises(FileReadError, match="is a directory, not a file; pass the file") as info:
        read_json(tmp_path, "profile", path_fix="pass the file")
    assert info.value.problem == "directory"
    path = tmp_path / "locked.json"
    path.write_text("{}")

    def denied(self):  # what a file without read permission gives (root would read it anyway)
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(path), "read_bytes", denied)
    with pytest.raises(FileReadError, match=r"baseline .*locked.json cannot be read \(Permission denied\); "
                                            "check its permissions") as info:
        read_json(path, "baseline")
    assert info.value.problem == "unreadable"


def test_valid_files_read_back(tmp_path):
    path = tmp_path / "ok.json"
    path.write_bytes(b'\xef\xbb\xbf{"a": [1, NaN]}')  # a byte-order mark is dropped; NaN is left to the caller
    data = read_json(path)
    assert data["a"][0] == 1 and data["a"][1] != data["a"][1]
    assert read_text(path) == '{"a": [1, NaN]}'
    listed = tmp_path / "list.json"
    listed.write_text("[1]")
    assert read_json(listed, expect=list) == read_json(listed, expect=None) == [1]
    assert parse_json('{"b": 2}', "<string>") == {"b": 2}


def test_json_lines_name_the_line():
    assert list(json_lines('{"a": 1}\n\n{"a": 2}\n', "p.jsonl")) == [(1, {"a": 1}), (3, {"a": 2})]
    with pytest.raises(FileReadError, match=r"prompt file p.jsonl:2 is not valid JSON \(.* at column 2\)"):
        list(json_lines('{"a": 1}\n{oops}\n', "p.jsonl", "prompt file"))
    with pytest.raises(FileReadError, match="p.jsonl:1 holds a number where an object is expected"):
        list(json_lines("3\n", "p.jsonl"))


def write_shard(tmp_path, content: bytes) -> str:
    path = tmp_path / "shard-1.json"
    path.write_bytes(content)
    return str(path)


def test_a_binary_or_truncated_shard_file_is_a_merge_error_not_a_traceback(tmp_path):
    path = write_shard(tmp_path, os.urandom(64) + b"\0" + os.urandom(64))
    with pytest.raises(MergeError, match=f"shard file {path} is binary, not UTF-8 text"):
        load_shards([path])
    path = write_shard(tmp_path, b'{"schema": "pytest-ditredundancy/report", "shard": {"index": 1')
    with pytest.raises(MergeError, match="truncated: not valid JSON .*ends before the JSON does.*interrupted"):
        load_shards([path])
    with pytest.raises(MergeError, match="no shard file at .*missing.json: the file does not exist"):
        load_shards([str(tmp_path / "missing.json")])
    path = write_shard(tmp_path, b"[]")
    with pytest.raises(MergeError, match="holds an array where an object is expected"):
        load_shards([path])


def test_the_merge_command_reports_a_binary_shard_in_one_line(tmp_path, capsys):
    from pytest_ditredundancy.__main__ import main

    path = write_shard(tmp_path, BINARY)
    assert main(["merge", path, "--json", str(tmp_path / "merged.json")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"merge: error: shard file {path} is binary") and error.count("\n") == 1


@pytest.mark.parametrize("content", [BINARY, b'{"schema": "pytest-ditredundancy/profile", "shape": {'])
def test_every_reader_says_it_the_same_way_with_its_own_error(tmp_path, content):
    path = tmp_path / "damaged.json"
    path.write_bytes(content)
    expected = str(pytest.raises(FileReadError, read_json, path, "x").value).split(f"x {path} ", 1)[1].split(";")[0]
    readers = [(BaselineError, read_baseline_file), (ProfileFormatError, RedundancyProfile.load),
               (ScheduleError, CacheSchedule.load), (MergeError, lambda p: load_shards([p]))]
    for error, reader in readers:
        with pytest.raises(error) as info:
            reader(path)
        assert f"{path} {expected}" in str(info.value)
    jsonl = tmp_path / "damaged.jsonl"
    jsonl.write_bytes(content)
    with pytest.raises(PromptFileError, match="not UTF-8|not valid JSON"):
        load_prompts(jsonl)


def test_a_missing_profile_stays_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no profile at .*: the file does not exist; create one with "
                                                r"profile_model\(...\).save"):
        RedundancyProfile.load(tmp_path / "none.json")
