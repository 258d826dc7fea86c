"""``gateway/protocol.py`` at the level of reads: what the event loop hands the protocol, in the
order uvloop (the workers' loop) can hand it, against a real socket and a real aiohttp server.

The end-to-end cases (hostile framing, heads, chunking) are in ``test_hostile_http.py`` and
``test_chunking.py``; here are the orderings a client cannot force from outside the process.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from gateway.protocol import ProtocolOptions
from tests.support.inprocess import connection, serving
from tests.support.rawhttp import parse_response


async def first_answer(reader: asyncio.StreamReader) -> bytes:
    """What the server sent up to A's body, or up to the connection's end."""
    data = b""
    while not data.endswith(b"\r\n\r\nA") and (chunk := await reader.read(65536)):
        data += chunk
    return data


async def test_an_oversized_head_behind_a_request_not_yet_started_waits_for_its_answer() -> None:
    """Request A is complete; B's head, behind it, grows past ``server.max_head_size``
    unfinished. The 431 for B is written at once only if no answer is due before it. aiohttp
    takes A off its queue, then starts A's task one loop turn later; uvloop handles reads in
    between, and a read of B's head landing there found the protocol "idle": the 431 went out
    first, the client took it for A's answer (a desync) and A's answer was lost, though its
    handler ran. Here the reads are handed to the protocol in exactly that order."""
    answered: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        answered.append(request.path)
        return web.Response(text="A")

    app = web.Application()
    app.router.add_get("/a", handler)
    options = ProtocolOptions(header_timeout=5, metrics=None, max_head_size=1024)
    async with serving(app, options) as (runner, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        protocol = await connection(runner)  # set up, and waiting for a request
        protocol.data_received(
            b"GET /a HTTP/1.1\r\nHost: gw\r\n\r\nGET /b HTTP/1.1\r\nHost: gw\r\n"
        )
        protocol.data_received(b"X-Pad-1: " + b"p" * 2000 + b"\r\n")  # A is queued: B waits
        await asyncio.sleep(0)  # aiohttp takes A off the queue; A's task has not run yet
        protocol.data_received(b"X-Pad-2: p\r\n")
        first = await asyncio.wait_for(first_answer(reader), 5)
        writer.close()
    response = parse_response(first)
    assert response.status == 200, first[:200]
    assert response.body == b"A"
    assert answered == ["/a"]
