"""To the backend and back, streaming both ways through one pooled ``ClientSession``.

Bodies are never held whole here: a request body arrives as an async iterator (or, when the spool
kept a small upload in memory in one piece, as that ``bytes``) and the response is copied chunk
by chunk. aiohttp's client would normally decompress responses; that is off, so the client gets
exactly the bytes the backend sent. Failures before the backend answered become problem+json
(502/504); a failure after the response started can only be signalled by cutting the connection
(:class:`ResponseAborted`), so a half response is never passed off as a whole one.

Like nginx, it adds nothing the backend did not send (aiohttp's default Content-Type is taken
back off), frames a body without a length as the client's HTTP version allows (chunked, or by
closing for HTTP/1.0), refuses a response header it could not relay unchanged (502), and never
reuses a pooled connection that received bytes while idle (:class:`_CleanPoolConnector`). The
session keeps no cookies: one client's ``Set-Cookie`` must never ride on another's request.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from aiohttp.client_exceptions import SocketTimeoutError
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ConnectionKey
from aiohttp.connector import Connection
from aiohttp.tracing import Trace
from multidict import CIMultiDict
from yarl import URL

from gateway.body import next_piece
from gateway.config.model import BackendConfig
from gateway.errors import GatewayError
from gateway.headers import end_to_end, has_undecodable_bytes
from gateway.metrics import Metrics
from gateway.sending import StallClock

LOGGER = logging.getLogger("upload_gateway.forward")
READ_CHUNK = 256 * 1024
# Headers aiohttp's server computes itself for the response it writes.
_RESPONSE_FRAMING = ("content-length",)  # Transfer-Encoding is hop-by-hop already


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


class RelayedResponse(web.StreamResponse):
    """A backend's response on its way back; ``backend_content_type`` is False when the backend
    sent none, so the ``on_response_prepare`` hook removes the default aiohttp adds."""

    backend_content_type = True


async def keep_backend_content_type(request: web.Request, response: web.StreamResponse) -> None:
    if isinstance(response, RelayedResponse) and not response.backend_content_type:
        response.headers.popall("Content-Type", None)


class ResponseAborted(ConnectionResetError):
    """The backend failed after the response started; the client's connection was cut."""


@dataclass
class ForwardResult:
    """What the access log and metrics need to know about the exchange."""

    backend_seconds: float = 0.0


class Forwarder:
    """Owns the backend connection pool; created and closed by the app's cleanup context."""

    def __init__(self, config: BackendConfig, metrics: Metrics) -> None:
        self._config = config
        self._metrics = metrics
        self._base = URL(config.url.rstrip("/"))
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        ssl: bool | object = True
        if self._base.scheme == "https":
            import ssl as ssl_module

            context = ssl_module.create_default_context(cafile=self._config.ca_file)
            context.minimum_version = ssl_module.TLSVersion.TLSv1_2
            if not self._config.verify_tls:
                context.check_hostname = False
                context.verify_mode = ssl_module.CERT_NONE
            ssl = context
        connector = _CleanPoolConnector(
            limit=self._config.pool_size,
            keepalive_timeout=30,
            ssl=ssl,
            send_timeout=self._config.read_timeout,  # nginx: proxy_send_timeout = read's
        )
        self._session = aiohttp.ClientSession(
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
                connect=self._config.connect_timeout,
                sock_connect=self._config.connect_timeout,
                sock_read=self._config.read_timeout,
            ),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            read_bufsize=READ_CHUNK,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def ping(self) -> bool:
        """Can we open a TCP connection to the backend? (``/readyz``; any HTTP answer counts)."""
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(self._base.host, self._base.port),
                self._config.connect_timeout,
            )
        except (OSError, TimeoutError):
            return False
        writer.close()
        return True

    async def forward(
        self,
        request: web.Request,
        headers: CIMultiDict[str],
        body: AsyncIterable[bytes] | bytes | None,
        route: str,
        result: ForwardResult,
        client_error: Callable[[], BaseException | None] = lambda: None,
    ) -> web.StreamResponse:
        """Send the request on, stream the answer back; raises GatewayError before it started.

        ``client_error`` says why the client's body stopped, if it did: aiohttp reports a body
        that failed while being sent as its own ``ClientOSError``, and a client that vanished
        mid-body is not the backend's failure, to log or to count (an operator alerts on
        ``backend_errors_total``). That error is raised instead, for the handler to answer."""
        assert self._session is not None, "Forwarder.start() was not awaited"
        url = URL(str(self._base) + request.raw_path, encoded=True)
        if request.method == "HEAD":
            # A backend that wrongly sends a body after a HEAD answer would leave bytes in a
            # pooled connection for the next request to read as its response (a desync that
            # hands one client's data to another): a HEAD never reuses its connection.
            headers["Connection"] = "close"
        started = time.monotonic()
        try:
            backend = await self._session.request(
                request.method,
                url,
                headers=headers,
                data=body,
                allow_redirects=False,
                compress=None,
                auto_decompress=False,
            )
        except TimeoutError as exc:
            self._metrics.backend_errors.labels(kind="timeout").inc()
            raise GatewayError("backend_timeout", "the backend did not answer in time") from exc
        except aiohttp.ClientResponseError as exc:
            # Its head did not parse (a header over 8190 bytes, Content-Length twice or with
            # Transfer-Encoding): the backend's fault, not a dropped connection. The parser's
            # message quotes the backend's bytes (a Set-Cookie, say): only its first words are
            # logged.
            self._metrics.backend_errors.labels(kind="invalid_response").inc()
            LOGGER.warning("backend response refused: %.80s", exc.message.split(":", 1)[0])
            raise GatewayError(
                "backend_unavailable", "the backend's response is not valid HTTP/1.1"
            ) from exc
        except aiohttp.ClientError as exc:
            gone = client_error()
            if gone is not None:
                raise gone from None
            LOGGER.warning("backend request failed: %s: %.200r", type(exc).__name__, str(exc))
            self._metrics.backend_errors.labels(kind="connect").inc()
            raise GatewayError(
                "backend_unavailable", "the backend refused or dropped the connection"
            ) from exc
        unfit = _unrelayable(backend)
        if unfit is not None:
            backend.close()
            self._metrics.backend_errors.labels(kind="invalid_response").inc()
            raise GatewayError("backend_unavailable", unfit)
        result.backend_seconds = time.monotonic() - started
        self._metrics.backend_duration.labels(route).observe(result.backend_seconds)
        async with backend:
            return await self._relay(request, backend, route, result)

    async def _relay(
        self,
        request: web.Request,
        backend: aiohttp.ClientResponse,
        route: str,
        result: ForwardResult,
    ) -> web.StreamResponse:
        response = RelayedResponse(status=backend.status, reason=backend.reason)
        response.headers.extend(end_to_end(backend.headers, drop=_RESPONSE_FRAMING))
        response.backend_content_type = "Content-Type" in backend.headers
        length = backend.headers.get("Content-Length")
        if length is not None and length.isdigit():
            response.content_length = int(length)
        if backend.content.is_eof():
            # The whole body came with the headers (a small answer): headers and body go out in
            # one write, as aiohttp does for its own Responses, not two. A body still on its way
            # keeps the headers going out at once, so a slow or streaming answer is not held up.
            response._send_headers_immediately = False
        # Otherwise aiohttp frames the body itself: chunked for HTTP/1.1, and delimited by
        # closing the connection for HTTP/1.0 (which has no chunked coding).
        await response.prepare(request)
        async for chunk in self._body(request, backend):
            try:
                await response.write(chunk)
            except ConnectionError as exc:
                # The client went away (aiohttp's ClientConnectionResetError is a ClientError
                # too, so it must not reach the backend's handler below): a 499.
                raise ConnectionResetError("client closed the connection") from exc
        await response.write_eof()
        return response

    async def _body(
        self, request: web.Request, backend: aiohttp.ClientResponse
    ) -> AsyncIterator[bytes]:
        """The backend's body; reading it failing is the backend's fault."""
        try:
            async for chunk in _response_pieces(backend):
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Headers are gone already: the only honest signal left is a cut connection.
            self._metrics.backend_errors.labels(kind="response_aborted").inc()
            if request.transport is not None:
                request.transport.abort()
            raise ResponseAborted("backend dropped the response mid-body") from exc


def _unrelayable(backend: aiohttp.ClientResponse) -> str | None:
    """Why a response cannot be passed on as it is, if it cannot: a header aiohttp would edit,
    a transfer coding it would not undo, or a switch of protocols nobody asked for (``Upgrade``
    is never forwarded, and relaying a 101 would leave the client waiting on a connection that
    speaks nothing it knows)."""
    if backend.status == 101:
        return "the backend switched protocols although no upgrade was asked for"
    if has_undecodable_bytes(backend.headers):
        return "the backend sent a header value that is not valid UTF-8"
    codings = backend.headers.getall("Transfer-Encoding", ())
    if codings and (len(codings) > 1 or codings[0].lower() != "chunked"):
        # aiohttp undoes only ``chunked``; ``gzip`` (or ``chunked, chunked``) would reach the
        # client as if it were the content, the coding's name dropped with the hop-by-hop
        # header. nginx refuses these too ("upstream sent unknown Transfer-Encoding").
        return "the backend sent a Transfer-Encoding other than chunked"
    return None


def _response_pieces(backend: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The backend's body in the pieces aiohttp buffered, taken whole (no copy: a 20 MB download
    costs 13.4-14.5 instead of 15.5-17.1 ms of CPU, ``bench/NOTES.md``, fourth round). A
    chunked body comes in its HTTP chunks instead, which are joined up to ``READ_CHUNK`` so a
    backend streaming small chunks does not cost one write to the client each."""
    if "chunked" in backend.headers.get("Transfer-Encoding", "").lower():
        return backend.content.iter_chunked(READ_CHUNK)
    return _whole_pieces(backend.content)


async def _whole_pieces(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    while piece := await next_piece(content):
        yield piece
