"""``server.send_timeout`` (``gateway/sending.py``): a client that takes no byte of a response
for that long is cut off, and one that reads slowly but steadily never is, as with nginx.

In this process, on a listening socket with a small fixed send buffer: on loopback the kernel
would grow it to megabytes, and no pause of the transport would last long enough to matter.
Nothing here asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import socket
import time

from aiohttp import web

from gateway.backend_pool import _CountingHandler
from gateway.protocol import ProtocolOptions
from tests.support.inprocess import serving

KiB = 1024
SEND_BUFFER = 16 * KiB  # the kernel doubles it


def streaming_app(
    size: int, piece: int, outcome: dict[str, str], done: asyncio.Event
) -> web.Application:
    """GET / answers ``size`` bytes with a Content-Length, written ``piece`` bytes at a time
    (a backend's pieces are relayed the same way); ``outcome`` says how the writing ended."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = size
        await response.prepare(request)
        try:
            for at in range(0, size, piece):
                await response.write(b"x" * min(piece, size - at))
            await response.write_eof()
            outcome["writes"] = "completed"
        except ConnectionError:
            outcome["writes"] = "failed"
        finally:
            done.set()
        return response

    app = web.Application()
    app.router.add_get("/", handler)
    return app


def download(port: int, rate: int) -> int:
    """GET / with a small receive window, reading ``rate`` bytes a second; the bytes received
    before the end or a reset."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * KiB)
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        return read_slowly(sock, rate)


def read_slowly(sock: socket.socket, rate: int) -> int:
    """Read ``sock`` at ``rate`` bytes a second until its end or a reset; the bytes read."""
    received = 0
    while True:
        try:
            data = sock.recv(4 * KiB)
        except ConnectionResetError:
            return received
        if not data:
            return received
        received += len(data)
        time.sleep(len(data) / rate)


async def test_a_client_reading_slowly_but_steadily_is_never_cut_off() -> None:
    """The transport pauses past 64 KiB and resumes below 16 KiB: with a 512 KiB piece waiting,
    a client taking 256 KiB/s needs ~2 s to bring it down. The send timeout (0.5 s) used to run
    from the pause to the resume, so that client was cut off after ~130 KiB although it never
    stopped reading; nginx restarts the timeout on every write the socket takes."""
    size, outcome, done = 640 * KiB, {}, asyncio.Event()
    app = streaming_app(size, 512 * KiB, outcome, done)
    options = ProtocolOptions(header_timeout=5, metrics=None, send_timeout=0.5)
    async with serving(app, options, SEND_BUFFER) as (_, port):
        received = await asyncio.get_running_loop().run_in_executor(None, download, port, 256 * KiB)
        await asyncio.wait_for(done.wait(), 10)
    assert outcome == {"writes": "completed"}
    assert received >= size  # the head, and every byte of the body


async def test_a_write_waiting_on_a_client_cut_off_for_taking_nothing_fails() -> None:
    """A client that reads nothing is cut off after the send timeout. The write waiting for it
    used to return as if done when that write was the response's last (aiohttp wakes it with
    success when the connection ends without an error): the gateway then logged and counted a
    200 for an answer the client never received. It fails, so it is logged 408 send_timeout."""
    outcome, done = {}, asyncio.Event()
    app = streaming_app(4096 * KiB, 4096 * KiB, outcome, done)  # one write: the last
    options = ProtocolOptions(header_timeout=5, metrics=None, send_timeout=0.2)
    async with serving(app, options, SEND_BUFFER) as (_, port):
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * KiB)
            sock.connect(("127.0.0.1", port))
            sock.sendall(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")  # and never read
            await asyncio.wait_for(done.wait(), 10)
    assert outcome == {"writes": "failed"}


def slow_reader(listener: socket.socket, rate: int) -> int:
    """Accept one connection and read it at ``rate`` bytes a second until its end (or a reset);
    the bytes read. A backend taking a request body slowly."""
    conn, _ = listener.accept()
    with conn:
        return read_slowly(conn, rate)


async def test_a_backend_reading_a_request_body_slowly_but_steadily_is_never_cut_off() -> None:
    """The backend side's send timeout (``backend.read_timeout``, nginx's
    ``proxy_send_timeout``) had the same flaw: it ran from the pause to the resume, so a
    backend taking 256 KiB/s of a 512 KiB piece was timed out (504) after 0.5 s of reading."""
    loop = asyncio.get_running_loop()
    size = 640 * KiB
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * KiB)  # for what it accepts
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        reading = loop.run_in_executor(None, slow_reader, listener, 256 * KiB)
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        client.connect(listener.getsockname())
        client.setblocking(False)
        transport, protocol = await loop.create_connection(
            lambda: _CountingHandler(loop, send_timeout=0.5), sock=client
        )
        transport.write(b"x" * 512 * KiB)
        transport.write(b"x" * (size - 512 * KiB))
        while transport.get_write_buffer_size() and not transport.is_closing():
            await asyncio.sleep(0.05)
        timed_out = protocol.exception()
        transport.close()
        received = await reading
    assert timed_out is None
    assert received == size
