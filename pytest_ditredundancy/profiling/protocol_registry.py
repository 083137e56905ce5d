"""The protocols by name: ``profile_model(protocol=NAME)`` and ``--dit-protocol=NAME`` look them up here."""

from __future__ import annotations

from types import MappingProxyType

from .paper import PaperProtocol
from .protocols import Protocol, ProtocolError

_PROTOCOLS: dict[str, Protocol] = {}
#: name -> protocol, read-only and live (``"paper" in PROTOCOLS``; iterating gives the names)
PROTOCOLS = MappingProxyType(_PROTOCOLS)


def register_protocol(protocol: Protocol) -> Protocol:
    """Make ``protocol`` available by its name (``profile_model(protocol=NAME)``, ``--dit-protocol=NAME``)."""
    if not protocol.name or not protocol.name.replace("-", "").isalnum():
        raise ValueError(f"a protocol name must be a plain word, got {protocol.name!r}")
    _PROTOCOLS[protocol.name] = protocol
    return protocol


def unregister_protocol(name: str) -> None:
    if name in (Protocol.name, PaperProtocol.name):
        raise ValueError(f"protocol {name!r} is built in")
    _PROTOCOLS.pop(name, None)


def protocol_names() -> tuple[str, ...]:
    return tuple(_PROTOCOLS)


def get_protocol(protocol: "str | Protocol") -> Protocol:
    """The protocol object for a name (or the object itself); an unknown name lists the known ones."""
    if isinstance(protocol, Protocol):
        return protocol
    if protocol not in _PROTOCOLS:
        known = ", ".join(f"{name!r} ({p.summary})" for name, p in _PROTOCOLS.items())
        raise ProtocolError(f"unknown protocol {protocol!r}; choose {known}")
    return _PROTOCOLS[protocol]


register_protocol(Protocol())
register_protocol(PaperProtocol())


__all__ = ["PROTOCOLS", "get_protocol", "protocol_names", "register_protocol", "unregister_protocol"]
