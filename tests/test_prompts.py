from __future__ import annotations

import pytest

from pytest_ditredundancy import PromptFileError, default_prompts, load_prompts
from pytest_ditredundancy.prompts import select_prompts


def test_default_prompt_set_is_large_varied_and_unique():
    prompts = default_prompts()
    assert len(prompts) >= 64
    assert len(set(prompts)) == len(prompts)
    assert any('"' in p for p in prompts)  # rendered text
    assert any("style" in p or "painting" in p for p in prompts)


def test_text_and_jsonl_files(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("a cat\n\n  a dog  \n", encoding="utf-8")
    assert load_prompts(text) == ["a cat", "a dog"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a cat", "id": 1}\n{"prompt": "a dog"}\n', encoding="utf-8")
    assert load_prompts(jsonl) == ["a cat", "a dog"]


@pytest.mark.parametrize("name,content,message", [
    ("empty.txt", b"\n  \n", "has no prompts"),
    ("latin1.txt", "caf\xe9".encode("latin-1"), "not UTF-8"),
    ("bad.jsonl", b'{"prompt": "ok"}\n{not json}\n', "bad.jsonl:2 is not valid JSON"),
    ("nofield.jsonl", b'{"text": "a cat"}\n', 'no non-empty "prompt"'),
])
def test_bad_files_name_the_problem(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(PromptFileError, match=message):
        load_prompts(path)


def test_missing_file_and_oversized_selection(tmp_path):
    with pytest.raises(PromptFileError, match="does not exist"):
        load_prompts(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="has only 2"):
        select_prompts(["a", "b"], 3, "p.txt")
