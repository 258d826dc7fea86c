"""Which headers cross the proxy, in each direction (RFC 9110 §7.6.1), and the ones we add.

Hop-by-hop headers describe one connection, not the message: forwarding them would let a client
steer the gateway's connection to the backend (``Connection: close``, ``Upgrade``) or smuggle
framing (``Transfer-Encoding``). Framing headers are recomputed by aiohttp for the next hop.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
from collections.abc import Iterable

from multidict import CIMultiDict, CIMultiDictProxy

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# aiohttp's parsers decode header bytes as UTF-8 with surrogateescape; its writer silently
# deletes those surrogates, so a non-UTF-8 byte (obs-text, RFC 9110 §5.5) would vanish.
_UNDECODABLE = re.compile("[\udc80-\udcff]")
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    """Header names listed in ``Connection``: hop-by-hop for this message only."""
    tokens: set[str] = set()
    for value in headers.getall("Connection", []):
        tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return tokens


def end_to_end(
    headers: CIMultiDictProxy[str] | CIMultiDict[str], drop: Iterable[str] = ()
) -> CIMultiDict[str]:
    """Copy of ``headers`` without hop-by-hop ones; repeated headers keep order and count."""
    skip = HOP_BY_HOP | connection_tokens(headers) | {d.lower() for d in drop}
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in skip)


class _RequestIds:
    """32 hex characters, unique across processes and restarts: a random 64-bit prefix per
    process and a counter. ``uuid4`` reads the kernel's random source for every request, which
    showed up as 5 % of a worker's CPU on small uploads."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._next = itertools.count(secrets.randbits(48)).__next__

    def new(self) -> str:
        return f"{self._prefix}{self._next() & 0xFFFFFFFFFFFFFFFF:016x}"


_IDS = _RequestIds()
os.register_at_fork(after_in_child=_IDS.reset)  # a forked child must not repeat the parent


def new_request_id() -> str:
    return _IDS.new()


def request_id(headers: CIMultiDictProxy[str]) -> str:
    """The client's ``X-Request-Id`` when it is sane (so traces join up), else a fresh one."""
    given = headers.get("X-Request-Id", "")
    if given and _SANE_REQUEST_ID.match(given):
        return given
    return _IDS.new()


def forwarded_for(existing: str | None, peer: str) -> str:
    """Append the peer to any ``X-Forwarded-For`` chain (nginx's ``$proxy_add_x_forwarded_for``)."""
    return f"{existing}, {peer}" if existing else peer


def has_undecodable_bytes(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> bool:
    """A header value held bytes that are not UTF-8: aiohttp cannot write them back unchanged."""
    return any(not v.isascii() and _UNDECODABLE.search(v) for v in headers.values())
