"""Every wait on a peer is bounded, like nginx's and Envoy's, against the real gateway process.

What aiohttp leaves unbounded and the gateway bounds itself: a client that stops reading a
response (``server.send_timeout``, nginx's ``send_timeout``), the wait for a free pooled backend
connection once ``backend.pool_size`` exchanges are in flight (``backend.connect_timeout``),
and a head that never ends on the admin listener (``server.header_timeout``). Each test waits
for an event with a generous deadline; none asserts how long anything took.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import mint
from tests.support.faults import raw_head, read_response, wait_until
from tests.support.gateway_proc import BackendProc, GatewayProc, base_config, cli, start_gateway
from tests.support.procs import RedisServer
from tests.support.rawhttp import parse_response
from tests.test_metrics import Samples, scrape

POOL_WAIT = 0.5  # backend.connect_timeout: also the longest wait for a pooled connection
READ_TIMEOUT = 2.0
SEND_TIMEOUT = 1.0
HEADER_TIMEOUT = 1.0
KEEPALIVE_TIMEOUT = 2.0  # above the header timeout: else it would end an unfinished head first
BIG = 64 * 1024 * 1024  # far more than every buffer between backend and client together


@pytest.fixture(scope="module")
def narrow(
    redis_server: RedisServer, backend_proc: BackendProc, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProc]:
    """One pooled backend connection, short timeouts."""
    work = tmp_path_factory.mktemp("bounds")
    config = base_config(redis_server.url, backend_proc.url, work / "spool")
    config["backend"].update(
        pool_size=1, connect_timeout=f"{POOL_WAIT}s", read_timeout=f"{READ_TIMEOUT}s"
    )
    config["server"].update(
        send_timeout=f"{SEND_TIMEOUT}s",
        header_timeout=f"{HEADER_TIMEOUT}s",
        keepalive_timeout=f"{KEEPALIVE_TIMEOUT}s",
    )
    gw = start_gateway(config, work)
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def token(narrow: GatewayProc) -> str:
    out = cli(narrow.config_path, "keys", "add", "--client", "bounds", "--json")
    return mint(narrow, str(json.loads(out.stdout)["api_key"]))


def access_lines(gw: GatewayProc, path: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in gw.log().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("path") == path and "status" in line]


def get(gw: GatewayProc, token: str, path: str) -> bytes:
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:
        sock.sendall(raw_head("GET", path, token))
        return read_response(sock, timeout=15)


def test_a_client_that_stops_reading_a_response_is_cut_off_and_frees_the_backend_connection(
    narrow: GatewayProc, backend: BackendProc, token: str
) -> None:
    """Its receive window shut, the client took nothing more: without a send timeout the
    handler waited for ever, holding the backend exchange and the only pooled connection, so
    every later request waited too."""
    path = f"/t/big/{BIG}"
    client = socket.create_connection(("127.0.0.1", narrow.port))
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        client.sendall(raw_head("GET", path, token))  # and never read
        assert wait_until(lambda: access_lines(narrow, path) != [], timeout=15), "never cut off"
    finally:
        client.close()
    [line] = access_lines(narrow, path)
    assert (line["status"], line["reason"]) == (408, "send_timeout")
    # the one pooled backend connection is free again
    assert parse_response(get(narrow, token, "/t/status/200")).status == 200
    assert [r["path"] for r in backend.records()] == [path, "/t/status/200"]


def test_a_request_waits_for_a_pooled_backend_connection_no_longer_than_connect_timeout(
    narrow: GatewayProc, backend: BackendProc, token: str
) -> None:
    """The only connection is held by a backend that does not answer (until read_timeout):
    the next request gets 504 after connect_timeout instead of queueing behind it without end
    (it used to wait, then be served, whenever the first let go)."""
    holder = socket.create_connection(("127.0.0.1", narrow.port))
    try:
        holder.sendall(raw_head("GET", "/t/hang", token))
        assert wait_until(lambda: backend.records() != [], timeout=5)
        response = parse_response(get(narrow, token, "/t/status/201"))
        assert response.status == 504, response.raw[:300]
        assert (response.header("Content-Type") or "").startswith("application/problem+json")
        doc = json.loads(response.body)
        assert doc["code"] == "backend_timeout" and doc["status"] == 504
        assert [r["path"] for r in backend.records()] == ["/t/hang"]  # nothing of the second
        samples = Samples(scrape(narrow))
        assert samples.get("backend_errors_total", kind="timeout") >= 1
    finally:
        holder.close()
    # the holder's own 504 (read_timeout) gives the connection back before the next test
    assert wait_until(lambda: access_lines(narrow, "/t/hang") != [], timeout=15)


def test_a_head_that_never_ends_on_the_admin_listener_is_cut_off(narrow: GatewayProc) -> None:
    """aiohttp has no head timeout: the admin port (the pod's address in Kubernetes, for probes
    and scrapes) kept such a connection, and its descriptor, open for ever."""
    with socket.create_connection(("127.0.0.1", narrow.admin_port)) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: admin\r\n")  # and nothing more
        data = read_response(sock, timeout=10)
    assert data.startswith(b"HTTP/1.1 408 "), f"still open, nothing answered: {data[:200]!r}"
    response = parse_response(data)
    assert json.loads(response.body)["code"] == "header_timeout"
    # the listener still serves, and such a refusal is not counted as proxy traffic
    samples = Samples(scrape(narrow))
    assert samples.by("rejections_total", "reason").get("header_timeout", 0) == 0


def test_an_idle_keepalive_connection_on_the_admin_listener_is_closed_like_the_proxys(
    narrow: GatewayProc,
) -> None:
    """The admin listener took aiohttp's keep-alive default (3630 s), not
    ``server.keepalive_timeout``: an idle connection there, which the head timer does not
    cover, held its descriptor for an hour."""
    with socket.create_connection(("127.0.0.1", narrow.admin_port)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n")
        assert parse_response(read_response(sock, timeout=10)).status == 200
        sock.settimeout(5 * KEEPALIVE_TIMEOUT)
        try:
            rest = sock.recv(1)
        except ConnectionResetError:
            rest = b""
        except TimeoutError:
            rest = b"still open"
    assert rest == b"", "the idle connection was kept past server.keepalive_timeout"


def test_a_body_on_the_policy_query_is_read_past_and_never_desyncs_keep_alive(
    narrow: GatewayProc, backend: BackendProc, token: str
) -> None:
    """The gateway answers GET /_gateway/policy/{channel} itself without reading a body; the
    body's bytes must still end where its Content-Length says, or they would be parsed as the
    next request on the connection (here: "helloGET ...", a 400)."""
    query = (
        f"GET /_gateway/policy/default HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n"
        "Content-Length: 5\r\n\r\nhello"
    ).encode()
    with socket.create_connection(("127.0.0.1", narrow.port)) as sock:
        sock.sendall(query + raw_head("GET", "/t/status/200?behind", token))
        first = read_response(sock, timeout=10)
        second = read_response(sock, timeout=10)
    assert parse_response(first).status == 200, first[:300]
    assert "allowed_types" in json.loads(parse_response(first).body)
    assert parse_response(second).status == 200, second[:300]
    assert [r["path"] for r in backend.records()] == ["/t/status/200?behind"]
