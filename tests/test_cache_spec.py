"""``--dit-cache`` parsing: strict, with the choices in every error; the option and its ini twin."""

from __future__ import annotations

import dataclasses

import pytest

from pytest_ditredundancy.cache.spec import EXTRA_PARAMS, STRATEGIES, CacheSpecError, parse_spec, parse_specs


def test_specs_parse_to_canonical_text():
    assert parse_spec("none").text == "none"
    assert parse_spec("profile").params == {"budget": 0.3}
    assert parse_spec("Profile:budget=0.30").text == "profile:budget=0.3"
    assert parse_spec("fbcache:threshold=0.05").params == {"threshold": 0.05}
    spec = parse_spec("pab:spatial_attention_timestep_skip_range=-1..681,spatial_attention_block_skip_range=3")
    assert spec.params == {"spatial_attention_timestep_skip_range": (-1, 681), "spatial_attention_block_skip_range": 3}
    assert spec.text == "pab:spatial_attention_block_skip_range=3,spatial_attention_timestep_skip_range=-1..681"
    assert parse_spec("taylorseer:use_lite_mode=yes").params == {"use_lite_mode": True}


def test_commas_inside_a_spec_survive_option_splitting():
    # the plugin splits option values on commas before the cache parser sees them
    specs = parse_specs(["profile:budget=0.3", "threshold=0.05", "fbcache", "pab"])
    assert [s.text for s in specs] == ["profile:budget=0.3,threshold=0.05", "fbcache", "pab"]
    assert [s.strategy for s in parse_specs(["profile:budget=0.3", "threshold=0.05", "fbcache"])] == ["profile", "fbcache"]
    assert parse_specs(["profile:budget=0.3", "threshold=0.05"])[0].params == {"budget": 0.3, "threshold": 0.05}


@pytest.mark.parametrize("text,message", [
    ("fbcach", "unknown caching strategy 'fbcach' in --dit-cache=fbcach. Did you mean fbcache or fastercache?"),
    ("teacache", "Strategies: none (no caching"),
    ("fbcache:treshold=0.1", "fbcache has no parameter 'treshold'. Did you mean threshold? Its parameters: threshold"),
    ("none:budget=0.1", "none has no parameter 'budget'"),
    ("profile:budget=1.0", "budget is the fraction of attention calls skipped and must lie in [0, 1), got 1"),
    ("profile:budget=-0.1", "must lie in [0, 1)"),
    ("profile:budget=abc", "bad value for budget"),
    ("profile:budget", "parameter 'budget' needs a value"),
    ("profile:budget=0.1,budget=0.2", "parameter 'budget' is given twice"),
    ("profile:schedule=a.json,budget=0.2", "give either schedule= or budget=/threshold="),
    ("pab:spatial_attention_timestep_skip_range=800..100", "range '800..100' is empty"),
    ("pab:spatial_attention_block_skip_range=0", "must be at least 1"),
    ("fastercache:tensor_format=NCHW", "expected one of BCHW, BFCHW, BCFHW"),
    ("magcache:mag_ratios=sdxl", "expected one of calibrate, flux"),
])
def test_bad_specs_are_explained(text, message):
    with pytest.raises(CacheSpecError) as info:
        parse_spec(text)
    assert message in str(info.value)


def test_duplicates_are_refused():
    with pytest.raises(CacheSpecError, match="given twice"):
        parse_specs(["profile", "profile:budget=0.3"])


def test_parameters_match_the_diffusers_config_fields():
    """Our static tables (parsed before diffusers is imported) name real fields of diffusers' configs."""
    import diffusers.hooks as hooks

    for strategy in STRATEGIES.values():
        if strategy.diffusers_config is None:
            continue
        fields = {f.name for f in dataclasses.fields(getattr(hooks, strategy.diffusers_config))}
        ours = set(strategy.params) - EXTRA_PARAMS.get(strategy.name, set())
        assert ours <= fields, (strategy.name, ours - fields)


@pytest.mark.parametrize("args,message", [
    (["--dit-cache=fbcach"], "Did you mean fbcache or fastercache?"),
    (["--dit-cache=profile:budget=1.5"], "must lie in [0, 1)"),
    (["--dit-cache-repeats=0"], "--dit-cache-repeats must be at least 1"),
    (["--dit-cache-budgets=0.2,1.2"], "--dit-cache-budgets must be fractions in [0, 1)"),
])
def test_bad_cache_options_are_usage_errors(pytester, args, message):
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()


def test_strategies_parametrize_with_spec_ids_and_the_ini_twin(pytester):
    pytester.makepyfile("def test_gate(dit_model, dit_cache):\n    assert dit_cache.strategy\n")
    result = pytester.runpytest("--collect-only", "-q", "--dit-model=tiny-dit-xl-2-256", "--dit-cache=none",
                                "--dit-cache=profile:budget=0.2,threshold=0.1", "--dit-cache=fbcache")
    result.stdout.fnmatch_lines(["*test_gate[[]tiny-dit-xl-2-256-none[]]",
                                 "*test_gate[[]tiny-dit-xl-2-256-profile:budget=0.2,threshold=0.1[]]",
                                 "*test_gate[[]tiny-dit-xl-2-256-fbcache[]]"])
    pytester.makeini("[pytest]\ndit_caches = pab fbcache:threshold=0.1\n")
    result = pytester.runpytest("--collect-only", "-q", "--dit-model=tiny-dit-xl-2-256")
    result.stdout.fnmatch_lines(["*[[]tiny-dit-xl-2-256-pab[]]", "*[[]tiny-dit-xl-2-256-fbcache:threshold=0.1[]]"])


def test_without_a_strategy_the_gate_skips_and_says_how_to_select_one(pytester):
    pytester.makepyfile("def test_gate(dit_cache):\n    pass\n")
    result = pytester.runpytest("-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*no caching strategy selected: pass --dit-cache=SPEC*"])
