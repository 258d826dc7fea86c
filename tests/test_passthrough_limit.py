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
from tests.support.faults import FaultBackend, send_while_listening, wait_until
from tests.support.gateway_proc import (
    BackendProc,
    GatewayProc,
    base_config,
    spool_files,
    start_gateway,
)
from tests.support.procs import RedisServer
from tests.support.rawhttp import parse_response, send_chunks_until_answered
from tests.support.test_backend import pattern
from tests.test_metrics import Samples, scrape

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
    ("method", "path"),
    [
        ("POST", "/t/status/200"),
        ("PATCH", "/streams/7/objects"),
        ("GET", "/t/status/200"),  # a body where none is expected is still a body
        ("DELETE", "/t/status/200"),
        ("OPTIONS", "/t/status/200"),  # not a preflight: no Access-Control-Request-Method
    ],
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
    with socket.create_connection(("127.0.0.1", bounded.port)) as sock:
        sock.sendall(head(token, "POST", "/t/status/200", "Transfer-Encoding: chunked"))
        sent, data = send_chunks_until_answered(sock, 20 * LIMIT)
        with contextlib.suppress(ConnectionResetError):
            data += read_response(sock)
    assert sent < LIMIT + 8 * MiB, f"sent {sent} bytes before the refusal"
    assert_too_large(data, backend, bounded)


def test_a_refused_body_sent_anyway_never_becomes_a_request_on_the_connection(
    bounded: GatewayProc, backend: BackendProc, token: str
) -> None:
    """The client sends its whole body, and a request behind it, before reading the 413: the
    gateway answers once and closes; the body's bytes are never parsed as a request (keep-alive
    desync), and the request behind it is not served."""
    body = b"GET /t/status/201?smuggled HTTP/1.1\r\nHost: gw\r\n\r\n" * (LIMIT // 40)
    behind = head(token, "GET", "/t/status/202?pipelined")
    framing = f"Content-Length: {len(body)}"
    with socket.create_connection(("127.0.0.1", bounded.port)) as sock:
        sock.sendall(head(token, "POST", "/t/status/200", framing) + body + behind)
        data = read_response(sock)
        sock.settimeout(10)
        rest, closed = b"", False
        with contextlib.suppress(TimeoutError):
            try:
                while chunk := sock.recv(65536):
                    rest += chunk
                closed = True
            except ConnectionResetError:
                closed = True
    assert rest == b"", "a second answer on the connection"
    assert closed, "the connection was left open"
    assert_too_large(data, backend, bounded)


@pytest.fixture(scope="module")
def bounded_to_fault(
    redis_server: RedisServer,
    fault_backend: FaultBackend,
    gateway: GatewayProc,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GatewayProc]:
    """The same limit in front of a backend that records every byte it read, and whether the
    request's framing ever completed."""
    work = tmp_path_factory.mktemp("passthrough-limit-fault")
    config = base_config(redis_server.url, fault_backend.url, work / "spool")
    config["limits"]["max_passthrough_size"] = "1MiB"
    gw = start_gateway(config, work)
    yield gw
    gw.stop()


def test_a_cut_chunked_body_reaches_the_backend_unfinished_and_is_logged_and_counted(
    bounded_to_fault: GatewayProc, fault_backend: FaultBackend, token: str
) -> None:
    """What the backend sees of a chunked body cut at the limit: at most the limit, and no last
    chunk (it can never take the request for a whole one). The access line and the metrics
    say what was read from the client and refused."""
    gw = bounded_to_fault
    fault_backend.clear()
    before = Samples(scrape(gw)).get("rejected_received_bytes_total")
    block = b"\0" * 65536
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:
        sock.sendall(head(token, "POST", "/plain/cut", "Transfer-Encoding: chunked"))
        data = send_while_listening(
            sock, b"".join(f"{len(block):x}\r\n".encode() + block + b"\r\n" for _ in range(64))
        )
    response = parse_response(data)
    assert response.status == 413, data[:300]
    assert json.loads(response.body)["limit_source"] == "limits.max_passthrough_size"
    assert wait_until(lambda: fault_backend.records("/plain/cut") != [])
    [seen] = fault_backend.records("/plain/cut")
    assert not seen.complete
    assert seen.length <= LIMIT
    assert wait_until(lambda: '"/plain/cut"' in gw.log())
    [line] = [json.loads(x) for x in gw.log().splitlines() if '"path": "/plain/cut"' in x]
    assert (line["status"], line["reason"]) == (413, "request_too_large")
    assert LIMIT < line["bytes_in"] <= LIMIT + 256 * 1024  # read: at most one piece past it
    assert line["bytes_out"] <= LIMIT  # sent on
    after = Samples(scrape(gw)).get("rejected_received_bytes_total")
    assert after - before == line["bytes_in"]
