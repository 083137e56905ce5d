"""pytest-xdist support: one worker per GPU, CPU cores split between workers, progress that reaches the user.

When the plugin is on from the start (a ``--dit-*`` option or ``dit_*`` ini key), the controller hands out
devices as it configures nodes (``pytest_configure_node``) and takes a device back when its node goes down,
so the replacement of a crashed worker gets a free GPU rather than one derived from its ``gwN`` number, and
``-n auto`` starts one worker per visible GPU when CUDA is available. When only the collected tests turn the
plugin on (``pytest suites -n 2``), the controller has not looked at GPUs: each worker then takes GPU
``N mod count`` itself, and ``-n auto`` is xdist's own default. Test data travels in ``relay``.

A crashed worker must not stop the run: under ``--dist loadgroup`` (and ``loadscope``/``loadfile``) the
controller schedules with ``RecoversFromCrashes``, and a SIGTERM to the controller ends the run like Ctrl-C, so
the report is still written.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections import Counter
from contextlib import nullcontext
from dataclasses import replace
from typing import Any, Callable

import pytest

from .options import DitConfig

XDIST_PLUGIN_NAME = "ditredundancy-xdist"
log = logging.getLogger("pytest_ditredundancy")


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def gpu_devices(requested: str) -> list[str]:
    """The GPUs workers may be spread over: every visible CUDA device for ``auto``/``cuda``; none for an
    explicit device (``cuda:1``, ``cpu``, ``mps``), which every worker then uses as given."""
    if requested not in ("auto", "cuda", ""):
        return []
    import torch

    if not torch.cuda.is_available():
        return []
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())]


class DeviceAssigner:
    """Which worker holds which device: a new worker gets the least-used device (a free one while there are
    free ones, in device order); a worker that goes down, finished or crashed, gives its device back."""

    def __init__(self, devices: list[str]) -> None:
        self.devices = list(devices)
        self.holders: dict[str, str] = {}  # worker id -> device

    def acquire(self, worker: str) -> str | None:
        if not self.devices:
            return None
        if worker in self.holders:
            return self.holders[worker]
        load = Counter(self.holders.values())
        device = min(self.devices, key=lambda d: (load[d], self.devices.index(d)))
        self.holders[worker] = device
        return device

    def release(self, worker: str) -> None:
        self.holders.pop(worker, None)


class XdistHooks:
    """Controller-side xdist hooks; registered only when xdist is active (its hook specs exist then)."""

    def __init__(self, config: pytest.Config, devices: list[str] | None = None) -> None:
        self.config = config
        requested = config.getoption("dit_device", None) or config.getini("dit_device") or "auto"
        self.assigner = DeviceAssigner(gpu_devices(requested) if devices is None else devices)
        self.previous_sigterm: Any = None  # the handler to restore at the end of the session

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_auto_num_workers(self, config: pytest.Config) -> int | None:
        return len(self.assigner.devices) or None  # None: xdist's own default (the CPU count)

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        device = self.assigner.acquire(node.gateway.id)
        if device is not None:
            node.workerinput["dit_device"] = device
            shared = sum(d == device for d in self.assigner.holders.values())
            if shared > 1:
                log.warning("%s shares %s with %d other worker(s): more workers than GPUs", node.gateway.id, device,
                            shared - 1)

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: object) -> None:
        self.assigner.release(node.gateway.id)

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node: Any, ids: list[str]) -> None:
        collector = self.config.pluginmanager.get_plugin("ditredundancy-report")
        if collector is not None:
            collector.add_collected(list(ids))

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_make_scheduler(self, config: pytest.Config, log: Any) -> Any:
        scheduler = scheduler_class(config.getvalue("dist"))
        return None if scheduler is None else scheduler(config, log)  # None: xdist's own

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        if is_controller(self.config):
            self.previous_sigterm = _on_sigterm(_terminate)

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.previous_sigterm is not None:
            _on_sigterm(self.previous_sigterm)
            self.previous_sigterm = None


class Terminated(KeyboardInterrupt):
    """SIGTERM (a CI timeout or cancel) on the controller: pytest ends the run as on Ctrl-C, so the workers are
    stopped and the report is written with the tests that did not finish."""


def _terminate(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated("SIGTERM: run stopped; the report lists the tests that did not finish")


def _on_sigterm(handler: Any) -> Any:
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (pytest run inside another program): leave signals alone
        return None


class RecoversFromCrashes:
    """Crash handling for xdist's scope schedulers (``loadgroup``, ``loadscope``, ``loadfile``), which in
    pytest-xdist 3.8 hang or crash-loop when a worker dies (pytest-xdist #1323, #1327, #1371): the test the
    worker died on is not run again (xdist has reported it failed; a second run kills the replacement too),
    only work units with tests left go back on the queue (an empty one leaves a worker waiting forever), and a
    worker that joins after the first distribution gets a next item or is told to finish (a worker runs a test
    only once it knows what comes after it)."""

    def remove_node(self, node: Any) -> str | None:
        workload = self.assigned_work.pop(node)
        left = [(scope, nodeid) for scope, unit in workload.items() for nodeid, done in unit.items() if not done]
        if not left:
            return None
        scope, crashitem = left[0]  # a worker runs its tests in the order they were sent
        workload[scope][crashitem] = True
        for key, unit in workload.items():
            if not all(unit.values()):
                self.workqueue[key] = unit
        for other in self.assigned_work:
            self._reschedule(other)
        return crashitem

    def schedule(self) -> None:
        if self.collection is None:  # the first distribution, which xdist does right
            return super().schedule()  # type: ignore[misc]
        for node in self.nodes:
            self._reschedule(node)
            self._reschedule(node)  # a second unit, or shutdown when none is left: a next item either way


def scheduler_class(dist: str) -> type | None:
    """The scheduler for ``--dist`` DIST when xdist's own mishandles a crashed worker, else None."""
    from xdist.scheduler import LoadFileScheduling, LoadGroupScheduling, LoadScopeScheduling

    bases = {"loadgroup": LoadGroupScheduling, "loadscope": LoadScopeScheduling, "loadfile": LoadFileScheduling}
    base = bases.get(dist)
    return None if base is None else type(base.__name__, (RecoversFromCrashes, base), {})


def is_controller(config: pytest.Config) -> bool:
    """Whether this process is an xdist controller (it runs no tests; xdist's own test for starting one)."""
    if hasattr(config, "workerinput"):
        return False
    return getattr(config.option, "dist", "no") != "no" and not getattr(config.option, "collectonly", False)


def register_xdist_hooks(config: pytest.Config) -> None:
    """Called before xdist reads ``-n auto``; a no-op without xdist (or with ``-p no:xdist``)."""
    if config.pluginmanager.hasplugin("xdist") and not config.pluginmanager.has_plugin(XDIST_PLUGIN_NAME):
        config.pluginmanager.register(XdistHooks(config), XDIST_PLUGIN_NAME)


def configure_worker(config: pytest.Config, cfg: DitConfig) -> DitConfig:
    """On an xdist worker: take the device the controller assigned (else GPU ``N mod count``), and on CPU use
    this worker's share of the cores (two workers each using every core would slow both down). Runs when the
    plugin turns on, never in a run that does not use it."""
    workerinput = getattr(config, "workerinput", None)
    if not workerinput:
        return cfg
    if workerinput.get("dit_device"):
        cfg = replace(cfg, device=workerinput["dit_device"])
    else:  # the controller assigned none: it saw no GPU, or the plugin was off there (turned on by collection)
        gpus = gpu_devices(cfg.device)
        if gpus:
            index = int(str(workerinput.get("workerid", "gw0"))[2:] or 0)
            cfg = replace(cfg, device=gpus[index % len(gpus)])
    if cfg.device == "cpu" or (cfg.device == "auto" and not workerinput.get("dit_device") and not _cuda()):
        import torch

        torch.set_num_threads(max(1, cpu_count() // max(1, int(workerinput.get("workercount", 1)))))
    return cfg


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def progress_sink(config: pytest.Config) -> Callable[[str], None]:
    """Where profiling progress goes. Serial run: a line on the terminal, written past output capture.
    xdist worker: a ``[gwN]`` line on the worker's stderr, which xdist passes through to the terminal
    (written past capture too). Always: an INFO record of logger ``pytest_ditredundancy``, so it is in the
    test's captured log and live with ``--log-cli-level=INFO``."""
    worker = getattr(config, "workerinput", {}).get("workerid")

    def emit(message: str) -> None:
        log.info(message)
        capman = config.pluginmanager.getplugin("capturemanager")
        with capman.global_and_fixture_disabled() if capman is not None else nullcontext():
            terminal = config.pluginmanager.getplugin("terminalreporter")
            if worker is None and terminal is not None:
                if getattr(getattr(terminal, "_tw", None), "width_of_current_line", 0):
                    terminal.write("\n")  # -q: the line of dots is open (write_line only ends a path's line)
                terminal.write_line(f"ditredundancy: {message}")
            else:
                sys.stderr.write(f"ditredundancy [{worker or 'main'}] {message}\n")
                sys.stderr.flush()

    return emit
