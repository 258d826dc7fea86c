"""``limits.max_passthrough_size``: the body of a request that is not an upload is bounded too.

nginx holds every location to ``client_max_body_size``; without a bound here, a file sent to a
path the upload routes miss, or with a method they do not list (``PATCH``), would reach the
backend uninspected and of any size. Over the limit, a ``Content-Length`` is refused before a
byte is read (and before ``100 Continue``), and a chunked body is cut off at the limit: the
backend never completes such a request.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import mint
from tests.support.gateway_proc import (
    BackendProc,
    GatewayProc,
    base_config,
    spool_files,
    start_gateway,
)
from tests.support.procs import RedisServer
from tests.support.rawhttp import parse_response
from tests.support.test_backend import pattern

MiB = 1024 * 1024
LIMIT = 1 * MiB


@pytest.fixture(scope="module")
def bounded(
    redis_server: RedisServer,
    backend_proc: BackendProc,
    gateway: GatewayProc,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GatewayProc]:
    work = tmp_path_factory.mktemp("passthrough-limit")
    config = base_config(redis_server.url, backend_proc.url, work / "spool")
    config["limits"]["max_passthrough_size"] = "1MiB"
    gw = start_gateway(config, work)
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def token(gateway: GatewayProc, api_key: str) -> str:
    return mint(gateway, api_key)


def head(token: str, method: str, path: str, *framing: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: gw", f"Authorization: Bearer {token}", *framing]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """The head and the whole Content-Length body of one response (or what came before EOF)."""
    sock.settimeout(timeout)
    data = b""
    while True:
        if b"\r\n\r\n" in data:
            length = parse_response(data).header("Content-Length")
            if length is not None and len(data.partition(b"\r\n\r\n")[2]) >= int(length):
                return data
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def assert_too_large(data: bytes, backend: BackendProc, gw: GatewayProc) -> dict[str, object]:
    response = parse_response(data)
    assert response.status == 413, data[:300]
    assert (response.header("Content-Type") or "").startswith("application/problem+json")
    doc = json.loads(response.body)
    assert doc["code"] == "request_too_large" and doc["status"] == 413
    assert doc["limit_bytes"] == LIMIT
    assert doc["limit_source"] == "limits.max_passthrough_size"
    assert doc["unValidActivity"] == 16 and doc["maxFileSizeAllow"] == 1
    assert doc["detail"].startswith("Refused by the upload gateway:"), doc["detail"]
    assert backend.records() == []
    assert spool_files(Path(gw.config["spool"]["dir"])) == []
    return doc


@pytest.mark.parametrize(
    ("method", "path"), [("POST", "/t/status/200"), ("PATCH", "/streams/7/objects")]
)
def test_a_content_length_over_the_limit_is_refused_before_any_body_byte(
    bounded: GatewayProc, backend: BackendProc, token: str, method: str, path: str
) -> None:
    """Also on an upload path with a method its route does not list: not inspected, but held
    to the same bound as any other request."""
    with socket.create_connection(("127.0.0.1", bounded.port)) as sock:
        sock.sendall(head(token, method, path, f"Content-Length: {LIMIT + 1}"))
        data = read_response(sock)
    assert_too_large(data, backend, bounded)


def test_expect_100_continue_over_the_limit_is_answered_413_instead(
    bounded: GatewayProc, backend: BackendProc, token: str
) -> None:
    framing = (f"Content-Length: {LIMIT + 1}", "Expect: 100-continue")
    with socket.create_connection(("127.0.0.1", bounded.port)) as sock:
        sock.sendall(head(token, "PUT", "/t/status/200", *framing))
        data = read_response(sock)
    assert not data.startswith(b"HTTP/1.1 100"), data[:40]
    assert_too_large(data, backend, bounded)


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_of_exactly_the_limit_passes_whole(
    bounded: GatewayProc, backend: BackendProc, token: str, chunked: bool
) -> None:
    body = pattern(LIMIT)
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {LIMIT}"
    payload = body
    if chunked:
        pieces = [body[i : i + 65536] for i in range(0, LIMIT, 65536)]
        payload = b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in pieces) + b"0\r\n\r\n"
    with socket.create_connection(("127.0.0.1", bounded.port)) as sock:
        sock.sendall(head(token, "POST", "/t/status/200", framing) + payload)
        data = read_response(sock)
    assert parse_response(data).status == 200, data[:300]
    [record] = backend.records()
    assert record["sha256"] == hashlib.sha256(body).hexdigest()


def test_a_chunked_body_growing_past_the_limit_is_cut_off_there(
    bounded: GatewayProc, backend: BackendProc, token: str
) -> None:
    """No Content-Length to refuse up front: the gateway stops reading soon after the limit,
    and the backend, which had at most the limit, never sees the request complete."""
    block = b"\0" * 65536
    sent = 0
    data = b""
    with socket.create_connection(("127.0.0.1", bounded.port)) as sock:
        sock.sendall(head(token, "POST", "/t/status/200", "Transfer-Encoding: chunked"))
        sock.settimeout(0.5)
        while sent < 20 * LIMIT and b"\r\n\r\n" not in data:
            try:
                sock.sendall(f"{len(block):x}\r\n".encode() + block + b"\r\n")
                sent += len(block)
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                break
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                data += sock.recv(65536)
            sock.settimeout(0.5)
        with contextlib.suppress(ConnectionResetError):
            data += read_response(sock)
    assert sent < LIMIT + 8 * MiB, f"sent {sent} bytes before the refusal"
    assert_too_large(data, backend, bounded)
