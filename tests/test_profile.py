"""RedundancyProfile: JSON round trip (exact), schema errors, slicing helpers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pytest_ditredundancy import ProfileFormatError, RedundancyProfile
from pytest_ditredundancy.capture.metrics import METRICS
from pytest_ditredundancy.capture.profile import ProfileMetadata


def make_profile(values: np.ndarray, computed: np.ndarray | None = None) -> RedundancyProfile:
    computed = np.ones(values.shape, bool) if computed is None else computed
    p, b, k, l, s = values.shape
    return RedundancyProfile(
        layers=[f"blocks.{i}.attn" for i in range(l)], kinds=["k", "v", "a"][:k], branches=["uncond", "cond"][:b],
        values={m: values * (i + 1) for i, m in enumerate(METRICS)}, computed=computed,
        metadata=ProfileMetadata(model="toy", steps=s + 1, prompts=[f"p{i}" for i in range(p)]),
    )


shapes = st.tuples(st.integers(1, 3), st.integers(1, 2), st.integers(1, 3), st.integers(1, 3), st.integers(1, 4))


@settings(max_examples=40, deadline=None)
@given(shapes.flatmap(lambda shape: st.tuples(
    arrays(np.float32, shape, elements=st.floats(width=32)),
    arrays(bool, shape))))
def test_json_round_trip_is_exact(tmp_path_factory, data):
    values, computed = data
    profile = make_profile(values, computed)
    path = tmp_path_factory.mktemp("p") / "profile.json"
    loaded = RedundancyProfile.load(profile.save(path))
    np.testing.assert_array_equal(loaded.computed, profile.computed)
    for metric in METRICS:
        expected = np.where(profile.computed, profile.values[metric], np.nan)
        np.testing.assert_array_equal(np.where(loaded.computed, loaded.values[metric], np.nan), expected)
    assert loaded.metadata == profile.metadata
    json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


def test_slicing_and_averaging():
    values = np.arange(2 * 2 * 3 * 2 * 4, dtype=np.float32).reshape(2, 2, 3, 2, 4)
    profile = make_profile(values)
    assert profile.series("abs_l1", kind="v", layer="blocks.1.attn").shape == (2, 4)
    np.testing.assert_array_equal(profile.series(kind="a", layer=0, prompt=1), values[1, 1, 2, 0])
    np.testing.assert_allclose(profile.mean_over_prompts()[1, 2, 0], values[:, 1, 2, 0].mean(axis=0))
    assert profile.kind_slice("k").shape == (2, 2, 2, 4)
    sub = profile.select_prompts([1])
    assert sub.num_prompts == 1 and sub.metadata.prompts == ["p1"]
    with pytest.raises(KeyError, match="no kind 'q'"):
        profile.series(kind="q", layer=0)


@pytest.mark.parametrize("text,message", [
    ("{not json", "not valid JSON"),
    ('{"schema": "something-else"}', "not a pytest-ditredundancy profile"),
    ('{"schema": "pytest-ditredundancy/profile", "schema_version": 0}', "schema version 0"),
    ('{"schema": "pytest-ditredundancy/profile", "schema_version": 1, "shape": {}}', "damaged profile"),
])
def test_bad_files_are_rejected_clearly(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ProfileFormatError, match=message):
        RedundancyProfile.load(path)


def test_truncated_file_is_rejected(tmp_path):
    profile = make_profile(np.ones((1, 1, 1, 1, 3), np.float32))
    text = profile.to_json()
    path = tmp_path / "cut.json"
    path.write_text(text[: len(text) // 2])
    with pytest.raises(ProfileFormatError, match="truncated"):
        RedundancyProfile.load(path)


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "p.json"
    make_profile(np.ones((1, 1, 1, 1, 2), np.float32)).save(path)
    before = path.read_text()
    import pytest_ditredundancy.io as io

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(io.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        make_profile(np.zeros((1, 1, 1, 1, 2), np.float32)).save(path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]
