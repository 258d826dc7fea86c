"""Before ``serve`` starts anything: are the proxy and admin addresses free?

The workers bind with SO_REUSEPORT so that ``--workers N`` share one port, but the kernel lets
*any* process of the same user join such a port: a second gateway (an old version, a trial
config in ``mode: report``) would start without a word and take a share of the clients and of
the ``/metrics`` scrapes. So the addresses are probed once, without SO_REUSEPORT, which fails
while anything listens there, SO_REUSEPORT or not; SO_REUSEADDR, as asyncio sets it, keeps
connections of a previous run in TIME_WAIT from counting. nginx refuses to start the same way.
A process that binds in the moment between the probe and the workers' bind is not caught.
"""

from __future__ import annotations

import socket

from gateway.config.model import HostPort


def unavailable(address: HostPort) -> str | None:
    """Why a new listener on ``address`` would not be this process's alone, or None."""
    try:
        found = socket.getaddrinfo(
            address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        return f"cannot resolve {address.host}: {exc.strerror}"
    for family, kind, proto, _, sockaddr in dict.fromkeys(found):
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # as asyncio binds it: IPv6 only
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                return exc.strerror or str(exc)
    return None


def first_unavailable(addresses: dict[str, HostPort]) -> str | None:
    """The first of the named addresses that is in use, as ``name host:port: reason``."""
    for name, address in addresses.items():
        reason = unavailable(address)
        if reason is not None:
            return f"{name} {address}: {reason}"
    return None
