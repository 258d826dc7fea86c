"""``server.max_connections``: a listener past its cap closes new connections at once.

Each connection is bounded in bytes and time but, before this, not in number: a flood of them
would take the worker's descriptors, and then everyone's uploads would fail (no spool file, no
backend connection). Past the cap a new connection is counted and closed before anything is
read from it, and the connections already open go on being served. The worker also raises its
soft descriptor limit to what the cap needs, and warns when the hard limit is short of it.
"""

from __future__ import annotations

import contextlib
import json
import resource
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.connections import ADMIN_CONNECTIONS, descriptors_needed
from tests.support.faults import read_response, wait_until
from tests.support.gateway_proc import (
    BackendProc,
    GatewayProc,
    base_config,
    spool_files,
    start_gateway,
)
from tests.support.procs import RedisServer
from tests.test_metrics import Samples, scrape

CAP = 3


@pytest.fixture(scope="module")
def capped(
    redis_server: RedisServer, backend_proc: BackendProc, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProc]:
    work = tmp_path_factory.mktemp("connections")
    config = base_config(redis_server.url, backend_proc.url, work / "spool")
    config["server"]["max_connections"] = CAP
    gw = start_gateway(config, work)
    yield gw
    gw.stop()


def ask(sock: socket.socket, path: str, token: str = "") -> bytes:
    """One keep-alive GET on ``sock``; the whole response, or what came before EOF or a reset."""
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: gw\r\n{auth}\r\n".encode())
    return read_response(sock, timeout=5)


def served(port: int, path: str, token: str = "") -> bool:
    """Whether a new connection to ``port`` gets an answer (False: closed unanswered)."""
    with (
        socket.create_connection(("127.0.0.1", port)) as sock,
        contextlib.suppress(BrokenPipeError, ConnectionResetError),
    ):
        return ask(sock, path, token).startswith(b"HTTP/1.1 200")
    return False


def hold(port: int, count: int, path: str, token: str = "") -> list[socket.socket]:
    """``count`` keep-alive connections, each served once before the next is opened.

    One after the other, not all at once: a connection the test harness opened and closed a
    moment before (``start_gateway`` probes the ports) still counts until the worker has read
    its end, and a batch accepted with it would find the cap reached a connection early.
    """
    held: list[socket.socket] = []
    for n in range(count):
        held.append(socket.create_connection(("127.0.0.1", port)))
        assert ask(held[-1], f"{path}={n}", token).startswith(b"HTTP/1.1 200")
    return held


def refused(gw: GatewayProc, listener: str) -> float:
    return Samples(scrape(gw)).get("connections_refused_total", listener=listener)


def test_a_connection_past_the_cap_is_closed_unanswered_and_the_others_are_served(
    capped: GatewayProc, backend: BackendProc, secret: str
) -> None:
    token = secret  # minted by the shared gateway; both use the same Redis
    held = hold(capped.port, CAP, "/t/status/200?held", token)
    try:
        assert not served(capped.port, "/t/status/200?past-the-cap", token)
        assert refused(capped, "proxy") == 1
        assert not any("past-the-cap" in json.dumps(r) for r in backend.records())
        for n, sock in enumerate(held):  # untouched: still served on the same connections
            assert ask(sock, f"/t/status/200?again={n}", token).startswith(b"HTTP/1.1 200")
        held.pop().close()
        # A new connection is served once the worker has seen that one go.
        attempts = 0

        def one_more() -> bool:
            nonlocal attempts
            attempts += 1
            return served(capped.port, "/t/status/200?after-a-close", token)

        assert wait_until(one_more)
        assert refused(capped, "proxy") == attempts  # the 1 above, plus any tried too early
        assert spool_files(Path(capped.config["spool"]["dir"])) == []
    finally:
        for sock in held:
            sock.close()


def test_the_admin_listener_has_its_own_cap(capped: GatewayProc) -> None:
    """Probes and scrapes need a few connections; a flood of them must not take the worker's
    descriptors either, nor count against (or be counted as) the proxy's."""
    before = refused(capped, "proxy")
    held = hold(capped.admin_port, ADMIN_CONNECTIONS, "/healthz?held")
    try:
        assert not served(capped.admin_port, "/healthz")
    finally:
        for sock in held:
            sock.close()
    attempts = 0

    def scraped() -> float | None:
        nonlocal attempts
        attempts += 1
        with contextlib.suppress(AssertionError, ConnectionError, OSError):
            return refused(capped, "admin")
        return None

    assert wait_until(lambda: scraped() is not None)
    # the one refused above, and the scrapes tried before the worker saw the others go
    assert refused(capped, "admin") == attempts
    assert refused(capped, "proxy") == before


@contextlib.contextmanager
def soft_descriptor_limit(soft: int) -> Iterator[None]:
    """This process's soft limit lowered while a gateway is spawned (which inherits it)."""
    old_soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (old_soft, hard))


def open_files_limit(gw: GatewayProc) -> tuple[int, int]:
    """(soft, hard) ``RLIMIT_NOFILE`` of the running gateway, from /proc."""
    soft, hard = resource.prlimit(gw.proc.pid, resource.RLIMIT_NOFILE)
    return soft, hard


def test_the_worker_raises_its_descriptor_limit_to_what_the_cap_needs(
    redis_server: RedisServer, backend_proc: BackendProc, tmp_path: Path
) -> None:
    """Debian starts processes with a soft limit of 1,024: a cap of 4,096 would not protect."""
    config = base_config(redis_server.url, backend_proc.url, tmp_path / "spool")
    config["server"]["max_connections"] = 1000
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with soft_descriptor_limit(512):
        gw = start_gateway(config, tmp_path)
    try:
        needed = descriptors_needed(load_config(str(gw.config_path), require_secrets=False))
        assert needed > 2000
        assert open_files_limit(gw) == (min(needed, hard), hard)
        assert ("server.max_connections" in gw.log()) == (hard < needed)
    finally:
        gw.stop()


def test_a_hard_limit_short_of_the_cap_is_said_at_startup(
    redis_server: RedisServer, backend_proc: BackendProc, tmp_path: Path
) -> None:
    config = base_config(redis_server.url, backend_proc.url, tmp_path / "spool")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    config["server"]["max_connections"] = hard  # needs about twice the hard limit
    gw = start_gateway(config, tmp_path)
    try:
        assert open_files_limit(gw) == (hard, hard)
        assert wait_until(lambda: "server.max_connections" in gw.log())
        assert f"only {hard} (hard limit)" in gw.log()
    finally:
        gw.stop()
