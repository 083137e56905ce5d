"""pytest glue: when the plugin turns on, fixtures, parametrization over the selected models, markers.

The plugin is opt-in. pytest imports this module in every run of an environment where the package is
installed, so until a run uses the plugin it only registers its options, ini keys and ``dit_*`` markers: it
imports nothing beyond this module, ``options`` and ``relay`` (no torch), prints no header, leaves ``-n auto``
and torch's thread count alone, and claims no generic marker. It turns on

- when pytest starts, if the run gives a ``--dit-*`` option or a ``dit_*`` ini key (also ``-o dit_...``): the
  options are checked at once (a bad value is a usage error, exit 4), the header names models and device,
  and under pytest-xdist the controller hands one GPU to each worker and ``-n auto`` means one worker per GPU;
- at collection, in the process that collects (the serial run, or each xdist worker), if a collected test
  uses one of its fixtures or ``dit_*`` markers (``pytest suites`` needs no option);
- on the xdist controller, when a worker sends test data (``relay``).

The work is done elsewhere (zoo → capture → profile → statistics → baselines → checks; ``terminal`` prints
the summary, ``report.collector`` writes the report).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pytest

from .options import add_options, requested
from .relay import RELAY_PLUGIN, ControllerRelay

if TYPE_CHECKING:
    from ..judging.baselines import BaselineStore
    from .cache_gate import CacheCheck
    from .cache_tune import TuneCheck
    from ..cache.spec import CacheSpec
    from ..cache.tuning import TuneSpec
    from .checks import SuiteCheck
    from ..capture.profile import RedundancyProfile
    from .session import DitSession
    from ..zoo.registry import ModelSpec

MARKERS = [
    "dit_families(*families): run the test only for models of these families (e.g. 'sd3', 'flux', 'pixart-alpha')",
    "dit_gpu: the test needs a CUDA GPU; skipped with a reason when pytest-ditredundancy runs on another device",
    "dit_cross_model: compares several models; runs after the per-model tests",
]
#: a collected test that uses one of these turns the plugin on
FIXTURES = frozenset({"dit_session", "dit_model", "dit_pipeline", "dit_profile", "dit_baselines", "dit_check",
                      "dit_distinctness", "dit_cache", "dit_cache_check", "dit_cache_tune",
                      "dit_cache_tune_check"})
STATE = pytest.StashKey["DitPlugin"]()


class DitPlugin:
    """Whether the plugin is on in this process, and its session once it is."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        #: what turned the plugin on when pytest started (an option or ini key), or None
        self.reason = requested(config)
        self.session: DitSession | None = None
        self.consumers: list[Any] = []  # controller side: where test data goes (terminal summary, report)
        self.header_shown = False

    def activate(self) -> "DitSession":
        """Turn the plugin on (once): read and check the options, build the session, register the reporters."""
        if self.session is not None:
            return self.session
        from . import cache_options as cache_config
        from .xdist import configure_worker, is_controller, progress_sink
        from .option_steps import read_config
        from .relay import WorkerRelay
        from .report_collector import ReportCollector
        from .session import DitSession, check_models
        from .terminal import DitReporter

        config = self.config
        cfg, specs = check_models(read_config(config), probe_hub=not hasattr(config, "workerinput"))
        dit = DitSession.from_config(configure_worker(config, cfg), specs)
        dit.progress = progress_sink(config)
        cache_config.cache_options(config)  # a bad --dit-cache is a usage error now
        reporter, collector = DitReporter(config, dit), ReportCollector(config, dit)
        config.pluginmanager.register(reporter, "ditredundancy-reporter")
        config.pluginmanager.register(collector, "ditredundancy-report")
        self.consumers = [reporter, collector]
        if not is_controller(config):  # tests run in this process: send their data
            config.pluginmanager.register(WorkerRelay(config, self.deliver), "ditredundancy-relay-worker")
        self.session = dit
        return dit

    def deliver(self, packet: dict[str, Any]) -> None:
        for consumer in self.consumers:
            consumer.ingest(packet)

    def receive(self, packets: list[dict[str, Any]]) -> None:
        """Packets from an xdist worker (the controller turns on if only its workers did)."""
        self.activate()
        for packet in packets:
            self.deliver(packet)


def _state(config: pytest.Config) -> DitPlugin:
    if STATE not in config.stash:
        config.stash[STATE] = DitPlugin(config)
    return config.stash[STATE]


def _session(config: pytest.Config) -> "DitSession":
    return _state(config).activate()


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_cmdline_main(config: pytest.Config):
    state = _state(config)
    if state.reason is not None:  # before xdist resolves -n auto: one worker per GPU
        from .xdist import register_xdist_hooks

        register_xdist_hooks(config)
    if config.pluginmanager.hasplugin("xdist") and not hasattr(config, "workerinput") \
            and not config.pluginmanager.has_plugin(RELAY_PLUGIN):
        config.pluginmanager.register(ControllerRelay(state.receive), RELAY_PLUGIN)
    return (yield)


def pytest_configure(config: pytest.Config) -> None:
    for marker in MARKERS:
        config.addinivalue_line("markers", marker)
    state = _state(config)
    if state.reason is not None and not config.getoption("help", False):
        state.activate()


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    state = _state(config)
    if state.session is None:
        return None
    from .terminal import header_lines

    state.header_shown = True
    return header_lines(config, state.session)


def pytest_report_collectionfinish(config: pytest.Config, items: list[pytest.Item]) -> list[str] | None:
    """The header, for a run the collected tests turned the plugin on in (after the header was printed)."""
    state = _state(config)
    if state.session is None or state.header_shown:
        return None
    from .terminal import header_lines

    state.header_shown = True
    return header_lines(config, state.session)


def _uses_plugin(item: pytest.Item) -> bool:
    if FIXTURES.intersection(getattr(item, "fixturenames", ())):
        return True
    return any(mark.name.startswith("dit_") for mark in item.iter_markers())


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if not FIXTURES.intersection(metafunc.fixturenames):
        return
    dit = _session(metafunc.config)
    if "dit_model" in metafunc.fixturenames:
        models = dit.selected_models()
        metafunc.parametrize("dit_model", models, ids=models, indirect=True, scope="session")
    if "dit_cache" in metafunc.fixturenames:
        from . import cache_options as cache_config

        metafunc.parametrize("dit_cache", cache_config.parameters(metafunc.config), indirect=True)
    if "dit_cache_tune" in metafunc.fixturenames:
        from . import cache_options as cache_config

        metafunc.parametrize("dit_cache_tune", cache_config.tune_parameters(metafunc.config), indirect=True)


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    state = _state(config)
    if state.session is None and not any(_uses_plugin(item) for item in items):
        return
    dit = state.activate()
    on_gpu = dit.device.type == "cuda"
    keep, drop = [], []
    for item in items:
        model = getattr(getattr(item, "callspec", None), "params", {}).get("dit_model")
        families = item.get_closest_marker("dit_families")
        family = _family_of(dit, model) if model is not None and families is not None else None
        # a model whose family cannot be read (broken, unknown) keeps its tests: they fail with the reason
        if family is not None and family not in families.args:
            drop.append(item)
            continue
        if item.get_closest_marker("dit_gpu") is not None and not on_gpu:
            item.add_marker(pytest.mark.skip(reason=f"needs a CUDA GPU; this run uses {dit.device} (--dit-device)"))
        if model is not None:
            item.add_marker(pytest.mark.xdist_group(f"dit-{model}"))  # one model's tests on one worker
        keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    keep.sort(key=lambda item: item.get_closest_marker("dit_cross_model") is not None)
    items[:] = keep


def _family_of(dit: "DitSession", model: str) -> str | None:
    try:
        return dit.spec(model).family
    except Exception:  # unknown or broken model: its tests report the error themselves
        return None


def pytest_collection_finish(session: pytest.Session) -> None:
    """The tests are known: a pool executor (``--dit-executor=ray``) starts on their profiles now."""
    state = _state(session.config)
    if state.session is not None and session.items and not session.config.option.collectonly:
        state.session.prefetch(session.items)


def pytest_deselected(items: list[pytest.Item]) -> None:
    if items:
        state = _state(items[0].config)
        if state.session is not None:
            state.session.deselected += len(items)


# -- fixtures ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def dit_session(pytestconfig: pytest.Config) -> "DitSession":
    """The plugin's session state (settings, loaded pipeline, profile cache, baseline store)."""
    return _session(pytestconfig)


@pytest.fixture(scope="session")
def dit_model(request: pytest.FixtureRequest, dit_session: "DitSession") -> "ModelSpec":
    """The model under test, one of ``--dit-model``; tests using it are parametrized over the selection::

        def test_has_attention(dit_model, dit_pipeline):
            assert dit_model.family in ("pixart-alpha", "sd3")
    """
    from ..zoo.loading import ModelLoadError
    from ..zoo.registry import UnknownModelError

    name = getattr(request, "param", None)
    if name is None:
        raise pytest.UsageError("dit_model is parametrized by the plugin; do not request it indirectly")
    try:
        return dit_session.spec(name)
    except (UnknownModelError, ModelLoadError) as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def dit_pipeline(dit_model: "ModelSpec", dit_session: "DitSession") -> Any:
    """The loaded pipeline of ``dit_model`` (loaded once; the previous model is released first)."""
    return dit_session.slot.get(dit_model)


@pytest.fixture(scope="session")
def dit_profile(dit_model: "ModelSpec", dit_session: "DitSession") -> Callable[..., "RedundancyProfile"]:
    """Factory for profiles of ``dit_model``, computed once per session and settings::

        def test_attention_output_is_most_redundant_late(dit_profile):
            profile = dit_profile()                    # session settings
            fast = dit_profile(steps=10, scheduler="euler")
    """

    def factory(*, steps: int | None = None, scheduler: str | None = None) -> "RedundancyProfile":
        return dit_session.profile(dit_session.request(dit_model, steps=steps, scheduler=scheduler))

    return factory


@pytest.fixture(scope="session")
def dit_baselines(dit_session: "DitSession") -> "BaselineStore":
    """The baseline store (``--dit-baseline-dir``)."""
    return dit_session.store


@pytest.fixture
def dit_check(request: pytest.FixtureRequest, dit_session: "DitSession", dit_model: "ModelSpec") -> "SuiteCheck":
    """The suite checks for ``dit_model``::

        def test_prompt_stability(dit_check):
            dit_check.prompt_stability()
    """
    from .checks import SuiteCheck
    from .shard import DeferredChecks

    if dit_session.config.shard:  # a shard sees some prompts only: the merge judges the suites
        return DeferredChecks(lambda item: SuiteCheck(dit_session, dit_model, item), request.node,
                              dit_session.config.shard)
    return SuiteCheck(dit_session, dit_model, request.node)


@pytest.fixture
def dit_distinctness(request: pytest.FixtureRequest, dit_session: "DitSession") -> Callable[[], Any]:
    """Runs the cross-model distinctness check over every selected model::

        @pytest.mark.dit_cross_model
        def test_models_differ(dit_distinctness):
            dit_distinctness()
    """
    from .checks import model_distinctness
    from .shard import deferred_distinctness

    if dit_session.config.shard:
        return lambda: deferred_distinctness(dit_session, request.node, dit_session.config.shard)
    return lambda: model_distinctness(dit_session, request.node)


@pytest.fixture
def dit_cache(request: pytest.FixtureRequest) -> "CacheSpec":
    """The caching strategy under test, one of ``--dit-cache`` (tests using it are parametrized over them)."""
    from . import cache_options as cache_config

    return cache_config.spec_of(request)


@pytest.fixture
def dit_cache_check(request: pytest.FixtureRequest, dit_session: "DitSession", dit_model: "ModelSpec",
                    dit_cache: "CacheSpec") -> "CacheCheck":
    """The cache gate for ``dit_model`` x ``dit_cache`` (see docs/cache-gate.md)::

        def test_cache_gate(dit_cache_check):
            dit_cache_check.gate()
    """
    from .cache_gate import CacheCheck

    return CacheCheck(dit_session, dit_model, request.node, dit_cache)


@pytest.fixture
def dit_cache_tune(request: pytest.FixtureRequest) -> "TuneSpec":
    """The search under test, one of ``--dit-cache-tune`` (tests using it are parametrized over them)."""
    from . import cache_options as cache_config

    return cache_config.tune_of(request)


@pytest.fixture
def dit_cache_tune_check(request: pytest.FixtureRequest, dit_session: "DitSession", dit_model: "ModelSpec",
                         dit_cache_tune: "TuneSpec") -> "TuneCheck":
    """The cache tuning of ``dit_model`` x ``dit_cache_tune`` (see docs/cache-tuning.md)::

        def test_cache_tune(dit_cache_tune_check):
            dit_cache_tune_check.tune()
    """
    from .cache_tune import TuneCheck

    return TuneCheck(dit_session, dit_model, request.node, dit_cache_tune)
