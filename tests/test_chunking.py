"""A chunked body's framing is held in proportion to its content (``gateway/chunking.py``).

aiohttp costs Python work per HTTP chunk, so a body of 1-byte chunks cost ~0.7 s of CPU per MB
(``python -m bench.chunking``). Past ``FREE_CHUNKS``, a body must average ``MIN_AVERAGE_CHUNK``
bytes per chunk, else 400 ``malformed_request`` and the connection closed, on an upload route
and on a path that is only proxied alike. Every refusal is proven as everywhere else (status,
problem+json, nothing at the backend, no spool left) and that the gateway stopped early: the
access line's ``bytes_in``, the body bytes it took, stays near the bound, far below the body.
Bodies that legitimate clients send, small chunks included, pass byte for byte.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import time
import uuid
from typing import Any

import pytest

from gateway.chunking import FREE_CHUNKS, MIN_AVERAGE_CHUNK
from tests.support import files
from tests.support.gateway_proc import BackendProc, GatewayProc
from tests.support.rawhttp import parse_response
from tests.test_uploads import UPLOAD, assert_no_spool_left

KiB = 1024
PASS = "/t/status/200"  # no upload route: proxied, the body streamed to the backend


def upload_body(size: int) -> tuple[bytes, str]:
    """A customer's PNG upload whose multipart body is about ``size`` bytes."""
    return files.multipart([("file", "photo.png", "image/png", files.make("png", size))])


def pass_body(size: int) -> tuple[bytes, str]:
    return bytes(range(256)) * (size // 256), "application/octet-stream"


BODIES = {"upload": (UPLOAD, upload_body), "pass-through": (PASS, pass_body)}


def framed(body: bytes, sizes: list[int]) -> bytes:
    """``body`` as HTTP chunks of ``sizes`` in turn (the last repeated), and the last chunk."""
    out, at, turn = [], 0, 0
    while at < len(body):
        size = sizes[min(turn, len(sizes) - 1)]
        piece = body[at : at + size]
        out.append(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        at, turn = at + len(piece), turn + 1
    return b"".join(out) + b"0\r\n\r\n"


def head(secret: str, path: str, ctype: str, rid: str, *extra: str) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        "Host: gw",
        f"Authorization: Bearer {secret}",
        f"Content-Type: {ctype}",
        "Transfer-Encoding: chunked",
        f"X-Request-Id: {rid}",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def exchange(port: int, payload: bytes) -> tuple[bytes, bool]:
    """Send ``payload`` until the gateway answers (reading as it goes, so an answer before the
    end is not lost to a reset); then read until it closes. The answer, and whether it did."""
    data = b""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        view = memoryview(payload)
        sock.settimeout(5)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for at in range(0, len(payload), 64 * KiB):
                sock.sendall(view[at : at + 64 * KiB])
                sock.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    data += sock.recv(65536)
                sock.settimeout(5)
                if data:
                    break
        try:
            while piece := sock.recv(65536):
                data += piece
            closed = True
        except ConnectionResetError:
            closed = True
        except TimeoutError:
            closed = False
    return data, closed


def access_line(gateway: GatewayProc, rid: str) -> dict[str, Any]:
    """The request's JSON access line (written once its answer is out)."""
    deadline = time.monotonic() + 5
    while not (mine := [line for line in gateway.log().splitlines() if rid in line]):
        assert time.monotonic() < deadline, "no access line"
        time.sleep(0.05)
    [line] = mine
    return dict(json.loads(line))


def bound(delivered_in_large_chunks: int) -> int:
    """Body bytes a refused body of 1-byte chunks may have delivered: its large chunks, then
    about as many 1-byte chunks as the bound allows, then at most one more parser step (2,048
    chunks) before the verdict; twice that, so the assertion is about order of magnitude."""
    allowed = FREE_CHUNKS + delivered_in_large_chunks // MIN_AVERAGE_CHUNK
    return delivered_in_large_chunks + 2 * (allowed + 2048)


def assert_refused_early(
    gateway: GatewayProc, backend: BackendProc, data: bytes, closed: bool, rid: str, most: int
) -> None:
    response = parse_response(data)
    assert response.status == 400, data[:300]
    assert (response.header("Content-Type") or "").startswith("application/problem+json")
    doc = json.loads(response.body[: int(response.header("Content-Length") or 0)])
    assert doc["code"] == "malformed_request" and doc["status"] == 400
    assert "chunked framing is out of proportion" in doc["detail"], doc["detail"]
    assert closed, "the gateway kept the connection open after refusing its framing"
    assert backend.records() == []
    assert_no_spool_left(gateway)
    entry = access_line(gateway, rid)
    assert (entry["status"], entry["reason"]) == (400, "malformed_request")
    assert entry["bytes_in"] <= most, f"took {entry['bytes_in']} body bytes before refusing"


@pytest.mark.parametrize("route", sorted(BODIES))
def test_a_body_of_one_byte_chunks_is_refused_after_a_few_thousand(
    gateway: GatewayProc, backend: BackendProc, secret: str, route: str
) -> None:
    """256 KiB in 1-byte chunks (1.5 MB on the wire) is refused after ~4,200 of them."""
    path, make_body = BODIES[route]
    body, ctype = make_body(256 * KiB)
    rid = uuid.uuid4().hex
    data, closed = exchange(gateway.port, head(secret, path, ctype, rid) + framed(body, [1]))
    assert_refused_early(gateway, backend, data, closed, rid, bound(0))


@pytest.mark.parametrize("route", sorted(BODIES))
def test_large_chunks_first_buy_only_a_proportional_number_of_small_ones(
    gateway: GatewayProc, backend: BackendProc, secret: str, route: str
) -> None:
    """512 KiB in 64 KiB chunks (an upload's spool is a file by then), then 1-byte chunks: the
    count is over the whole body, so the large chunks allow 8,192 more, not unlimited."""
    path, make_body = BODIES[route]
    body, ctype = make_body(1024 * KiB)
    rid = uuid.uuid4().hex
    sizes = [64 * KiB] * 8 + [1]
    data, closed = exchange(gateway.port, head(secret, path, ctype, rid) + framed(body, sizes))
    assert_refused_early(gateway, backend, data, closed, rid, bound(512 * KiB))


@pytest.mark.parametrize("route", sorted(BODIES))
def test_a_body_of_32_byte_chunks_is_refused_once_past_the_free_chunks(
    gateway: GatewayProc, backend: BackendProc, secret: str, route: str
) -> None:
    """Under the average, though not tiny: at 32 bytes a chunk, past 256 KiB delivered."""
    path, make_body = BODIES[route]
    body, ctype = make_body(1024 * KiB)
    rid = uuid.uuid4().hex
    data, closed = exchange(gateway.port, head(secret, path, ctype, rid) + framed(body, [32]))
    assert_refused_early(gateway, backend, data, closed, rid, 2 * 256 * KiB)


SHAPES = {
    # a client flushing small writes before streaming the rest
    "500 one-byte chunks, then 16 KiB ones": [1] * 500 + [16 * KiB],
    # a multipart writer sending each boundary and head on its own, between file pieces
    "small and 4 KiB chunks alternating": [2, 40, 7, 4 * KiB] * 150 + [4 * KiB],
    # the free chunks, all of them 1 byte, then the rest whole
    f"{FREE_CHUNKS} one-byte chunks, then one": [1] * FREE_CHUNKS + [1024 * KiB],
    # the average the bound asks for, throughout
    f"{MIN_AVERAGE_CHUNK}-byte chunks": [MIN_AVERAGE_CHUNK],
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("route", sorted(BODIES))
def test_ordinary_chunked_bodies_with_small_chunks_pass_byte_for_byte(
    gateway: GatewayProc, backend: BackendProc, secret: str, route: str, shape: str
) -> None:
    path, make_body = BODIES[route]
    body, ctype = make_body(256 * KiB)
    rid = uuid.uuid4().hex
    payload = head(secret, path, ctype, rid, "Connection: close") + framed(body, SHAPES[shape])
    data, _ = exchange(gateway.port, payload)
    assert parse_response(data).status == 200, data[:300]
    [record] = backend.records()
    assert record["sha256"] == hashlib.sha256(body).hexdigest()
    assert access_line(gateway, rid)["bytes_in"] == len(body)


def test_a_body_of_tiny_chunks_left_unread_is_not_drained_after_the_answer(
    gateway: GatewayProc, backend: BackendProc, secret: str
) -> None:
    """The policy query answers without reading the body; aiohttp then reads on for up to
    ``lingering_time``, parsing the rest. Past the bound the connection is closed instead, so
    nothing behind the body (a pipelined request here) is served either."""
    errors = gateway.log().count('"level": "ERROR"')
    rid = uuid.uuid4().hex
    body = framed(b"x" * 64 * KiB, [1])
    query = head(secret, "/_gateway/policy/default", "text/plain", rid).replace(b"POST", b"GET", 1)
    behind = f"GET {PASS}?pipelined HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {secret}\r\n\r\n"
    data, closed = exchange(gateway.port, query + body + behind.encode())
    assert parse_response(data).status == 200, data[:300]
    assert data.count(b"HTTP/1.1 ") == 1, "the request behind the body was served"
    assert closed
    assert backend.records() == []
    # the next request's access line is written after aiohttp has left that connection
    later = uuid.uuid4().hex
    exchange(
        gateway.port, head(secret, PASS, "text/plain", later, "Connection: close") + b"0\r\n\r\n"
    )
    access_line(gateway, later)
    assert gateway.log().count('"level": "ERROR"') == errors, "closing it logged an error"


def test_a_body_behind_a_websocket_upgrade_request_is_neither_parsed_nor_forwarded(
    gateway: GatewayProc, backend: BackendProc, secret: str
) -> None:
    """aiohttp sets aside what follows a request asking for a WebSocket upgrade and, the upgrade
    declined, parsed it where the protocol's counts never saw it: a request pipelined behind
    it with 100,000 1-byte chunks (~70 ms of CPU) reached the backend whole, as would 50 MB of
    them (~35 s). The gateway proxies no upgrade: it answers that request and closes."""
    upgrade = (
        f"GET {PASS}?upgrade HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {secret}\r\n"
        "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    ).encode()
    rid = uuid.uuid4().hex
    behind = head(secret, PASS, "application/octet-stream", rid) + framed(b"x" * 100_000, [1])
    data, closed = exchange(gateway.port, upgrade + behind)
    assert parse_response(data).status == 200, data[:300]
    assert data.count(b"HTTP/1.1 ") == 1, "the request behind the upgrade was served"
    assert closed
    assert [r["path"] for r in backend.records()] == [f"{PASS}?upgrade"]
    assert rid not in gateway.log()
