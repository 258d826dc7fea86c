"""The HTTP/1.1 connection, before a request reaches the handler: head timeout and parse errors.

aiohttp has no timeout for receiving a request head: its ``keepalive_timeout`` only closes a
connection that is idle *between* requests, so a slowloris client dribbling one header byte a
second holds a connection (and a file descriptor) for as long as it likes. :class:`GatewayProtocol`
times each head from its first byte (and a fresh connection from its accept, like nginx's
``client_header_timeout``) and answers 408 when it is not complete within
``server.header_timeout``. Bodies have their own per-chunk timeout (:mod:`gateway.body`).

Nor has aiohttp a timeout for sending: a client that stops reading a response (its receive window
shut) would hold the connection, its handler, the backend exchange and a pooled backend connection
for ever, and ``backend.pool_size`` such clients would stall every request. Like nginx's
``send_timeout``, :class:`GatewayProtocol` aborts a connection whose client took no byte of what
waits for it for ``server.send_timeout`` (:mod:`gateway.sending`: a slow but steady reader is
never cut off), and the write waiting on it then fails instead of returning as if done.

aiohttp bounds a head only per line (``max_line_size``, ``max_field_size``) and by count (128
headers): ~1 MiB, which an unfinished head holds twice over for the whole head timeout (200 such
connections: +376 MiB RSS in one worker). Like nginx's ``large_client_header_buffers`` and
Envoy's ``max_request_headers_kb``, the request line and headers together are held to
``server.max_head_size`` (431): counted as they arrive, and measured once parsed.

aiohttp also answers requests its parser refuses with a plain-text page that quotes the offending
bytes, and logs them with a traceback; the bytes may be an ``Authorization`` header. Here every
such refusal is problem+json from the one error table (SPEC §5), 431 for heads that are too large,
and the log line names only the kind of error, never the bytes.

Each read of a chunked body is also counted against :mod:`gateway.chunking`: a body of tiny
chunks costs the parser's Python side per chunk, and is refused (400) once out of proportion.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from aiohttp import StreamReader, web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler
from prometheus_client import Counter

from gateway.accesslog import RequestRecord, log_request
from gateway.chunking import ChunkCount
from gateway.errors import GatewayError, problem_body, problem_response
from gateway.headers import new_request_id
from gateway.metrics import Metrics
from gateway.sending import StallClock

LOGGER = logging.getLogger("upload_gateway")
_TOO_MANY_HEADERS = "Too many headers received"
_REASON = re.compile(r"[A-Za-z0-9 `\-]+")


@dataclass(frozen=True)
class ProtocolOptions:
    header_timeout: float
    metrics: Metrics | None  # None: refusals are not counted (the admin listener's own)
    send_timeout: float = 60.0
    max_head_size: int = 64 * 1024
    max_connections: int = 0  # 0: no cap
    refused: Counter | None = None  # counts connections closed past max_connections


class GatewayProtocol(RequestHandler):
    """One client connection; see the module docstring for what it adds to aiohttp's."""

    def __init__(self, manager: web.Server, options: ProtocolOptions, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._options = options
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = -1  # bytes of the current unfinished head; -1: none started
        self._line_end: int | None = None  # offset of the head's first LF, once seen
        self._line_fits = True  # when the parser refused a head: was its request line short?
        self._parse_failed = False
        self._last_payload: StreamReader | None = None
        self._failed_body: StreamReader | None = None
        self._send_clock = StallClock(self._loop, options.send_timeout, self._send_timed_out)
        self.send_timed_out = False  # the handler logs such a cut as send_timeout, not the client's
        self._chunks: ChunkCount | None = None  # the current body's, when it is chunked
        self._answered_body: StreamReader | None = None  # the last answered request's body

    @property
    def options(self) -> ProtocolOptions:
        """The settings this connection was accepted with (a reload changes new ones only)."""
        return self._options

    @property
    def busy(self) -> bool:
        """A request is being handled: its body may still be arriving (server drain waits)."""
        return bool(self._request_in_progress)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()  # a connection that never sends a byte is closed too

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_head_timer()
        self._send_clock.stop()
        if exc is None and self.send_timed_out:
            # aiohttp wakes a write waiting for the buffer to drain with success when the
            # connection ends without an error: the last write of a response would pass for
            # delivered (logged 200). The gateway cut it: that write fails.
            exc = ConnectionResetError("the client took nothing for server.send_timeout")
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        """The client's window is full: the stall clock watches whether it takes any more."""
        super().pause_writing()
        self._send_clock.start(self.transport)

    def resume_writing(self) -> None:
        self._send_clock.stop()
        super().resume_writing()

    def data_received(self, data: bytes) -> None:
        chunks = self._chunks
        if self._parse_failed or (chunks is not None and chunks.refused):
            # The connection ends with that refusal: nothing after it is parsed. Parsing on
            # after a refused head would queue one more error per read, and the refusal would
            # be described by the last (a field over 8 KiB arriving in several reads was
            # answered 400 "request line too long" instead of 431); after a body refused for
            # its chunking, its framing is not trusted.
            return
        # b"" is aiohttp resuming its parser on data it held back while the reader was full
        reading_body = not self._between_requests()
        if data and not reading_body:
            self._note_head_bytes(data)
        count = self._request_count
        mark = chunks.mark() if chunks is not None else 0
        super().data_received(data)
        if chunks is not None and chunks.over(mark):
            self._refuse_chunks(chunks)
        if self._request_count == count:
            if self._head_bytes > self._options.max_head_size and self._idle():
                # Unfinished and already too large: refused now, not once ~1 MiB is parsed.
                # (Behind a request still being answered it waits for _checked: no answer
                # may be written into another one.)
                self._send_refusal(head_too_large(self._options.max_head_size))
                self.force_close()
            return
        # The parser finished a head, or refused the bytes.
        message, payload = self._messages[-1]
        if (exc := getattr(message, "exc", None)) is not None:
            self._parse_failed = True
            self._line_fits = self._line_end is not None and self._line_end <= self.max_line_size
            if reading_body:
                self._fail_body(exc)
        self._last_payload = payload
        self._chunks = ChunkCount(payload) if getattr(message, "chunked", False) else None
        self._head_bytes, self._line_end = -1, None
        self._cancel_head_timer()

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        self._answered_body = request.content
        declined = self._upgraded and not self._messages and self._payload_parser is None
        if declined:
            # A WebSocket upgrade asked for (the gateway proxies none): aiohttp held what came
            # after it aside, to parse it here, past data_received's head and chunk counts (a
            # body of 1-byte chunks behind it went through whole). It is dropped instead, and
            # the connection closes once the answer is out (a client refused a 101 fails the
            # WebSocket anyway).
            self._message_tail = b""
            if not resp.prepared:
                resp.force_close()
        result = await super().finish_response(request, resp, start_time)
        if declined or resp.status == 408 or request.content is self._failed_body:
            # The client stalled, or its body framing broke, or it asked for an upgrade:
            # nothing more worth reading, so skip aiohttp's lingering read (up to 10 s) and
            # close once the answer is out.
            self.force_close()
        return result

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's hook for parse errors (and handler crashes): problem+json, then close."""
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error")
        error = self._classify(status, exc)
        if error.status >= 500:
            LOGGER.error("error serving a request from %s", request.remote, exc_info=exc)
        else:
            LOGGER.info(
                "refused a request from %s: %s (%s)", request.remote, error.code, type(exc).__name__
            )
        return refuse(error, request.remote or "", self._options.metrics)

    def _fail_body(self, exc: BaseException) -> None:
        """aiohttp drops a body whose chunked framing breaks midway without telling its reader,
        which would then wait for the body timeout; fail it now, as the 400 it is."""
        if self._last_payload is None or self._last_payload.is_eof():
            return
        reason = _safe_reason(exc) if isinstance(exc, BadHttpMessage) else type(exc).__name__
        self._refuse_body(
            self._last_payload,
            GatewayError("malformed_request", f"the body's chunked framing is invalid: {reason}"),
        )

    def _send_timed_out(self) -> None:
        """Aborted, not closed: a close would wait for the unsent bytes to drain, that is for
        ever. The pending write fails, the handler lets go of the backend's connection."""
        self.send_timed_out = True
        if self.transport is not None:
            self.transport.abort()

    def _refuse_chunks(self, chunks: ChunkCount) -> None:
        """A body of too many tiny chunks: refused, and the parser is fed nothing more."""
        chunks.refused = True
        self._refuse_body(chunks.reader, chunks.error())

    def _refuse_body(self, reader: StreamReader, error: GatewayError) -> None:
        """Its handler reads ``error`` instead of the rest of the body. The body of a request
        already answered is read by aiohttp only to be discarded (its lingering read), which an
        error would end with an ERROR line and a traceback ("Unhandled exception"): close, and
        end that read instead (no handler reads it: nothing is taken for complete)."""
        if reader is self._answered_body:
            self.force_close()
            reader.feed_eof()
            return
        self._failed_body = reader
        reader.set_exception(error)

    # -- the head timer -------------------------------------------------------------------------

    def _between_requests(self) -> bool:
        """True when the next bytes start a head rather than continue a body."""
        if self._upgraded or self._payload_parser is not None:
            return False
        return self._last_payload is None or self._last_payload.is_eof()

    def _note_head_bytes(self, data: bytes) -> None:
        if self._head_bytes < 0:
            self._head_bytes = 0
            self._arm_head_timer()
        if self._line_end is None and (lf := data.find(b"\n")) >= 0:
            self._line_end = self._head_bytes + lf
        self._head_bytes += len(data)

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self._loop.call_later(
                self._options.header_timeout, self._head_timed_out
            )

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport is None or self._force_close:
            return
        if self._waiter is None or self._messages:
            # A pipelined head arrived while a request is still being served: never write into
            # that response; its own timeouts apply, and this head gets a fresh period.
            self._arm_head_timer()
            return
        if self._head_bytes >= 0:
            timeout = self._options.header_timeout
            error = GatewayError(
                "header_timeout", f"the request head was not complete within {timeout:g} s"
            )
            self._send_refusal(error)
        self.force_close()

    def _idle(self) -> bool:
        """No request queued or taken, or aiohttp waits for the next: an answer written now
        cannot land before or inside another. (``_request_in_progress`` is not enough: a
        request taken off the queue is not in progress until its task first runs, and uvloop
        handles reads in between.)"""
        return not self._messages and (self._waiter is not None or self._request_count == 0)

    def _send_refusal(self, error: GatewayError) -> None:
        """A problem+json answer for a head the parser never finished (so no handler runs)."""
        status = HTTPStatus(error.status)
        rid = new_request_id()
        body = json.dumps(problem_body(error, rid)).encode()
        head = (
            f"HTTP/1.1 {status.value} {status.phrase}\r\nContent-Type: application/problem+json\r\n"
            f"Content-Length: {len(body)}\r\nX-Request-Id: {rid}\r\nConnection: close\r\n\r\n"
        )
        assert self.transport is not None
        self.transport.write(head.encode() + body)
        peer = self.transport.get_extra_info("peername")
        account(error, rid, str(peer[0]) if peer else "", self._options.metrics)

    # -- parse errors ---------------------------------------------------------------------------

    def _classify(self, status: int, exc: BaseException | None) -> GatewayError:
        if status >= 500 or not isinstance(exc, BadHttpMessage):
            return GatewayError("internal_error", "an unexpected error occurred; it was logged")
        if isinstance(exc, LineTooLong):
            if not self._line_fits:
                return GatewayError(
                    "malformed_request",
                    f"the request line is longer than {self.max_line_size} bytes",
                    limit_bytes=self.max_line_size,
                )
            return GatewayError(
                "headers_too_large",
                f"a request header is longer than {self.max_field_size} bytes",
                limit_bytes=self.max_field_size,
            )
        if exc.message == _TOO_MANY_HEADERS:
            return GatewayError(
                "headers_too_large",
                f"the request has more than {self.max_headers} headers",
                max_headers=self.max_headers,
            )
        return GatewayError("malformed_request", f"not valid HTTP/1.1: {_safe_reason(exc)}")


def refuse(error: GatewayError, remote: str, metrics: Metrics | None) -> web.Response:
    """problem+json for a request refused before the handler; the connection is not reused."""
    rid = new_request_id()
    account(error, rid, remote, metrics)
    response = problem_response(error, rid)
    response.force_close()
    return response


def account(error: GatewayError, rid: str, remote: str, metrics: Metrics | None) -> None:
    """Count and log what never reached the handler, like any other refusal (the admin
    listener's are neither: they are no proxy traffic)."""
    if metrics is None:
        return
    record = RequestRecord(request_id=rid, method="-", path="-", remote=remote)
    record.reason = error.code
    record.finish(error.status)
    metrics.rejections.labels(reason=error.code, channel="").inc()
    metrics.requests.labels(route="proxy", method="OTHER", status=str(error.status)).inc()
    log_request(record)


def head_size(request: web.BaseRequest) -> int:
    """The bytes of a parsed head: request line and header lines (each ``name: value``+CRLF)."""
    line = len(request.method) + len(request.raw_path) + len("  HTTP/1.1\r\n")
    return line + sum(len(name) + len(value) + 4 for name, value in request.raw_headers) + 2


def head_too_large(limit: int) -> GatewayError:
    return GatewayError(
        "headers_too_large",
        f"the request line and headers are larger than {limit} bytes together",
        limit_bytes=limit,
    )


def _safe_reason(exc: BadHttpMessage) -> str:
    """The parser's words for what is wrong, without the request bytes it quotes after them."""
    text = str(exc.message).replace("can't", "cannot")
    match = _REASON.match(text)
    reason = match.group(0).strip() if match else ""
    return reason[:80] or type(exc).__name__
