"""The transparent proxy (issue 2): every non-upload request goes through unchanged, streaming."""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from tests.support.faults import gauge, wait_until
from tests.support.gateway_proc import BackendProc, GatewayProc, base_config, start_gateway
from tests.support.procs import RedisServer, free_port
from tests.support.rawhttp import request as raw_request
from tests.support.test_backend import pattern


def session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(total=60))


def seen_headers(record: dict) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in record["headers"]:
        out.setdefault(k.lower(), []).append(v)
    return out


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def test_every_method_reaches_the_backend_with_its_body(
    gateway: GatewayProc, backend: BackendProc, auth: dict[str, str], method: str
) -> None:
    body = b"" if method in ("GET", "DELETE", "OPTIONS") else b"payload-" + method.encode()
    async with (
        session() as s,
        s.request(method, gateway.url + "/t/echo", data=body, headers=auth) as r,
    ):
        assert r.status == 200
        assert await r.read() == body
    [rec] = backend.records()
    assert rec["method"] == method


async def test_large_bodies_are_byte_identical_both_ways(
    gateway: GatewayProc, backend: BackendProc, auth: dict[str, str]
) -> None:
    """50 MB up (not an upload route: exactly the default max_passthrough_size passes) and 50 MB
    down, streamed."""
    size = 50 * 1024 * 1024
    data = pattern(size)

    async def gen() -> AsyncIterator[bytes]:
        for i in range(0, size, 1 << 20):
            yield data[i : i + (1 << 20)]

    digest = hashlib.sha256()
    async with session() as s:
        async with s.post(gateway.url + "/t/echo", data=gen(), headers=auth) as r:
            assert r.status == 200
            async for chunk in r.content.iter_any():
                digest.update(chunk)
        assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
        async with s.get(gateway.url + f"/t/big/{size}", headers=auth) as r:
            assert r.headers["Content-Length"] == str(size)
            got = await r.read()
        assert got == data


async def test_content_length_request_keeps_its_framing(
    gateway: GatewayProc, backend: BackendProc, auth: dict[str, str]
) -> None:
    async with session() as s, s.post(gateway.url + "/t/echo", data=b"x" * 1000, headers=auth) as r:
        assert r.headers["X-Seen-Content-Length"] == "1000"
        assert r.headers["X-Seen-Transfer-Encoding"] == "-"


async def test_chunked_request_and_response_stream_through(
    gateway: GatewayProc, backend: BackendProc, auth: dict[str, str]
) -> None:
    parts = [b"a" * 10, b"b" * 70000, b"c"]

    async def gen() -> AsyncIterator[bytes]:
        for p in parts:
            yield p

    async with session() as s:
        async with s.post(gateway.url + "/t/echo", data=gen(), headers=auth) as r:
            assert r.headers["X-Seen-Transfer-Encoding"] == "chunked"
            assert await r.read() == b"".join(parts)
        async with s.get(gateway.url + "/t/chunked/100000", headers=auth) as r:
            assert r.headers.get("Transfer-Encoding") == "chunked"
            assert await r.read() == pattern(100000)


@pytest.mark.parametrize(
    "target",
    [
        "/t/status/200?a=%2F%2f&b=%E2%82%AC&c=a+b&d=%25&e=&f",
        "/t/status/200?q=%7Bx%7D&sp=a%20b&plus=1+1&x=%ZZ",
        "/q;param/%2e%2E?k=v=w&&k=v2#",
        "/t/status/200%0A",  # decodes to a path with a line feed, which ``.*`` does not match
    ],
)
def test_path_and_query_reach_the_backend_exactly_as_sent(
    gateway: GatewayProc, backend: BackendProc, secret: str, target: str
) -> None:
    payload = (
        f"GET {target} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {secret}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    response = raw_request(gateway.port, payload)
    assert response.status == 200
    [rec] = backend.records()
    assert rec["path"] == target.split("#")[0]


def test_hop_by_hop_headers_are_not_forwarded(
    gateway: GatewayProc, backend: BackendProc, secret: str
) -> None:
    payload = (
        "GET /t/status/200 HTTP/1.1\r\nHost: chat.example.com\r\n"
        f"Authorization: Bearer {secret}\r\n"
        "Connection: close, X-Private\r\nX-Private: secret-hop\r\nKeep-Alive: timeout=5\r\n"
        "TE: trailers\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\nTrailer: X-T\r\n"
        "X-End-To-End: kept\r\nX-Request-Id: trace-123\r\nX-Gateway-Client-Id: spoofed\r\n"
        "X_Gateway_Client_Id: spoofed-too\r\n"  # the same variable to a CGI/WSGI backend
        "Proxy: http://evil.example:8080\r\n"  # httpoxy: HTTP_PROXY to a CGI backend
        "X-Forwarded-For: 10.9.8.7\r\nX-Forwarded-For: 192.0.2.1\r\n\r\n"  # an LB's own line
    ).encode()
    assert raw_request(gateway.port, payload).status == 200
    [rec] = backend.records()
    seen = seen_headers(rec)
    for hop in ("x-private", "keep-alive", "te", "proxy-authorization", "trailer", "proxy"):
        assert hop not in seen, hop
    assert seen.get("connection", ["keep-alive"]) != ["close, X-Private"]
    assert seen["x-end-to-end"] == ["kept"]
    assert seen["authorization"] == [f"Bearer {secret}"]  # the backend may check it too
    assert seen["x-request-id"] == ["trace-123"]
    assert seen["x-forwarded-for"] == ["10.9.8.7, 192.0.2.1, 127.0.0.1"]  # every line kept
    assert seen["x-forwarded-proto"] == ["http"]
    assert seen["x-forwarded-host"] == ["chat.example.com"]
    assert seen["x-gateway-client-id"] == ["acme"]
    assert "x_gateway_client_id" not in seen


def test_an_insane_request_id_is_replaced(
    gateway: GatewayProc, backend: BackendProc, secret: str
) -> None:
    payload = (
        "GET /t/status/200 HTTP/1.1\r\nHost: gw\r\n"
        f"Authorization: Bearer {secret}\r\nX-Request-Id: {'a b<>' * 50}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    response = raw_request(gateway.port, payload)
    [rec] = backend.records()
    rid = seen_headers(rec)["x-request-id"][0]
    assert " " not in rid and len(rid) == 32
    assert response.header("X-Request-Id") is None or response.header("X-Request-Id")


async def test_head_204_and_304_have_no_body(
    gateway: GatewayProc, backend: BackendProc, auth: dict[str, str]
) -> None:
    async with session() as s:
        async with s.head(gateway.url + "/t/big/5000", headers=auth) as r:
            assert r.status == 200
            assert r.headers["Content-Length"] == "5000"
            assert await r.read() == b""
        for code in (204, 304):
            async with s.get(gateway.url + f"/t/status/{code}", headers=auth) as r:
                assert r.status == code
                assert r.headers["ETag"] == '"v1"'
                assert await r.read() == b""


async def test_a_backend_sending_a_body_after_head_cannot_desync_later_requests(
    gateway: GatewayProc, backend: BackendProc, auth: dict[str, str]
) -> None:
    """Bytes a broken backend sends after a HEAD answer must never be read as the answer to
    someone else's request: the HEAD's backend connection is never reused."""
    async with session() as s:
        for _ in range(3):
            async with s.head(gateway.url + "/t/big/5000?broken=1", headers=auth) as r:
                assert r.status in (200, 502)
                assert await r.read() == b""
            for _ in range(5):
                async with s.get(gateway.url + "/t/status/200", headers=auth) as r:
                    assert r.status == 200
                    assert await r.text() == "status 200"


async def test_repeated_response_headers_are_all_passed_back(
    gateway: GatewayProc, backend: BackendProc, auth: dict[str, str]
) -> None:
    async with session() as s, s.get(gateway.url + "/t/cookies", headers=auth) as r:
        assert r.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
        assert r.headers.getall("X-Multi") == ["one", "two"]


async def test_backend_status_and_body_pass_back_unchanged(
    gateway: GatewayProc, backend: BackendProc, auth: dict[str, str]
) -> None:
    async with session() as s, s.post(gateway.url + "/t/status/418", data=b"x", headers=auth) as r:
        assert r.status == 418
        assert await r.text() == "status 418"


async def test_backend_hanging_is_a_504_problem(
    gateway: GatewayProc, backend: BackendProc, auth: dict[str, str]
) -> None:
    async with session() as s, s.get(gateway.url + "/t/hang", headers=auth) as r:
        assert r.status == 504
        assert r.content_type == "application/problem+json"
        problem = await r.json(content_type=None)
    assert problem["code"] == "backend_timeout"
    assert "backend" in problem["detail"]


async def test_backend_dropping_the_response_midway_cuts_the_client_off(
    gateway: GatewayProc, backend: BackendProc, auth: dict[str, str]
) -> None:
    """A half response must never look whole: the client sees a broken body, not 1,000 bytes."""
    async with session() as s, s.get(gateway.url + "/t/reset-mid", headers=auth) as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()


async def test_backend_down_is_a_502_problem(
    redis_server: RedisServer, tmp_path: Path, api_key: str, gateway: GatewayProc
) -> None:
    config = base_config(redis_server.url, f"http://127.0.0.1:{free_port()}", tmp_path / "spool")
    down = start_gateway(config, tmp_path)
    try:
        from tests.conftest import mint

        token = mint(gateway, api_key)
        async with (
            session() as s,
            s.get(down.url + "/anything", headers={"Authorization": f"Bearer {token}"}) as r,
        ):
            assert r.status == 502
            problem = json.loads(await r.read())
        assert problem["code"] == "backend_unavailable"
        assert problem["status"] == 502
        assert problem["request_id"] == r.headers["X-Request-Id"]
    finally:
        down.stop()


async def test_encoded_url_is_not_normalised(
    gateway: GatewayProc, backend: BackendProc, auth: dict[str, str]
) -> None:
    url = URL(gateway.url + "/t/status/200/..%2Fetc/%2e%2e/x", encoded=True)
    async with session() as s, s.get(url, headers=auth) as r:
        assert r.status == 200
    [rec] = backend.records()
    assert rec["path"] == "/t/status/200/..%2Fetc/%2e%2e/x"


async def test_one_clients_cookies_never_reach_the_backend_on_anothers_request(
    redis_server: RedisServer,
    backend: BackendProc,
    tmp_path: Path,
    auth: dict[str, str],
) -> None:
    """The backend pool is shared by every client: a cookie the backend set for one of them
    must go back to that client only, never be kept and replayed by the gateway. (aiohttp's
    client keeps cookies by default, and only refuses them from an IP address, so this needs a
    backend addressed by name, as it is in production.)"""
    by_name = backend.url.replace("127.0.0.1", "localhost")
    gw = start_gateway(base_config(redis_server.url, by_name, tmp_path / "spool"), tmp_path)
    try:
        async with session() as first, first.get(gw.url + "/t/cookies", headers=auth) as r:
            assert r.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
        async with session() as second, second.get(gw.url + "/t/status/200", headers=auth) as r:
            assert r.status == 200
    finally:
        gw.stop()
    cookies_seen = [seen_headers(rec).get("cookie") for rec in backend.records()]
    assert cookies_seen == [None, None]


def test_a_client_stalling_its_body_after_the_backend_answered_is_cut_as_a_body_timeout(
    gateway: GatewayProc, secret: str
) -> None:
    """A pass-through client that stops sending its body while the backend is already
    streaming the answer (an echo, a progress stream): the exchange is cut after
    ``server.body_timeout`` (3 s here) and logged as the client's 408 ``body_timeout``, not as
    a backend failure (502 ``backend_aborted``, counted in ``backend_errors_total``, which an
    operator alerts on)."""
    errors = gauge(gateway.admin_port, "upload_gateway_backend_errors_total")
    rid = "stalls-after-the-answer"
    head = (
        "POST /t/echo HTTP/1.1\r\nHost: gw\r\n"
        f"Authorization: Bearer {secret}\r\nX-Request-Id: {rid}\r\n"
        "Content-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=20) as sock:
        sock.sendall(head + b"5\r\nfirst\r\n")
        assert sock.recv(12) == b"HTTP/1.1 200"  # the backend is answering; now: nothing
        started = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            while sock.recv(65536):
                pass
        assert time.monotonic() - started < 15  # cut by the 3 s body timeout, not never
    assert wait_until(lambda: rid in gateway.log(), timeout=10)
    (line,) = [json.loads(x) for x in gateway.log().splitlines() if f'"{rid}"' in x]
    assert (line["status"], line["reason"]) == (408, "body_timeout")
    assert gauge(gateway.admin_port, "upload_gateway_backend_errors_total") == errors
