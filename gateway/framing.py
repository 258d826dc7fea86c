"""Request-framing checks aiohttp's parser leaves to us, run before anything else sees a request.

aiohttp's C parser (llhttp, strict mode for requests) already refuses with 400, before a handler
runs: ``Content-Length`` together with ``Transfer-Encoding``, duplicate or non-decimal
``Content-Length``, runaway or non-hex chunk sizes, obs-fold, bare LF or CR, NUL/CR in header
values, duplicate ``Transfer-Encoding``/``Host``, unknown methods and versions. It lets through,
and a reverse proxy must not:

* a ``Transfer-Encoding`` that merely *ends* in ``chunked`` (``gzip, chunked``), which it parses as
  chunked but whose coding nobody undoes: the backend would get bytes framed differently from what
  the client meant, the classic seam for request smuggling between two hops;
* ``Transfer-Encoding`` on an HTTP/1.0 request (RFC 9112 §6.1: the framing is faulty);
* request targets that are not origin-form: absolute-form (``GET http://evil/``) would be glued
  onto the backend URL, asterisk-form (``OPTIONS *``) and authority-form (``CONNECT host:443``)
  mean nothing to a reverse proxy.

The Python fallback parser (``AIOHTTP_NO_EXTENSIONS``) is laxer still (any method token, any
``HTTP/1.x``), so method and version are checked here as well. Every refusal is 400
``malformed_request``, whose response closes the connection, so nothing pipelined behind it runs.
"""

from __future__ import annotations

import re

from aiohttp import web

from gateway.errors import GatewayError
from gateway.headers import has_undecodable_bytes

# RFC 9110 §5.6.2 token; aiohttp's C parser only knows registered methods anyway.
_METHOD = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSIONS = frozenset({(1, 0), (1, 1)})


def check_framing(request: web.BaseRequest) -> None:
    """Raise 400 ``malformed_request`` for framing a reverse proxy must not pass on."""
    if request.version not in _VERSIONS:
        raise _malformed(f"HTTP/{request.version.major}.{request.version.minor} is not supported")
    if not _METHOD.fullmatch(request.method):
        raise _malformed("the method is not a valid token")
    if not request.raw_path.startswith("/"):
        raise _malformed("the request target must be a path (origin-form), like /streams/1/objects")
    _check_transfer_encoding(request)
    if has_undecodable_bytes(request.headers):
        raise _malformed("a header value is not valid UTF-8 and cannot be forwarded unchanged")


def _check_transfer_encoding(request: web.BaseRequest) -> None:
    codings = request.headers.getall("Transfer-Encoding", [])
    if not codings:
        return
    if request.version < (1, 1):
        raise _malformed("Transfer-Encoding is not allowed in an HTTP/1.0 request")
    # Same rule as nginx: exactly one coding, "chunked" (case-insensitive, RFC 9112 §7).
    if len(codings) != 1 or codings[0].strip().lower() != "chunked":
        raise _malformed("Transfer-Encoding must be exactly 'chunked'")


def _malformed(detail: str) -> GatewayError:
    return GatewayError("malformed_request", detail)
