"""The gateway's connection protocol serving a small app in the test's own event loop.

For what only shows at the socket level and cannot be arranged from outside the real process:
a listening socket with a fixed, small send buffer (the kernel on loopback would otherwise grow
it to megabytes, and a slow reader would never fill it), or the order in which the event loop
hands reads to the protocol. The sockets, aiohttp and :class:`GatewayProtocol` are all real.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

from aiohttp import web

from gateway.listener import GatewayRunner
from gateway.protocol import GatewayProtocol, ProtocolOptions


@contextlib.asynccontextmanager
async def serving(
    app: web.Application, options: ProtocolOptions, send_buffer: int | None = None
) -> AsyncIterator[tuple[GatewayRunner, int]]:
    """``app`` behind :class:`GatewayProtocol` on a free port; accepted sockets inherit
    ``send_buffer`` (SO_SNDBUF, which also turns the kernel's autotuning off)."""
    runner = GatewayRunner(app, options, handle_signals=False, access_log=None)
    await runner.setup()
    listener = socket.socket()
    if send_buffer is not None:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    await web.SockSite(runner, listener).start()
    try:
        yield runner, int(listener.getsockname()[1])
    finally:
        await runner.cleanup()


async def connection(runner: GatewayRunner) -> GatewayProtocol:
    """The one client connection the server has, once aiohttp waits for its first request."""
    for _ in range(500):
        server = runner.server
        found = server.connections if server is not None else []
        if len(found) == 1 and isinstance(found[0], GatewayProtocol) and found[0]._waiter:
            return found[0]
        await asyncio.sleep(0.01)
    raise AssertionError("no connection waiting for a request")
