"""To the backend and back, streaming both ways through the backend's pool (``backend_pool.py``).

Bodies are never held whole here: a request body arrives as an async iterator (or, when the spool
kept a small upload in memory in one piece, as that ``bytes``) and the response is copied chunk
by chunk. Failures before the backend answered become problem+json (502/504); a failure after
the response started can only be signalled by cutting the connection (:class:`ResponseAborted`),
so a half response is never passed off as a whole one.

Like nginx, it adds nothing the backend did not send (aiohttp's default Content-Type is taken
back off), frames a body without a length as the client's HTTP version allows (chunked, or by
closing for HTTP/1.0), and refuses a response header it could not relay unchanged (502).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway.backend_pool import READ_CHUNK, BackendPool
from gateway.body import next_piece
from gateway.config import ConfigError, ConfigIssue
from gateway.config.model import BackendConfig
from gateway.errors import GatewayError
from gateway.headers import end_to_end, has_undecodable_bytes
from gateway.metrics import Metrics

LOGGER = logging.getLogger("upload_gateway.forward")
# Headers aiohttp's server computes itself for the response it writes.
_RESPONSE_FRAMING = ("content-length",)  # Transfer-Encoding is hop-by-hop already


class RelayedResponse(web.StreamResponse):
    """A backend's response on its way back; ``backend_content_type`` is False when the backend
    sent none, so the ``on_response_prepare`` hook removes the default aiohttp adds."""

    backend_content_type = True


async def keep_backend_content_type(request: web.Request, response: web.StreamResponse) -> None:
    if isinstance(response, RelayedResponse) and not response.backend_content_type:
        response.headers.popall("Content-Type", None)


class ResponseAborted(ConnectionResetError):
    """The backend failed after the response started; the client's connection was cut."""


class BodyFailedMidResponse(ConnectionResetError):
    """The client's body failed (it vanished, or stalled past ``server.body_timeout``) while the
    backend was already answering; the answer was cut. ``cause`` says which, for the log."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__("the client's body ended mid-exchange")
        self.cause = cause


@dataclass
class ForwardResult:
    """What the access log and metrics need to know about the exchange."""

    backend_seconds: float = 0.0


class Forwarder:
    """Owns the backend pools; started and closed by the app's cleanup context, and given each
    reloaded ``backend`` config (:meth:`apply`)."""

    def __init__(self, config: BackendConfig, metrics: Metrics) -> None:
        self._config = config
        self._metrics = metrics
        self._pool: BackendPool | None = None
        self._retired: set[BackendPool] = set()  # replaced, with exchanges still on them
        self._closing: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._pool = BackendPool(self._config)

    def apply(self, config: BackendConfig, source: str) -> bool:
        """New exchanges use ``config`` from now on; True if it differs (or its CA bundle was
        renewed). Exchanges under way finish on the pool they began on, which is closed after
        the last of them.

        Raises ``ConfigError`` and changes nothing when the new pool cannot be made (a
        ``ca_file`` that went missing or bad since the loader read it): the reload fails like
        one whose file does not parse, instead of the error ending the file watcher's task."""
        if self._pool is None or self._pool.serves(config):
            self._config = config
            return False
        try:
            pool = BackendPool(config)
        except (OSError, ssl.SSLError, ValueError) as exc:
            issue = ConfigIssue(None, "backend.ca_file", f"cannot be loaded: {exc}")
            raise ConfigError([issue], source) from None
        old, self._pool, self._config = self._pool, pool, config
        if old.exchanges:
            self._retired.add(old)
        else:
            self._close_soon(old)
        return True

    def _close_soon(self, pool: BackendPool) -> None:
        self._retired.discard(pool)
        task = asyncio.get_running_loop().create_task(pool.close(), name="backend-pool-close")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        pools = [p for p in (self._pool, *self._retired) if p is not None]
        self._pool = None
        self._retired.clear()
        await asyncio.gather(*(p.close() for p in pools), *self._closing)

    async def ping(self) -> bool:
        """Can we open a TCP connection to the backend? (``/readyz``; any HTTP answer counts)."""
        base = URL(self._config.url)
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(base.host, base.port), self._config.connect_timeout
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
        pool = self._pool
        assert pool is not None, "Forwarder.start() was not awaited"
        pool.exchanges += 1
        try:
            return await self._exchange(pool, request, headers, body, route, result, client_error)
        finally:
            pool.exchanges -= 1
            if not pool.exchanges and pool in self._retired:
                self._close_soon(pool)

    async def _exchange(
        self,
        pool: BackendPool,
        request: web.Request,
        headers: CIMultiDict[str],
        body: AsyncIterable[bytes] | bytes | None,
        route: str,
        result: ForwardResult,
        client_error: Callable[[], BaseException | None],
    ) -> web.StreamResponse:
        url = URL(str(pool.base) + request.raw_path, encoded=True)
        if request.method == "HEAD":
            # A backend that wrongly sends a body after a HEAD answer would leave bytes in a
            # pooled connection for the next request to read as its response (a desync that
            # hands one client's data to another): a HEAD never reuses its connection.
            headers["Connection"] = "close"
        started = time.monotonic()
        try:
            backend = await pool.session.request(
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
            return await self._relay(request, backend, route, result, client_error)

    async def _relay(
        self,
        request: web.Request,
        backend: aiohttp.ClientResponse,
        route: str,
        result: ForwardResult,
        client_error: Callable[[], BaseException | None],
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
        async for chunk in self._body(request, backend, client_error):
            try:
                await response.write(chunk)
            except ConnectionError as exc:
                # The client went away (aiohttp's ClientConnectionResetError is a ClientError
                # too, so it must not reach the backend's handler below): a 499.
                raise ConnectionResetError("client closed the connection") from exc
        await response.write_eof()
        return response

    async def _body(
        self,
        request: web.Request,
        backend: aiohttp.ClientResponse,
        client_error: Callable[[], BaseException | None],
    ) -> AsyncIterator[bytes]:
        """The backend's body; reading it failing is the backend's fault, unless it failed
        because the client's own body did (it vanished or stalled while the backend answered)."""
        try:
            async for chunk in _response_pieces(backend):
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Headers are gone already: the only honest signal left is a cut connection.
            if request.transport is not None:
                request.transport.abort()
            if (cause := client_error()) is not None:
                raise BodyFailedMidResponse(cause) from exc
            self._metrics.backend_errors.labels(kind="response_aborted").inc()
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
