"""How long a peer may take none of the bytes queued for it (nginx's ``send_timeout``).

asyncio tells a protocol only that its transport's buffer rose past the high-water mark
(``pause_writing``) and, later, that it fell below the low-water mark (``resume_writing``).
Between the two lie up to ~300 KiB (64 KiB above the mark plus the piece being written, down
to 16 KiB), so timing the pause itself cut off a client that reads steadily but slowly: one
taking 4 KB/s needs ~75 s to bring the buffer down, and was cut off after 60 s without ever
having stopped reading. nginx restarts its ``send_timeout`` on every write the socket accepts.
:class:`StallClock` does the same from outside the transport: while writing is paused it looks
at the transport's buffer :data:`CHECKS` times per timeout, and only a buffer that has not
shrunk for a whole timeout (the peer took no byte of it) is a stall. One timer per look while
paused, nothing per write; a peer that keeps up never sees a look at all.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

CHECKS = 4
"""Looks per timeout: a stall is acted on between one timeout and 1.25 timeouts after the peer
took its last byte (nginx: exactly one)."""


class StallClock:
    """Calls ``on_stall`` once a paused transport has taken nothing for ``timeout`` seconds.

    :meth:`start` from ``pause_writing``, :meth:`stop` from ``resume_writing`` and
    ``connection_lost``. Writes made while paused raise the buffer, never count as progress:
    only a smaller buffer than at the last look does.
    """

    __slots__ = ("_handle", "_loop", "_on_stall", "_since", "_size", "_timeout", "_transport")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, timeout: float, on_stall: Callable[[], None]
    ) -> None:
        self._loop = loop
        self._timeout = timeout
        self._on_stall = on_stall
        self._transport: asyncio.WriteTransport | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._size = 0
        self._since = 0.0

    def start(self, transport: asyncio.WriteTransport | None) -> None:
        if self._handle is not None or transport is None:
            return
        self._transport = transport
        self._size = transport.get_write_buffer_size()
        self._since = self._loop.time()
        self._handle = self._loop.call_later(self._timeout / CHECKS, self._look)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._transport = None

    def _look(self) -> None:
        self._handle = None
        transport = self._transport
        if transport is None:
            return
        now = self._loop.time()
        size = transport.get_write_buffer_size()
        if size < self._size:
            self._since = now  # the peer took bytes since the last look
        self._size = size
        left = self._since + self._timeout - now
        if left <= 0:
            self._transport = None
            self._on_stall()
            return
        self._handle = self._loop.call_later(min(left, self._timeout / CHECKS), self._look)
