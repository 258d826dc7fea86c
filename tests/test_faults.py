"""Faults (issue 7): the real gateway process while Redis dies, the backend misbehaves, clients
vanish, the spool has no room and the process is told to stop.

Each test proves what an operator relies on: the status the client gets, that the backend got
nothing it should not have (:class:`FaultBackend` records every byte that reached it), that no
spool descriptor is left open, and that the same gateway process keeps serving afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis

from tests.conftest import mint
from tests.support.faults import (
    FaultBackend,
    Received,
    chunked_complete,
    connect_refused,
    gauge,
    open_fds,
    raw_head,
    read_response,
    response_complete,
    send_while_listening,
    trickle_upload,
    vanish,
    wait_until,
)
from tests.support.files import make, multipart
from tests.support.gateway_proc import GatewayProc, base_config, cli, start_gateway
from tests.support.procs import RedisServer, free_port
from tests.support.rawhttp import parse_response
from tests.test_metrics import Samples, scrape

MiB = 1024 * 1024
CACHE_TTL = 1.0
READ_TIMEOUT = 1.0
# roomy_gw's read_timeout, also its bound on a stalled send: above SLOW_READ_PAUSE by a margin a
# loaded machine's scheduling delays do not eat (with 1.0 s against a 0.6 s pause the margin was
# 0.4 s), while the four pauses of an 18 MiB slow read (4 x 1.3 s) still add up to more than two.
ROOMY_READ_TIMEOUT = 2.5
SPOOL_MAX = 4 * MiB


# -- the fault environment: its own Redis (we kill it), a misbehaving backend, one gateway -----


@pytest.fixture(scope="module")
def fault_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.close()


def fault_config(redis_url: str, backend_url: str, spool: Path) -> dict[str, Any]:
    config = base_config(redis_url, backend_url, spool)
    config["auth"]["cache_ttl"] = f"{CACHE_TTL:g}s"
    config["backend"]["read_timeout"] = f"{READ_TIMEOUT:g}s"
    config["spool"].update(memory_threshold="64KiB", max_bytes=SPOOL_MAX)
    config["server"].update(body_timeout="5s", shutdown_grace="3s")
    return config


@pytest.fixture(scope="module")
def fault_gw(
    fault_redis: RedisServer, fault_backend: FaultBackend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProc]:
    work = tmp_path_factory.mktemp("faults")
    gw = start_gateway(fault_config(fault_redis.url, fault_backend.url, work / "spool"), work)
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def agent(fault_gw: GatewayProc) -> str:
    """A Secret (role agent: PDFs allowed) for a key in the fault Redis."""
    out = cli(fault_gw.config_path, "keys", "add", "--client", "faults", "--json")
    return mint(fault_gw, str(json.loads(out.stdout)["api_key"]), "role=agent")


@pytest.fixture
def backend(fault_backend: FaultBackend) -> FaultBackend:
    fault_backend.clear()
    return fault_backend


# -- helpers ------------------------------------------------------------------------------------


def pdf_upload(size: int) -> tuple[bytes, str]:
    return multipart([("file", "doc.pdf", None, make("pdf", size))])


def fds(gw: GatewayProc) -> dict[str, str]:
    return open_fds(gw.proc.pid)


def spool_fds(gw: GatewayProc) -> list[str]:
    """Spool files are unlinked at creation: the open descriptors are what is left to find."""
    spool = str(gw.config["spool"]["dir"])
    return [target for target in fds(gw).values() if target.startswith(spool)]


def assert_released(gw: GatewayProc, fd_baseline: int | None = None) -> None:
    """No spool descriptor (or file) left, and, when given, no more descriptors than before."""
    assert wait_until(lambda: not spool_fds(gw)), spool_fds(gw)
    spool = Path(gw.config["spool"]["dir"])
    assert not spool.exists() or os.listdir(spool) == []
    if fd_baseline is not None:
        assert wait_until(lambda: len(fds(gw)) <= fd_baseline), (fd_baseline, fds(gw))
    assert gw.proc.poll() is None, "the gateway must survive the fault"


async def upload(
    gw: GatewayProc, secret: str, path: str, body: bytes, ctype: str, **headers: str
) -> tuple[int, dict[str, Any], Any]:
    hdrs = {"Authorization": f"Bearer {secret}", "Content-Type": ctype, **headers}
    async with aiohttp.ClientSession() as s, s.post(gw.url + path, data=body, headers=hdrs) as r:
        raw = await r.read()
        doc = json.loads(raw) if raw and r.content_type.endswith("json") else {}
        return r.status, doc, r.headers


def assert_problem(
    status: int, doc: dict[str, Any], headers: Any, expected: int, code: str
) -> None:
    assert status == expected, doc
    assert headers["Content-Type"].startswith("application/problem+json")
    assert doc["status"] == expected and doc["code"] == code and doc["request_id"]


async def assert_still_serving(
    gw: GatewayProc, secret: str, backend: FaultBackend, size: int = 200_000
) -> None:
    """A good upload (on disk by default: over memory_threshold) still reaches the backend."""
    body, ctype = pdf_upload(size)
    status, doc, _ = await upload(gw, secret, "/streams/after/objects", body, ctype)
    assert status == 200, doc
    assert backend.records("/streams/after/")[-1].sha256 == hashlib.sha256(body).hexdigest()


# -- Redis ------------------------------------------------------------------------------------


@dataclass
class Outcome:
    rid: str
    phase: str  # the phase when the request started
    phase_end: str
    status: int
    code: str | None
    retry_after: str | None


async def test_redis_killed_mid_traffic_fails_closed_then_recovers_without_a_restart(
    fault_gw: GatewayProc, fault_redis: RedisServer, backend: FaultBackend, agent: str
) -> None:
    body, ctype = multipart([("file", "photo.png", None, make("png"))])
    url = fault_gw.url + "/streams/redis/objects"
    phase = ["up"]
    outcomes: list[Outcome] = []
    stop = asyncio.Event()

    async def traffic(worker: int) -> None:
        async with aiohttp.ClientSession() as s:
            for i in range(100_000):
                if stop.is_set():
                    return
                rid, started = f"faults-redis-{worker}-{i}", phase[0]
                hdrs = {"Authorization": f"Bearer {agent}", "Content-Type": ctype}
                async with s.post(url, data=body, headers={**hdrs, "X-Request-Id": rid}) as r:
                    code = json.loads(await r.read()).get("code")
                retry = r.headers.get("Retry-After")
                outcomes.append(Outcome(rid, started, phase[0], r.status, code, retry))
                await asyncio.sleep(0.01)

    tasks = [asyncio.create_task(traffic(w)) for w in range(4)]
    await asyncio.sleep(0.5)
    redis.Redis(port=fault_redis.port).save()  # a Redis with persistence: keys survive a restart
    fault_redis.stop()  # SIGKILL
    phase[0] = "killed"
    await asyncio.sleep(CACHE_TTL + 0.5)  # verdicts cached before the kill have expired by now
    phase[0] = "down"
    await asyncio.sleep(1.5)
    phase[0] = "restarting"
    await asyncio.to_thread(fault_redis.start)
    phase[0] = "restarted"
    recovered = time.monotonic()
    while not [o for o in outcomes if o.phase == "restarted" and o.status == 200]:
        assert time.monotonic() - recovered < 10, "no request passed after Redis came back"
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.gather(*tasks)

    assert {o.status for o in outcomes} <= {200, 503}, {(o.status, o.code) for o in outcomes}
    down = [o for o in outcomes if o.phase == "down" and o.phase_end == "down"]
    assert len(down) >= 10 and all(o.status == 503 for o in down), "fail closed while Redis is down"
    for o in outcomes:
        if o.status == 503:
            assert o.code == "auth_unavailable" and o.retry_after and int(o.retry_after) >= 1
    assert [o.status for o in outcomes if o.phase == "up"][:5] == [200] * 5
    assert [o.status for o in outcomes if o.phase == "restarted"][-5:] == [200] * 5
    forwarded = {r.headers.get("x-request-id") for r in backend.records("/streams/redis/")}
    assert forwarded == {o.rid for o in outcomes if o.status == 200}, "a 503 reached the backend"
    digest = hashlib.sha256(body).hexdigest()
    assert all(r.sha256 == digest for r in backend.records("/streams/redis/"))
    assert fault_gw.proc.poll() is None, "recovered by the same process, not a restart"


# -- the backend --------------------------------------------------------------------------------


async def test_a_backend_refusing_connections_is_a_502_and_the_spool_is_released(
    fault_redis: RedisServer, agent: str, tmp_path: Path
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    gw = start_gateway(fault_config(fault_redis.url, closed, tmp_path / "spool"), tmp_path)
    try:
        body, ctype = pdf_upload(1 * MiB)
        status, doc, headers = await upload(gw, agent, "/streams/refused/objects", body, ctype)
        assert_problem(status, doc, headers, 502, "backend_unavailable")
        assert "backend" in doc["detail"]
        assert_released(gw)
    finally:
        gw.stop()


async def test_a_hanging_backend_is_a_504_within_the_read_timeout(
    fault_gw: GatewayProc, backend: FaultBackend, agent: str
) -> None:
    body, ctype = pdf_upload(300_000)
    started = time.monotonic()
    status, doc, headers = await upload(fault_gw, agent, "/streams/hang/objects", body, ctype)
    elapsed = time.monotonic() - started
    assert_problem(status, doc, headers, 504, "backend_timeout")
    # Closed by the read timeout, not never: the bound says which, not how promptly (noisy CI).
    assert READ_TIMEOUT <= elapsed < READ_TIMEOUT + 6, elapsed
    assert_released(fault_gw)


async def test_a_backend_resetting_mid_request_body_is_a_502_and_the_spool_is_released(
    fault_gw: GatewayProc, backend: FaultBackend, agent: str
) -> None:
    # Warm pools first, as the other descriptor checks do: run alone (or first on its xdist
    # worker), the gateway opened its pooled Redis connection during this test, one more
    # descriptor than a baseline taken before any request.
    await assert_still_serving(fault_gw, agent, backend)
    baseline = len(fds(fault_gw))
    body, ctype = pdf_upload(3 * MiB)
    status, doc, headers = await upload(
        fault_gw, agent, "/streams/reset-request/objects", body, ctype
    )
    assert_problem(status, doc, headers, 502, "backend_unavailable")
    [rec] = backend.records("/streams/reset-request/")
    assert not rec.complete and rec.length < len(body), "the backend hung up while we were sending"
    assert_released(fault_gw, baseline)
    await assert_still_serving(fault_gw, agent, backend)


def inflight(gw: GatewayProc) -> float:
    return gauge(gw.admin_port, "upload_gateway_inflight_uploads")


@pytest.fixture(scope="module")
def roomy_gw(
    fault_redis: RedisServer, fault_backend: FaultBackend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProc]:
    """Uploads larger than the socket buffers between gateway and backend (~4 MiB on
    loopback), spooled to disk when announced past 8 MiB, else kept in memory."""
    work = tmp_path_factory.mktemp("roomy")
    config = fault_config(fault_redis.url, fault_backend.url, work / "spool")
    config["spool"].update(memory_threshold="8MiB", memory_budget="32MiB", max_bytes="64MiB")
    config["backend"]["read_timeout"] = f"{ROOMY_READ_TIMEOUT:g}s"
    gw = start_gateway(config, work)
    yield gw
    gw.stop()


@pytest.mark.parametrize(
    ("path", "size"),
    [
        ("/streams/stall-request/objects", 12 * MiB),  # spooled to disk
        ("/streams/stall-request/objects", 6 * MiB),  # kept in memory
        ("/api/stall-request/notes", 30 * MiB),  # a pass-through body, streamed as it comes
    ],
)
async def test_a_backend_that_stops_reading_the_body_is_a_504_and_gives_the_spool_back(
    roomy_gw: GatewayProc, backend: FaultBackend, agent: str, path: str, size: int
) -> None:
    """A backend stuck before reading the request body (its receive window full) must not hold
    the upload, its spool bytes and its descriptor forever: the read timeout starts only once
    the body is sent, so without a bound on sending, a handful of such requests fill
    ``spool.max_bytes`` and every later upload is a 507. nginx's ``proxy_send_timeout``: 504."""
    gw = roomy_gw
    await assert_still_serving(gw, agent, backend)
    baseline = len(fds(gw))
    body, ctype = pdf_upload(size)
    started = time.monotonic()
    try:
        status, doc, headers = await asyncio.wait_for(
            upload(gw, agent, path, body, ctype), ROOMY_READ_TIMEOUT + 6
        )
    except TimeoutError:
        status, doc, headers = 0, {}, {}
    elapsed = time.monotonic() - started
    assert status == 504, f"no answer after {elapsed:.1f} s: the gateway waits forever"
    assert_problem(status, doc, headers, 504, "backend_timeout")
    assert not backend.records("/stall-request/")[0].complete
    assert wait_until(lambda: spool_bytes(gw) == 0 and inflight(gw) == 0)
    assert_released(gw, baseline)
    await assert_still_serving(gw, agent, backend)


async def test_a_backend_reading_slowly_but_steadily_is_not_cut_off(
    roomy_gw: GatewayProc, backend: FaultBackend, agent: str
) -> None:
    """The bound on sending is per stall, like nginx's ``proxy_send_timeout``, not on the whole
    body: a backend that pauses shorter than ``read_timeout`` after each 4 MiB it reads takes
    several times ``read_timeout`` for the whole upload and still gets all of it."""
    body, ctype = exactly(18 * MiB)
    started = time.monotonic()
    status, doc, _ = await upload(roomy_gw, agent, "/streams/slow-read/objects", body, ctype)
    assert status == 200, doc
    assert time.monotonic() - started > 2 * ROOMY_READ_TIMEOUT
    [rec] = backend.records("/streams/slow-read/")
    assert rec.complete and rec.sha256 == hashlib.sha256(body).hexdigest()
    assert wait_until(lambda: spool_bytes(roomy_gw) == 0)


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_a_backend_resetting_mid_response_leaves_the_client_a_visibly_broken_response(
    fault_gw: GatewayProc, backend: FaultBackend, agent: str, framing: str
) -> None:
    """The head is already out when the backend drops: the gateway must cut the connection,
    never end the body cleanly, so no client can take 1,000 bytes for the whole answer."""
    logged = len(fault_gw.log())
    path = f"/fault/reset-response-{framing}"
    with socket.create_connection(("127.0.0.1", fault_gw.port)) as sock:
        sock.sendall(raw_head("GET", path, agent))
        started = time.monotonic()
        data = read_response(sock, timeout=10)
        assert time.monotonic() - started < 9, (  # read_response gives up at 10
            "the gateway must close, not leave the client hanging"
        )
        sock.settimeout(1)
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(1) == b"", "the connection must be closed"
    response = parse_response(data)
    assert response.status == 200
    if framing == "length":
        assert response.header("Content-Length") == "1000000"
        assert len(response.body) < 1_000_000
    else:
        assert response.header("Transfer-Encoding") == "chunked"
        assert b"y" * 1000 in response.body and not chunked_complete(response.body)
    assert fault_gw.proc.poll() is None
    # Logged as the backend's failure, not as a client leaving, and not as an ERROR traceback.
    assert wait_until(lambda: f'"path": "{path}"' in fault_gw.log()[logged:])
    assert_closed_quietly(fault_gw.log()[logged:], path, 502, "backend_aborted")


# -- clients ----------------------------------------------------------------------------------


def vanish_mid_upload(gw: GatewayProc, agent: str, path: str) -> None:
    """Send two thirds of a 3 MiB upload to ``path``, then reset the connection."""
    body, ctype = pdf_upload(3 * MiB)
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:
        sock.sendall(raw_head("POST", path, agent, ctype, len(body)))
        sock.sendall(body[: 2 * MiB])
        time.sleep(0.3)
        vanish(sock)


async def test_a_client_vanishing_mid_upload_sends_the_backend_nothing_and_leaks_nothing(
    fault_gw: GatewayProc, backend: FaultBackend, agent: str
) -> None:
    await assert_still_serving(fault_gw, agent, backend)  # warm pools: the baseline is steady
    baseline, logged = len(fds(fault_gw)), len(fault_gw.log())
    vanish_mid_upload(fault_gw, agent, "/streams/vanish/objects")
    assert_released(fault_gw, baseline)
    assert backend.records("/streams/vanish/") == []
    await assert_still_serving(fault_gw, agent, backend)
    assert_closed_quietly(fault_gw.log()[logged:], "/streams/vanish/objects")


@pytest.mark.parametrize("length", [3 * MiB, None])
async def test_a_client_vanishing_mid_pass_through_body_is_a_499_not_an_error(
    fault_gw: GatewayProc, backend: FaultBackend, agent: str, length: int | None
) -> None:
    """Not an upload route: the body streams to the backend as it arrives. A client that goes
    away is ordinary (mobile networks): an access line with 499, no ERROR with a traceback,
    and not counted or logged as the backend's failure (an operator alerts on those)."""
    logged = len(fault_gw.log())
    backend_errors = gauge(fault_gw.admin_port, "upload_gateway_backend_errors_total")
    ctype = "application/octet-stream"
    with socket.create_connection(("127.0.0.1", fault_gw.port)) as sock:
        sock.sendall(raw_head("POST", "/api/notes", agent, ctype, length, chunked=not length))
        sock.sendall(b"x" * 65536 if length else b"1000\r\n" + b"x" * 0x1000)
        time.sleep(0.3)
        vanish(sock)
    assert wait_until(lambda: '"path": "/api/notes"' in fault_gw.log()[logged:])
    assert_closed_quietly(fault_gw.log()[logged:], "/api/notes")
    assert "backend request failed" not in fault_gw.log()[logged:]
    assert gauge(fault_gw.admin_port, "upload_gateway_backend_errors_total") == backend_errors
    await assert_still_serving(fault_gw, agent, backend)


async def test_an_upload_whose_client_vanished_counts_as_aborted_not_as_rejected(
    fault_gw: GatewayProc, backend: FaultBackend, agent: str
) -> None:
    """``uploads_total{outcome="rejected"}`` is what a policy refused: a mobile client dropping
    mid-upload is not, and counting it there makes every network blip look like the policy."""
    before = _settled_outcomes(fault_gw)
    vanish_mid_upload(fault_gw, agent, "/streams/vanish-counted/objects")
    assert wait_until(lambda: "/streams/vanish-counted/objects" in fault_gw.log())
    after = Samples(scrape(fault_gw)).by("uploads_total", "outcome")
    changed = {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}
    assert changed == {"aborted": 1.0}, changed
    assert backend.records("/streams/vanish-counted/") == []


def _settled_outcomes(gw: GatewayProc) -> dict[str, float]:
    """``uploads_total`` by outcome once the earlier tests' uploads are all counted: a relayed
    answer reaches its client before the gateway's accounting of it runs."""
    last = Samples(scrape(gw)).by("uploads_total", "outcome")
    for _ in range(50):
        time.sleep(0.1)
        now = Samples(scrape(gw)).by("uploads_total", "outcome")
        if now == last:
            return now
        last = now
    return last


def assert_closed_quietly(
    log: str, path: str, status: int = 499, reason: str = "client_closed"
) -> None:
    """One access line for ``path`` with this status and reason, and no ERROR line at all."""
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert [line for line in lines if line.get("level") == "ERROR"] == [], log
    mine = [line for line in lines if line.get("path") == path]
    assert [(line["status"], line["reason"]) for line in mine] == [(status, reason)], mine


async def test_a_client_vanishing_mid_download_stops_the_backend_transfer_and_leaks_nothing(
    fault_gw: GatewayProc, backend: FaultBackend, agent: str
) -> None:
    await assert_still_serving(fault_gw, agent, backend)
    baseline, logged = len(fds(fault_gw)), len(fault_gw.log())
    backend_errors = gauge(fault_gw.admin_port, "upload_gateway_backend_errors_total")
    size = 256 * MiB
    with socket.create_connection(("127.0.0.1", fault_gw.port)) as sock:
        sock.sendall(raw_head("GET", f"/fault/big/{size}", agent))
        got = 0
        while got < MiB:
            got += len(sock.recv(65536))
        vanish(sock)
    # The gateway must drop the backend's transfer too, not read 256 MiB into nowhere.
    [rec] = backend.records("/fault/big/")
    assert wait_until(lambda: not _still_sending(rec), timeout=5)
    assert rec.response_sent < size
    assert_released(fault_gw, baseline)
    # The client left, the backend did nothing wrong: 499, not a backend error (a failed write
    # to the client is an aiohttp ClientError too).
    assert wait_until(lambda: "/fault/big/" in fault_gw.log()[logged:])
    assert_closed_quietly(fault_gw.log()[logged:], f"/fault/big/{size}")
    assert gauge(fault_gw.admin_port, "upload_gateway_backend_errors_total") == backend_errors
    await assert_still_serving(fault_gw, agent, backend)


def _still_sending(rec: Received) -> bool:
    before = rec.response_sent
    time.sleep(0.3)
    return bool(rec.response_sent != before)


# -- the spool --------------------------------------------------------------------------------


def spool_bytes(gw: GatewayProc) -> float:
    return gauge(gw.admin_port, "upload_gateway_spool_bytes")


async def test_concurrent_uploads_over_spool_max_bytes_get_507_spool_full(
    fault_gw: GatewayProc, backend: FaultBackend, agent: str
) -> None:
    """``spool.max_bytes`` counts every in-flight upload: the one that would cross it is refused,
    the one already holding its room completes."""
    first, ctype = pdf_upload(3 * MiB)
    second, _ = pdf_upload(2 * MiB)
    with socket.create_connection(("127.0.0.1", fault_gw.port)) as held:
        held.sendall(raw_head("POST", "/streams/full-a/objects", agent, ctype, len(first)))
        held.sendall(first[: 5 * MiB // 2])
        assert wait_until(lambda: spool_bytes(fault_gw) >= 5 * MiB // 2)
        with socket.create_connection(("127.0.0.1", fault_gw.port)) as sock:
            head = raw_head("POST", "/streams/full-b/objects", agent, ctype, len(second))
            refused = parse_response(send_while_listening(sock, head + second))
        held.sendall(first[5 * MiB // 2 :])
        accepted = parse_response(read_response(held))
    doc = json.loads(refused.body)
    assert_problem(refused.status, doc, dict(refused.headers), 507, "spool_full")
    assert accepted.status == 200, accepted.body
    assert backend.records("/streams/full-b/") == [], "the refused upload reached the backend"
    [rec] = backend.records("/streams/full-a/")
    assert rec.sha256 == hashlib.sha256(first).hexdigest()
    assert_released(fault_gw)
    assert wait_until(lambda: spool_bytes(fault_gw) == 0)


async def test_an_unwritable_spool_dir_is_507_spool_full_and_nothing_is_forwarded(
    fault_redis: RedisServer, backend: FaultBackend, agent: str, tmp_path: Path
) -> None:
    """As root, permissions do not stop us: the spool dir sits under a regular file (ENOTDIR)."""
    (tmp_path / "not-a-dir").write_bytes(b"")
    config = fault_config(fault_redis.url, backend.url, tmp_path / "not-a-dir" / "spool")
    gw = start_gateway(config, tmp_path)
    try:
        body, ctype = pdf_upload(1 * MiB)  # over memory_threshold: it must go to disk
        status, doc, headers = await upload(gw, agent, "/streams/unwritable/objects", body, ctype)
        assert_problem(status, doc, headers, 507, "spool_full")
        assert backend.records("/streams/unwritable/") == []
        await assert_still_serving(gw, agent, backend, size=20_000)  # memory only: it passes
    finally:
        gw.stop()


async def test_past_the_memory_budget_even_a_small_upload_goes_to_the_spool_file(
    fault_redis: RedisServer, backend: FaultBackend, agent: str, tmp_path: Path
) -> None:
    """spool.memory_budget is obeyed end to end: with none, a 20 KB upload (well within
    memory_threshold) needs the disk, so an unwritable spool refuses it, and a writable one
    delivers it byte-identical and keeps nothing."""
    (tmp_path / "not-a-dir").write_bytes(b"")
    config = fault_config(fault_redis.url, backend.url, tmp_path / "not-a-dir" / "spool")
    config["spool"]["memory_budget"] = "0"
    gw = start_gateway(config, tmp_path)
    try:
        body, ctype = pdf_upload(20_000)
        status, doc, headers = await upload(gw, agent, "/streams/nobudget/objects", body, ctype)
        assert_problem(status, doc, headers, 507, "spool_full")
        assert backend.records("/streams/nobudget/") == []
    finally:
        gw.stop()
    config = fault_config(fault_redis.url, backend.url, tmp_path / "spool")
    config["spool"]["memory_budget"] = "0"
    gw = start_gateway(config, tmp_path)
    try:
        await assert_still_serving(gw, agent, backend, size=20_000)
        assert_released(gw)
    finally:
        gw.stop()


def spills(gw: GatewayProc) -> dict[str, float]:
    return Samples(scrape(gw)).by("spool_spills_total", "reason")


def exchange(gw: GatewayProc, head: bytes, body: bytes, *, vanish_after: int = -1) -> int:
    """Send ``head`` and ``body`` (all of it, or ``vanish_after`` bytes and then a RST);
    the answer's status, 0 when there is none."""
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:
        if vanish_after >= 0:
            sock.sendall(head + body[:vanish_after])
            time.sleep(0.1)
            vanish(sock)
            return 0
        answer = send_while_listening(sock, head + body)
    return parse_response(answer).status if answer else 0


def chunked_head(secret: str, path: str, ctype: str) -> bytes:
    return raw_head("POST", path, secret, ctype, chunked=True)


def as_chunks(body: bytes, piece: int) -> bytes:
    pieces = (body[i : i + piece] for i in range(0, len(body), piece))
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


@pytest.fixture
def tight_gw(
    fault_redis: RedisServer, fault_backend: FaultBackend, tmp_path: Path
) -> Iterator[GatewayProc]:
    """A memory budget of exactly one threshold: a single byte of it not given back sends the
    next upload that fits the threshold to disk (``spool_spills_total{reason="budget"}``)."""
    config = fault_config(fault_redis.url, fault_backend.url, tmp_path / "spool")
    config["spool"].update(memory_threshold="64KiB", memory_budget="64KiB")
    config["server"].update(body_timeout="1s")
    config["channels"]["small"] = {
        "agents": {"max_file_size": "100KB", "allowed_types": [".pdf"]},
        "customers": {"enabled": False},
    }
    gw = start_gateway(config, tmp_path)
    yield gw
    gw.stop()


def exactly(total: int) -> tuple[bytes, str]:
    """A PDF upload whose whole multipart body is ``total`` bytes."""
    overhead = len(pdf_upload(1000)[0]) - 1000
    return pdf_upload(total - overhead)


async def test_every_way_an_upload_ends_gives_back_budget_spool_gauges_and_descriptors(
    tight_gw: GatewayProc, backend: FaultBackend, agent: str
) -> None:
    """Accepted (memory, announced to disk, spilled midway), refused before the body, at the
    sniff, by size midway, as malformed, for a full spool, for a stalled client, the client
    gone (in memory, on disk), the backend reset or hanging: each several times, then every
    counter is back where it started. A leak of one byte of the memory budget would turn every
    later upload into a spill, of ``spool.max_bytes`` into a 507 sooner or later."""
    gw = tight_gw
    await assert_still_serving(gw, agent, backend)
    baseline = len(fds(gw))
    small, ctype = pdf_upload(20_000)
    large, _ = pdf_upload(300_000)
    exe, _ = multipart([("file", "doc.pdf", None, make("pe", 20_000))])
    full, _ = pdf_upload(SPOOL_MAX + 1)

    def post(path: str, body: bytes, length: int | None = None) -> bytes:
        return raw_head("POST", path, agent, ctype, len(body) if length is None else length)

    paths: dict[str, tuple[int, Any]] = {
        "memory": (200, lambda: exchange(gw, post("/streams/a/objects", small), small)),
        "announced": (200, lambda: exchange(gw, post("/streams/a/objects", large), large)),
        "threshold": (
            200,
            lambda: exchange(
                gw, chunked_head(agent, "/streams/a/objects", ctype), as_chunks(large, 4096)
            ),
        ),
        "precheck": (413, lambda: exchange(gw, post("/streams/a/objects", b"", 60 * MiB), b"")),
        "sniffed": (415, lambda: exchange(gw, post("/streams/a/objects", exe), exe)),
        "too_large": (413, lambda: exchange(gw, post("/streams/small/objects", large), large)),
        "malformed": (400, lambda: exchange(gw, post("/streams/a/objects", small), b"x" * 20_000)),
        "spool_full": (507, lambda: exchange(gw, post("/streams/a/objects", full), full)),
        "stalled": (
            408,
            lambda: exchange(gw, post("/streams/a/objects", small, 40_000), small),
        ),
        "gone_memory": (
            0,
            lambda: exchange(gw, post("/streams/a/objects", small), small, vanish_after=10_000),
        ),
        "gone_disk": (
            0,
            lambda: exchange(gw, post("/streams/a/objects", large), large, vanish_after=200_000),
        ),
        "backend_reset": (
            502,
            lambda: exchange(gw, post("/streams/reset-request/objects", large), large),
        ),
        "backend_hang": (504, lambda: exchange(gw, post("/streams/hang/objects", small), small)),
    }
    before = spills(gw)
    for _ in range(3):
        for name, (expected, run) in paths.items():
            assert await asyncio.to_thread(run) == expected, name
    assert wait_until(lambda: spool_bytes(gw) == 0 and inflight(gw) == 0), (
        spool_bytes(gw),
        inflight(gw),
    )
    assert_released(gw, baseline)
    # The whole memory budget is free again: a body of exactly it stays in memory ...
    before = spills(gw)
    body, ctype = exactly(64 * 1024)
    head = chunked_head(agent, "/streams/budget/objects", ctype)
    assert await asyncio.to_thread(exchange, gw, head, as_chunks(body, 4096)) == 200
    assert spills(gw) == before, "some of the memory budget was never given back"
    # ... and so is the whole of spool.max_bytes: an upload of exactly it is accepted.
    body, ctype = exactly(SPOOL_MAX)
    status, doc, _ = await upload(gw, agent, "/streams/budget/objects", body, ctype)
    assert status == 200, doc
    assert wait_until(lambda: spool_bytes(gw) == 0)
    assert_released(gw, baseline)


async def test_many_concurrent_uploads_against_a_small_memory_budget_all_pass_and_leak_nothing(
    tight_gw: GatewayProc, backend: FaultBackend, agent: str
) -> None:
    """40 uploads at once, each within the threshold, into a budget that holds one of them:
    the rest spill (``budget``) instead of failing, every body arrives whole, and afterwards
    the budget, the spool and the descriptors are all back."""
    gw = tight_gw
    await assert_still_serving(gw, agent, backend)
    baseline = len(fds(gw))
    files = sum(not target.startswith("socket:") for target in fds(gw).values())
    body, ctype = pdf_upload(40_000)
    before = spills(gw).get("budget", 0.0)

    async def one(i: int) -> int:
        status, _, _ = await upload(gw, agent, f"/streams/many-{i}/objects", body, ctype)
        return status

    statuses = await asyncio.gather(*(one(i) for i in range(40)))
    assert statuses == [200] * 40
    digest = hashlib.sha256(body).hexdigest()
    assert all(r.sha256 == digest for r in backend.records("/streams/many-"))
    assert spills(gw).get("budget", 0.0) > before, "the budget should have run out"
    assert wait_until(lambda: spool_bytes(gw) == 0 and inflight(gw) == 0)
    assert_released(gw)
    # beyond the baseline: at most the keep-alive pool to the backend, one per upload at once
    assert len(fds(gw)) <= baseline + 40
    assert sum(not t.startswith("socket:") for t in fds(gw).values()) <= files
    before = spills(gw)
    body, ctype = exactly(64 * 1024)
    head = chunked_head(agent, "/streams/budget/objects", ctype)
    assert await asyncio.to_thread(exchange, gw, head, as_chunks(body, 4096)) == 200
    assert spills(gw) == before, "some of the memory budget was never given back"


async def test_a_full_disk_is_507_spool_full_and_the_space_comes_back(
    fault_redis: RedisServer, backend: FaultBackend, agent: str, tmp_path: Path, tiny_disk: Path
) -> None:
    config = fault_config(fault_redis.url, backend.url, tiny_disk)
    config["spool"]["max_bytes"] = "1GiB"  # the budget would allow it: only the disk says no
    gw = start_gateway(config, tmp_path)
    try:
        body, ctype = pdf_upload(3 * MiB)
        status, doc, headers = await upload(gw, agent, "/streams/enospc/objects", body, ctype)
        assert_problem(status, doc, headers, 507, "spool_full")
        assert backend.records("/streams/enospc/") == []
        assert_released(gw)
        disk = os.statvfs(tiny_disk)
        assert disk.f_bfree == disk.f_blocks, "the refused upload's space was given back"
        body, ctype = pdf_upload(512 * 1024)  # on disk, and it fits
        status, doc, _ = await upload(gw, agent, "/streams/fits/objects", body, ctype)
        assert status == 200, doc
        assert backend.records("/streams/fits/")[0].sha256 == hashlib.sha256(body).hexdigest()
    finally:
        gw.stop()


# -- SIGTERM ----------------------------------------------------------------------------------


async def test_sigterm_stops_accepting_finishes_in_flight_uploads_and_exits_0(
    fault_redis: RedisServer, backend: FaultBackend, agent: str, tmp_path: Path
) -> None:
    """Uploads done within ``shutdown_grace`` (3 s) are forwarded whole; one still arriving
    when it ends is cut off and never half-forwarded; the process exits 0."""
    gw = start_gateway(fault_config(fault_redis.url, backend.url, tmp_path / "spool"), tmp_path)
    bodies = {name: pdf_upload(1 * MiB) for name in ("a", "b", "c")}
    release, never = asyncio.Event(), asyncio.Event()
    tasks = {}
    for name, (body, ctype) in bodies.items():
        head = raw_head("POST", f"/streams/drain-{name}/objects", agent, ctype, chunked=True)
        gate = never if name == "c" else release
        tasks[name] = asyncio.create_task(trickle_upload(gw.port, head, body, gate, give_up=12))
    try:
        await asyncio.sleep(0.8)
        assert not backend.records("/streams/drain-")
        gw.signal(signal.SIGTERM)
        term = time.monotonic()
        await asyncio.sleep(0.3)
        assert await asyncio.to_thread(connect_refused, gw.port), "still accepting after SIGTERM"
        async with aiohttp.ClientSession() as s, s.get(gw.admin_url + "/readyz") as r:
            assert r.status == 503 and (await r.json())["checks"]["draining"] is True
        await asyncio.sleep(0.7)
        release.set()
        answers = {name: await task for name, task in tasks.items()}
        code = await asyncio.to_thread(gw.proc.wait, 15)
        exited = time.monotonic() - term
    finally:
        for task in tasks.values():
            task.cancel()
        gw.stop()
    assert code == 0
    assert exited < 3 + 4, f"took {exited:.1f} s to exit with a 3 s grace"
    for name in ("a", "b"):
        assert answers[name].startswith(b"HTTP/1.1 200"), f"{name} was cut off: {answers[name]!r}"
        assert response_complete(answers[name])
        [rec] = backend.records(f"/streams/drain-{name}/")
        assert rec.complete and rec.sha256 == hashlib.sha256(bodies[name][0]).hexdigest()
    assert not answers["c"].startswith(b"HTTP/1.1 200"), answers["c"][:300]
    assert backend.records("/streams/drain-c/") == [], "an unfinished upload was forwarded"


def test_an_answer_given_while_draining_closes_its_keep_alive_connection(
    fault_redis: RedisServer, backend: FaultBackend, agent: str, tmp_path: Path
) -> None:
    """The drain closes a connection once it is idle; a keep-alive client must be told so in
    the answer (``Connection: close``, as Envoy and Go do), or it sends its next request on a
    connection about to close and gets no answer at all, not knowing whether it was taken."""
    gw = start_gateway(fault_config(fault_redis.url, backend.url, tmp_path / "spool"), tmp_path)
    body = b"x" * 10_000
    try:
        with socket.create_connection(("127.0.0.1", gw.port)) as sock:
            sock.sendall(raw_head("POST", "/api/drain-keepalive", agent, "text/plain", len(body)))
            sock.sendall(body[:5000])
            time.sleep(0.5)
            gw.signal(signal.SIGTERM)
            time.sleep(0.5)
            sock.sendall(body[5000:])
            response = parse_response(read_response(sock))
            assert response.status == 200
            assert (response.header("Connection") or "").lower() == "close", response.headers
        assert gw.proc.wait(15) == 0
    finally:
        gw.stop()


def test_a_request_cut_off_when_the_grace_ends_is_logged_as_the_shutdown_not_the_client(
    fault_redis: RedisServer, backend: FaultBackend, agent: str, tmp_path: Path
) -> None:
    """An upload still arriving when ``shutdown_grace`` ends is cancelled by the gateway: its
    access line says so (503, reason ``shutdown``), not 499 ``client_closed``, so an operator
    counting what a deploy cut off does not go looking at the clients' networks."""
    config = fault_config(fault_redis.url, backend.url, tmp_path / "spool")
    config["server"].update(shutdown_grace="1s", body_timeout="30s")
    gw = start_gateway(config, tmp_path)
    body, ctype = pdf_upload(2 * MiB)
    try:
        with socket.create_connection(("127.0.0.1", gw.port)) as sock:
            sock.sendall(raw_head("POST", "/streams/cut-off/objects", agent, ctype, len(body)))
            sock.sendall(body[:MiB])
            time.sleep(0.5)
            gw.signal(signal.SIGTERM)
            assert gw.proc.wait(15) == 0
    finally:
        gw.stop()
    lines = [json.loads(x) for x in gw.log().splitlines() if x.startswith("{")]
    mine = [x for x in lines if x.get("path") == "/streams/cut-off/objects"]
    assert [(x["status"], x["reason"]) for x in mine] == [(503, "shutdown")], mine
    assert [x for x in lines if x.get("level") == "ERROR"] == []
    assert backend.records("/streams/cut-off/") == []
