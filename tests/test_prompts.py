from __future__ import annotations

import pytest

from pytest_ditredundancy import PromptFileError, default_prompts, load_prompts
from pytest_ditredundancy.profiling.prompts import select_prompts


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


def test_coco1000_is_the_study_caption_set_verbatim():
    import hashlib
    from importlib.resources import files

    from pytest_ditredundancy import PROMPT_SETS, coco_prompts, named_prompts

    raw = files("pytest_ditredundancy").joinpath("data/coco_caption1000.txt").read_bytes()
    # byte for byte the study's caption1000.txt
    assert hashlib.sha256(raw).hexdigest() == "72c6f232c3447699e66c5fc0cfd554eb26d5e2125053b4a5b32d9abb9027fb0d"
    prompts = coco_prompts()
    assert len(prompts) == 1000 == len(set(prompts)) and named_prompts("coco1000") == prompts
    assert prompts[0] == "A man with a red helmet on a small moped on a dirt road. "  # the study's line[:-1]
    assert prompts[-1] == "A pink pitcher filled with long stemmed flowers."
    assert prompts == raw.decode("utf-8").split("\n")[:-1]
    assert set(PROMPT_SETS) == {"default", "coco1000", "shapes"} and named_prompts("default") == default_prompts()
    with pytest.raises(PromptFileError, match="named sets: default, coco1000"):
        named_prompts("coco2017")


def test_a_subset_is_a_deterministic_nested_prefix():
    from pytest_ditredundancy import coco_prompts

    prompts = coco_prompts()
    assert select_prompts(prompts, 10) == prompts[:10] == select_prompts(coco_prompts(), 10)
    assert select_prompts(prompts, 8) == select_prompts(prompts, 16)[:8]
    with pytest.raises(ValueError, match="has only 1000"):
        select_prompts(prompts, 1001, "prompt set coco1000")


def test_the_coco_captions_ship_with_their_attribution():
    import tomllib
    from importlib.resources import files
    from pathlib import Path

    readme = files("pytest_ditredundancy").joinpath("data/README.md").read_text(encoding="utf-8")
    for needed in ("coco_caption1000.txt", "CC BY 4.0", "COCO Consortium", "https://cocodataset.org/#termsofuse",
                   "https://creativecommons.org/licenses/by/4.0/", "2411.13588"):
        assert needed in readme, needed
    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text(encoding="utf-8"))
    data = pyproject["tool"]["setuptools"]["package-data"]["pytest_ditredundancy"]
    assert "data/*.txt" in data and "data/*.md" in data


def test_named_prompt_set_option(pytester):
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest("--dit-model=tiny-pixart-alpha", "--dit-prompts=coco1000", "--dit-num-prompts=3")
    result.stdout.fnmatch_lines(["*protocol project, 3 prompts from coco1000, seed 0*"])
    result = pytester.runpytest("--dit-model=tiny-pixart-alpha", "--dit-prompts=coco1000", "--dit-num-prompts=1001")
    result.stderr.fnmatch_lines(["*1001 prompts requested but prompt set coco1000 has only 1000*"])


def test_named_set_key_and_prompts(tmp_path):
    from dataclasses import replace

    from pytest_ditredundancy import coco_prompts
    from pytest_ditredundancy.plugin.options import DitConfig
    from pytest_ditredundancy.plugin.session import DitSession

    config = DitConfig(models=(), device="cpu", dtype="auto", prompts=tuple(coco_prompts()[:4]), prompt_source="coco1000",
                       num_prompts=4, steps=None, scheduler=None, seed=0, batch_size=8, baseline_dir=tmp_path,
                       update_baselines=False, step_factors=(), schedulers=(), cv_bounds=(0.0, 1.0),
                       min_shape_correlation=0.0)
    session = DitSession.from_config(config)
    key = session.request(session.spec("tiny-pixart-alpha")).key
    assert key == "steps20-dpm-solver-seed0-p4-32x32-g4.5-coco1000"
    assert config.prompt_tag == "coco1000"
    paper = DitSession.from_config(replace(config, protocol="paper", batch_size=1))  # what --dit-protocol=paper sets
    assert paper.request(paper.spec("tiny-pixart-alpha")).key == \
        "paper-steps20-dpm-solver-seed42-p4-32x32-g4.5-coco1000"


def test_shapes_set_holds_every_caption_in_a_mixed_seeded_order():
    from pytest_ditredundancy.profiling.prompts import named_prompts
    from pytest_ditredundancy.training.shapes import all_captions, parse_caption

    shapes = named_prompts("shapes")
    assert sorted(shapes) == sorted(all_captions()) and shapes == named_prompts("shapes")
    first = [parse_caption(c) for c in shapes[:8]]  # the default --dit-num-prompts
    assert len({s.shape for s in first}) == 3 and len({s.colour for s in first}) >= 3
