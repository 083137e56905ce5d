"""cache-dit's DBCache as the ``cachedit`` strategy, and the engine registry every strategy runs through.

Parsing is strict; parameters that do not fit the model, a missing or untested cache-dit and CFG modes that do
not match the model are clear errors; a real run on trained-pixart caches steps at a high threshold and none at
a low one; each pipeline run starts fresh; removal leaves the pipeline exactly as it was, bit for bit.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.metadata
import importlib.util
import sys

import numpy as np
import pytest
import torch

from pytest_ditredundancy import load_model
from pytest_ditredundancy.cache import (ENGINES, STRATEGIES, CacheDependencyError, CacheParameterError, CacheSpecError,
                                        UnsupportedStrategy, applied, cachedit, engine_of, parse_spec)
from pytest_ditredundancy.cache.apply import attention_modules
from pytest_ditredundancy.cache.diffusers_cache import StrategyContext
from pytest_ditredundancy.cache.engines import CacheEngine, merge_counters
from pytest_ditredundancy.cache.measure import RunPlan, run_once
from pytest_ditredundancy.cache.schedule import CacheSchedule
from pytest_ditredundancy.cache.spec import Strategy
from pytest_ditredundancy.profiling.runner import call_kwargs, resolve_run, settings_for
from pytest_ditredundancy.zoo import get_spec

#: cache-dit is installed where these tests run in CI; without it only the tests that need no cache-dit run
needs_cache_dit = pytest.mark.skipif(importlib.util.find_spec("cache_dit") is None,
                                     reason="needs cache-dit: pip install 'pytest-ditredundancy[cache-dit]'")


# -- parsing ------------------------------------------------------------------------------------------------------
def test_cachedit_specs_parse_to_sorted_canonical_text():
    spec = parse_spec("cachedit:warmup=2,rdt=0.20,Fn=1,Bn=0")
    assert spec.params == {"warmup": 2, "rdt": 0.2, "Fn": 1, "Bn": 0}
    assert spec.text == "cachedit:Bn=0,Fn=1,rdt=0.2,warmup=2"
    assert parse_spec("cachedit").text == "cachedit" and parse_spec("cachedit").params == {}
    assert parse_spec("cachedit:max_cached_steps=-1,taylorseer=2,separate_cfg=no").params == {
        "max_cached_steps": -1, "taylorseer": 2, "separate_cfg": False}


@pytest.mark.parametrize("text,message", [
    ("cachedit:fn=1", "cachedit has no parameter 'fn'. Did you mean Fn?"),
    ("cachedit:threshold=0.1", "Its parameters: Bn, Fn, max_accumulated_rdt, max_cached_steps"),
    ("cachedit:Fn=0", "bad value for Fn: must be at least 1, got 0"),
    ("cachedit:Bn=-1", "bad value for Bn: must be at least 0, got -1"),
    ("cachedit:Fn=1.5", "bad value for Fn: expected a whole number, got '1.5'"),
    ("cachedit:rdt=-0.1", "bad value for rdt: must be at least 0, got -0.1"),
    ("cachedit:rdt=nan", "bad value for rdt: expected a finite number, got 'nan'"),
    ("cachedit:warmup=-2", "bad value for warmup: must be at least 0"),
    ("cachedit:warmup_interval=0", "bad value for warmup_interval: must be at least 1"),
    ("cachedit:max_cached_steps=-2", "expected -1 (no limit) or a number of steps >= 0, got -2"),
    ("cachedit:max_continuous_cached_steps=x", "bad value for max_continuous_cached_steps: expected a whole number"),
    ("cachedit:taylorseer=-1", "bad value for taylorseer: must be at least 0"),
    ("cachedit:separate_cfg=maybe", "bad value for separate_cfg: expected true/false, got 'maybe'"),
    ("cachedit:rdt=0.1,rdt=0.2", "parameter 'rdt' is given twice"),
])
def test_bad_cachedit_specs_are_explained(text, message):
    with pytest.raises(CacheSpecError) as info:
        parse_spec(text)
    assert message in str(info.value)


@needs_cache_dit
def test_every_knob_is_a_dbcache_config_field_with_the_documented_default():
    """The static table names real fields, and its ``upstream`` column is cache-dit's actual default."""
    import cache_dit

    fields = {f.name: f.default for f in dataclasses.fields(cache_dit.DBCacheConfig)}
    for name, knob in cachedit.KNOBS.items():
        assert knob.field in fields, name
        assert fields[knob.field] == knob.upstream, (name, fields[knob.field], knob.upstream)
    assert set(STRATEGIES["cachedit"].params) == set(cachedit.KNOBS) | {"taylorseer"}
    assert {f.name for f in dataclasses.fields(cache_dit.TaylorSeerCalibratorConfig)} >= {"taylorseer_order"}


# -- the engine registry ------------------------------------------------------------------------------------------
def test_every_strategy_has_an_engine():
    assert set(ENGINES) == {"none", "profile", "diffusers", "cachedit"}
    for strategy in STRATEGIES.values():
        assert isinstance(engine_of(parse_spec(strategy.name)), CacheEngine)
    assert engine_of(None) is ENGINES["none"] and engine_of(parse_spec("cachedit")) is ENGINES["cachedit"]
    assert {name for name, s in STRATEGIES.items() if s.engine == "diffusers"} == {
        "fbcache", "pab", "fastercache", "magcache", "taylorseer"}


def test_a_strategy_without_an_engine_is_refused():
    with pytest.raises(ValueError, match="strategy 'mine' names no engine"):
        Strategy("mine", "a strategy", {})


def _code(spec_text: str, **values) -> tuple[str, str]:
    spec = parse_spec(spec_text)
    engine = engine_of(spec)
    return "\n".join(engine.code_imports(spec, **values)), engine.code_line(spec, **values)


class _Transformer:
    def enable_cache(self, config):
        self.config = config


def _config_of(imports: str, line: str):
    """Run the imports and evaluate the config call in the line (it must build a real config object)."""
    namespace: dict = {"pipe": type("Pipe", (), {"current_timestep": 500, "transformer": _Transformer()})()}
    exec(imports, namespace)
    call = next(node for node in ast.walk(ast.parse(line)) if isinstance(node, ast.Call)
                and ast.unparse(node.func).endswith("Config"))
    return eval(ast.unparse(call), namespace)


@pytest.mark.parametrize("text,values", [
    ("none", {}),
    ("profile", {"schedule_path": "pixart-schedule.json"}),
    ("profile:schedule=saved.json", {}),
    ("fbcache:threshold=0.2", {"has_enable_cache": False}),
    ("fbcache:threshold=0.2", {"transformer_class": "FluxTransformer2DModel"}),
    ("pab", {"transformer_class": "PixArtTransformer2DModel"}),
    ("pab:spatial_attention_timestep_skip_range=-1..681,cross_attention_block_skip_range=3", {"has_enable_cache": True}),
    ("fastercache:attention_weight=0.3", {"has_enable_cache": True, "tensor_format": "BCHW",
                                          "is_guidance_distilled": False}),
    ("fastercache", {"transformer_class": "PixArtTransformer2DModel",
                     "context": StrategyContext(get_spec("tiny-pixart-alpha"), settings_for(get_spec("tiny-pixart-alpha")))}),
    ("magcache", {"has_enable_cache": False, "mag_ratios": [1.0, 0.99, 0.98], "steps": 3}),
    ("magcache:mag_ratios=flux", {"has_enable_cache": True, "steps": 20}),
    ("taylorseer:taylor_factors_dtype=float16,max_order=2", {"has_enable_cache": True}),
    pytest.param("cachedit:Fn=1,Bn=0,rdt=0.08,warmup=2", {}, marks=needs_cache_dit),
    pytest.param("cachedit:taylorseer=2,max_cached_steps=5", {}, marks=needs_cache_dit),
])
def test_every_engine_writes_a_valid_line_whose_config_builds(text, values):
    imports, line = _code(text, **values)
    ast.parse(imports + "\n" + line)
    assert "\n" not in line
    if "Config(" in line:
        config = _config_of(imports, line)
        spec = parse_spec(text)
        if spec.strategy == "cachedit":
            assert dataclasses.asdict(config)["Fn_compute_blocks"] == spec.get("Fn", 1)


def test_code_lines_follow_the_transformer_and_the_run():
    assert _code("cachedit:Fn=1,Bn=0,rdt=0.08,warmup=2")[1] == (
        "cache_dit.enable_cache(pipe, cache_config=DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, "
        "residual_diff_threshold=0.08, max_warmup_steps=2))")
    assert _code("cachedit:taylorseer=1")[1] == (
        "cache_dit.enable_cache(pipe, cache_config=DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, "
        "residual_diff_threshold=0.08, max_warmup_steps=8), calibrator_config=TaylorSeerCalibratorConfig("
        "taylorseer_order=1))")
    from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel

    assert _code("fbcache:threshold=0.2", transformer_class=PixArtTransformer2DModel)[1] == (
        "apply_first_block_cache(pipe.transformer, FirstBlockCacheConfig(threshold=0.2))")
    assert _code("fbcache:threshold=0.2", transformer_class=FluxTransformer2DModel)[1] == (
        "pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))")
    assert "num_inference_steps=3" in _code("magcache", has_enable_cache=True, mag_ratios=[1.0, 1.0, 1.0], steps=3)[1]
    flux, pixart = get_spec("tiny-flux-dev"), get_spec("tiny-pixart-alpha")
    assert "is_guidance_distilled=True" in _code("fastercache", transformer_class=FluxTransformer2DModel,
                                                 context=StrategyContext(flux, settings_for(flux)))[1]
    line = _code("fastercache", transformer_class=PixArtTransformer2DModel,
                 context=StrategyContext(pixart, settings_for(pixart)))[1]
    assert "is_guidance_distilled=False, tensor_format='BCHW'" in line  # diffusers' default is a video layout


@pytest.mark.parametrize("text,values,message", [
    ("fbcache", {}, "pass transformer_class= (the class or its diffusers name) or has_enable_cache="),
    ("fbcache", {"transformer_class": "NoSuchTransformer"}, "diffusers has no class 'NoSuchTransformer'"),
    ("magcache", {"has_enable_cache": True, "steps": 20}, "pass mag_ratios= (the calibrated ratios)"),
    ("magcache:mag_ratios=flux", {"has_enable_cache": True}, "needs steps="),
    ("profile", {}, "pass schedule_path="),
    ("fastercache", {"has_enable_cache": True}, "needs is_guidance_distilled= and tensor_format= (or context="),
])
def test_code_lines_say_what_they_miss(text, values, message):
    with pytest.raises(ValueError) as info:
        _code(text, **values)
    assert message in str(info.value)


def test_counters_of_several_batches_merge():
    first = {"cached": 2, "steps": 20, "cached_steps": [[2, 3]], "cfg": "batched", "skipped_calls": 1}
    second = {"cached": 1, "steps": 20, "cached_steps": [[4]], "cfg": "batched", "skipped_calls": 2}
    assert merge_counters(merge_counters({}, first), second) == {
        "cached": 3, "steps": 40, "cached_steps": [[2, 3], [4]], "cfg": "batched", "skipped_calls": 3}
    assert merge_counters({"cfg": "a"}, {"cfg": "b"}) == {"cfg": "a | b"}


# -- failures: raised under cache-dit, or here ------------------------------------------------------------------
@needs_cache_dit
def test_failure_names_where_cache_dit_raised():
    import cache_dit

    with pytest.raises(AssertionError) as info:
        cache_dit.steps_mask(total_steps=5)  # cache-dit's own check
    where = engine_of(parse_spec("cachedit")).failure(info.value)
    assert where.startswith("AssertionError: Only total_steps=4 or 6 is supported")
    assert "(raised under cache_dit/caching/cache_interface.py:" in where
    with pytest.raises(ValueError) as ours:
        cachedit.code_line(parse_spec("cachedit:rdt=inf"))  # raised in this package: a bug here, not the cache's
    assert engine_of(parse_spec("cachedit")).failure(ours.value) is None
    assert engine_of(parse_spec("profile")).failure(info.value) is None
    assert engine_of(parse_spec("fbcache")).failure(info.value).endswith(")")  # diffusers: "at" the last frame


# -- a missing or untested cache-dit ----------------------------------------------------------------------------
def test_a_missing_cache_dit_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "cache_dit", None)
    with pytest.raises(CacheDependencyError) as info:
        cachedit.require_cache_dit()
    assert "cachedit strategy runs on cache-dit, which is not installed" in str(info.value)
    assert "pip install 'pytest-ditredundancy[cache-dit]'" in str(info.value)
    assert isinstance(info.value, ImportError)


@needs_cache_dit
@pytest.mark.parametrize("version", ["1.4.9", "2.0.0", "0.3.1", "unknown"])
def test_an_untested_cache_dit_version_is_refused(monkeypatch, version):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: version)
    with pytest.raises(CacheDependencyError) as info:
        cachedit.require_cache_dit()
    assert f"tested with cache-dit >=1.5,<2; installed is {version}" in str(info.value)
    assert "pip install 'pytest-ditredundancy[cache-dit]'" in str(info.value)


@needs_cache_dit
@pytest.mark.parametrize("version", ["1.5.0", "1.5.3", "1.9.1.dev4+g1234"])
def test_a_tested_cache_dit_version_passes(monkeypatch, version):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: version)
    assert cachedit.require_cache_dit() is sys.modules["cache_dit"]


# -- on the trained PixArt ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pixart(tiny_pipeline_cache):
    spec = get_spec("trained-pixart")
    request = resolve_run(spec, num_prompts=2)
    plan = RunPlan(tiny_pipeline_cache("trained-pixart"), spec, request.settings, list(request.prompts),
                   request.settings.seed, request.batch_size)
    return plan, run_once(plan)


def _rewritten_by_a_run(plan: RunPlan) -> set[str]:
    """Pipeline attributes an uncached run itself replaces (the fresh scheduler, Flux's _joint_attention_kwargs)."""
    run_once(plan)
    first = dict(vars(plan.pipe))
    run_once(plan)
    return {k for k, v in vars(plan.pipe).items() if first.get(k) is not v}


def _state(plan: RunPlan, rewritten: set[str]) -> dict:
    """Everything cache-dit could leave behind: instance attributes of the pipeline (but those its own runs
    replace), its transformer and every submodule, the pipeline class's attributes, the module tree, the weights."""
    pipe = plan.pipe
    transformer = pipe.transformer
    return {
        "pipe": {k: (type(v) if k in rewritten else id(v)) for k, v in vars(pipe).items()},
        "class": {k: id(v) for k, v in vars(type(pipe)).items()},
        "modules": {name: {k: id(v) for k, v in vars(m).items()} for name, m in transformer.named_modules()},
        "tree": [name for name, _ in transformer.named_modules()],
        "weights": {k: v.clone() for k, v in transformer.state_dict().items()},
    }


def _same_state(a: dict, b: dict) -> bool:
    return (all(a[key] == b[key] for key in ("pipe", "class", "modules", "tree"))
            and a["weights"].keys() == b["weights"].keys()
            and all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"]))


@needs_cache_dit
def test_a_high_threshold_caches_steps_a_low_one_none(pixart):
    plan, reference = pixart
    low = run_once(plan, parse_spec("cachedit:Fn=1,Bn=0,rdt=0.05,warmup=2"))
    high = run_once(plan, parse_spec("cachedit:Fn=1,Bn=0,rdt=0.3,warmup=2"))
    assert low.strategy["cached_steps"] == [[]] and low.strategy["cached"] == 0
    assert torch.equal(low.latents, reference.latents)  # nothing cached: the same computation
    cached = high.strategy["cached_steps"][0]
    assert len(cached) >= 5 and min(cached) >= 2  # never in the two warm-up steps
    assert high.strategy["steps"] == 20 and not torch.equal(high.latents, reference.latents)
    diffs = high.strategy["residual_diffs"][0]
    assert diffs[:2] == [None, None] and all(isinstance(d, float) for d in diffs[2:])
    assert all(diffs[step] < 0.3 for step in cached)  # cache-dit cached where its own diff fell below rdt
    assert high.strategy["cfg"].startswith("batched in one call (uncond-cond; enable_separate_cfg=False")


@needs_cache_dit
def test_removal_leaves_the_pipeline_exactly_as_before(pixart):
    plan, reference = pixart
    rewritten = _rewritten_by_a_run(plan)
    before = _state(plan, rewritten)
    run_once(plan, parse_spec("cachedit:Fn=1,Bn=1,rdt=0.3,warmup=2,taylorseer=1"))
    assert _same_state(before, _state(plan, rewritten))
    fresh = load_model("trained-pixart", device="cpu").transformer  # the modules' order: the profile's layer order
    assert before["tree"] == [name for name, _ in fresh.named_modules()]
    again = run_once(plan)
    assert torch.equal(again.latents, reference.latents) and np.array_equal(again.images, reference.images)


@needs_cache_dit
def test_each_pipeline_run_starts_fresh(pixart):
    """Two calls in one block: the second caches and computes exactly what it does alone."""
    plan = pixart[0]
    spec = parse_spec("cachedit:Fn=1,Bn=0,rdt=0.3,warmup=2")

    def call(prompt: str, seed: int):
        kwargs = call_kwargs(plan.model, plan.settings, [prompt], plan.pipe, [torch.Generator().manual_seed(seed)])
        return plan.pipe(**kwargs).images

    with applied(plan.pipe, spec, context=plan.context()) as both:
        call(plan.prompts[0], 0)
        second = call(plan.prompts[1], 1)
    with applied(plan.pipe, spec, context=plan.context()) as alone:
        only = call(plan.prompts[1], 1)
    assert torch.equal(second, only)
    runs = both.counters()["cached_steps"]
    assert both.counters()["runs"] == 2 and runs[1] == alone.counters()["cached_steps"][0]
    assert both.skipped_steps() == sorted(set(runs[0]) | set(runs[1])) and runs[0] != runs[1]


@needs_cache_dit
def test_too_many_compute_blocks_fail_before_cache_dit_asserts(pixart):
    plan = pixart[0]
    rewritten = _rewritten_by_a_run(plan)
    before = _state(plan, rewritten)
    with pytest.raises(CacheParameterError) as info:
        run_once(plan, parse_spec("cachedit:Fn=3,Bn=2"))
    assert str(info.value) == (
        "cachedit:Bn=2,Fn=3: Fn=3 + Bn=2 = 5 compute blocks, but PixArtTransformer2DModel has 4 transformer blocks "
        "in transformer_blocks (transformer_blocks: 4 blocks); use fewer compute blocks, e.g. "
        "--dit-cache=cachedit:Fn=1,Bn=0 (First-Block-Cache's split), with Fn + Bn below the block count")
    with pytest.raises(CacheParameterError, match="Fn=4 \\+ Bn=0 leaves no middle block of PixArtTransformer2DModel"):
        run_once(plan, parse_spec("cachedit:Fn=4"))
    assert _same_state(before, _state(plan, rewritten))


@needs_cache_dit
def test_without_the_check_cache_dit_fails_inside_the_pipeline(pixart, monkeypatch):
    """What the check prevents: cache-dit's own assertion, deep in the run; failure() says where."""
    plan = pixart[0]
    rewritten = _rewritten_by_a_run(plan)
    before = _state(plan, rewritten)
    monkeypatch.setattr(cachedit, "check_blocks", lambda *args: None)
    with pytest.raises(AssertionError) as info:
        run_once(plan, parse_spec("cachedit:Fn=5"))
    where = engine_of(parse_spec("cachedit")).failure(info.value)
    assert "Fn_compute_blocks 5 must be less than the number of transformer blocks 4" in where
    assert "raised under cache_dit/caching/cache_blocks/" in where
    assert _same_state(before, _state(plan, rewritten))


@needs_cache_dit
def test_a_cfg_mode_the_model_does_not_run_is_refused(pixart):
    plan = pixart[0]
    with pytest.raises(CacheParameterError) as info:
        run_once(plan, parse_spec("cachedit:separate_cfg=true"))
    assert ("trained-pixart makes one transformer call per step (CFG batched in it, or none), but separate_cfg=True"
            in str(info.value)) and "Use cachedit:separate_cfg=false" in str(info.value)
    assert run_once(plan, parse_spec("cachedit:separate_cfg=false,Fn=1,warmup=2,rdt=0.3")).strategy["cached"] > 0


def test_the_profile_engine_reports_its_skipped_steps(pixart):
    plan = pixart[0]
    layers = [name for name, _ in attention_modules(plan.pipe.transformer)]
    mask = [[False] * 20 for _ in layers]
    mask[0][3] = mask[1][3] = mask[2][7] = True
    with applied(plan.pipe, parse_spec("profile"), schedule=CacheSchedule("trained-pixart", layers, 20, mask)) as run:
        call = call_kwargs(plan.model, plan.settings, plan.prompts[:1], plan.pipe, [torch.Generator().manual_seed(0)])
        plan.pipe(**call)
    assert run.skipped_steps() == [3, 7] and run.counters()["skipped_calls"] == 3


# -- other models -------------------------------------------------------------------------------------------------
def _plan(tiny_pipeline_cache, name: str, steps: int) -> RunPlan:
    spec = get_spec(name)
    request = resolve_run(spec, num_prompts=2, steps=steps)
    return RunPlan(tiny_pipeline_cache(name), spec, request.settings, list(request.prompts),
                   request.settings.seed, request.batch_size)


@needs_cache_dit
def test_flux_is_restored_after_cache_dits_patch(tiny_pipeline_cache):
    """On Flux cache-dit re-binds the transformer's forward to its own adaptation; removal restores diffusers'."""
    plan = _plan(tiny_pipeline_cache, "tiny-flux-dev", 8)
    rewritten = _rewritten_by_a_run(plan)
    reference, before = run_once(plan), _state(plan, rewritten)
    cached = run_once(plan, parse_spec("cachedit:Fn=1,Bn=0,rdt=0.5,warmup=1"))
    assert cached.strategy["cached"] > 0 and cached.strategy["cfg"].startswith("no CFG: one call per step")
    with pytest.raises(CacheParameterError, match="FluxTransformer2DModel has 4 transformer blocks in "
                                                  "transformer_blocks \\+ single_transformer_blocks"):
        run_once(plan, parse_spec("cachedit:Fn=4,Bn=1"))
    assert _same_state(before, _state(plan, rewritten)) and "forward" not in vars(plan.pipe.transformer)
    assert torch.equal(run_once(plan).latents, reference.latents)


@needs_cache_dit
def test_sd3_runs_and_is_restored(tiny_pipeline_cache):
    plan = _plan(tiny_pipeline_cache, "trained-sd3", 28)
    rewritten = _rewritten_by_a_run(plan)
    reference, before = run_once(plan), _state(plan, rewritten)
    cached = run_once(plan, parse_spec("cachedit:Fn=1,Bn=0,rdt=0.3,warmup=2"))
    assert cached.strategy["cached"] >= 5 and cached.strategy["steps"] == 28
    assert cached.strategy["cfg"].startswith("batched in one call (uncond-cond")
    assert _same_state(before, _state(plan, rewritten)) and torch.equal(run_once(plan).latents, reference.latents)


@needs_cache_dit
def test_separate_cfg_calls_are_cached_per_branch(tiny_pipeline_cache):
    plan = _plan(tiny_pipeline_cache, "tiny-wan2.1", 6)
    result = run_once(plan, parse_spec("cachedit:Fn=1,Bn=0,rdt=0.5,warmup=1"))
    assert result.strategy["cfg"].startswith("separate calls (cond-uncond; enable_separate_cfg=True")
    assert result.strategy["cached"] > 0 and result.strategy["steps"] == 6
    with pytest.raises(CacheParameterError, match="runs its CFG branches as separate transformer calls, but "
                                                  "separate_cfg=False.*Use cachedit:separate_cfg=true"):
        run_once(plan, parse_spec("cachedit:separate_cfg=false"))


@needs_cache_dit
def test_a_pipeline_cache_dit_has_no_adapter_for_is_unsupported(tiny_pipeline_cache):
    plan = _plan(tiny_pipeline_cache, "tiny-latte-1", 4)
    with pytest.raises(UnsupportedStrategy, match="cache-dit .* has no block adapter for LattePipeline"):
        run_once(plan, parse_spec("cachedit"))
