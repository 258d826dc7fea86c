"""The client's request body as an async iterator of chunks, with a per-chunk deadline.

Like tusd's ``bodyReader``: the body is wrapped once, and that one place counts bytes, enforces
the idle timeout (a client that stops sending gets 408, not a worker held forever) and remembers
why reading stopped, so the handler can tell "client too slow" from "backend failed" even when
the error surfaced inside aiohttp's client while it was sending the body on.

Chunks are the pieces aiohttp's parser buffered, taken whole (``readchunk``): no slice, no join,
no copy. Their size is bounded by the transport, not by the client: uvloop reads at most 256 KiB
from a TCP socket, and its TLS layer hands over what it decrypted while the reader was paused
(~480 KiB seen); aiohttp pauses the socket once more than twice ``read_bufsize`` (``server.py``)
waits unread. ``read(n)`` sliced every piece into new ``n``-byte objects and raised the
buffer limit to ``n``; against it, 64 x 20 MB into one worker: peak RSS 123 instead of 134-155
MiB, 432 instead of 328-348 MiB/s, and 46 instead of 53 ms of CPU per 20 MB upload
(``bench/NOTES.md``, fourth round).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from aiohttp import StreamReader

from gateway.errors import GatewayError


class BodyStream:
    """Iterate once; ``received`` counts bytes read so far, ``error`` is why it stopped early.

    ``chunked``: the body comes in HTTP chunks, and ``readchunk`` would stop at each of them;
    a client sending one-byte chunks would make every byte a pass through the inspection. Such
    a body is read with ``readany``, which joins what is buffered. Should the flag ever be wrong,
    nothing is lost: an HTTP chunk's end is never taken for the body's (:func:`next_piece`).

    ``limit`` (0: none) stops a body that grows past it: the chunk that crosses it raises
    ``too_large()`` and is never handed on, so a reader downstream gets at most ``limit`` bytes.
    """

    def __init__(
        self,
        content: StreamReader,
        idle_timeout: float,
        chunked: bool = False,
        limit: int = 0,
        too_large: Callable[[], GatewayError] | None = None,
    ) -> None:
        self._content = content
        self._idle_timeout = idle_timeout
        self._chunked = chunked
        self._limit = limit
        self._too_large = too_large
        self.received = 0
        self.error: BaseException | None = None

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def read_chunk(self) -> bytes:
        """The next chunk, ``b""`` at the end; raises 408 when the client stalls."""
        try:
            if self._may_wait():
                async with asyncio.timeout(self._idle_timeout):
                    chunk = await self._next_piece()
            else:
                chunk = await self._next_piece()
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
        if self._limit and self.received > self._limit and self._too_large is not None:
            self.error = self._too_large()
            raise self.error
        return chunk

    def _may_wait(self) -> bool:
        """Whether the next read may wait for the client, and so needs its deadline: not when
        aiohttp has bytes buffered already (it was fed more than was taken) nor at the end.
        Arming and cancelling a timeout costs ~6 us, twice per small upload and once per chunk
        of a large one, where most reads find their bytes waiting."""
        content = self._content
        return not content.is_eof() and content.total_bytes <= self.received

    async def _next_piece(self) -> bytes:
        if self._chunked:
            return await self._content.readany()
        return await next_piece(self._content)

    async def _chunks(self) -> AsyncIterator[bytes]:
        while chunk := await self.read_chunk():
            yield chunk


async def next_piece(content: StreamReader) -> bytes:
    """The next piece ``content`` buffered, whole; ``b""`` only at the end of the body.

    ``readchunk`` also answers ``(b"", True)``: the end of an HTTP chunk whose data was already
    read, not of the body. Taking it for the body's end would pass on a body cut short,
    well-formed and silently (a wrong ``chunked`` flag), so it is read past, unless the reader
    is at its end: aiohttp's one shared reader for bodiless messages answers ``(b"", True)``
    forever once anyone has read it, and looping on it would hang the worker.
    """
    while True:
        chunk, http_chunk_end = await content.readchunk()
        if chunk or not http_chunk_end or content.at_eof():
            return chunk
