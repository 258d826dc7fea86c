"""BodyStream: the client's body as aiohttp buffered it, without copies or per-HTTP-chunk trips."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest
from aiohttp import StreamReader
from aiohttp.base_protocol import BaseProtocol

from gateway.body import BodyStream
from gateway.errors import GatewayError


def reader() -> StreamReader:
    """A reader fed by hand, with a limit high enough that it never pauses a transport."""
    loop = asyncio.get_running_loop()
    return StreamReader(BaseProtocol(loop), 2**24, loop=loop)


async def connected_reader() -> tuple[StreamReader, socket.socket]:
    """A reader whose protocol sits on a real (idle) socket: a read that has to wait for data
    needs a live connection. Close the returned peer socket when done."""
    loop = asyncio.get_running_loop()
    ours, peer = socket.socketpair()
    _, protocol = await loop.connect_accepted_socket(lambda: BaseProtocol(loop), ours)
    return StreamReader(protocol, 2**24, loop=loop), peer


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


@pytest.mark.parametrize("chunked", [True, False])
async def test_an_http_chunk_ending_after_its_data_was_read_is_not_the_end_of_the_body(
    chunked: bool,
) -> None:
    """A chunk's data and its closing CRLF may arrive in different reads: the chunk's end then
    comes on its own, after its data was taken. That is not the body's end, whichever way the
    body is read; taking it for one would forward a body cut short."""
    content, peer = await connected_reader()
    content.begin_http_chunk_receiving()
    body = BodyStream(content, idle_timeout=5, chunked=chunked)
    content.feed_data(b"hello")
    assert await body.read_chunk() == b"hello"
    reading = asyncio.ensure_future(body.read_chunk())
    await asyncio.sleep(0)
    content.end_http_chunk_receiving()  # the CRLF after "hello" arrives alone
    content.feed_data(b"world")
    content.end_http_chunk_receiving()
    content.feed_eof()
    assert await reading == b"world"
    assert await body.read_chunk() == b""
    assert body.received == 10
    peer.close()


@pytest.mark.parametrize(("limit", "passes"), [(0, True), (1000, True), (999, False)])
async def test_a_limit_stops_the_body_at_the_chunk_that_crosses_it(
    limit: int, passes: bool
) -> None:
    """Exactly the limit passes, one byte more does not, and 0 is no limit; the chunk that
    crosses is never handed on, so whatever reads the body has had at most the limit."""
    content = reader()
    for piece in (b"a" * 600, b"b" * 400):
        content.feed_data(piece)
    content.feed_eof()
    refusal = GatewayError("request_too_large", "too big")
    body = BodyStream(content, idle_timeout=5, limit=limit, too_large=lambda: refusal)
    got: list[bytes] = []
    if passes:
        got = [chunk async for chunk in body]
        assert b"".join(got) == b"a" * 600 + b"b" * 400 and body.error is None
        return
    with pytest.raises(GatewayError) as raised:
        async for chunk in body:
            got.append(chunk)
    assert raised.value is refusal and body.error is refusal
    assert got == [b"a" * 600]
