"""How each test's data (suite records, baseline files used, profile summaries, deferred suite calls) reaches
the process that prints the summary and writes the report, without ``user_properties``: pytest writes those
into JUnit XML, and a profile summary is tens of kilobytes.

Where a test runs, its data is kept on the item (:func:`emit`; ``item.stash``) and, when the test is done,
sent as one *packet* of plain JSON builtins ``{"nodeid", "data": [[key, value], ...]}``:

- in a serial run, straight to the controller-side consumers (the terminal summary and the report);
- on a pytest-xdist worker, appended to the worker's spool file (one flushed JSON line per test, in a
  temporary directory the controller names) and gathered into ``config.workeroutput``, which xdist hands to
  the controller when the worker finishes (as syrupy does). The controller takes a finished worker's packets
  from ``workeroutput`` and, when a worker crashed, the packets of the tests it had finished from its spool
  file; either way it removes the file.

Nothing here imports torch: the controller-side half is registered in every xdist run (it costs one
``workerinput`` string per worker) and wakes the plugin only when a worker actually sends data.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest

from ..io import plain

#: per-item list of (key, value) pairs a test produced
ITEM_DATA = pytest.StashKey[list]()
#: the key of our data in ``workerinput`` (spool directory) and ``workeroutput`` (packets)
XDIST_KEY = "ditredundancy"
RELAY_PLUGIN = "ditredundancy-relay"


def emit(item: Any, key: str, value: Any) -> None:
    """Add ``(key, value)`` to the data of ``item`` (a pytest item, or anything with a dict-like ``stash``)."""
    item.stash.setdefault(ITEM_DATA, []).append((key, value))


def emitted(item: Any, key: str | None = None) -> list:
    """The values ``item`` emitted under ``key``, or every ``(key, value)`` pair when ``key`` is None."""
    pairs = item.stash.get(ITEM_DATA, [])
    return list(pairs) if key is None else [value for name, value in pairs if name == key]


def packet(item: Any) -> dict[str, Any] | None:
    """The test's data as JSON builtins (numpy scalars unwrapped, tuples as lists), so a packet is the same
    whether it was sent from a worker or delivered in the same process."""
    pairs = emitted(item)
    if not pairs:
        return None
    return {"nodeid": item.nodeid, "data": [[key, plain(value)] for key, value in pairs]}


class WorkerRelay:
    """Where tests run: after each test, its packet goes to ``deliver`` (serial) or to the spool and
    ``workeroutput`` (xdist worker)."""

    def __init__(self, config: pytest.Config, deliver: Callable[[dict], None]) -> None:
        self.config = config
        self.deliver = deliver
        workerinput = getattr(config, "workerinput", None)
        self.worker = workerinput is not None
        spool_dir = (workerinput or {}).get(XDIST_KEY)
        self.spool = Path(spool_dir) / f"{workerinput['workerid']}.jsonl" if spool_dir else None
        self.packets: list[dict] = []

    @pytest.hookimpl(wrapper=True, trylast=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None):
        try:
            return (yield)
        finally:
            sent = packet(item)
            item.stash[ITEM_DATA] = []
            if sent is not None:
                self.send(sent)

    def send(self, sent: dict) -> None:
        if not self.worker:
            self.deliver(sent)
            return
        self.packets.append(sent)
        if self.spool is not None:
            try:
                self.spool.parent.mkdir(parents=True, exist_ok=True)
                with open(self.spool, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(sent) + "\n")
                    handle.flush()
            except OSError:
                self.spool = None  # workeroutput still carries everything when the worker finishes

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.worker:
            self.config.workeroutput[XDIST_KEY] = self.packets  # type: ignore[attr-defined]


class ControllerRelay:
    """The xdist controller's half: names a spool directory for each worker and, as each worker goes down,
    hands its packets to ``receive`` (which turns the plugin on where it was not on yet)."""

    def __init__(self, receive: Callable[[list[dict]], None]) -> None:
        self.receive = receive
        self.spool_dir: Path | None = None  # named when xdist configures the first worker; created by workers
        self.done: set[str] = set()

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        if self.spool_dir is None:
            self.spool_dir = Path(tempfile.gettempdir()) / f"pytest-ditredundancy-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        node.workerinput[XDIST_KEY] = str(self.spool_dir)

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: object) -> None:
        worker = node.gateway.id
        if worker in self.done:  # xdist may report a node down twice (keyboard interrupt)
            return
        self.done.add(worker)
        output = getattr(node, "workeroutput", None) or {}
        packets = output.get(XDIST_KEY)
        if self.spool_dir is not None:
            spool = self.spool_dir / f"{worker}.jsonl"
            if packets is None:  # crashed: what it had finished is in its spool file
                packets = read_spool(spool)
            spool.unlink(missing_ok=True)
        if packets:
            self.receive(packets)

    def pytest_unconfigure(self) -> None:
        if self.spool_dir is not None:
            shutil.rmtree(self.spool_dir, ignore_errors=True)


def read_spool(path: Path) -> list[dict]:
    """The packets of a spool file; a line cut short by the crash is dropped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    packets = []
    for line in lines:
        try:
            packets.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return packets
