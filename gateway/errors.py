"""Every response the gateway makes itself, in one table (SPEC §5), and problem+json rendering.

A stage of the request path never builds a response: it raises :class:`GatewayError` with a code
from :data:`ERRORS`, and :func:`problem_response` turns it into RFC 9457
``application/problem+json``
in one place. That keeps status codes, titles and the platform's own fields
(``unValidActivity``…) consistent, and lets CORS and ``WWW-Authenticate`` be added once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

PROBLEM_TYPE_BASE = "urn:upload-gateway:problem:"
PROBLEM_CONTENT_TYPE = "application/problem+json"


@dataclass(frozen=True)
class ErrorKind:
    status: int
    title: str
    who: str  # who refused, in the plain words of ``detail`` (SPEC §5)
    un_valid_activity: int | None = None  # the platform's own code for the same event


_GATEWAY = "the upload gateway"
_POLICY = "the channel's media settings"
_BACKEND = "the backend"

ERRORS: Mapping[str, ErrorKind] = {
    "malformed_request": ErrorKind(400, "Malformed request", _GATEWAY),
    "missing_secret": ErrorKind(401, "Missing Secret", _GATEWAY),
    "invalid_secret": ErrorKind(401, "Invalid Secret", _GATEWAY),
    "expired_secret": ErrorKind(401, "Expired Secret", _GATEWAY),
    "key_not_active": ErrorKind(403, "API key not active", _GATEWAY),
    "uploads_disabled": ErrorKind(403, "Uploads not enabled", _POLICY, 17),
    "ip_not_allowed": ErrorKind(403, "Client IP not allowed", _GATEWAY),
    "not_found": ErrorKind(404, "Not found", _GATEWAY),
    "header_timeout": ErrorKind(408, "Request header timeout", _GATEWAY),
    "body_timeout": ErrorKind(408, "Request body timeout", _GATEWAY),
    "file_too_large": ErrorKind(413, "File too large", _POLICY, 16),
    "request_too_large": ErrorKind(413, "Request too large", _POLICY, 16),
    "too_many_files": ErrorKind(413, "Too many files", _POLICY),
    "type_not_allowed": ErrorKind(415, "File type not allowed", _POLICY, 15),
    "type_mismatch": ErrorKind(415, "File type does not match its name", _POLICY, 15),
    "rate_limited": ErrorKind(429, "Rate limit exceeded", _GATEWAY),
    "headers_too_large": ErrorKind(431, "Request headers too large", _GATEWAY),
    "internal_error": ErrorKind(500, "Internal gateway error", _GATEWAY),
    "backend_unavailable": ErrorKind(502, "Backend unavailable", _BACKEND),
    "auth_unavailable": ErrorKind(503, "Authentication unavailable", _GATEWAY),
    "shutting_down": ErrorKind(503, "Gateway shutting down", _GATEWAY),
    "backend_timeout": ErrorKind(504, "Backend timeout", _BACKEND),
    "spool_full": ErrorKind(507, "No room to spool the upload", _GATEWAY),
}


class GatewayError(Exception):
    """A refusal by the gateway. ``fields`` are extra problem members (``limit_bytes``…)."""

    def __init__(
        self,
        code: str,
        detail: str,
        *,
        headers: Mapping[str, str] | None = None,
        **fields: Any,
    ) -> None:
        if code not in ERRORS:
            raise KeyError(f"unknown gateway error code {code!r}")
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.kind = ERRORS[code]
        self.detail = detail
        self.headers = dict(headers or {})
        self.fields = fields

    @property
    def status(self) -> int:
        return self.kind.status


def problem_body(error: GatewayError, request_id: str) -> dict[str, Any]:
    """The RFC 9457 document, plus the platform's fields where the platform has a code."""
    kind = error.kind
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + error.code,
        "title": kind.title,
        "status": kind.status,
        "detail": f"Refused by {_who_refused(error)}: {error.detail}",
        "code": error.code,
        "request_id": request_id,
    }
    body.update(error.fields)
    if kind.un_valid_activity is not None:
        body.setdefault("unValidActivity", kind.un_valid_activity)
        body.setdefault("description", error.detail)
    return body


def _who_refused(error: GatewayError) -> str:
    """SPEC §5: who refused, so nobody takes a system limit for a policy or the reverse. A size
    or count refusal is the channel's media settings' only when a channel's setting set the
    limit; the ``limits.*`` section (the 20 MB cap, ``max_request_size``, ``max_files``,
    ``max_passthrough_size``) is the gateway's own, the same for every channel."""
    source = error.fields.get("limit_source")
    if isinstance(source, str) and source.startswith("limits."):
        return _GATEWAY
    return error.kind.who


def problem_response(error: GatewayError, request_id: str) -> web.Response:
    """Render ``error``; CORS is added by the caller that knows the request's Origin."""
    headers = {"X-Request-Id": request_id, **error.headers}
    response = web.Response(
        status=error.status,
        body=json.dumps(problem_body(error, request_id)).encode(),
        content_type=PROBLEM_CONTENT_TYPE,
        headers=headers,
    )
    if error.status in (400, 408, 431):
        # The framing or timing of the stream can no longer be trusted: do not reuse it.
        response.force_close()  # aiohttp then answers "Connection: close" and closes
    return response
