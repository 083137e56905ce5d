"""Which steps a cache will skip, predicted from the redundancy profile before anything is run.

FBCache and cache-dit's DBCache compare the relative L1 change of the first blocks' residual since the last computed
step with a threshold; MagCache accumulates how far the residual's magnitude ratios stray from 1; the profile
measures the relative change of every attention layer's output between consecutive steps. Each family gets a
predictor (registry :data:`PREDICTORS`) that estimates the cache's per-step quantity from the profile
(``indicator``) and replays the cache's own rule on it (``predict``): warm-up, limits, and a stored reference that
is not refreshed on a cached step, so the change since the last computed step is taken as the *sum* of the
consecutive changes (exact when the tensor drifts one way, an over-estimate otherwise). ``breakpoints`` gives the
values where the predicted pattern changes, so a search can try one value per pattern.

The profile sees attention outputs, not block residuals (those add the timestep gates, the feed-forward and the
other attention of the block): the scale may differ while the ordering of steps holds, which ``calibrated`` corrects
from one measured run. Where the ordering does not hold either the errors show it; docs/cache-tuning.md has the
numbers measured on the trained models.

    predictor = FBCachePredictor()
    prediction = predictor.predict(profile, {"threshold": 0.2})
    prediction.cached_steps, prediction.compare(measured_shares).as_dict()
    predictor.breakpoints(profile, "threshold", 0.02, 0.5)  # one search value per predicted pattern
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from ..capture.profile import RedundancyProfile
from .predict_core import (Choice, Count, Fixed, Inert, Param, PredictInputError, Prediction, PredictionError,
                           Predictor, Threshold, Unmodelled)
from .schedule import derive_mask, profile_costs, skip_order

__all__ = ["PREDICTORS", "BoundPredictor", "CacheDitPredictor", "Choice", "Count", "FBCachePredictor", "Fixed", "Inert",
           "MagCachePredictor", "Param", "PredictInputError", "Prediction", "PredictionError", "Predictor",
           "ProfilePredictor", "Threshold", "Unmodelled", "bind", "predictor_for"]


@dataclass
class Context:
    """The profile's attention outputs, checked, with the transformer blocks they belong to; ``memo`` keeps what a
    family derives from them per parameter value (a replay runs many times during a search)."""

    profile: RedundancyProfile
    steps: int
    rel: np.ndarray  # [prompt, branch, layer, step_pair] relative L1 change of the attention output
    abs: np.ndarray  # the same, mean absolute change
    blocks: list[list[int]]
    memo: dict[Any, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, profile: RedundancyProfile) -> "Context":
        rel = attention_values(profile, "rel_l1")
        return cls(profile, profile.num_step_pairs + 1, rel, attention_values(profile, "abs_l1"),
                   block_layers(profile.layers))

    @property
    def layers(self) -> list[str]:
        return self.profile.layers

    def change(self, layers: Sequence[int], what: str) -> np.ndarray:
        """Per step: the relative change since the step before, averaged over ``layers``; NaN at step 0."""
        key = ("change", tuple(layers))
        if key not in self.memo:
            self.memo[key] = np.concatenate([[np.nan], layer_mean(self.rel, layers, what, self.layers)])
        return self.memo[key]


def attention_values(profile: RedundancyProfile, metric: str) -> np.ndarray:
    """``[prompt, branch, layer, step_pair]`` of the attention outputs (kind ``a``), NaN where unmeasured; refuses
    profiles without them and profiles with measured non-finite cells."""
    if "a" not in profile.kinds:
        raise PredictInputError(f"the profile has no attention output series (kind 'a'; it has "
                                f"{', '.join(profile.kinds)}); profile the model with kind 'a' (the default kinds)")
    if profile.num_step_pairs < 1:
        raise PredictInputError("the profile has no step pairs; profile at least 2 denoising steps")
    k = profile.kinds.index("a")
    computed = profile.computed[:, :, k]
    for name in ("rel_l1", "abs_l1"):
        bad = computed & ~np.isfinite(profile.values[name][:, :, k])
        if bad.any():
            p, b, l, s = (int(i[0]) for i in np.nonzero(bad))
            raise PredictInputError(f"the profile has non-finite {name} at layer {profile.layers[l]}, step pair {s}, "
                                    f"prompt {p}, branch {profile.branches[b]}: the model produced NaN/inf there; "
                                    "fix the run (dtype, weights) and profile again")
    return np.where(computed, profile.values[metric][:, :, k], np.nan).astype(np.float64)


def block_layers(layers: Sequence[str]) -> list[list[int]]:
    """Attention layer indices grouped by transformer block (the name up to the layer's own part), in order."""
    blocks: dict[str, list[int]] = {}
    for i, name in enumerate(layers):
        blocks.setdefault(name.rpartition(".")[0] or name, []).append(i)
    return list(blocks.values())


def layer_mean(values: np.ndarray, layers: Sequence[int], what: str, names: Sequence[str]) -> np.ndarray:
    """Mean over prompts, branches and ``layers`` per step pair; every step pair must have a measured value."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(values[:, :, list(layers)], axis=(0, 1, 2))
    if not np.isfinite(mean).all():
        pair = int(np.flatnonzero(~np.isfinite(mean))[0])
        raise PredictInputError(f"{what}: step pair {pair} has no measured value for layers "
                                f"{', '.join(names[i] for i in layers)}; profile every step")
    return mean


class AttentionPredictor(Predictor):
    """A predictor that reads the profile's attention outputs (kind ``a``)."""

    def context(self, profile: RedundancyProfile) -> Context:
        return Context.of(profile)


def _need_blocks(ctx: Context, strategy: str, count: int) -> None:
    if len(ctx.blocks) < count:
        raise PredictInputError(f"{strategy} needs at least {count} transformer blocks; the profile's attention layers "
                                f"form {len(ctx.blocks)} ({', '.join(ctx.layers[:3])}, ...)")


class FBCachePredictor(AttentionPredictor):
    """diffusers' First Block Cache. The cache runs the first block, takes its residual (output minus input) and
    skips the rest of the stack when ``mean|r_s - r_ref| / mean|r_ref| <= threshold``, where ``r_ref`` is the
    residual of the last *computed* step. Estimate: the relative L1 change of the first block's attention outputs
    (its ``attn1``, ``attn2``, ... averaged, over prompts and CFG branches too: the cache decides on the whole
    batch), summed since the last computed step. The block's residual also holds the timestep gates and the
    feed-forward, which the profile does not see."""

    strategy = "fbcache"
    threshold = "threshold"
    params = (Threshold("threshold", 0.05, doc="skip when the change since the last computed step is at most this"),)

    def series(self, ctx, values):
        _need_blocks(ctx, self.strategy, 2)
        return ctx.change(ctx.blocks[0], "fbcache")

    def trace(self, ctx, values, eff):
        change = self.series(ctx, values)
        share = 1.0 - len(ctx.blocks[0]) / len(ctx.layers)
        out, compared, since = np.zeros(ctx.steps), [], 0.0
        for s in range(1, ctx.steps):
            since += change[s]
            compared.append(since)
            if since <= eff:
                out[s] = share
            else:
                since = 0.0
        return out, compared


class CacheDitPredictor(AttentionPredictor):
    """cache-dit's DBCache. The first ``Fn`` blocks always run; their residual is compared with the one stored at
    the last computed step (``mean|diff| / mean|stored| < rdt`` caches; ``rdt`` >= 1 always caches, <= 0 never);
    steps ``0, warmup_interval, ... < warmup`` are never cached, nor a step after ``max_cached_steps`` cached steps
    or ``max_continuous_cached_steps`` in a row (-1: no limit). The last ``Bn`` blocks run on cached steps too.
    Estimate: the relative L1 change of the attention outputs of the first ``Fn`` blocks, summed since the last
    computed step. Defaults are the ``cachedit`` strategy's (cache-dit's own, but ``Fn=1``)."""

    strategy = "cachedit"
    threshold = "rdt"
    params = (Count("Fn", 1, minimum=1, doc="blocks always computed first; their residual decides"),
              Count("Bn", 0, minimum=0, doc="blocks always computed last"),
              Threshold("rdt", 0.08, special=(1.0,), doc="residual diff threshold"),
              Count("warmup", 8, minimum=0, doc="max_warmup_steps: steps before it are never cached"),
              Count("warmup_interval", 1, minimum=1, doc="only every n-th warm-up step is forced to compute"),
              Count("max_cached_steps", -1, minimum=-1), Count("max_continuous_cached_steps", -1, minimum=-1),
              Inert("taylorseer", 0, minimum=0, doc="TaylorSeer order: changes what a cached step returns, not when"),
              Unmodelled("max_accumulated_rdt", None, why="a budget on the summed diffs of the whole run"),
              Unmodelled("separate_cfg", None, allowed=(None, False), why="CFG branches as separate calls"))

    def _blocks(self, ctx: Context, values: dict[str, Any]) -> tuple[list[int], float]:
        fn, bn = values["Fn"], values["Bn"]
        if fn + bn > len(ctx.blocks):
            raise PredictInputError(f"cachedit: Fn={fn} + Bn={bn} blocks exceed the model's {len(ctx.blocks)} "
                                    f"transformer blocks; use Fn=1,Bn=0")
        first = [i for block in ctx.blocks[:fn] for i in block]
        last = [i for block in ctx.blocks[len(ctx.blocks) - bn:] for i in block] if bn else []
        return first, 1.0 - (len(first) + len(last)) / len(ctx.layers)

    def series(self, ctx, values):
        return ctx.change(self._blocks(ctx, values)[0], f"cachedit Fn={values['Fn']}")

    def count_cap(self, ctx, name, values):
        if name in ("Fn", "Bn"):
            return len(ctx.blocks) - values["Bn" if name == "Fn" else "Fn"]
        return ctx.steps + 1

    def trace(self, ctx, values, eff):
        change, share = self.series(ctx, values), self._blocks(ctx, values)[1]
        rdt, most, run = values["rdt"], values["max_cached_steps"], values["max_continuous_cached_steps"]
        warm = set(range(0, values["warmup"], values["warmup_interval"]))
        out, compared = np.zeros(ctx.steps), []
        since, cached, streak, stored = 0.0, 0, 0, False
        for s in range(ctx.steps):
            since += change[s] if s else 0.0
            hit = False
            if s not in warm and stored and not (0 <= most <= cached) and not (0 <= run <= streak) and rdt > 0:
                if rdt >= 1.0:
                    hit = True
                else:
                    compared.append(since)
                    hit = since < eff
            if hit:
                out[s], cached, streak = share, cached + 1, streak + 1
            else:
                since, streak, stored = 0.0, 0, True
        return out, compared


class MagCachePredictor(AttentionPredictor):
    """diffusers' MagCache. From step ``int(retention_ratio * steps + 0.5)`` on, the cache multiplies the residual's
    magnitude ratio of each step into an accumulated ratio and adds ``|1 - ratio|`` to an accumulated error; it skips
    the whole stack while the error is at most ``threshold`` and at most ``max_skip_steps`` steps were skipped in a
    row, else computes and resets. Estimate of the ratios: the mean absolute attention output of every layer
    (``abs_l1 / rel_l1`` of a step pair is the mean |x| of its first step), summed over layers, step over step; the
    last step's magnitude is not in the profile, so its ratio repeats the one before. ``ratios``: replay on the
    cache's own (calibrated) ratios instead: then only the rule is predicted, exactly."""

    strategy = "magcache"
    threshold = "threshold"
    params = (Threshold("threshold", 0.06), Count("max_skip_steps", 3, minimum=1),
              Fixed("retention_ratio", 0.2, minimum=0.0, doc="share of the first steps never skipped"),
              Choice("mag_ratios", "calibrate", choices=("calibrate", "flux")))

    def __init__(self, *, scale: float = 1.0, ratios: Sequence[float] | None = None) -> None:
        super().__init__(scale=scale)
        self.ratios = None if ratios is None else [float(r) for r in ratios]
        if self.ratios is not None and (not self.ratios or not np.isfinite(self.ratios).all()):
            raise PredictInputError(f"magcache ratios must be a non-empty list of finite numbers, got {ratios!r}")

    def _options(self):
        return {"ratios": self.ratios}

    def series(self, ctx, values):
        if self.ratios is not None:  # the cache stretches its table to the step count by nearest index
            index = np.round(np.arange(ctx.steps) * (len(self.ratios) - 1) / max(ctx.steps - 1, 1)).astype(int)
            return np.asarray(self.ratios)[index] if ctx.steps > 1 else np.asarray(self.ratios[-1:])
        if values["mag_ratios"] == "flux":
            raise PredictInputError("magcache:mag_ratios=flux uses Flux's fixed ratios, not this model's: pass them, "
                                    "MagCachePredictor(ratios=diffusers.hooks.mag_cache.FLUX_MAG_RATIOS)")
        if "ratios" not in ctx.memo:
            with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
                warnings.simplefilter("ignore", RuntimeWarning)
                size = np.where(np.isinf(ctx.rel), 0.0, ctx.abs / ctx.rel)  # mean |x| of each pair's first step
                total = np.nansum(np.nanmean(size, axis=(0, 1)), axis=0)  # [step_pair]: steps 0 .. steps-2
            if not (np.isfinite(total).all() and (total > 0).all()):
                raise PredictInputError("magcache: the profile's attention outputs have no magnitude at some step "
                                        "(all-zero outputs); MagCache's ratios cannot be estimated from it")
            ratios = np.ones(ctx.steps)
            ratios[1:ctx.steps - 1] = total[1:] / total[:-1]
            ratios[ctx.steps - 1] = ratios[ctx.steps - 2] if ctx.steps > 2 else 1.0
            ctx.memo["ratios"] = ratios
        return ctx.memo["ratios"]

    def trace(self, ctx, values, eff):
        _need_blocks(ctx, self.strategy, 2)
        ratios = self.series(ctx, values)
        start = int(values["retention_ratio"] * ctx.steps + 0.5)
        out, compared = np.zeros(ctx.steps), []
        ratio, row, error, stored = 1.0, 0, 0.0, False
        for s in range(ctx.steps):
            hit = False
            if s >= start:
                ratio, row = ratio * ratios[s], row + 1
                error += abs(1.0 - ratio)
                if stored and row <= values["max_skip_steps"]:
                    compared.append(error)
                    hit = error <= eff
                if not hit:
                    ratio, row, error = 1.0, 0, 0.0
            out[s] = 1.0 if hit else 0.0
            stored = stored or not hit
        return out, compared

    def candidates(self, ctx, name, values):
        return [(k - 0.5) / ctx.steps for k in range(1, ctx.steps + 1)]  # where int(r * steps + 0.5) steps up


class ProfilePredictor(AttentionPredictor):
    """This package's static schedule (``profile:budget=`` / ``threshold=``): the prediction is the schedule's mask
    itself, per step the share of attention layers reused, so it is exact by construction. The indicator is the mean
    cost (relative L1 change of the attention output) of the step's layers."""

    strategy = "profile"
    params = (Fixed("budget", None, minimum=0.0, below=1.0, doc="share of attention calls skipped"),
              Fixed("threshold", None, minimum=0.0, doc="most summed cost of the skipped cells"),
              Unmodelled("schedule", None, why="a schedule file fixes the mask: its pattern is "
                                               "CacheSchedule.load(path).array.mean(axis=0)"))

    def _costs(self, ctx: Context) -> np.ndarray:
        if "costs" not in ctx.memo:
            ctx.memo["costs"] = profile_costs(ctx.profile)
        return ctx.memo["costs"]

    def series(self, ctx, values):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(self._costs(ctx), axis=0)

    def trace(self, ctx, values, eff):
        budget, threshold = values["budget"], values["threshold"]
        if budget is None and threshold is None:
            budget = 0.3  # what profile with neither means (cache.spec)
        mask = derive_mask(self._costs(ctx), budget=budget, threshold=threshold)
        return mask.mean(axis=0), []

    def candidates(self, ctx, name, values):
        costs = self._costs(ctx)
        if name == "budget":  # derive_mask takes floor(budget * cells + 1e-9) cells
            return [(k - 1e-9) / costs.size for k in range(1, len(skip_order(costs)) + 1)]
        sums, total = [], 0.0
        for layer, step in skip_order(costs):
            total += costs[layer, step]
            sums.append(total)
        return sums


PREDICTORS: dict[str, type[Predictor]] = {cls.strategy: cls for cls in (
    FBCachePredictor, CacheDitPredictor, MagCachePredictor, ProfilePredictor)}


def predictor_for(strategy: str, **options: Any) -> Predictor:
    """The predictor of ``strategy`` (``options``: e.g. ``scale``, MagCache's ``ratios``)."""
    if strategy not in PREDICTORS:
        raise PredictInputError(f"no prediction for strategy {strategy!r}; the profile predicts "
                                f"{', '.join(PREDICTORS)}")
    return PREDICTORS[strategy](**options)


@dataclass
class BoundPredictor:
    """A predictor with its profile and a search's fixed parameters: what the tuning asks of the prediction. The
    first measured point of the searched threshold above 0 calibrates the scale (:meth:`Predictor.calibrated`);
    every later point then reports the raw and the calibrated error (the calibrating point's own is in-sample)."""

    predictor: Predictor
    profile: RedundancyProfile
    fixed: dict[str, Any] = field(default_factory=dict)
    calibration: Predictor | None = None
    calibrated_on: float | None = None

    def prediction(self, param: str, value: float, *, calibrated: bool = False) -> Prediction:
        use = self.calibration if calibrated and self.calibration is not None else self.predictor
        return use.predict(self.profile, {**self.fixed, param: value})

    def breakpoints(self, param: str, lo: float, hi: float) -> list[float]:
        use = self.calibration or self.predictor
        return use.breakpoints(self.profile, param, lo, hi, self.fixed)

    def calibrate(self, param: str, value: float, measured: Sequence[float]) -> Predictor:
        self.calibration = self.predictor.calibrated(self.profile, measured, {**self.fixed, param: value})
        self.calibrated_on = value
        return self.calibration

    def predicted(self, param: str, value: float, measured: Sequence[float]) -> dict[str, Any]:
        """The prediction for ``param=value`` and its error against the measured shares, as plain builtins."""
        if self.calibration is None and param == self.predictor.threshold and value > 0:  # at 0 nothing is learnt
            self.calibrate(param, value, measured)
        raw = self.prediction(param, value)
        out: dict[str, Any] = {"strategy": raw.strategy, "param": param, "value": value,
                               "predicted_steps": raw.cached_steps, "fractions": raw.fractions,
                               "raw": raw.compare(measured).as_dict(), "calibrated": None}
        if self.calibration is not None:
            cal = self.prediction(param, value, calibrated=True)
            out.update(calibrated=cal.compare(measured).as_dict(), scale=self.calibration.scale,
                       calibrated_on=self.calibrated_on, calibrated_steps=cal.cached_steps)
        return out


def bind(strategy: str, profile: RedundancyProfile, fixed: Mapping[str, Any] | None = None,
         **options: Any) -> BoundPredictor:
    """A :class:`BoundPredictor` for ``strategy`` on ``profile``; ``fixed``: the typed parameters that stay put
    (``CacheSpec.params`` without the searched one). Checks the profile and the parameters now."""
    predictor = predictor_for(strategy, **options)
    values = predictor.values(fixed)
    predictor.series(predictor.context(profile), values)
    return BoundPredictor(predictor, profile, dict(fixed or {}))

