"""To the backend and back, streaming both ways through one pooled ``ClientSession``.

Bodies are never held whole here: a request body arrives as an async iterator (or, when the spool
kept a small upload in memory in one piece, as that ``bytes``) and the response is copied chunk
by chunk. aiohttp's client would normally decompress responses; that is off, so the client gets
exactly the bytes the backend sent. Failures before the backend answered become problem+json
(502/504); a failure after the response started can only be signalled by cutting the connection
(:class:`ResponseAborted`), so a half response is never passed off as a whole one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway.body import next_piece
from gateway.config.model import BackendConfig
from gateway.errors import GatewayError
from gateway.headers import end_to_end
from gateway.metrics import Metrics

LOGGER = logging.getLogger("upload_gateway.forward")
READ_CHUNK = 256 * 1024
# Headers aiohttp's server computes itself for the response it writes.
_RESPONSE_FRAMING = ("content-length",)  # Transfer-Encoding is hop-by-hop already


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
        connector = aiohttp.TCPConnector(
            limit=self._config.pool_size,
            keepalive_timeout=30,
            ssl=ssl,  # type: ignore[arg-type]
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
        except aiohttp.ClientError as exc:
            gone = client_error()
            if gone is not None:
                raise gone from None
            LOGGER.warning("backend request failed: %s: %.200r", type(exc).__name__, str(exc))
            self._metrics.backend_errors.labels(kind="connect").inc()
            raise GatewayError(
                "backend_unavailable", "the backend refused or dropped the connection"
            ) from exc
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
        response = web.StreamResponse(status=backend.status, reason=backend.reason)
        response.headers.extend(end_to_end(backend.headers, drop=_RESPONSE_FRAMING))
        length = backend.headers.get("Content-Length")
        if length is not None and length.isdigit():
            response.content_length = int(length)
        elif _has_body(request.method, backend.status):
            response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            async for chunk in _response_pieces(backend):
                await response.write(chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Headers are gone already: the only honest signal left is a cut connection.
            self._metrics.backend_errors.labels(kind="response_aborted").inc()
            if request.transport is not None:
                request.transport.abort()
            raise ResponseAborted("backend dropped the response mid-body") from exc
        await response.write_eof()
        return response


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


def _has_body(method: str, status: int) -> bool:
    return method != "HEAD" and status not in (204, 304) and not 100 <= status < 200
