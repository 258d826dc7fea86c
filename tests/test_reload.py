"""Hot reload (issue 5, SPEC §4): by SIGHUP and by editing the file; bad files change nothing.

Files are always replaced atomically (write, then rename), as a deploy tool would: the watcher
must never see half a file, so every failure counted here is a failure we caused on purpose.
To prove that SIGHUP — and not the 1 s file poller — applied a change, the SIGHUP cases write a
file of the same size and give it back the old mtime: the poller cannot tell it changed.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import re
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from gateway import reload as module
from gateway.config import load_config
from gateway.config.model import Config
from gateway.metrics import Metrics
from gateway.state import ConfigHolder
from tests.support import files
from tests.support.faults import (
    established_to,
    gauge,
    raw_head,
    read_response,
    vanish,
    wait_until,
)
from tests.support.gateway_proc import (
    SIGNING_KEY,
    BackendProc,
    GatewayProc,
    base_config,
    start_backend,
    start_gateway,
    write_atomically,
)
from tests.support.procs import RedisServer
from tests.support.rawhttp import parse_response
from tests.support.rawhttp import request as raw_request
from tests.test_metrics import (
    Reply,
    Samples,
    bearer,
    mint,
    new_key,
    observed_config,
    scrape,
    send,
    upload,
)
from tests.test_uploads import assert_no_spool_left

PNG_3000 = files.make("png", 3000)


@dataclass
class Reloading:
    gw: GatewayProc
    base: dict[str, Any]
    agent: dict[str, str]

    def post(
        self, data: bytes = PNG_3000, name: str = "photo.png", ctype: str = "image/png"
    ) -> Reply:
        body, headers = upload(name, ctype, data)
        return send(self.gw.port, "POST", "/streams/301/objects", body, {**headers, **self.agent})

    def readyz(self) -> dict[str, Any]:
        reply = send(self.gw.admin_port, "GET", "/readyz")
        assert reply.status == 200, reply.body  # a refused reload keeps the replica ready
        return dict(reply.json()["checks"])

    def reloads(self, result: str) -> float:
        return Samples(scrape(self.gw)).get("config_reloads_total", result=result)


@pytest.fixture(scope="module")
def reloading(
    redis_server: RedisServer, backend_proc: BackendProc, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Reloading]:
    tmp = tmp_path_factory.mktemp("reload")
    base = observed_config(redis_server, backend_proc, tmp, "ugw-reload")
    gw = start_gateway(copy.deepcopy(base), tmp)
    try:
        secret = mint(gw, new_key(gw, "reload-client"), "role=agent")
        yield Reloading(gw, base, bearer(secret))
    finally:
        gw.stop()


def with_agents(base: dict[str, Any], **agents: Any) -> dict[str, Any]:
    config = copy.deepcopy(base)
    config["channels"]["default"]["agents"].update(agents)
    return config


def wait_for(predicate: Any, timeout: float = 15.0) -> None:
    """Poll ``predicate``; the timeout only tells "happened" from "never" on a loaded machine."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def apply_by_edit(r: Reloading, text: str) -> None:
    generation = r.readyz()["config_generation"]
    write_atomically(r.gw.config_path, text)
    wait_for(lambda: r.readyz()["config_generation"] == generation + 1)


def apply_by_sighup(r: Reloading, text: str) -> None:
    """Same size, old mtime: the poller would never see it; only SIGHUP can load it."""
    generation = r.readyz()["config_generation"]
    write_atomically(r.gw.config_path, text, keep_stat=True)
    time.sleep(1.3)  # more than one poll: prove the poller did not notice
    assert r.readyz()["config_generation"] == generation
    r.gw.signal(signal.SIGHUP)
    wait_for(lambda: r.readyz()["config_generation"] == generation + 1)


def dump(config: dict[str, Any]) -> str:
    return yaml.safe_dump(config, sort_keys=False)


def test_sighup_applies_a_lower_size_limit(reloading: Reloading) -> None:
    r = reloading
    apply_by_edit(r, dump(r.base))
    assert r.post().status == 200
    successes = r.reloads("success")
    # "20MB" -> "2000": the same number of characters, so the file keeps its size.
    apply_by_sighup(r, dump(with_agents(r.base, max_file_size=2000)))
    refused = r.post()
    assert refused.status == 413
    assert refused.json()["limit_bytes"] == 2000
    assert r.reloads("success") == successes + 1


def test_editing_the_file_applies_new_allowed_types(reloading: Reloading) -> None:
    r = reloading
    apply_by_edit(r, dump(with_agents(r.base, allowed_types=["documents"])))
    png = r.post(files.png())
    assert png.status == 415 and png.json()["code"] == "type_not_allowed"
    assert r.post(files.pdf(), "invoice.pdf", "application/pdf").status == 200


def test_a_reload_says_which_changed_settings_wait_for_a_restart(reloading: Reloading) -> None:
    """A successful reload must not let an operator believe a new Redis is in use."""
    r = reloading
    logged = len(r.gw.log())
    apply_by_edit(r, dump(with_agents(r.base, allowed_types=["documents"])))
    assert "take effect only after a restart" not in r.gw.log()[logged:]
    changed = with_agents(r.base, allowed_types=["documents"])
    changed["auth"]["leeway"] = "30s"  # applied by a reload: not named
    changed["backend"]["read_timeout"] = "9s"  # likewise
    changed["redis"]["timeout"] = "9s"
    apply_by_edit(r, dump(changed))
    assert 'take effect only after a restart: redis"' in r.gw.log()[logged:]


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), start=1) if needle in line)


def test_bad_files_keep_the_running_policy_until_a_good_one_comes(reloading: Reloading) -> None:
    r = reloading
    limited = dump(with_agents(r.base, max_file_size=1999))
    apply_by_edit(r, limited)
    generation, failures = r.readyz()["config_generation"], r.reloads("failure")
    path = str(r.gw.config_path)

    # 1. A YAML syntax error, noticed by the poller.
    broken = limited.replace("channels:\n", "channels: [unclosed\n", 1)
    write_atomically(r.gw.config_path, broken)
    wait_for(lambda: r.reloads("failure") == failures + 1)
    where = re.compile(re.escape(path) + r":(\d+): invalid YAML")
    logged = where.search(r.gw.log())
    assert logged is not None and int(logged.group(1)) >= line_of(broken, "[unclosed")
    checks = r.readyz()
    assert where.search(checks["config_error"])
    assert checks["config"] != "ok" and checks["config_generation"] == generation
    assert r.post().json()["limit_bytes"] == 1999  # the old policy still runs

    # 2. A semantic error (a channel above the 20 MB system cap), by SIGHUP only: "1999" ->
    # "30MB" keeps the size, and the old mtime is put back, so the poller cannot see it.
    write_atomically(r.gw.config_path, limited)
    wait_for(lambda: r.readyz()["config_generation"] == generation + 1)
    generation = r.readyz()["config_generation"]
    over_cap = limited.replace("max_file_size: 1999", "max_file_size: 30MB", 1)
    write_atomically(r.gw.config_path, over_cap, keep_stat=True)
    r.gw.signal(signal.SIGHUP)
    wait_for(lambda: r.reloads("failure") == failures + 2)
    cap_line = line_of(over_cap, "30MB")
    expected = f"{path}:{cap_line}: channels.default.agents.max_file_size"
    assert expected in r.gw.log()
    assert expected in r.readyz()["config_error"]
    assert r.post().json()["limit_bytes"] == 1999
    assert r.readyz()["config_generation"] == generation

    # 3. A good file recovers: the new policy runs and the error is gone from /readyz.
    apply_by_edit(r, dump(r.base))
    checks = r.readyz()
    assert checks["config"] == "ok" and checks["config_error"] is None
    assert r.post().status == 200


def chunked_upload(r: Reloading, body: bytes, headers: dict[str, str], split: int) -> socket.socket:
    head = "".join(f"{k}: {v}\r\n" for k, v in {**headers, **r.agent}.items())
    sock = socket.create_connection(("127.0.0.1", r.gw.port), timeout=10)
    sock.sendall(
        (
            f"POST /streams/302/objects HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n{head}"
            "Transfer-Encoding: chunked\r\n\r\n"
        ).encode()
        + b"%x\r\n%s\r\n" % (split, body[:split])
    )
    return sock


def test_an_inflight_upload_finishes_under_the_policy_it_started_with(reloading: Reloading) -> None:
    r = reloading
    apply_by_edit(r, dump(r.base))
    body, headers = upload("photo.png", "image/png", PNG_3000)
    sock = chunked_upload(r, body, headers, split=1000)
    try:
        time.sleep(0.3)  # the gateway has the headers and 1000 bytes: the request has started
        generation = r.readyz()["config_generation"]
        write_atomically(r.gw.config_path, dump(with_agents(r.base, max_file_size=2000)))
        r.gw.signal(signal.SIGHUP)
        wait_for(lambda: r.readyz()["config_generation"] > generation)
        rest = body[1000:]
        sock.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(rest), rest))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    finally:
        sock.close()
    response = parse_response(data)
    assert response.status == 200, response.body
    assert b'"success"' in response.body  # the backend stored it
    assert r.post().status == 413  # a request that starts now gets the new policy


def test_a_file_the_loader_cannot_even_read_keeps_the_watcher_alive(reloading: Reloading) -> None:
    """YAML's ``.nan`` is a float: ``cors.max_age: .nan`` made the loader raise ValueError (not
    ConfigError), which killed the file watcher's task: not counted as a failed reload, and
    every later edit, good ones included, was ignored until a restart."""
    r = reloading
    failures = r.reloads("failure")
    generation = r.readyz()["config_generation"]
    broken = copy.deepcopy(r.base)
    broken["cors"]["max_age"] = float("nan")
    write_atomically(r.gw.config_path, dump(broken))
    wait_for(lambda: r.reloads("failure") == failures + 1)
    assert "cors.max_age" in r.readyz()["config_error"]
    apply_by_edit(r, dump(with_agents(r.base, max_file_size=2999)))  # the watcher still runs
    assert r.readyz()["config_generation"] == generation + 1
    assert r.post().json()["limit_bytes"] == 2999
    apply_by_edit(r, dump(r.base))


def test_a_backend_ca_file_that_cannot_be_loaded_fails_the_reload_and_changes_nothing(
    reloading: Reloading,
) -> None:
    """A reload naming a ``backend.ca_file`` that cannot be loaded raised FileNotFoundError out
    of the rebuild, after the certificate and the ``auth`` section of the same edit had been
    applied: the reload was not counted nor shown on /readyz, the policy stayed old while the
    signing keys were new, and the file watcher's task ended (every later edit was ignored,
    and the next SIGTERM's drain raised the error instead of waiting for uploads)."""
    r = reloading
    failures = r.reloads("failure")
    generation = r.readyz()["config_generation"]
    broken = with_agents(r.base, max_file_size=2999)
    broken["backend"]["url"] = "https://127.0.0.1:9"
    broken["backend"]["ca_file"] = str(r.gw.config_path.with_name("no-such-ca.pem"))
    broken["auth"]["header"] = "X-Secret"  # applied on its own, every request here would be 401
    write_atomically(r.gw.config_path, dump(broken))
    wait_for(lambda: r.reloads("failure") == failures + 1)
    assert "backend.ca_file" in r.readyz()["config_error"]
    assert r.readyz()["config_generation"] == generation
    assert r.post().status == 200  # the old auth header, the old limit, the old backend
    apply_by_edit(r, dump(with_agents(r.base, max_file_size=2999)))  # the watcher still runs
    assert r.post().json()["limit_bytes"] == 2999
    apply_by_edit(r, dump(r.base))


async def test_a_loader_bug_fails_the_reload_and_keeps_watching(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever the loader raises, the reload fails (counted, on /readyz) and the next one runs."""
    path = tmp_path / "policies.yaml"
    path.write_text("x")
    holder, metrics = ConfigHolder(Config()), Metrics(CollectorRegistry())
    watcher = module.ConfigWatcher(str(path), holder, metrics)
    monkeypatch.setattr(module, "load_config", lambda _: 1 / 0)
    assert await watcher.reload() is False
    assert holder.last_error is not None and "ZeroDivisionError" in holder.last_error
    monkeypatch.setattr(module, "load_config", lambda _: Config())
    assert await watcher.reload() is True and holder.generation == 1


async def test_a_rebuild_bug_fails_the_reload_and_keeps_watching(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever rebuilding raises, the reload fails (counted, on /readyz) and the next runs."""
    path = tmp_path / "policies.yaml"
    path.write_text("{}")
    monkeypatch.setattr(module, "load_config", lambda _: Config())
    holder, metrics = ConfigHolder(Config()), Metrics(CollectorRegistry())
    calls: list[Config] = []

    def rebuild(config: Config, _source: str) -> None:
        calls.append(config)
        if len(calls) == 1:
            raise RuntimeError("a bug")

    watcher = module.ConfigWatcher(str(path), holder, metrics, rebuild)
    assert await watcher.reload() is False
    assert holder.last_error is not None and "RuntimeError" in holder.last_error
    assert holder.generation == 0
    assert await watcher.reload() is True and holder.generation == 1


async def test_a_sighup_while_the_worker_drains_starts_no_reload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGHUP's handler stays installed during the drain (its default would kill the worker):
    once the watcher is closed, a reload it started would be awaited and cancelled by nobody,
    swap the config of a worker on its way out, and hold the worker's exit until its thread
    had read the file (~5 s per MiB of YAML)."""
    path = tmp_path / "policies.yaml"
    path.write_text("{}")
    holder, metrics = ConfigHolder(Config()), Metrics(CollectorRegistry())
    watcher = module.ConfigWatcher(str(path), holder, metrics)
    loads: list[str] = []
    monkeypatch.setattr(module, "load_config", lambda p: loads.append(p) or Config())
    await watcher.close()
    watcher.request_reload()
    await asyncio.gather(*asyncio.all_tasks() - {asyncio.current_task()})
    assert loads == [] and holder.generation == 0


async def test_the_restart_warning_compares_with_what_runs_not_with_the_last_reload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The settings fixed at start were compared with the previous reload's file: once a
    warned change (``redis.timeout``) had been reloaded, the next reload (a limit)
    said nothing although the file still differed from what the process runs, and putting
    the running value back warned that it waited for a restart. (``backend`` has been applied
    by a reload since; ``redis`` is still fixed.)"""
    monkeypatch.setenv("GATEWAY_SIGNING_KEY", SIGNING_KEY)
    base = base_config("redis://127.0.0.1:9/0", "http://127.0.0.1:9", tmp_path / "spool")
    path = tmp_path / "policies.yaml"
    path.write_text(dump(base))
    holder = ConfigHolder(load_config(str(path)))
    watcher = module.ConfigWatcher(str(path), holder, Metrics(CollectorRegistry()))

    async def restart_warnings(config: dict[str, Any]) -> list[str]:
        write_atomically(path, dump(config))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="upload_gateway.reload"):
            assert await watcher.reload()
        return [r.getMessage() for r in caplog.records if "after a restart" in r.getMessage()]

    slower = copy.deepcopy(base)
    slower["redis"]["timeout"] = "9s"
    assert [w.rsplit(": ", 1)[1] for w in await restart_warnings(slower)] == ["redis"]
    limited = with_agents(slower, max_file_size=2000)
    assert [w.rsplit(": ", 1)[1] for w in await restart_warnings(limited)] == ["redis"]
    assert holder.current.channels["default"].agents.max_file_size == 2000  # the rest applies
    assert await restart_warnings(base) == []  # the file agrees with what runs again


def test_a_reload_applies_a_new_log_level(
    redis_server: RedisServer, backend_proc: BackendProc, tmp_path: Path
) -> None:
    """``log_level`` is neither fixed at start (no warning names it) nor read per request: a
    reload that turns the access lines on (or DEBUG for an incident) must do so, as nginx's
    ``error_log`` level does on reload."""
    base = observed_config(redis_server, backend_proc, tmp_path, "ugw-reload-level")
    quiet = {**copy.deepcopy(base), "log_level": "WARNING"}
    gw = start_gateway(copy.deepcopy(quiet), tmp_path)
    try:
        assert (
            send(gw.port, "GET", "/inbox", headers={"X-Request-Id": "level-before"}).status == 401
        )
        write_atomically(gw.config_path, dump({**quiet, "log_level": "INFO"}))
        gw.signal(signal.SIGHUP)
        wait_for(lambda: gw.config_generation() == 1)
        assert send(gw.port, "GET", "/inbox", headers={"X-Request-Id": "level-after"}).status == 401
        wait_for(lambda: "level-after" in gw.log())
    finally:
        gw.stop()
    assert "level-before" not in gw.log()


def test_a_reload_sends_new_exchanges_to_a_new_backend_and_lets_running_ones_finish(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """``backend`` was fixed at start: pointing it elsewhere (a moved service, a new timeout)
    needed every replica restarted. A reload now opens a new pool for new exchanges; one
    already talking to the old backend finishes there, whole, and the old pool's connections
    are closed after it, as nginx's old workers finish their requests after a reload."""
    old, new = start_backend(tmp_path / "old-store"), start_backend(tmp_path / "new-store")
    base = observed_config(redis_server, old, tmp_path, "ugw-reload-backend")
    gw = start_gateway(copy.deepcopy(base), tmp_path)
    try:
        secret = mint(gw, new_key(gw, "reload-backend"), "role=agent")
        streaming = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
        streaming.sendall(raw_head("POST", "/t/echo", secret, "text/plain", chunked=True))
        streaming.sendall(b"5\r\nfirst\r\n")  # a pass-through body streams to the backend
        assert streaming.recv(12) == b"HTTP/1.1 200"  # the echo answered: the exchange is on
        moved = copy.deepcopy(base)
        moved["backend"]["url"] = new.url
        write_atomically(gw.config_path, dump(moved))
        wait_for(lambda: gw.config_generation() == 1)
        assert send(gw.port, "GET", "/t/status/204", headers=bearer(secret)).status == 204
        assert [r["path"] for r in new.records()] == ["/t/status/204"]
        streaming.sendall(b"4\r\nlast\r\n0\r\n\r\n")
        streaming.settimeout(10)
        answer = b""
        while not answer.endswith(b"0\r\n\r\n"):
            piece = streaming.recv(65536)
            assert piece, f"the exchange was cut: {answer!r}"
            answer += piece
        streaming.close()
        assert answer.split(b"\r\n\r\n", 1)[1] == b"5\r\nfirst\r\n4\r\nlast\r\n0\r\n\r\n"
        assert [r["path"] for r in old.records()] == ["/t/echo"]
        assert wait_until(lambda: established_to(old.port) == 0, timeout=15), "old pool still open"
        assert "after a restart" not in gw.log()
    finally:
        gw.stop()
        old.stop()
        new.stop()


def test_a_client_vanishing_after_the_backend_answered_ends_its_exchange_and_its_pool(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A pass-through client that vanished while the backend was already streaming its answer
    (an echo, a progress stream) left the exchange waiting on the backend's body for ever:
    aiohttp's writer put the body's failure on the wait for the response head, which had come
    already, and dropped the read timeout. The backend connection stayed open, a pool retired
    by a reload was never closed, and the drain waited for the exchange at shutdown. Now the
    exchange ends at once, as the client's doing (499), not the backend's."""
    old, new = start_backend(tmp_path / "old-store"), start_backend(tmp_path / "new-store")
    base = observed_config(redis_server, old, tmp_path, "ugw-reload-vanish")
    gw = start_gateway(copy.deepcopy(base), tmp_path)
    try:
        secret = mint(gw, new_key(gw, "reload-vanish"), "role=agent")
        errors = gauge(gw.admin_port, "upload_gateway_backend_errors_total")
        streams = []
        for _ in range(3):  # each one its own chance at the race aiohttp loses
            sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
            sock.sendall(raw_head("POST", "/t/echo", secret, "text/plain", chunked=True))
            sock.sendall(b"5\r\nfirst\r\n")
            assert sock.recv(12) == b"HTTP/1.1 200"  # the backend is answering
            streams.append(sock)
        moved = copy.deepcopy(base)
        moved["backend"]["url"] = new.url
        write_atomically(gw.config_path, dump(moved))
        wait_for(lambda: gw.config_generation() == 1)
        for sock in streams:
            vanish(sock)
        assert wait_until(lambda: established_to(old.port) == 0, timeout=10), "exchange hangs"
        lines = [line for line in gw.log().splitlines() if '"path": "/t/echo"' in line]
        assert len(lines) == 3 and all('"status": 499' in line for line in lines), lines
        assert gauge(gw.admin_port, "upload_gateway_backend_errors_total") == errors
    finally:
        gw.stop()
        old.stop()
        new.stop()


def test_a_reload_resizes_the_spool_budget(
    redis_server: RedisServer, backend: BackendProc, tmp_path: Path
) -> None:
    """``spool.max_bytes`` was fixed at start: an operator raising it during a burst of 507s
    had to restart every replica. A reload now resizes the budget for new uploads."""
    base = observed_config(redis_server, backend, tmp_path, "ugw-reload-spool")
    base["spool"]["max_bytes"] = "64KiB"
    gw = start_gateway(copy.deepcopy(base), tmp_path)
    try:
        agent = bearer(mint(gw, new_key(gw, "reload-spool"), "role=agent"))
        body, headers = upload("big.png", "image/png", files.make("png", 100_000))

        def post() -> Reply:
            return send(gw.port, "POST", "/streams/301/objects", body, {**headers, **agent})

        refused = post()
        assert (refused.status, refused.json()["code"]) == (507, "spool_full")
        assert backend.records() == []
        assert_no_spool_left(gw)
        roomier = copy.deepcopy(base)
        roomier["spool"]["max_bytes"] = "64MiB"
        write_atomically(gw.config_path, dump(roomier))
        wait_for(lambda: gw.config_generation() == 1)
        assert post().status == 200
        assert [r["path"] for r in backend.records()] == ["/streams/301/objects"]
        assert "after a restart" not in gw.log()
    finally:
        gw.stop()


def test_a_reload_retunes_the_listener_for_the_connections_it_accepts_next(
    redis_server: RedisServer, backend: BackendProc, tmp_path: Path
) -> None:
    """The ``server`` limits and timeouts were fixed at start: tightening them during an
    attack (floods of oversized or slow heads) needed every replica restarted. A reload now
    gives them to the connections accepted from then on; one already open keeps its own, as
    its parser and timers were made with them."""
    base = observed_config(redis_server, backend, tmp_path, "ugw-reload-server")
    base["server"].update(max_head_size="64KiB", header_timeout="10s")
    gw = start_gateway(copy.deepcopy(base), tmp_path)
    padding = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 1000) for i in range(6))
    head = b"GET /t/status/204 HTTP/1.1\r\nHost: gw\r\n" + padding + b"\r\n"  # ~6 KB
    try:
        assert raw_request(gw.port, head).status == 401  # read whole, then: no Secret
        accepted_before = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
        tight = copy.deepcopy(base)
        tight["server"].update(max_head_size="4KiB", header_timeout="1s")
        write_atomically(gw.config_path, dump(tight))
        wait_for(lambda: gw.config_generation() == 1)
        refused = raw_request(gw.port, head)
        assert refused.status == 431
        assert refused.header("Content-Type") == "application/problem+json"
        assert json.loads(refused.body)["limit_bytes"] == 4096
        accepted_before.sendall(head)  # accepted under 64 KiB: still read whole
        assert parse_response(read_response(accepted_before)).status == 401
        accepted_before.close()
        started = time.monotonic()
        silent = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
        assert silent.recv(65536) == b""  # closed, having sent nothing, by the new 1 s timer
        assert time.monotonic() - started < 6  # not the 10 s it was started with
        silent.close()
        assert backend.records() == []
        assert "after a restart" not in gw.log()
    finally:
        gw.stop()


def test_a_large_file_is_read_while_the_worker_keeps_answering(reloading: Reloading) -> None:
    """Composing YAML costs ~0.3 s per 100 KB in pure Python: a file listing thousands of
    channels, read on the event loop, stopped the worker answering anyone for that long, on
    every reload. It is read in a thread: /readyz answers (still the old generation) while the
    new file is being read, then the new policy applies."""
    r = reloading
    generation = r.readyz()["config_generation"]
    large = copy.deepcopy(r.base)
    for i in range(3000):  # ~430 KB, about a second to read here
        large["channels"][f"stream-{i}"] = {"agents": {"enabled": False}}
    write_atomically(r.gw.config_path, dump(large), keep_stat=False)
    r.gw.signal(signal.SIGHUP)
    time.sleep(0.2)  # ordering only: the signal has been taken, the reading has begun
    assert r.readyz()["config_generation"] == generation, "answered only once the file was read"
    wait_for(lambda: r.readyz()["config_generation"] >= generation + 1, timeout=20)
    apply_by_edit(r, dump(r.base))
