"""Joining a Ray cluster for ``--dit-executor=ray``: Ray imported only here and only then, an address checked
before Ray would retry it for minutes, and every failure one :class:`ExecutorError` that names the fix (the
plugin makes it a usage error before any test runs)."""

from __future__ import annotations

import logging
import socket
from typing import Any
from urllib.parse import urlsplit

from .executors import ExecutorError

INSTALL = "pip install 'pytest-ditredundancy[ray]'"
#: seconds to wait for a TCP connection to the cluster's address before calling it unreachable
CONNECT_TIMEOUT = 5.0


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ExecutorError(f"--dit-executor=ray needs Ray, which is not installed here: {INSTALL}") from None
    return ray


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """``host:port`` (the head's GCS) or ``ray://host:port`` (Ray Client) must accept a TCP connection;
    Ray itself retries an unreachable address for minutes."""
    parts = urlsplit(address if "://" in address else f"gcs://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or port is None:
        raise ExecutorError(f"--dit-ray-address={address} is not a cluster address: give host:port of the head "
                            "node (e.g. raycluster-head-svc:6379), ray://host:10001, 'auto' (a cluster started on "
                            "this machine with 'ray start') or 'local'")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise ExecutorError(f"the Ray cluster at {address} is unreachable ({exc.strerror or exc}); start it, or fix "
                            "--dit-ray-address / RAY_ADDRESS (on KubeRay: the head service, port 6379)") from None


def connect(ray: Any, address: str | None) -> bool:
    """Join the cluster at ``address`` (None or ``local``: start a local instance); True when this started
    Ray (and so must stop it). A process that has joined a cluster already keeps it."""
    if ray.is_initialized():  # a caller (a test, a notebook) joined a cluster already
        return False
    if address and address not in ("auto", "local"):
        check_reachable(address)
    try:
        if address and address != "local":
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        else:
            ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExecutorError(f"could not join the Ray cluster {address or '(local instance)'}: {first}. Check "
                            "--dit-ray-address / RAY_ADDRESS; a cluster with token authentication needs "
                            "RAY_AUTH_MODE=token and its token in RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH") from None
    return True


__all__ = ["CONNECT_TIMEOUT", "INSTALL", "check_reachable", "connect", "import_ray"]
