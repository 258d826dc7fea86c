"""A listener's connections: which protocol each accepted connection gets, and what is checked
of a parsed head before the app routes it.

aiohttp's ``AppRunner`` makes one low-level ``web.Server`` per listener, and the event loop
calls it once per accepted connection. :class:`GatewayServer` answers that call with a
:class:`~gateway.protocol.GatewayProtocol` (head timer, send timeout, head size, problem+json
refusals), or, past ``server.max_connections``, with a connection that is closed at once
(:mod:`gateway.connections`).
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from aiohttp import web

from gateway.connections import RefusedConnection
from gateway.errors import GatewayError
from gateway.framing import check_framing
from gateway.protocol import GatewayProtocol, ProtocolOptions, head_size, head_too_large, refuse


class GatewayServer(web.Server):
    """aiohttp's low-level server, making a :class:`GatewayProtocol` for each connection.

    Framing is checked here, before routing: the app's catch-all route never sees an
    asterisk-form or authority-form target, which aiohttp would answer with a plain-text 404.
    """

    def __init__(self, base: web.Server, options: ProtocolOptions) -> None:
        super().__init__(
            self._checked,
            request_factory=base.request_factory,
            handler_cancellation=base.handler_cancellation,
            **base._kwargs,  # the runner's protocol settings (sizes, timeouts, access log)
        )
        self._app_handler = base.request_handler
        self._options = options

    def __call__(self) -> asyncio.Protocol:  # type: ignore[override]  # the loop needs no more
        """The protocol for a connection just accepted.

        ``_connections`` holds every connection whose protocol has not finished; the loop may
        accept a batch of connections before any of theirs is counted, so the cap can be
        passed by one such batch. On a TLS listener the loop calls this at the accept but
        makes the connection only after its handshake: connections still in their handshake
        are not counted, and one refused here is closed only after its handshake.
        """
        cap, refused = self._options.max_connections, self._options.refused
        if cap and refused is not None and len(self._connections) >= cap:
            return RefusedConnection(refused)
        return GatewayProtocol(self, self._options, loop=self._loop, **self._kwargs)

    def retune(self, options: ProtocolOptions, **settings: Any) -> None:
        """A reload's settings, for connections accepted from now on: an open connection keeps
        those it was accepted with (its parser was built and its timers armed by them)."""
        self._options = options
        self._kwargs.update(settings)

    async def _checked(self, request: web.BaseRequest) -> web.StreamResponse:
        # The connection's own settings (a reload changes only new connections'); every
        # connection that gets as far as a request was made by __call__, so it is ours.
        options = cast(GatewayProtocol, request.protocol).options
        try:
            check_framing(request)
            if head_size(request) > options.max_head_size:
                raise head_too_large(options.max_head_size)
        except GatewayError as error:
            return refuse(error, request.remote or "", options.metrics)
        return await self._app_handler(request)


class GatewayRunner(web.AppRunner):
    """``AppRunner`` whose server speaks through :class:`GatewayProtocol`."""

    def __init__(self, app: web.Application, options: ProtocolOptions, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._options = options

    async def _make_server(self) -> web.Server:
        return GatewayServer(await super()._make_server(), self._options)

    def retune(self, options: ProtocolOptions, **settings: Any) -> None:
        """:meth:`GatewayServer.retune` of this runner's server (once it is set up)."""
        if isinstance(self.server, GatewayServer):
            self.server.retune(options, **settings)


class ListenerSite(web.TCPSite):
    """``TCPSite`` whose TLS handshakes must be done within ``handshake_timeout``.

    The event loop gives a handshake 60 s by default, and until it is done the connection is
    not the app's: it is neither timed by the head timer nor counted against
    ``server.max_connections``, so a client that connects and never sends a ClientHello holds a
    descriptor for a minute. nginx times the handshake with ``client_header_timeout``; so does
    this (``server.header_timeout``). aiohttp's ``TCPSite`` has no such setting: ``start`` is
    its own, with the one argument added.
    """

    def __init__(self, *args: Any, handshake_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._handshake_timeout = handshake_timeout

    async def start(self) -> None:
        if self._ssl_context is None:
            return await super().start()
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            server,
            self._host,
            self._port,
            ssl=self._ssl_context,
            ssl_handshake_timeout=self._handshake_timeout,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        self._bound_port = self._server.sockets[0].getsockname()[1]
