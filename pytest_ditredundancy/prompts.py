"""Prompt sets: the project's own default set, and user files (one prompt per line, or JSONL)."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path


class PromptFileError(ValueError):
    """A prompt file that cannot be used; the message names the file and the problem."""


def default_prompts() -> list[str]:
    """The 72 captions shipped with the package: objects, scenes, people, rendered text, styles."""
    text = files("pytest_ditredundancy").joinpath("data/prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_prompts(path: str | Path) -> list[str]:
    """Read prompts from ``path``: plain text (one prompt per non-empty line) or ``.jsonl``
    (one JSON object per line with a ``prompt`` field)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PromptFileError(f"prompt file {path} does not exist; pass a text file with one prompt per line") from None
    except IsADirectoryError:
        raise PromptFileError(f"prompt file {path} is a directory; pass a text or .jsonl file") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PromptFileError(f"prompt file {path} is not UTF-8 (bad byte at offset {exc.start}); "
                              "re-save it as UTF-8") from None
    if path.suffix.lower() == ".jsonl":
        prompts = _jsonl_prompts(text, path)
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise PromptFileError(f"prompt file {path} has no prompts; add one prompt per line")
    return prompts


def _jsonl_prompts(text: str, path: Path) -> list[str]:
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptFileError(f"{path}:{number} is not valid JSON ({exc.msg})") from None
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptFileError(f'{path}:{number} has no non-empty "prompt" string field')
        prompts.append(prompt.strip())
    return prompts


def select_prompts(prompts: list[str], count: int | None, source: str = "the prompt set") -> list[str]:
    """The first ``count`` prompts; asking for more than there are is an error, not a silent cut."""
    if count is None:
        return list(prompts)
    if count < 1:
        raise ValueError(f"the number of prompts must be at least 1, got {count}")
    if count > len(prompts):
        raise ValueError(f"{count} prompts requested but {source} has only {len(prompts)}; "
                         "lower the number or pass a larger prompt file")
    return list(prompts[:count])
