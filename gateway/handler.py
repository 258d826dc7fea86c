"""The request path, top to bottom (SPEC §1).

    authenticate → (policy query | pass-through | upload: precheck → inspect+spool) → forward

Every refusal is a :class:`GatewayError` raised by a stage and rendered here, once. Anything
else that escapes a stage is a bug: it becomes a 500 and is logged — never a request let through.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, AsyncIterator, Callable

from aiohttp import web
from multidict import CIMultiDict

from gateway.accesslog import RequestRecord, log_request
from gateway.auth.authenticator import Identity
from gateway.body import BodyStream
from gateway.client_ip import client_address
from gateway.config.model import Config
from gateway.cors import add_cors_headers, is_preflight, preflight_response
from gateway.errors import GatewayError, problem_response
from gateway.forward import BodyFailedMidResponse, ForwardResult, ResponseAborted
from gateway.headers import end_to_end, forwarded_for, request_id
from gateway.inspect.precheck import precheck_upload
from gateway.inspect.upload import inspect_upload
from gateway.policy.query import POLICY_PREFIX, policy_response
from gateway.policy.routes import UploadTarget, match_upload
from gateway.policy.rules import megabytes
from gateway.state import STATE, GatewayState

LOGGER = logging.getLogger("upload_gateway")
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
POLICY_ROUTE = "policy"  # the route label of GET /_gateway/policy/{channel}
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


async def handle(request: web.Request) -> web.StreamResponse:
    """Serve one request; the config is read once here so a reload never changes it midway."""
    state = request.app[STATE]
    config = state.config.current
    record = RequestRecord(
        request_id=request_id(request.headers),
        method=request.method,
        path=request.path,
        remote=client_address(request.remote or "", request.headers, config.server.trusted_proxies),
    )
    response: web.StreamResponse | None = None
    try:
        response = await _serve(request, state, config, record)
    except GatewayError as error:
        response = _refuse(request, state, config, record, error)
        # Its traceback holds every frame between here and where it was raised, and those
        # frames hold it: a cycle that would keep the chunk being inspected (up to 256 KiB) for
        # the garbage collector, under a flood of refusals a lot of it. It is rendered already.
        error.__traceback__ = None
    except asyncio.CancelledError:
        # aiohttp cancels a handler only when the server stops (handler_cancellation is off: a
        # client going away surfaces as a ConnectionError below), that is when the drain's
        # grace ran out: the gateway cut the request, so it must not pass for the client's doing.
        shutdown = state.draining
        record.reason = "shutdown" if shutdown else "client_closed"
        record.finish(503 if shutdown else 499)  # 499: nginx's "client closed request"
        raise
    except ConnectionError as gone:
        # The client went away mid-request (ordinary on mobile networks), or the backend failed
        # mid-response and the client's connection was cut, or the client took nothing of the
        # response for server.send_timeout and the gateway cut it: the access line and the
        # metrics say which. Raising would make aiohttp log an ERROR with a traceback and count
        # a 500; this answer goes to a closed transport, which aiohttp ignores.
        status, record.reason = _connection_end(request, gone)
        response = web.Response(status=status)
        response.force_close()
        gone.__traceback__ = None  # the same cycle as a refusal's, as common on mobile networks
    except Exception:
        LOGGER.exception("unexpected error, request %s refused", record.request_id)
        internal = GatewayError("internal_error", "an unexpected error occurred; it was logged")
        response = _refuse(request, state, config, record, internal)
    finally:
        _account(state, record, response)
    return response


async def _serve(
    request: web.Request, state: GatewayState, config: Config, record: RequestRecord
) -> web.StreamResponse:
    policy = request.path.startswith(POLICY_PREFIX)
    if is_preflight(request):
        if request.body_exists or "Transfer-Encoding" in request.headers:
            # A preflight never has a body (Fetch); the Secret exemption must not make OPTIONS
            # an unauthenticated way to send bytes to the backend.
            raise GatewayError("malformed_request", "a CORS preflight carries no body")
        if policy:
            record.route = POLICY_ROUTE
            return preflight_response(request, config.cors, state.auth.config.header)
        return await _forward(request, state, config, record, identity=None, body=None)
    if policy and request.method == "GET":
        # answered (or refused: a 401, a 429) here: not proxied traffic, in metrics and log
        record.route = POLICY_ROUTE
    identity = await state.auth.authenticate(request.headers, record.remote)
    record.client_id = identity.client_id
    if record.route == POLICY_ROUTE:
        response = policy_response(request, config, identity.claims, record.request_id)
        add_cors_headers(response, request, config.cors)  # SPEC §5: the widget must read it
        return response
    target = match_upload(config, request.method, request.raw_path)
    if target is None:
        body = _passthrough_body(request, config)
        await _send_continue(request)
        return await _forward(request, state, config, record, identity, body)
    return await _upload(request, state, config, record, identity, target)


async def _upload(
    request: web.Request,
    state: GatewayState,
    config: Config,
    record: RequestRecord,
    identity: Identity,
    target: UploadTarget,
) -> web.StreamResponse:
    """Inspect and spool the whole body; only a body that passed every check is forwarded."""
    record.route, record.channel = target.route, target.channel
    precheck_upload(request.headers, target, identity.claims, config)
    await _send_continue(request)
    body = _body_stream(request, config)
    state.metrics.inflight_uploads.inc()
    try:
        upload = await inspect_upload(
            body,
            request.headers,
            target,
            identity.claims,
            config,
            state.spool_budget,
            state.metrics,
        )
        async with upload:  # the spool is released on every way out
            record.role = upload.role
            record.sniffed_types = [f.sniffed_type for f in upload.files]
            record.would_reject = upload.would_reject
            return await _forward(
                request, state, config, record, identity, upload.body(), upload.content_length
            )
    finally:
        record.bytes_in = body.received
        state.metrics.inflight_uploads.dec()


async def _forward(
    request: web.Request,
    state: GatewayState,
    config: Config,
    record: RequestRecord,
    identity: Identity | None,
    body: BodyStream | AsyncIterable[bytes] | bytes | None,
    content_length: int | None = None,
) -> web.StreamResponse:
    headers = _backend_headers(request, record.request_id, identity, state.auth.config.header)
    if content_length is None and request.content_length is not None:
        content_length = request.content_length
    if content_length is not None:
        headers["Content-Length"] = str(content_length)
    counted = _CountedBody(body) if body is not None and not isinstance(body, bytes) else None
    result = ForwardResult()
    client_error = (lambda: body.error) if isinstance(body, BodyStream) else (lambda: None)
    try:
        sent = body if counted is None else counted
        response = await state.forwarder.forward(
            request, headers, sent, record.route, result, client_error
        )
        if isinstance(body, bytes):
            record.bytes_out = len(body)  # handed to the connection whole
        return response
    except GatewayError:
        if isinstance(body, BodyStream) and body.error is not None:
            raise body.error from None  # the client's fault, not the backend's
        raise
    finally:
        if counted is not None:
            record.bytes_out = counted.sent
        if isinstance(body, BodyStream):
            record.bytes_in = body.received
        record.backend_ms = round(result.backend_seconds * 1000, 3)
        state.metrics.forwarded_bytes.labels(record.route).inc(record.bytes_out)


class _CountedBody:
    """Counts what actually went to the backend (forwarded-bytes metric, access log)."""

    def __init__(self, body: AsyncIterable[bytes]) -> None:
        self._body = body
        self.sent = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._body:
            self.sent += len(chunk)
            yield chunk


def _passthrough_body(request: web.Request, config: Config) -> BodyStream | None:
    """Any other request's body, held to ``limits.max_passthrough_size`` as nginx holds every
    location to ``client_max_body_size``: a file sent where no upload route looks (a path the
    routes miss, a method they do not list) is not inspected, but it is not unbounded either.
    A ``Content-Length`` over the limit is refused before ``100 Continue`` and before any byte
    is read; a body that grows past it is cut off there, the backend having had at most the
    limit (its request is aborted, never completed)."""
    limit = config.limits.max_passthrough_size
    if not request.body_exists:
        return None
    length = request.content_length
    if limit and length is not None and length > limit:
        raise _passthrough_too_large(limit)
    return _body_stream(request, config, limit, lambda: _passthrough_too_large(limit))


def _passthrough_too_large(limit: int) -> GatewayError:
    return GatewayError(
        "request_too_large",
        f"the request body is larger than {limit} bytes, the most the gateway passes on in a "
        "request that is not an upload (set by limits.max_passthrough_size)",
        limit_bytes=limit,
        limit_source="limits.max_passthrough_size",
        maxFileSizeAllow=megabytes(limit),
    )


def _body_stream(
    request: web.Request,
    config: Config,
    limit: int = 0,
    too_large: Callable[[], GatewayError] | None = None,
) -> BodyStream:
    chunked = "chunked" in request.headers.get("Transfer-Encoding", "").lower()
    return BodyStream(request.content, config.server.body_timeout, chunked, limit, too_large)


def _backend_headers(
    request: web.Request, rid: str, identity: Identity | None, auth_header: str
) -> CIMultiDict[str]:
    """The client's end-to-end headers (the backend may check the Secret too) plus ours."""
    # "Proxy" is httpoxy: a CGI backend would take it for its HTTP_PROXY (nginx's advice too)
    drop: tuple[str, ...] = ("content-length", "expect", "host", "proxy")
    if identity is None:  # a preflight: a credential nobody verified is not passed on
        drop += (auth_header.lower(),)
    headers = end_to_end(request.headers, drop=drop)
    for name in [k for k in headers if k.lower().replace("_", "-").startswith("x-gateway-")]:
        # never let a client assert what only the gateway may say, in either spelling (CGI and
        # WSGI backends read X_Gateway_Client_Id and X-Gateway-Client-Id as one variable)
        headers.popall(name, None)
    headers["X-Request-Id"] = rid
    chain = ", ".join(request.headers.getall("X-Forwarded-For", []))  # every line, in order
    headers["X-Forwarded-For"] = forwarded_for(chain or None, request.remote or "")
    headers["X-Forwarded-Proto"] = request.scheme
    headers["X-Forwarded-Host"] = request.headers.get("Host", "")
    if identity is not None:
        headers["X-Gateway-Client-Id"] = identity.client_id
    return headers


async def _send_continue(request: web.Request) -> None:
    """``100 Continue`` only once the request passed every check that needs no body."""
    if request.version >= (1, 1) and request.headers.get("Expect", "").lower() == "100-continue":
        await request.writer.write(CONTINUE)


def _refuse(
    request: web.Request,
    state: GatewayState,
    config: Config,
    record: RequestRecord,
    error: GatewayError,
) -> web.Response:
    record.reason = error.code
    if record.channel is not None and record.role is None:
        role = error.fields.get("role")
        record.role = role if role in ("agent", "customer") else None
    sniffed = error.fields.get("sniffed_type")
    if isinstance(sniffed, str) and not record.sniffed_types:
        # SPEC §6: the access line names the sniffed type, above all when it was refused for it
        record.sniffed_types = [sniffed]
    response = problem_response(error, record.request_id)
    if request.body_exists and not request.content.at_eof():
        # Unread body: draining up to 50 MB only to keep the connection is not worth it.
        response.force_close()
    add_cors_headers(response, request, config.cors)
    state.metrics.rejections.labels(reason=error.code, channel=record.channel or "").inc()
    if record.bytes_in:
        state.metrics.rejected_received_bytes.inc(record.bytes_in)
    return response


def _connection_end(request: web.Request, gone: ConnectionError) -> tuple[int, str]:
    """Who ended an exchange whose connection went: the backend (502), the gateway because the
    client sent (``server.body_timeout``) or read (``send_timeout``) nothing for too long (408),
    the client (499, nginx's "client closed request")."""
    if isinstance(gone, ResponseAborted):
        return 502, "backend_aborted"
    if isinstance(gone, BodyFailedMidResponse) and isinstance(gone.cause, GatewayError):
        return gone.cause.status, gone.cause.code  # its body stalled: 408 body_timeout
    if getattr(request.protocol, "send_timed_out", False):
        return 408, "send_timeout"
    return 499, "client_closed"


def _account(
    state: GatewayState, record: RequestRecord, response: web.StreamResponse | None
) -> None:
    if response is not None:
        record.finish(response.status)
    metrics = state.metrics
    method = record.method if record.method in KNOWN_METHODS else "OTHER"
    # Label values are positional, in the order metrics.py declares them: with keywords,
    # prometheus_client sorts them on every call, and these run for every request.
    metrics.requests.labels(record.route, method, str(record.status)).inc()
    metrics.request_duration.labels(record.route).observe(record.duration_ms / 1000)
    metrics.received_bytes.labels(record.route).inc(record.bytes_in)
    if record.channel is not None:
        role = record.role or "unknown"
        metrics.uploads.labels(record.channel, role, _outcome(record)).inc()
    log_request(record)


def _outcome(record: RequestRecord) -> str:
    """accepted | reported (report mode let it pass) | rejected | failed | backend_refused |
    aborted (the client went away, or stopped reading the answer: neither the policy's refusal
    nor the gateway's failure)."""
    if record.reason is None:
        if record.status >= 400:
            return "backend_refused"
        return "reported" if record.would_reject else "accepted"
    if record.reason in ("client_closed", "send_timeout"):
        return "aborted"
    return "rejected" if record.status < 500 else "failed"
