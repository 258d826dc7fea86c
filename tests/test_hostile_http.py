"""Hostile HTTP/1.1 sent as raw bytes, in the manner of nginx's and HAProxy's regression tests.

Every refused request must: get a problem+json answer (400, 408 or 431), close the connection,
send the backend nothing, and leave a request pipelined behind it on the same connection
unprocessed. Each case carries a valid Secret, so a request the gateway wrongly let through
would reach the recording backend and fail the test.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.gateway_proc import BackendProc, GatewayProc, base_config, start_gateway
from tests.support.procs import RedisServer
from tests.support.rawhttp import RawResponse, exchange, parse_response

HEADER_TIMEOUT = 1.0
MB = 1024 * 1024
BODY_TIMEOUT = 1.0
# Scheduling slack on a loaded CI machine (three test files at a time, other work on 2 cores):
# the bounds below tell "closed by the timeout" from "never closed", not how promptly.
SLACK = 3.0
STATUS_LINE = re.compile(rb"HTTP/1\.[01] \d{3} ")


def pipelined(secret: str) -> bytes:
    """An innocent request behind the hostile one: it must never reach the backend."""
    return (
        f"GET /t/status/200?pipelined HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {secret}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()


def head(secret: str, start: str = "POST /t/status/200 HTTP/1.1", *lines: str) -> bytes:
    text = f"{start}\r\nHost: gw\r\nAuthorization: Bearer {secret}\r\n"
    return (text + "".join(line + "\r\n" for line in lines) + "\r\n").encode()


def responses(data: bytes) -> int:
    """How many HTTP responses came back on the connection."""
    return len(STATUS_LINE.findall(data))


def problem(response: RawResponse) -> dict[str, object]:
    assert response.header("Content-Type") == "application/problem+json"
    length = int(response.header("Content-Length") or 0)
    return dict(json.loads(response.body[:length]))


def assert_refused(
    port: int, payload: bytes, backend: BackendProc, status: int, code: str, timeout: float = 5.0
) -> dict[str, object]:
    """One problem+json refusal, the connection closed by the gateway, nothing forwarded."""
    started = time.monotonic()
    data = exchange(port, payload, timeout=timeout)
    assert time.monotonic() - started < timeout, "the gateway kept the connection open"
    response = parse_response(data)
    assert response.status == status, data[:300]
    body = problem(response)
    assert body["code"] == code and body["status"] == status
    assert responses(data) == 1, "a request pipelined behind a refused one was processed"
    assert backend.records() == []
    return body


# -- framing the parser refuses, and framing framing.py refuses ----------------------------------

CHUNKED = "Transfer-Encoding: chunked"
ABC = b"3\r\nabc\r\n0\r\n\r\n"  # a well-formed chunked body
SMUGGLING: dict[str, tuple[tuple[str, ...], bytes]] = {
    "content_length_with_transfer_encoding_hiding_a_request": (
        ("Content-Length: 4", CHUNKED),
        b"0\r\n\r\nGET /t/status/201?smuggled HTTP/1.1\r\nHost: gw\r\n\r\n",
    ),
    "duplicate_equal_content_length": (("Content-Length: 3", "Content-Length: 3"), b"abc"),
    "conflicting_content_length": (("Content-Length: 3", "Content-Length: 5"), b"abcde"),
    "content_length_list": (("Content-Length: 3, 3",), b"abc"),
    "content_length_with_plus_sign": (("Content-Length: +3",), b"abc"),
    "content_length_negative": (("Content-Length: -3",), b"abc"),
    "content_length_hex": (("Content-Length: 0x3",), b"abc"),
    "content_length_inner_whitespace": (("Content-Length: 1 0",), b"abcdefghij"),
    "content_length_space_before_colon": (("Content-Length : 3",), b"abc"),
    "runaway_chunk_size": ((CHUNKED,), b"ffffffffffffffffff\r\nabc\r\n0\r\n\r\n"),
    "non_hex_chunk_size": ((CHUNKED,), b"zz\r\nabc\r\n0\r\n\r\n"),
    "chunk_size_with_0x": ((CHUNKED,), b"0x3\r\nabc\r\n0\r\n\r\n"),
    "negative_chunk_size": ((CHUNKED,), b"-3\r\nabc\r\n0\r\n\r\n"),
    "chunk_extension_with_nul": ((CHUNKED,), b"3;\x00\r\nabc\r\n0\r\n\r\n"),
    "chunk_extension_with_bare_lf": ((CHUNKED,), b"3;a\nb\r\nabc\r\n0\r\n\r\n"),
    "chunk_data_longer_than_its_size": ((CHUNKED,), b"3\r\nabcXX\r\n0\r\n\r\n"),
    "chunk_lines_with_bare_lf": ((CHUNKED,), b"3\nabc\n0\n\n"),
    "transfer_encoding_gzip": (("Transfer-Encoding: gzip",), b"abc"),
    "transfer_encoding_chunked_then_gzip": (("Transfer-Encoding: chunked, gzip",), ABC),
    "transfer_encoding_gzip_then_chunked": (("Transfer-Encoding: gzip, chunked",), ABC),
    "transfer_encoding_xchunked": (("Transfer-Encoding: xchunked",), ABC),
    "transfer_encoding_trailing_comma": (("Transfer-Encoding: chunked,",), ABC),
    "transfer_encoding_identity": (("Transfer-Encoding: identity", "Content-Length: 3"), b"abc"),
    "duplicated_transfer_encoding": ((CHUNKED, CHUNKED), ABC),
    "transfer_encoding_gzip_and_chunked_headers": (("Transfer-Encoding: gzip", CHUNKED), ABC),
    "transfer_encoding_space_before_colon": (("Transfer-Encoding : chunked",), ABC),
    "transfer_encoding_vertical_tab": (("Transfer-Encoding:\x0bchunked",), ABC),
    "obs_fold_with_space": (("X-Folded: one", " two"), b""),
    "obs_fold_with_tab": (("X-Folded: one", "\ttwo"), b""),
    "nul_in_header_value": (("X-Nul: a\x00b",), b""),
    "cr_in_header_value": (("X-Cr: a\rb",), b""),
    "bare_lf_after_header": (("X-A: b\nX-B: c",), b""),
    "space_in_header_name": (("X Space: b",), b""),
    "empty_header_name": ((": b",), b""),
    "duplicate_host": (("Host: other",), b""),
}


@pytest.mark.parametrize("case", sorted(SMUGGLING))
def test_hostile_framing_is_refused_with_400_and_nothing_is_forwarded(
    gateway: GatewayProc, backend: BackendProc, secret: str, case: str
) -> None:
    lines, body = SMUGGLING[case]
    payload = head(secret, "POST /t/status/200 HTTP/1.1", *lines) + body + pipelined(secret)
    assert_refused(gateway.port, payload, backend, 400, "malformed_request")


REQUEST_LINES = {
    "bare_lf_line_endings": "GET /t/status/200 HTTP/1.1\nHost: gw\n",
    "absolute_form_target": "GET http://evil.example/t/status/200 HTTP/1.1",
    "asterisk_form_target": "OPTIONS * HTTP/1.1",
    "authority_form_connect": "CONNECT evil.example:443 HTTP/1.1",
    "method_with_separator": "G(T /t/status/200 HTTP/1.1",
    "method_with_space": "GE T /t/status/200 HTTP/1.1",
    "lowercase_method": "get /t/status/200 HTTP/1.1",
    "unknown_method": "FOO /t/status/200 HTTP/1.1",
    "http_1_2": "GET /t/status/200 HTTP/1.2",
    "http_2_in_http_1_framing": "GET /t/status/200 HTTP/2.0",
    "http_0_9_request_line": "GET /t/status/200",
    "control_char_in_target": "GET /t/status/200\x01 HTTP/1.1",
}


@pytest.mark.parametrize("case", sorted(REQUEST_LINES))
def test_hostile_request_line_is_refused_with_400(
    gateway: GatewayProc, backend: BackendProc, secret: str, case: str
) -> None:
    payload = head(secret, REQUEST_LINES[case]) + pipelined(secret)
    assert_refused(gateway.port, payload, backend, 400, "malformed_request")


def test_transfer_encoding_on_http_1_0_is_refused(
    gateway: GatewayProc, backend: BackendProc, secret: str
) -> None:
    """Sent alone: behind it, the parser would already refuse data after an HTTP/1.0 request."""
    payload = head(secret, "POST /t/status/200 HTTP/1.0", CHUNKED) + ABC
    assert_refused(gateway.port, payload, backend, 400, "malformed_request")


def test_bad_chunk_after_the_body_started_is_refused_and_not_forwarded(
    gateway: GatewayProc, backend: BackendProc, secret: str
) -> None:
    """The head is dispatched first, so the error surfaces while the body streams."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(head(secret, "POST /t/status/200 HTTP/1.1", CHUNKED) + b"3\r\nabc\r\n")
        time.sleep(0.3)
        sock.sendall(b"zz\r\nxyz\r\n0\r\n\r\n" + pipelined(secret))
        data = _read_until_closed(sock, 5)
    response = parse_response(data)
    assert response.status == 400, data[:300]
    assert problem(response)["code"] == "malformed_request"
    assert responses(data) == 1
    assert backend.records() == []


def test_bad_chunk_in_bytes_the_parser_held_back_is_refused_at_once(
    gateway: GatewayProc, backend: BackendProc, secret: str
) -> None:
    """aiohttp stops parsing a read once ~2,048 chunks wait unread, and parses the rest when
    the body is read on: a framing error found then must fail the body too (it waited for the
    body timeout: 408), and nothing may be forwarded as if complete."""
    body = b"1\r\nX\r\n" * 3000 + b"zz\r\nxyz\r\n0\r\n\r\n"
    payload = head(secret, "POST /t/status/200 HTTP/1.1", CHUNKED) + body + pipelined(secret)
    body_doc = assert_refused(gateway.port, payload, backend, 400, "malformed_request")
    assert "chunked framing is invalid" in str(body_doc["detail"])


def test_bad_chunk_in_a_body_read_only_to_be_discarded_closes_without_an_error_line(
    gateway: GatewayProc, backend: BackendProc, secret: str
) -> None:
    """The policy query is answered without its body being read; aiohttp then reads on to
    discard it (its lingering read). A chunk size that breaks there ended that read with the
    gateway's own 400 error, which aiohttp logged as an ERROR "Unhandled exception" with a
    traceback, for nothing but a client's bad bytes. Now the connection just closes, and
    nothing pipelined behind the body is served."""
    errors = gateway.log().count('"level": "ERROR"')
    query = head(secret, "GET /_gateway/policy/default HTTP/1.1", CHUNKED) + b"5\r\nhello\r\n"
    with socket.create_connection(("127.0.0.1", gateway.port)) as sock:
        sock.sendall(query)
        sock.settimeout(5)
        answer = sock.recv(65536)
        assert parse_response(answer).status == 200, answer[:300]
        sock.sendall(b"zz\r\n" + pipelined(secret))  # broken, after the answer
        rest, closed = b"", False
        try:
            while piece := sock.recv(65536):
                rest += piece
            closed = True
        except ConnectionResetError:
            closed = True
    assert closed and responses(rest) == 0, rest[:300]
    assert backend.records() == []
    # the next request's access line is written after the gateway has left that connection
    assert exchange(gateway.port, pipelined(secret)).startswith(b"HTTP/1.1 200 ")
    assert gateway.log().count('"level": "ERROR"') == errors, "it logged an ERROR"


def test_chunked_body_with_extensions_still_reaches_the_backend_intact(
    gateway: GatewayProc, backend: BackendProc, secret: str
) -> None:
    """Control case: legal chunk extensions are not framing abuse."""
    payload = head(secret, "POST /t/status/200 HTTP/1.1", CHUNKED, "Connection: close")
    data = exchange(gateway.port, payload + b"3;name=value\r\nabc\r\n0\r\n\r\n")
    assert parse_response(data).status == 200
    [record] = backend.records()
    assert (record["method"], record["length"]) == ("POST", 3)


def test_parse_errors_never_echo_or_log_the_secret(
    gateway: GatewayProc, backend: BackendProc, secret: str
) -> None:
    """aiohttp's own 400 page quotes the bad header; the Secret must appear in neither place."""
    payload = head(secret, "GET /t/status/200 HTTP/1.1", f"X-Copy: {secret}\x00")
    data = exchange(gateway.port, payload)
    assert parse_response(data).status == 400
    assert secret.encode() not in data
    time.sleep(0.2)
    assert secret not in gateway.log()
    assert secret.split(".")[-1] not in gateway.log()


# -- oversized heads -----------------------------------------------------------------------------


def test_oversized_header_is_refused_with_431(
    gateway: GatewayProc, backend: BackendProc, secret: str
) -> None:
    big = "X-Big: " + "a" * 20_000
    payload = head(secret, "GET /t/status/200 HTTP/1.1", big) + pipelined(secret)
    body = assert_refused(gateway.port, payload, backend, 431, "headers_too_large")
    assert body["limit_bytes"] == 8192


def test_too_many_headers_are_refused_with_431(
    gateway: GatewayProc, backend: BackendProc, secret: str
) -> None:
    lines = [f"X-H{i}: v" for i in range(200)]
    payload = head(secret, "GET /t/status/200 HTTP/1.1", *lines) + pipelined(secret)
    assert_refused(gateway.port, payload, backend, 431, "headers_too_large")


def test_a_one_megabyte_authorization_header_is_refused_with_431(
    gateway: GatewayProc, backend: BackendProc, secret: str
) -> None:
    """A Secret is ~300 bytes; a 1 MB one is stopped by the field limit after 8 KiB."""
    payload = head(secret, "GET /t/status/200 HTTP/1.1", "Authorization: Bearer " + "a" * MB)
    body = assert_refused(
        gateway.port, payload + pipelined(secret), backend, 431, "headers_too_large"
    )
    assert body["limit_bytes"] == 8192


def test_a_head_over_max_head_size_in_fields_each_within_limits_is_refused_with_431(
    gateway: GatewayProc, backend: BackendProc, secret: str
) -> None:
    """aiohttp bounds each field (8 KiB) and their number (128), not their sum: ~1 MiB of head
    used to be parsed, held and forwarded. 80 KB in 20 fields is over 64 KiB together."""
    lines = [f"X-Pad-{i}: {'p' * 4000}" for i in range(20)]
    payload = head(secret, "GET /t/status/200 HTTP/1.1", *lines) + pipelined(secret)
    body = assert_refused(gateway.port, payload, backend, 431, "headers_too_large")
    assert body["limit_bytes"] == 64 * 1024


def test_an_unfinished_head_over_max_head_size_is_refused_before_it_ends(
    gateway: GatewayProc, backend: BackendProc, secret: str
) -> None:
    """Not held until the header timeout (10 s here) with all it sent: 200 connections each
    dribbling 0.96 MB of head held +376 MiB in one worker."""
    lines = [f"X-Pad-{i}: {'p' * 1000}" for i in range(100)]
    unfinished = head(secret, "GET /t/status/200 HTTP/1.1", *lines)[:-2]  # no blank line
    body = assert_refused(gateway.port, unfinished, backend, 431, "headers_too_large")
    assert body["limit_bytes"] == 64 * 1024


def test_a_head_within_max_head_size_is_forwarded_whole(
    gateway: GatewayProc, backend: BackendProc, secret: str
) -> None:
    lines = [f"X-Pad-{i}: {'p' * 4000}" for i in range(14)]  # ~56 KB: big cookies, say
    data = exchange(
        gateway.port, head(secret, "GET /t/status/200 HTTP/1.1", *lines, "Connection: close")
    )
    assert parse_response(data).status == 200, data[:300]
    [record] = backend.records()
    assert sum(1 for name, _ in record["headers"] if name.startswith("X-Pad-")) == 14


def test_overlong_request_line_is_refused_with_400(
    gateway: GatewayProc, backend: BackendProc, secret: str
) -> None:
    payload = head(secret, f"GET /t/status/200?{'q' * 20_000} HTTP/1.1") + pipelined(secret)
    body = assert_refused(gateway.port, payload, backend, 400, "malformed_request")
    assert "request line" in str(body["detail"])


# -- slow clients --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_gateway(
    redis_server: RedisServer,
    backend_proc: BackendProc,
    spool_dir: Path,
    gateway: GatewayProc,  # the shared one created the API key; both use the same Redis
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GatewayProc]:
    config = base_config(redis_server.url, backend_proc.url, spool_dir)
    config["server"].update(
        {"header_timeout": f"{HEADER_TIMEOUT}s", "body_timeout": f"{BODY_TIMEOUT}s"}
    )
    gw = start_gateway(config, tmp_path_factory.mktemp("slow-gateway"))
    yield gw
    gw.stop()


def _read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except TimeoutError:
        chunks.append(b"<still open>")
    return b"".join(chunks)


def read_one_response(sock: socket.socket) -> RawResponse:
    """One Content-Length-framed response, leaving the connection open."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536) or b"<closed>"
        assert not data.endswith(b"<closed>"), data
    response = parse_response(data)
    length = int(response.header("Content-Length") or 0)
    while len(response.body) < length:
        response.body += sock.recv(65536)
    return response


def test_slowloris_head_gets_408_within_the_header_timeout(
    slow_gateway: GatewayProc, backend: BackendProc, secret: str
) -> None:
    """One header byte every 0.2 s: never idle, yet the head is never finished in time."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", slow_gateway.port), timeout=5) as sock:
        sock.sendall(b"GET /t/status/200 HTTP/1.1\r\nHost: gw\r\n")
        sock.setblocking(False)
        closed_at = None
        for byte in f"Authorization: Bearer {secret}\r\n".encode():
            try:
                sock.send(bytes([byte]))
            except OSError:
                break  # the gateway closed the connection
            time.sleep(0.2)
            if time.monotonic() - started > HEADER_TIMEOUT + SLACK:
                break
        sock.setblocking(True)
        data = _read_until_closed(sock, 3)
        closed_at = time.monotonic() - started
    response = parse_response(data)
    assert response.status == 408, data[:300]
    assert problem(response)["code"] == "header_timeout"
    assert HEADER_TIMEOUT * 0.9 <= closed_at <= HEADER_TIMEOUT + SLACK + 0.5
    assert backend.records() == []


def test_a_silent_connection_is_closed_after_the_header_timeout(slow_gateway: GatewayProc) -> None:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", slow_gateway.port), timeout=5) as sock:
        data = _read_until_closed(sock, HEADER_TIMEOUT + SLACK)
    assert data == b""
    assert time.monotonic() - started <= HEADER_TIMEOUT + SLACK


def test_an_idle_keepalive_connection_outlives_the_header_timeout(
    slow_gateway: GatewayProc, backend: BackendProc, secret: str
) -> None:
    """The head timer runs only while a head is arriving, not between requests."""
    request = head(secret, "GET /t/status/200 HTTP/1.1")
    with socket.create_connection(("127.0.0.1", slow_gateway.port), timeout=5) as sock:
        sock.sendall(request)
        assert read_one_response(sock).status == 200
        time.sleep(HEADER_TIMEOUT + 0.5)
        sock.sendall(request)
        assert read_one_response(sock).status == 200
    assert len(backend.records()) == 2


def test_a_head_sent_in_pieces_within_the_timeout_is_served(
    slow_gateway: GatewayProc, backend: BackendProc, secret: str
) -> None:
    request = head(secret, "GET /t/status/200 HTTP/1.1", "Connection: close")
    with socket.create_connection(("127.0.0.1", slow_gateway.port), timeout=5) as sock:
        for i in range(0, len(request), len(request) // 4 + 1):
            sock.sendall(request[i : i + len(request) // 4 + 1])
            time.sleep(HEADER_TIMEOUT / 8)
        data = _read_until_closed(sock, 5)
    assert parse_response(data).status == 200
    assert len(backend.records()) == 1


def test_a_stalled_body_gets_408_body_timeout_and_is_not_forwarded(
    slow_gateway: GatewayProc, backend: BackendProc, secret: str
) -> None:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", slow_gateway.port), timeout=5) as sock:
        sock.sendall(head(secret, "POST /t/status/200 HTTP/1.1", "Content-Length: 100") + b"x" * 10)
        data = _read_until_closed(sock, BODY_TIMEOUT + SLACK + 2)
    elapsed = time.monotonic() - started
    response = parse_response(data)
    assert response.status == 408, data[:300]
    assert problem(response)["code"] == "body_timeout"
    assert BODY_TIMEOUT * 0.9 <= elapsed <= BODY_TIMEOUT + SLACK
    assert b"<still open>" not in data
    assert backend.records() == []
