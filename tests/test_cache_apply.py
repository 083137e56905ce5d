"""Applying strategies: the reuse hooks really skip attention, change nothing when they skip nothing, key
caches per call, never leak between runs, refuse batch mismatches, and always come off again."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from pytest_ditredundancy.cache import CacheBatchError, UnsupportedStrategy, applied, parse_spec
from pytest_ditredundancy.cache.apply import RunTracker, attention_modules
from pytest_ditredundancy.cache.measure import ComputeCounter, RunPlan, run_once, skipped_fractions
from pytest_ditredundancy.cache.schedule import CacheSchedule, ScheduleError, schedule_from_costs
from pytest_ditredundancy.capture.hooks import RedundancyCapture, capture_redundancy
from pytest_ditredundancy.capture.tracking import StepTracker
from pytest_ditredundancy.profiling.runner import settings_for
from pytest_ditredundancy.zoo import get_spec


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(4, 4) for _ in range(4))

    def forward(self, hidden_states):
        q, k, v = self.to_q(hidden_states), self.to_k(hidden_states), self.to_v(hidden_states)
        return self.to_out(torch.tanh(q * k) + v)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Attention(), Attention()])

    def forward(self, hidden_states):
        for block in self.blocks:
            hidden_states = hidden_states + block(hidden_states)
        return hidden_states


class Scheduler:
    timesteps = None

    def set_timesteps(self, steps):
        self.timesteps = torch.linspace(999, 0, steps)

    def step(self, output, timestep, sample):
        return SimpleNamespace(prev_sample=sample - 0.1 * output)


class Pipe:
    """A denoising loop shaped like a diffusers pipeline (``calls`` transformer calls per step, as CFG
    branches run separately)."""

    def __init__(self, calls: int = 1) -> None:
        self.transformer, self.scheduler, self.calls = Net(), Scheduler(), calls

    @torch.no_grad()
    def __call__(self, x, steps=4, fail_at=None):
        self.scheduler.set_timesteps(steps)
        for i, t in enumerate(self.scheduler.timesteps):
            if i == fail_at:
                raise RuntimeError("boom")
            out = sum(self.transformer(x * (1 + c)) for c in range(self.calls))
            x = self.scheduler.step(out, t, x).prev_sample
        return x


LAYERS = ["blocks.0", "blocks.1"]


def schedule(mask, steps=4) -> CacheSchedule:
    return CacheSchedule(model="toy", layers=LAYERS, steps=steps, mask=mask)


def count_to_q(pipe: Pipe) -> list[int]:
    calls = [0]
    for block in pipe.transformer.blocks:
        block.to_q.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def is_clean(pipe: Pipe) -> bool:
    modules = [pipe.transformer, *pipe.transformer.modules()]
    hooks = [h for m in modules if getattr(m, "_diffusers_hook", None) for h in m._diffusers_hook.hooks]
    return (not hooks and not pipe.transformer._forward_pre_hooks and not pipe.transformer._forward_hooks
            and "step" not in vars(pipe.scheduler) and "set_timesteps" not in vars(pipe.scheduler))


PROFILE = parse_spec("profile")


def test_a_schedule_that_skips_nothing_is_bit_identical():
    pipe, x = Pipe(calls=2), torch.randn(3, 5, 4)
    plain = pipe(x)
    with applied(pipe, PROFILE, schedule=schedule([[False] * 4] * 2)) as handle:
        hooked = pipe(x)
    assert torch.equal(plain, hooked)
    assert handle.counters() == {"skipped_calls": 0, "total_calls": 16}
    assert is_clean(pipe)


def test_skipping_really_skips_the_attention_computation():
    pipe, x = Pipe(calls=2), torch.randn(2, 5, 4)
    calls = count_to_q(pipe)
    pipe(x)
    full = calls[0]
    calls[0] = 0
    mask = [[False, True, True, False], [False, False, True, True]]  # 4 cells x 2 calls per step = 8 skips
    with applied(pipe, PROFILE, schedule=schedule(mask)) as handle:
        out = pipe(x)
    assert full == 16 and calls[0] == full - 8
    assert handle.applier.skipped == 8 and handle.applier.skipped_cells.tolist() == [[0, 2, 2, 0], [0, 0, 2, 2]]
    assert not torch.equal(out, pipe(x))


def test_cfg_calls_keep_separate_caches():
    """Call 1 of a step reuses call 1 of the previous step, not call 0 (whose input differs)."""
    pipe, x = Pipe(calls=2), torch.randn(1, 3, 4)
    mask = [[False, True, False, False], [False] * 4]
    with applied(pipe, PROFILE, schedule=schedule(mask)) as handle:
        pipe(x)
        entries = {call: entry.output for (layer, call), entry in handle.applier.cache.items() if layer == 0}
    assert set(entries) == {0, 1} and not torch.equal(entries[0], entries[1])


def test_caches_are_dropped_at_every_run_start_and_batch_mismatch_is_refused():
    pipe = Pipe()
    sizes = []
    probe = pipe.transformer.register_forward_pre_hook(lambda m, a: sizes.append(len(handle.applier.cache)))
    mask = [[False, True, True, True]] * 2
    with applied(pipe, PROFILE, schedule=schedule(mask)) as handle:
        pipe(torch.randn(2, 3, 4))
        pipe(torch.randn(1, 3, 4))  # a new prompt batch of another size: nothing stale is reused
        assert sizes[0] == 0 and sizes[4] == 0
        # within one run, the batch may not change under a cached output
        pipe.scheduler.set_timesteps(4)
        pipe.transformer(torch.randn(2, 3, 4))
        pipe.scheduler.step(torch.zeros(1), 0, torch.zeros(1))
        with pytest.raises(CacheBatchError, match=r"blocks.0 \(call 0 of step 1\) has batch 1, its cached output "
                                                  r"has batch 2"):
            pipe.transformer(torch.randn(1, 3, 4))
    probe.remove()
    assert not handle.applier.cache and is_clean(pipe)


def test_hooks_come_off_when_the_pipeline_raises():
    pipe = Pipe()
    with pytest.raises(RuntimeError, match="boom"):
        with applied(pipe, PROFILE, schedule=schedule([[False, True, True, True]] * 2)):
            pipe(torch.randn(1, 3, 4), fail_at=2)
    assert is_clean(pipe)
    with applied(pipe, None):
        pass
    assert is_clean(pipe)


def test_in_place_changes_to_a_cached_output_are_detected():
    pipe, x = Pipe(), torch.randn(1, 3, 4)
    original = pipe.transformer.forward

    def mutating(hidden_states):  # a model that scales an attention output in place after using it
        out = pipe.transformer.blocks[0](hidden_states)
        result = hidden_states + out + pipe.transformer.blocks[1](hidden_states + out)
        out.mul_(2.0)
        return result

    pipe.transformer.forward = mutating
    with applied(pipe, PROFILE, schedule=schedule([[False, True, True, True], [False] * 4])) as handle:
        pipe(x)
    pipe.transformer.forward = original
    assert handle.applier.skipped == 2 and 0 in handle.applier.copies  # step 1 recomputed, then copies reused


def test_a_schedule_for_other_layers_is_refused_before_anything_is_installed():
    pipe = Pipe()
    other = CacheSchedule(model="other", layers=["blocks.0", "blocks.9"], steps=4, mask=[[False] * 4] * 2)
    with pytest.raises(ScheduleError, match="first difference: schedule 'blocks.9', model 'blocks.1'"):
        with applied(pipe, PROFILE, schedule=other):
            pass
    assert is_clean(pipe)


def test_attention_modules_are_found_in_registration_order():
    assert [name for name, _ in attention_modules(Pipe().transformer)] == LAYERS


def test_a_pipeline_without_transformer_is_unsupported():
    with pytest.raises(UnsupportedStrategy, match="not a diffusers pipeline"):
        with applied(SimpleNamespace(scheduler=Scheduler()), PROFILE):
            pass


# -- on a tiny diffusers pipeline ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pixart_plan(tiny_pipeline_cache):
    spec = get_spec("tiny-pixart-alpha")
    settings = settings_for(spec, steps=4, num_prompts=2)
    return RunPlan(tiny_pipeline_cache("tiny-pixart-alpha"), spec, settings, ["a red bus", "a cat"], 0, 2)


def test_tiny_pixart_no_skip_schedule_is_bit_identical_and_counts_match(pixart_plan):
    layers = [name for name, _ in attention_modules(pixart_plan.pipe.transformer)]
    reference = run_once(pixart_plan, count=True)
    nothing = CacheSchedule("tiny-pixart-alpha", layers, 4, [[False] * 4 for _ in layers])
    same = run_once(pixart_plan, PROFILE, schedule=nothing, count=True)
    assert np.array_equal(reference.images, same.images) and torch.equal(reference.latents, same.latents)
    assert same.attention_calls == reference.attention_calls == same.strategy["total_calls"] == 4 * len(layers)
    costs = np.tile(np.arange(4, dtype=float), (len(layers), 1))
    costs[:, 0] = np.nan
    half = schedule_from_costs(costs, layers, model="tiny-pixart-alpha", budget=0.5)
    cached = run_once(pixart_plan, PROFILE, schedule=half, count=True)
    assert cached.strategy["skipped_calls"] == half.skipped_cells == 8
    assert reference.attention_calls - cached.attention_calls == 8
    assert skipped_fractions(reference, cached)["attention"] == pytest.approx(0.5)
    assert 0 < skipped_fractions(reference, cached)["transformer"] < 0.5  # FFNs and embeddings still run


def test_diffusers_cache_hooks_come_off_even_when_the_pipeline_raises(pixart_plan):
    pipe = pixart_plan.pipe

    def stop(step, timestep, latents):
        if step == 2:
            raise RuntimeError("stop")

    kwargs = dict(prompt=["a red bus"], num_inference_steps=4, height=32, width=32, output_type="latent",
                  use_resolution_binning=False, clean_caption=False, callback=stop)
    with pytest.raises(RuntimeError, match="stop"):
        with applied(pipe, parse_spec("fbcache"), context=pixart_plan.context()):
            pipe(**kwargs)
    registries = [m._diffusers_hook for m in pipe.transformer.modules() if hasattr(m, "_diffusers_hook")]
    assert registries and not any(r.hooks for r in registries)
    assert not pipe.transformer._forward_pre_hooks and "step" not in vars(pipe.scheduler)


def test_compute_counter_sees_only_what_runs():
    net = Net()
    with ComputeCounter(net) as counter:
        net(torch.randn(2, 3, 4))
    assert counter.attention_calls == 2 and counter.attention_rows == 4
    assert counter.linear_macs == 8 * (2 * 3) * 4 * 4  # 8 linears, 6 rows of 4 -> 4
    assert "forward" not in vars(net.blocks[0]) and "forward" not in vars(net.blocks[0].to_q)


def test_a_diffusers_cache_the_model_cannot_run_is_unsupported_with_the_reason(pixart_plan):
    pipe = pixart_plan.pipe
    with pytest.raises(UnsupportedStrategy, match="taylorseer found no module of PixArtTransformer2DModel .*"
                                                  "transformer_blocks.0.attn1"):
        with applied(pipe, parse_spec("taylorseer"), context=pixart_plan.context()):
            pass
    dit_like = pixart_plan.context()
    dit_like.model = get_spec("tiny-dit-xl-2-256")
    with pytest.raises(UnsupportedStrategy, match=r"fastercache needs classifier-free guidance batched as "
                                                  r"\[uncond, cond\] in one call; tiny-dit-xl-2-256 runs it as "
                                                  r"batched-cond-uncond"):
        with applied(pipe, parse_spec("fastercache"), context=dit_like):
            pass
    registries = [m._diffusers_hook for m in pipe.transformer.modules() if hasattr(m, "_diffusers_hook")]
    assert not any(r.hooks for r in registries) and not pipe.transformer._forward_pre_hooks


# -- run/step/call tracking, shared with the capture ----------------------------------------------------------
def test_capture_and_cache_count_with_the_same_tracker_class():
    assert issubclass(RedundancyCapture, StepTracker) and issubclass(RunTracker, StepTracker)
    for name in ("_before_call", "wrap"):  # the counting and the wrapping are written once
        assert getattr(RunTracker, name) is getattr(RedundancyCapture, name) is getattr(StepTracker, name)


def test_capture_and_cache_see_the_same_steps_and_calls():
    pipe, seen = Pipe(calls=2), []
    listener = SimpleNamespace(before_call=lambda index: seen.append((handle.tracker.step, index)),
                               after_call=lambda: None)
    with capture_redundancy(pipe, branch_layout="single") as cap, applied(pipe, None) as handle:
        handle.tracker.call_listeners.append(listener)
        pipe(torch.randn(2, 5, 4), steps=3)
        pipe(torch.randn(2, 5, 4), steps=3)
    assert seen == [(step, call) for _ in range(2) for step in range(3) for call in range(2)]
    runs = [run for run in cap.runs if not run.empty]
    assert [run.step for run in runs] == [3, 3] and all(sorted(run.batch_sizes) == [0, 1] for run in runs)
    assert {key[1] for run in runs for key in run.series} == {0, 1}  # each call its own series
    assert handle.tracker.final_latents[-1] is not None and is_clean(pipe)


def test_the_tracker_keeps_the_scheduler_signature_and_comes_off():
    pipe = Pipe()
    before = inspect.signature(pipe.scheduler.step)
    tracker = StepTracker(pipe.transformer, pipe.scheduler)
    tracker.install()
    try:
        assert inspect.signature(pipe.scheduler.step) == before  # pipelines inspect it
        pipe(torch.randn(1, 5, 4), steps=4)
        assert (tracker.step, tracker.calls_in_step, tracker.call_index) == (4, 0, None)
        pipe.transformer(torch.randn(1, 5, 4))
        assert (tracker.calls_in_step, tracker.call_index) == (1, 0)
        tracker.start_run()
        assert (tracker.step, tracker.calls_in_step, tracker.call_index) == (0, 0, None)
    finally:
        tracker.remove()
    assert is_clean(pipe)
