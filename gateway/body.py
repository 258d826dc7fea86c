"""The client's request body as an async iterator of chunks, with a per-chunk deadline.

Like tusd's ``bodyReader``: the body is wrapped once, and that one place counts bytes, enforces
the idle timeout (a client that stops sending gets 408, not a worker held forever) and remembers
why reading stopped, so the handler can tell "client too slow" from "backend failed" even when
the error surfaced inside aiohttp's client while it was sending the body on.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import StreamReader

from gateway.errors import GatewayError

# Bounded, because aiohttp's read(n) raises the connection's buffer to n (pausing the socket
# only past 2n), and readany() joins everything buffered. 64 concurrent 20 MB uploads into one
# worker peaked at 145 MiB RSS with 64 KiB reads, 163 with 256 KiB and 258 with readany(); the
# larger reads were at most ~15 % faster on 20 MB bodies (make bench, quick runs, session 2).
READ_CHUNK = 64 * 1024
# A body announced small enough to be held in memory anyway (spool.memory_threshold) is read in
# larger pieces: a bigger aiohttp buffer costs it nothing it would not hold regardless, and a
# 1 MB upload takes 4 trips through the inspection instead of 16.
SMALL_BODY_READ = 256 * 1024


class BodyStream:
    """Iterate once; ``received`` counts bytes read so far, ``error`` is why it stopped early."""

    def __init__(
        self, content: StreamReader, idle_timeout: float, read_size: int = READ_CHUNK
    ) -> None:
        self._content = content
        self._idle_timeout = idle_timeout
        self._read_size = read_size
        self.received = 0
        self.error: BaseException | None = None

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def read_chunk(self) -> bytes:
        """The next chunk, ``b""`` at the end; raises 408 when the client stalls."""
        try:
            async with asyncio.timeout(self._idle_timeout):
                chunk = await self._content.read(self._read_size)
        except TimeoutError as exc:
            self.error = GatewayError(
                "body_timeout",
                f"the client sent no body bytes for {self._idle_timeout:g} s",
            )
            raise self.error from exc
        except Exception as exc:
            self.error = exc
            raise
        self.received += len(chunk)
        return chunk

    async def _chunks(self) -> AsyncIterator[bytes]:
        while chunk := await self.read_chunk():
            yield chunk
