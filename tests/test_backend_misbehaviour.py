"""A backend that breaks HTTP must not make the gateway break it for anyone else (issue 2/7).

The backend here is :class:`~tests.support.faults.FaultBackend` (raw sockets, misbehaving by
path); the gateway is the real process. nginx is the bar: it closes an idle upstream
connection on any byte that arrives unasked, frames a body without a length for an HTTP/1.0
client by closing, and adds no header the backend did not send.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import mint
from tests.support.faults import (
    FaultBackend,
    gauge,
    raw_head,
    send_while_listening,
    wait_until,
)
from tests.support.files import make
from tests.support.gateway_proc import GatewayProc, base_config, cli, start_gateway
from tests.support.procs import RedisServer
from tests.support.rawhttp import RawResponse, parse_response
from tests.test_metrics import Samples, scrape

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def odd_gw(
    redis_server: RedisServer, fault_backend: FaultBackend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProc]:
    work: Path = tmp_path_factory.mktemp("odd-backend")
    gw = start_gateway(base_config(redis_server.url, fault_backend.url, work / "spool"), work)
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def token(odd_gw: GatewayProc) -> str:
    out = cli(odd_gw.config_path, "keys", "add", "--client", "odd", "--json")
    return mint(odd_gw, json.loads(out.stdout)["api_key"])


def get(gw: GatewayProc, token: str, path: str, version: str = "1.1", extra: bytes = b"") -> bytes:
    """One request on its own connection; everything the gateway sent until it closed."""
    head = f"GET {path} HTTP/{version}\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n"
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        sock.sendall(head.encode() + extra + b"Connection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def backend_errors(gw: GatewayProc) -> float:
    return gauge(gw.admin_port, "upload_gateway_backend_errors_total")


@pytest.mark.parametrize("late", ["204", "304", "length"])
def test_bytes_a_backend_sends_unasked_never_become_another_clients_answer(
    odd_gw: GatewayProc, token: str, late: str
) -> None:
    """The backend answers, then sends a whole extra response on the idle pooled connection.
    aiohttp would queue it and hand it to the next request on that connection as *its*
    answer, and every later one the previous client's (aio-libs/aiohttp#13656)."""
    first = parse_response(get(odd_gw, token, f"/fault/late/{late}"))
    assert first.status in (200, 204, 304)
    time.sleep(0.3)  # the extra bytes have arrived on the pooled connection
    for who in ("bob", "carol", "dave"):
        answer = get(odd_gw, token, f"/fault/whoami/{who}")
        assert b"POISONED" not in answer
        assert parse_response(answer).body == f"you asked for /fault/whoami/{who}".encode()


@pytest.mark.parametrize("path", ["/fault/chunked", "/fault/close-delimited"])
def test_an_http10_client_gets_a_body_without_a_length_delimited_by_the_close(
    odd_gw: GatewayProc, token: str, path: str
) -> None:
    """HTTP/1.0 has no chunked coding: such a body ends where the connection does."""
    response = parse_response(get(odd_gw, token, path, version="1.0"))
    assert response.status == 200, response.raw[:300]
    assert response.body == b"hello"
    assert response.header("Transfer-Encoding") is None


def test_no_content_type_is_added_to_a_response_that_had_none(
    odd_gw: GatewayProc, token: str
) -> None:
    """aiohttp would add application/octet-stream, and a browser would download, not sniff."""
    response = parse_response(get(odd_gw, token, "/fault/no-content-type"))
    assert (response.status, response.body) == (200, b"hello")
    assert response.header("Content-Type") is None


def assert_problem(response: RawResponse, status: int, code: str) -> None:
    assert response.status == status, response.raw[:300]
    assert response.header("Content-Type") == "application/problem+json"
    assert json.loads(response.body)["code"] == code


def test_a_response_header_aiohttp_cannot_relay_unchanged_is_a_502_not_a_silent_edit(
    odd_gw: GatewayProc, token: str
) -> None:
    """``caf\\xe9`` (ISO-8859-1, as Servlet containers send) is not UTF-8: aiohttp's writer
    would drop the byte and send ``filename="caf.pdf"``."""
    before = backend_errors(odd_gw)
    assert_problem(
        parse_response(get(odd_gw, token, "/fault/latin1-header")), 502, "backend_unavailable"
    )
    assert backend_errors(odd_gw) == before + 1


def test_a_request_header_that_cannot_be_forwarded_unchanged_is_a_400(
    odd_gw: GatewayProc, fault_backend: FaultBackend, token: str
) -> None:
    fault_backend.clear()
    response = parse_response(get(odd_gw, token, "/fault/whoami/x", extra=b"X-Name: caf\xe9\r\n"))
    assert_problem(response, 400, "malformed_request")
    assert fault_backend.records() == []


def test_a_switch_of_protocols_nobody_asked_for_is_a_502(odd_gw: GatewayProc, token: str) -> None:
    """``Upgrade`` is never forwarded, so a 101 is a broken backend; relayed, it would leave the
    client on a connection speaking a protocol it never asked for, waiting."""
    before = backend_errors(odd_gw)
    assert_problem(parse_response(get(odd_gw, token, "/fault/switch")), 502, "backend_unavailable")
    assert backend_errors(odd_gw) == before + 1


@pytest.mark.parametrize("coding", ["gzip", "two-lines", "chunked-twice"])
def test_a_transfer_coding_other_than_chunked_is_a_502_not_a_corrupted_body(
    odd_gw: GatewayProc, token: str, coding: str
) -> None:
    """aiohttp undoes only ``chunked``: a ``gzip`` transfer coding would reach the client as
    the content itself, its name dropped with the hop-by-hop header (nginx: "upstream sent
    unknown Transfer-Encoding", 502)."""
    before = backend_errors(odd_gw)
    response = parse_response(get(odd_gw, token, f"/fault/te/{coding}"))
    assert_problem(response, 502, "backend_unavailable")
    assert backend_errors(odd_gw) == before + 1


@pytest.mark.parametrize("fault", ["huge-header", "many-headers", "cl-and-te", "two-lengths"])
def test_a_response_head_that_does_not_parse_is_an_invalid_response_not_quoted_in_the_log(
    odd_gw: GatewayProc, token: str, fault: str
) -> None:
    """A 502 either way; but it is the backend's broken answer, not a dropped connection, and
    the parser's message quotes the backend's bytes (here a session cookie) into the log."""
    logged = len(odd_gw.log())
    before = Samples(scrape(odd_gw)).by("backend_errors_total", "kind")
    response = parse_response(get(odd_gw, token, f"/fault/invalid/{fault}"))
    assert_problem(response, 502, "backend_unavailable")
    assert "not valid HTTP" in json.loads(response.body)["detail"]
    after = Samples(scrape(odd_gw)).by("backend_errors_total", "kind")
    changed = {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}
    assert changed == {"invalid_response": 1.0}, changed
    assert wait_until(lambda: f"/fault/invalid/{fault}" in odd_gw.log()[logged:])
    assert "s3ss10n" not in odd_gw.log()[logged:]


@pytest.mark.parametrize("path", ["/fault/interim/100", "/fault/interim/103", "/fault/no-reason"])
def test_interim_responses_are_dropped_and_a_status_line_without_a_reason_is_relayed(
    odd_gw: GatewayProc, token: str, path: str
) -> None:
    """A 100 nobody asked for and 103 Early Hints never reach the client (nginx drops them
    too); ``HTTP/1.1 200`` without a reason phrase is a valid status line."""
    response = parse_response(get(odd_gw, token, path))
    assert (response.status, response.body) == (200, b"ok"), response.raw[:300]
    assert response.raw.count(b"HTTP/1.1 ") == 1


@pytest.mark.parametrize("kind", ["pass-through", "upload"])
def test_an_early_answer_reaches_the_client_and_its_connection_is_not_reused(
    odd_gw: GatewayProc, fault_backend: FaultBackend, token: str, kind: str
) -> None:
    """The backend answers 413 on the head, before reading a byte of the 8 MiB body (then
    discards the body and serves on, RFC 9112 §9.3): the client gets the 413, not a 502, and
    a connection whose body was cut short never carries another request (the backend would
    read that request as the rest of the body)."""
    fault_backend.clear()
    size = 8 * MiB
    if kind == "upload":
        path, ctype, body = "/streams/early/objects", "application/pdf", make("pdf", size)
    else:
        path, ctype, body = "/api/early/notes", "application/octet-stream", b"x" * size
    with socket.create_connection(("127.0.0.1", odd_gw.port)) as sock:
        sock.sendall(raw_head("POST", path, token, ctype, len(body)))
        response = parse_response(send_while_listening(sock, body))
    assert (response.status, response.body) == (413, b"too large"), response.raw[:300]
    for who in ("erin", "frank"):
        answer = parse_response(get(odd_gw, token, f"/fault/whoami/{who}"))
        assert answer.body == f"you asked for /fault/whoami/{who}".encode(), answer.raw[:300]
