"""The backend's connection pool: one ``ClientSession`` per ``backend`` config, retired whole.

A pooled connection is reused only if nothing arrived on it while idle
(:class:`_CleanPoolConnector`), and sending a request body may stall only for ``read_timeout``
(:class:`_CountingHandler`). The session keeps no cookies: one client's ``Set-Cookie`` must never
ride on another's request. aiohttp's client would normally decompress responses; that is off,
so the client gets exactly the bytes the backend sent.

A hot reload that changes ``backend`` opens a new pool for new exchanges; the old one is closed
once the exchanges that began on it have ended, as nginx's old workers finish their requests
after a reload: a new URL, timeout or CA bundle (also one renewed under its path) needs no
restart and cuts nothing off.
"""

from __future__ import annotations

import asyncio
import functools
import ssl as ssl_module

import aiohttp
from aiohttp.client_exceptions import SocketTimeoutError
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ConnectionKey
from aiohttp.connector import Connection
from aiohttp.helpers import _EXC_SENTINEL, set_exception
from aiohttp.tracing import Trace
from yarl import URL

from gateway.config.model import BackendConfig
from gateway.sending import StallClock

READ_CHUNK = 256 * 1024
KEEPALIVE_SECONDS = 30


class _CountingHandler(ResponseHandler):
    """Counts the bytes a backend connection received, so the pool can tell whether any
    arrived while it sat idle; and bounds how long sending may stall (``send_timeout``).

    aiohttp's ``sock_read`` starts only once the request body is sent: a backend that stops
    reading it (its receive window full) would hold the request, its spool and its descriptor
    forever, and a few such requests fill ``spool.max_bytes``. Like nginx's
    ``proxy_send_timeout``, the clock runs only while the transport has stopped taking bytes
    (``pause_writing``: only under backpressure, nothing per chunk) and restarts whenever the
    backend takes any (:class:`gateway.sending.StallClock`); when it runs out the exchange is
    a timeout.
    """

    received = 0
    released_at = -1

    def __init__(self, loop: asyncio.AbstractEventLoop, send_timeout: float | None = None) -> None:
        super().__init__(loop)
        self._send_clock = (
            StallClock(loop, send_timeout, self._send_timed_out) if send_timeout else None
        )

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        super().data_received(data)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_clock is not None:
            self._send_clock.start(self.transport)

    def resume_writing(self) -> None:
        if self._send_clock is not None:
            self._send_clock.stop()
        super().resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._send_clock is not None:
            self._send_clock.stop()
        super().connection_lost(exc)

    def set_exception(self, exc: BaseException, exc_cause: BaseException = _EXC_SENTINEL) -> None:
        """Also fail the response body being read, as aiohttp's read timeout does.

        aiohttp's writer, when the request body fails (the client vanished or stalled while the
        backend was already streaming its answer, as an echo or a progress stream does), sets
        its error here only: on the wait for a response head that came long ago. It also drops
        the read timeout, so the relay waited on the backend's body for ever, holding the
        backend connection, and a retired pool was never closed."""
        super().set_exception(exc, exc_cause)
        payload = self._payload
        if payload is not None and not payload.is_eof():
            set_exception(payload, exc, exc_cause)

    def _send_timed_out(self) -> None:
        """The wait for the response fails as a timeout (504); the connection is aborted, not
        closed: a close would wait for the unsent bytes to drain, that is forever."""
        self.set_exception(SocketTimeoutError("Timeout on sending the request body"))
        if self.transport is not None:
            self.transport.abort()


class _CleanPoolConnector(aiohttp.TCPConnector):
    """Never hands out a pooled connection that received anything while idle.

    Bytes that arrive on an idle keep-alive connection (a backend's late body after a 204/304,
    bytes past its Content-Length, an unsolicited response) would be parsed and queued by
    aiohttp and read by the next request as *its* response, and every later request on that
    connection would get the previous one's (aio-libs/aiohttp#13656). nginx closes an idle
    upstream connection on any unexpected data (``ngx_http_upstream_keepalive_close_handler``).
    """

    def __init__(
        self, *, limit: int, keepalive_timeout: float, ssl: object, send_timeout: float
    ) -> None:
        super().__init__(limit=limit, keepalive_timeout=keepalive_timeout, ssl=ssl)  # type: ignore[arg-type]
        self._factory = functools.partial(  # type: ignore[assignment]
            _CountingHandler, loop=self._loop, send_timeout=send_timeout
        )

    def _release(
        self, key: ConnectionKey, protocol: ResponseHandler, *, should_close: bool = False
    ) -> None:
        if isinstance(protocol, _CountingHandler):
            protocol.released_at = protocol.received
        super()._release(key, protocol, should_close=should_close)

    async def _get(self, key: ConnectionKey, traces: list[Trace]) -> Connection | None:
        while (conn := await super()._get(key, traces)) is not None:
            proto = conn.protocol
            if (
                isinstance(proto, _CountingHandler)
                and proto.received == proto.released_at
                and not proto.should_close
            ):
                return conn
            conn.close()  # dirty: never reuse it
        return None


class BackendPool:
    """The session for one ``backend`` config, and how many exchanges are using it."""

    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        self.base = URL(config.url.rstrip("/"))
        self._bundle = _read_bundle(config.ca_file)  # read before the session loads it
        self.session = _session(config, self.base)
        self.exchanges = 0  # begun on this pool and not yet ended

    def serves(self, config: BackendConfig) -> bool:
        """Whether ``config`` would make this same pool: the same settings, and the CA bundle
        still what it was (a renewed bundle keeps its path)."""
        return config == self.config and _read_bundle(config.ca_file) == self._bundle

    async def close(self) -> None:
        await self.session.close()


def _session(config: BackendConfig, base: URL) -> aiohttp.ClientSession:
    connector = _CleanPoolConnector(
        limit=config.pool_size,
        keepalive_timeout=KEEPALIVE_SECONDS,
        ssl=_tls(config) if base.scheme == "https" else True,
        send_timeout=config.read_timeout,  # nginx: proxy_send_timeout = read's
    )
    return aiohttp.ClientSession(
        connector=connector,
        # One session serves every client: its default jar would keep a cookie the backend
        # set for one client and send it with the next client's request (it only refuses
        # cookies from IP addresses, so this bites exactly when the backend has a name).
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(
            total=None,
            # ``connect`` also bounds the wait for a free pooled connection: without it a
            # request queues for ever once ``pool_size`` exchanges are in flight (slow
            # backend, clients not reading), holding its spool; then it is a 504.
            connect=config.connect_timeout,
            sock_connect=config.connect_timeout,
            sock_read=config.read_timeout,
        ),
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        read_bufsize=READ_CHUNK,
    )


def _read_bundle(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as bundle:
            return bundle.read()
    except OSError:
        return None


def _tls(config: BackendConfig) -> ssl_module.SSLContext:
    context = ssl_module.create_default_context(cafile=config.ca_file)
    context.minimum_version = ssl_module.TLSVersion.TLSv1_2
    if not config.verify_tls:
        context.check_hostname = False
        context.verify_mode = ssl_module.CERT_NONE
    return context
