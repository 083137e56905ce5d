"""Protocols are objects in a registry: a third one is one class and one ``register_protocol`` call, and the
runner, the session and the options use it without knowing its name."""

from __future__ import annotations

import pytest

from pytest_ditredundancy import ProtocolError, profile_model
from pytest_ditredundancy.profiling.protocol_registry import (PROTOCOLS, get_protocol, register_protocol,
                                                               unregister_protocol)
from pytest_ditredundancy.profiling.protocols import Protocol
from pytest_ditredundancy.profiling.settings import resolve_run
from pytest_ditredundancy.zoo import get_spec


class AttentionOutputOnly(Protocol):
    """A toy protocol: only A, every prompt seeded 7, three prompts per call, two prompts by default."""

    name = "toy"
    summary = "a test's protocol"
    default_batch_size = 3
    same_seed = True

    def default_seed(self, spec):
        return 7

    def num_prompts(self, prompt_set):
        return 2

    def kinds(self, kinds):
        return ("a",)


@pytest.fixture
def toy():
    protocol = register_protocol(AttentionOutputOnly())
    yield protocol
    unregister_protocol(protocol.name)
    assert "toy" not in PROTOCOLS


def test_a_registered_protocol_runs_through_profile_model(toy):
    profile = profile_model("tiny-pixart-alpha", protocol="toy", steps=3)
    assert profile.metadata.protocol == "toy"
    assert profile.kinds == ["a"]
    assert profile.num_prompts == 2
    assert profile.metadata.seed == 7
    assert profile.metadata.extra["settings_key"].startswith("toy-steps3-")
    assert profile.metadata.extra["batch_size"] == 3


def test_a_request_asks_its_protocol(toy):
    request = resolve_run(get_spec("tiny-pixart-alpha"), protocol="toy", steps=3)
    assert request.protocol is toy
    assert request.seeds(0, 3) == [7, 7, 7]  # same_seed
    project = resolve_run(get_spec("tiny-pixart-alpha"), steps=3, prompt_offset=4)
    assert project.seeds(1, 2) == [5, 6]  # seed 0 + global index
    assert project.key == "steps3-dpm-solver-seed0-p8-32x32-g4.5"


def test_an_unknown_protocol_names_the_registered_ones(toy):
    with pytest.raises(ProtocolError, match=r"unknown protocol 'study'; choose 'project' .*'paper' .*'toy'"):
        get_protocol("study")


def test_built_in_protocols_cannot_be_unregistered():
    with pytest.raises(ValueError, match="built in"):
        unregister_protocol("paper")
    assert set(PROTOCOLS) >= {"project", "paper"}


def test_a_trained_model_runs_its_own_prompt_set_unless_told_otherwise():
    from pytest_ditredundancy.profiling.prompts import named_prompts

    request = resolve_run(get_spec("trained-pixart"), num_prompts=4)
    assert request.prompts == tuple(named_prompts("shapes")[:4])
    assert request.key.endswith("-shapes") and request.prompt_source == "shapes"
    told = resolve_run(get_spec("trained-pixart"), prompt_set="default", num_prompts=4)
    assert told.prompts == tuple(named_prompts("default")[:4]) and told.prompt_tag is None


def test_the_plugin_runs_a_protocol_a_conftest_registers(pytester):
    pytester.makeconftest('''
from pytest_ditredundancy.profiling.protocol_registry import register_protocol
from pytest_ditredundancy.profiling.protocols import Protocol


class AttentionOutputOnly(Protocol):
    name = "toy"
    summary = "a conftest's protocol"

    def kinds(self, kinds):
        return ("a",)


register_protocol(AttentionOutputOnly())
''')
    pytester.makepyfile('''
def test_profile(dit_profile):
    profile = dit_profile()
    assert profile.metadata.protocol == "toy"
    assert profile.kinds == ["a"]
    assert profile.metadata.extra["settings_key"].startswith("toy-steps3-")
''')
    result = pytester.runpytest_subprocess("--dit-protocol=toy", "--dit-model=tiny-pixart-alpha", "--dit-steps=3",
                                           "--dit-num-prompts=2", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
