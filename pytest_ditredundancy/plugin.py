"""pytest glue: options, fixtures, parametrization over the selected models, markers, and the summary.

The work is done elsewhere (zoo → capture → profile → statistics → baselines → checks); this module only
wires it into pytest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest

from .baselines import BaselineStore, relative, stale_baselines
from .cache import config as cache_config
from .cache.check import CacheCheck
from .cache.spec import CacheSpec
from .checks import SuiteCheck, model_distinctness
from .distributed import configure_worker, progress_sink, register_xdist_hooks
from .environment import versions
from .options import add_options, read_config
from .profile import RedundancyProfile
from .report.collector import ReportCollector
from .session import BASELINE_USED_KEY, RECORD_KEY, SESSION_KEY, DitSession
from .shard import DeferredChecks, deferred_distinctness
from .zoo.loading import resolve_spec
from .zoo.registry import ModelSpec, UnknownModelError

MARKERS = [
    "dit_families(*families): run the test only for models of these families (e.g. 'sd3', 'flux', 'pixart-alpha')",
    "gpu: the test needs a CUDA GPU; skipped with a reason on CPU runs",
    "dit_cross_model: compares several models; runs after the per-model tests",
]


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_cmdline_main(config: pytest.Config):
    register_xdist_hooks(config)  # before xdist resolves -n auto
    return (yield)


def pytest_configure(config: pytest.Config) -> None:
    for marker in MARKERS:
        config.addinivalue_line("markers", marker)
    dit = DitSession.from_config(configure_worker(config, read_config(config)))
    dit.progress = progress_sink(config)
    config.stash[SESSION_KEY] = dit
    cache_config.cache_options(config)  # a bad --dit-cache is a usage error now
    config.pluginmanager.register(DitReporter(dit), "ditredundancy-reporter")
    config.pluginmanager.register(ReportCollector(config, dit), "ditredundancy-report")


def _session(config: pytest.Config) -> DitSession:
    return config.stash[SESSION_KEY]


def pytest_report_header(config: pytest.Config) -> list[str]:
    session = _session(config)
    cfg = session.config
    v = versions()
    models = ", ".join(session.selected_models())
    seed = f"seed {cfg.seed}" if cfg.noise_seed is not None else "each model's study seed"
    return [
        f"ditredundancy: models: {models}",
        f"ditredundancy: device {session.device} ({cfg.dtype} dtype), protocol {cfg.protocol}, {cfg.num_prompts} prompts"
        f"{' from ' + cfg.prompt_source if cfg.prompt_source else ''}, {seed}, baselines in "
        f"{relative(cfg.baseline_dir, config.rootpath)}{' (UPDATING)' if cfg.update_baselines else ''}",
        f"ditredundancy: torch {v['torch']}, diffusers {v['diffusers']}, transformers {v['transformers']}",
    ]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "dit_model" in metafunc.fixturenames:
        models = _session(metafunc.config).selected_models()
        metafunc.parametrize("dit_model", models, ids=models, indirect=True, scope="session")
    if "dit_cache" in metafunc.fixturenames:
        metafunc.parametrize("dit_cache", cache_config.parameters(metafunc.config), indirect=True)


def _family_of(name: str) -> str | None:
    try:
        return resolve_spec(name).family
    except Exception:  # unknown or broken model: its tests report the error themselves
        return None


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    dit = _session(config)
    on_gpu = dit.device.type == "cuda"
    keep, drop = [], []
    for item in items:
        model = getattr(getattr(item, "callspec", None), "params", {}).get("dit_model")
        families = item.get_closest_marker("dit_families")
        family = _family_of(model) if model is not None and families is not None else None
        # a model whose family cannot be read (broken, unknown) keeps its tests: they fail with the reason
        if family is not None and family not in families.args:
            drop.append(item)
            continue
        if item.get_closest_marker("gpu") is not None and not on_gpu:
            item.add_marker(pytest.mark.skip(reason=f"needs a CUDA GPU; this run uses {dit.device} (--dit-device)"))
        if model is not None:
            item.add_marker(pytest.mark.xdist_group(f"dit-{model}"))  # one model's tests on one worker
        keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    keep.sort(key=lambda item: item.get_closest_marker("dit_cross_model") is not None)
    items[:] = keep


def pytest_deselected(items: list[pytest.Item]) -> None:
    if items:
        config = items[0].config
        _session(config).deselected += len(items)


# -- fixtures ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def dit_session(pytestconfig: pytest.Config) -> DitSession:
    """The plugin's session state (settings, loaded pipeline, profile cache, baseline store)."""
    return _session(pytestconfig)


@pytest.fixture(scope="session")
def dit_model(request: pytest.FixtureRequest) -> ModelSpec:
    """The model under test, one of ``--dit-model``; tests using it are parametrized over the selection::

        def test_has_attention(dit_model, dit_pipeline):
            assert dit_model.family in ("pixart-alpha", "sd3")
    """
    name = getattr(request, "param", None)
    if name is None:
        raise pytest.UsageError("dit_model is parametrized by the plugin; do not request it indirectly")
    try:
        return resolve_spec(name)
    except UnknownModelError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def dit_pipeline(dit_model: ModelSpec, dit_session: DitSession) -> Any:
    """The loaded pipeline of ``dit_model`` (loaded once; the previous model is released first)."""
    return dit_session.slot.get(dit_model)


@pytest.fixture(scope="session")
def dit_profile(dit_model: ModelSpec, dit_session: DitSession) -> Callable[..., RedundancyProfile]:
    """Factory for profiles of ``dit_model``, computed once per session and settings::

        def test_attention_output_is_most_redundant_late(dit_profile):
            profile = dit_profile()                    # session settings
            fast = dit_profile(steps=10, scheduler="euler")
    """

    def factory(*, steps: int | None = None, scheduler: str | None = None) -> RedundancyProfile:
        return dit_session.profile(dit_model, steps=steps, scheduler=scheduler)

    return factory


@pytest.fixture(scope="session")
def dit_baselines(dit_session: DitSession) -> BaselineStore:
    """The baseline store (``--dit-baseline-dir``)."""
    return dit_session.store


@pytest.fixture
def dit_check(request: pytest.FixtureRequest, dit_session: DitSession, dit_model: ModelSpec) -> SuiteCheck:
    """The suite checks for ``dit_model``::

        def test_prompt_stability(dit_check):
            dit_check.prompt_stability()
    """
    if dit_session.config.shard:  # a shard sees some prompts only: the merge judges the suites
        return DeferredChecks(lambda item: SuiteCheck(dit_session, dit_model, item), request.node,
                              dit_session.config.shard)
    return SuiteCheck(dit_session, dit_model, request.node)


@pytest.fixture
def dit_distinctness(request: pytest.FixtureRequest, dit_session: DitSession) -> Callable[[], Any]:
    """Runs the cross-model distinctness check over every selected model::

        @pytest.mark.dit_cross_model
        def test_models_differ(dit_distinctness):
            dit_distinctness()
    """
    if dit_session.config.shard:
        return lambda: deferred_distinctness(dit_session, request.node, dit_session.config.shard)
    return lambda: model_distinctness(dit_session, request.node)


@pytest.fixture
def dit_cache(request: pytest.FixtureRequest) -> CacheSpec:
    """The caching strategy under test, one of ``--dit-cache`` (tests using it are parametrized over them)."""
    return cache_config.spec_of(request)


@pytest.fixture
def dit_cache_check(request: pytest.FixtureRequest, dit_session: DitSession, dit_model: ModelSpec,
                    dit_cache: CacheSpec) -> CacheCheck:
    """The cache gate for ``dit_model`` x ``dit_cache`` (see the README section Cache gate)::

        def test_cache_gate(dit_cache_check):
            dit_cache_check.gate()
    """
    return CacheCheck(dit_session, dit_model, request.node, dit_cache)


# -- results and summary ------------------------------------------------------------------------------------------
class DitReporter:
    """Collects suite records from test reports (local or sent by xdist workers) and prints the summary."""

    def __init__(self, dit: DitSession) -> None:
        self.dit = dit
        self.whole_suite_ran = False

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        for name, value in getattr(report, "user_properties", ()):
            if name == RECORD_KEY and report.when == "call":
                self.dit.records.append(value)
            elif name == BASELINE_USED_KEY:
                self.dit.baselines_used.add(value)

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        option = session.config.option
        self.whole_suite_ran = (not self.dit.deselected and not getattr(option, "keyword", "")
                                and not getattr(option, "markexpr", "") and not session.shouldstop
                                and not session.shouldfail and session.testscollected > 0)
        self.dit.close()

    def pytest_terminal_summary(self, terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
        if not self.dit.records:
            return
        terminalreporter.section("ditredundancy")
        for line in summary_lines(self.dit.records):
            terminalreporter.write_line(line)
        if self.whole_suite_ran:
            self.dit.store.used = {Path(p).resolve() for p in self.dit.baselines_used}
            stale = stale_baselines(self.dit.store, self.dit.selected_models())
            if stale:
                terminalreporter.write_line("stale baselines (no test used them; delete them if their settings are gone):")
                for path in stale:
                    terminalreporter.write_line(f"  {relative(path, config.rootpath)}")


def summary_lines(records: list[dict]) -> list[str]:
    """One line per model with its key numbers, and one line for the cross-model comparison."""
    by_model: dict[str, list[dict]] = {}
    pairs = [r for r in records if r["suite"] == "model_distinctness"]
    for record in records:
        if record["suite"] != "model_distinctness":
            by_model.setdefault(record["model"], []).append(record)
    lines = []
    for model, entries in by_model.items():
        parts = []
        judged = [e for e in entries if e.get("question") not in ("claim", "info")]
        cvs = [f"{e['kind']}={e['value']:.3f}" for e in judged
               if e["suite"] == "prompt_stability" and e.get("value") is not None]
        if cvs:
            parts.append("CV " + " ".join(cvs))
        for suite, label in (("step_stability", "steps r>="), ("scheduler_stability", "schedulers r>=")):
            values = [e["value"] for e in judged if e["suite"] == suite and e.get("value") is not None]
            if values:
                parts.append(f"{label}{min(values):.3f}")
        drift = [e for e in entries if e["suite"] == "baseline_regression"]
        if drift:
            parts.append(f"baseline drift {int(drift[-1]['value'] or 0)} cells")
        parts += [f"cache {e['strategy']} PSNR {e['value']:.1f} skip {e['skipped']['attention']:.0%} "
                  f"x{e['speedup']:.2f}" + (f" adherence {e['adherence']['cached']:.0%}" if e.get("adherence") else "")
                  for e in entries if e["suite"] == "cache_gate" and e.get("value") is not None]
        broken = sum(e.get("question") == "claim" and e.get("met") is False for e in entries)
        if broken:
            parts.append(f"{broken} stability claim{'s' if broken != 1 else ''} not met")
        failed = sum(not e["passed"] for e in entries)
        lines.append(f"{model}: {'FAIL' if failed else 'ok'}; " + "; ".join(parts))
    if pairs:
        worst = min(pairs, key=lambda r: float("inf") if r["value"] is None else r["value"])
        failed = sum(not r["passed"] for r in pairs)
        value = "inf" if worst["value"] is None else f"{worst['value']:.2f}"
        lines.append(f"model distinctness: {'FAIL' if failed else 'ok'}; {len(pairs)} pairs, lowest "
                     f"between/within {value} ({worst['model']}){f'; {failed} pairs not distinct' if failed else ''}")
    return lines
