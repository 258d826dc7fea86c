"""CORS for the gateway's own responses (SPEC §5).

A browser that gets a 413 without ``Access-Control-Allow-Origin`` reports a CORS failure and hides
the real answer from the chat widget; so every problem+json we make carries the headers when the
request's Origin is allowed. Preflights are not ours to answer: they go to the backend unchanged
(without a Secret, since browsers never send one on a preflight, SPEC §3) — except for the
gateway's own endpoint (``GET /_gateway/policy/{channel}``), whose preflight only the gateway can
answer.
"""

from __future__ import annotations

from aiohttp import web

from gateway.config.model import CorsConfig

EXPOSED = "X-Request-Id, Retry-After, WWW-Authenticate"


def is_preflight(request: web.Request) -> bool:
    return request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers


def allowed_origin(request: web.Request, cors: CorsConfig) -> str | None:
    """The ``Access-Control-Allow-Origin`` value for this request, or None.

    A listed origin is echoed (with credentials); ``*`` in the list admits any other origin as
    ``*``, without credentials, so a wildcard never lets every site read credentialed answers
    (and ``null``, the origin of sandboxed frames and local files, only ever as ``*``)."""
    origin = request.headers.get("Origin")
    if not origin:
        return None
    if origin in cors.allowed_origins:
        return origin
    return "*" if "*" in cors.allowed_origins else None


def add_cors_headers(response: web.StreamResponse, request: web.Request, cors: CorsConfig) -> bool:
    """Allow the browser to read a response the gateway made itself, for allowed origins only;
    whether the origin was allowed."""
    allowed = allowed_origin(request, cors)
    if allowed is None:
        return False
    response.headers["Access-Control-Allow-Origin"] = allowed
    if allowed != "*":
        response.headers["Access-Control-Allow-Credentials"] = "true"
    response.headers["Access-Control-Expose-Headers"] = EXPOSED
    response.headers.add("Vary", "Origin")
    return True


def preflight_response(request: web.Request, cors: CorsConfig, auth_header: str) -> web.Response:
    """The answer to a preflight for the gateway's own endpoint: GET with the Secret's header."""
    response = web.Response(status=204)
    if not add_cors_headers(response, request, cors):
        response.headers.add("Vary", "Origin")
        return response
    response.headers["Access-Control-Allow-Methods"] = "GET"
    response.headers["Access-Control-Allow-Headers"] = auth_header
    response.headers["Access-Control-Max-Age"] = str(cors.max_age)
    return response
