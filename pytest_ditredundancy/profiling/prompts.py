"""Prompt sets: the project's own default set, named sets shipped with the package, and user files (one prompt
per line, or JSONL).

Named sets (:data:`PROMPT_SETS`, ``--dit-prompts=NAME``):

* ``default`` — the 72 captions written for this package (:func:`default_prompts`);
* ``coco1000`` — the 1000 MS-COCO captions the redundancy study ran (``data/coco_caption1000.txt``, CC BY 4.0,
  attribution in ``data/README.md``), each exactly the string the study passed to its pipelines: the line
  without its newline, leading or trailing spaces kept;
* ``shapes`` — every caption of the procedural shapes data the ``trained-*`` models learnt, in a seeded order
  (:func:`shape_prompts`; the trained models' suites and cache gate run on it).

A subset of a set is always its first ``n`` prompts (:func:`select_prompts`): deterministic, nested (a larger
subset contains every smaller one) and the study's own choice (its statistics use captions 0-9).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from ..io import FileReadError, json_lines, read_text

_FIX = 'save it as UTF-8 text: one prompt per line, or one JSON object with a "prompt" field per line (.jsonl)'


class PromptFileError(ValueError):
    """A prompt file that cannot be used; the message names the file and the problem."""


def default_prompts() -> list[str]:
    """The 72 captions shipped with the package: objects, scenes, people, rendered text, styles."""
    text = files("pytest_ditredundancy").joinpath("data/prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def coco_prompts() -> list[str]:
    """The 1000 MS-COCO captions of the redundancy study (arXiv 2411.13588), in the study's order.

    MS-COCO annotations © COCO Consortium, CC BY 4.0 (https://cocodataset.org/#termsofuse); see the package's
    ``data/README.md``. Each prompt is its line without the newline, as the study read it (``line[:-1]``)."""
    text = files("pytest_ditredundancy").joinpath("data/coco_caption1000.txt").read_text(encoding="utf-8")
    return [line for line in text.split("\n") if line.strip()]


def shape_prompts() -> list[str]:
    """Every caption of the trained models' procedural shapes data, in a seeded order.

    The trained models understand only these words, and the cache gate scores prompt adherence on them. The
    order is a fixed shuffle (seed 0) so that any first ``n`` mixes shapes, colours, sizes and places."""
    import numpy as np

    from ..training.shapes import all_captions

    captions = all_captions()
    return [captions[i] for i in np.random.default_rng(0).permutation(len(captions))]


#: Named prompt sets: name -> (loader, one-line description).
PROMPT_SETS = {
    "default": (default_prompts, "the 72 captions written for this package"),
    "coco1000": (coco_prompts, "the 1000 MS-COCO captions of the redundancy study (CC BY 4.0)"),
    "shapes": (shape_prompts, "the captions of the trained models' procedural shapes data (seeded order)"),
}


def named_prompts(name: str) -> list[str]:
    """The prompts of a named set (:data:`PROMPT_SETS`); an unknown name lists the known ones."""
    if name not in PROMPT_SETS:
        raise PromptFileError(f"no prompt set named {name!r}; named sets: {', '.join(PROMPT_SETS)} "
                              "(or pass a prompt file)")
    return PROMPT_SETS[name][0]()


def resolve_prompts(source: str | Path) -> list[str]:
    """A named set (``coco1000``) or a prompt file. A name wins over a file of the same name in the working
    directory; write ``./coco1000`` for the file."""
    text = str(source)
    if text in PROMPT_SETS:
        return named_prompts(text)
    return load_prompts(Path(text).expanduser())


def load_prompts(path: str | Path) -> list[str]:
    """Read prompts from ``path``: plain text (one prompt per non-empty line) or ``.jsonl``
    (one JSON object per line with a ``prompt`` field)."""
    path = Path(path)
    try:
        text = read_text(path, "prompt file", fix=_FIX, path_fix="pass a text file with one prompt per line")
        if path.suffix.lower() == ".jsonl":
            prompts = _jsonl_prompts(text, path)
        else:
            prompts = [line.strip() for line in text.splitlines() if line.strip()]
    except FileReadError as exc:
        raise PromptFileError(str(exc)) from None
    if not prompts:
        raise PromptFileError(f"prompt file {path} has no prompts; add one prompt per line")
    return prompts


def _jsonl_prompts(text: str, path: Path) -> list[str]:
    prompts = []
    for number, record in json_lines(text, path, "prompt file", fix=_FIX):
        prompt = record.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptFileError(f'{path}:{number} has no non-empty "prompt" string field')
        prompts.append(prompt.strip())
    return prompts


def select_prompts(prompts: list[str], count: int | None, source: str = "the prompt set") -> list[str]:
    """The first ``count`` prompts; asking for more than there are is an error, not a silent cut.

    A prefix is deterministic and nested (the first 8 are among the first 16), keeps the order shards split
    by, and is how the redundancy study chose its subset of ``coco1000`` (its statistics use captions 0-9)."""
    if count is None:
        return list(prompts)
    if count < 1:
        raise ValueError(f"the number of prompts must be at least 1, got {count}")
    if count > len(prompts):
        raise ValueError(f"{count} prompts requested but {source} has only {len(prompts)}; "
                         "lower the number or pass a larger prompt file")
    return list(prompts[:count])
