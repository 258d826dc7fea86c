"""BodyStream: the client's body as aiohttp buffered it, without copies or per-HTTP-chunk trips."""

from __future__ import annotations

import asyncio
import os

from aiohttp import StreamReader
from aiohttp.base_protocol import BaseProtocol

from gateway.body import BodyStream


def reader() -> StreamReader:
    """A reader fed by hand, with a limit high enough that it never pauses a transport."""
    loop = asyncio.get_running_loop()
    return StreamReader(BaseProtocol(loop), 2**24, loop=loop)


async def test_buffered_pieces_come_whole_and_uncopied() -> None:
    content = reader()
    pieces = [os.urandom(size) for size in (10, 300_000, 65_536, 1)]
    for piece in pieces:
        content.feed_data(piece)
    content.feed_eof()
    body = BodyStream(content, idle_timeout=5)
    got = [chunk async for chunk in body]
    assert all(mine is theirs for mine, theirs in zip(got, pieces, strict=True))
    assert body.received == sum(map(len, pieces))


async def test_tiny_http_chunks_are_joined_not_read_one_by_one() -> None:
    """A chunked body of one-byte HTTP chunks: one pass through the inspection per buffered
    read, not one per byte (which ``readchunk`` would give)."""
    data = os.urandom(1000)

    def chunked_reader() -> StreamReader:
        content = reader()
        content.begin_http_chunk_receiving()
        for byte in data:
            content.feed_data(bytes([byte]))
            content.end_http_chunk_receiving()
        content.feed_eof()
        return content

    got = [chunk async for chunk in BodyStream(chunked_reader(), idle_timeout=5, chunked=True)]
    assert b"".join(got) == data and len(got) == 1
    per_chunk = [chunk async for chunk in BodyStream(chunked_reader(), idle_timeout=5)]
    assert b"".join(per_chunk) == data and len(per_chunk) == len(data)  # why the flag exists
