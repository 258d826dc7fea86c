"""The ``--workers N`` supervisor on failures (issue 5, SPEC §2): a worker that cannot start must
not be restarted forever. nginx and Envoy refuse to start when their port is taken or their
certificate is unusable; the gateway must exit non-zero with the reason, not crash-loop.
"""

from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.support import files
from tests.support.gateway_proc import (
    BackendProc,
    GatewayProc,
    base_config,
    spawn_gateway,
    start_gateway,
)
from tests.support.procs import (
    REPO,
    RedisServer,
    child_env,
    free_port,
    gateway_command,
    wait_for_port,
)
from tests.test_metrics import Samples, bearer, mint, new_key, observed_config, scrape, send, upload


def run_serve(
    config: dict[str, object], tmp: Path, workers: int, timeout: float
) -> tuple[int | None, str]:
    """Run ``serve`` for at most ``timeout`` s; (exit code or None if still running, log)."""
    gw = spawn_gateway(config, tmp, workers)
    proc, log_path = gw.proc, gw.log_path
    try:
        code: int | None = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        code = None
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return code, log_path.read_text(errors="replace")


@pytest.mark.parametrize("workers", [1, 2])
def test_port_in_use_exits_non_zero_instead_of_crash_looping(
    redis_server: RedisServer, backend_proc: BackendProc, tmp_path: Path, workers: int
) -> None:
    config = base_config(redis_server.url, backend_proc.url, tmp_path / "spool")
    holder = socket.socket()  # another program on the port, without SO_REUSEPORT
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    config["listen"] = f"127.0.0.1:{holder.getsockname()[1]}"
    try:
        code, log = run_serve(config, tmp_path, workers, timeout=10)
    finally:
        holder.close()
    assert code not in (None, 0), f"still running / exit {code} after 10 s:\n{log[-2000:]}"
    assert log.count("restarting") <= 3, log[-2000:]
    assert "address already in use" in log.lower(), log[-2000:]


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("taken", ["listen", "admin_listen"])
def test_a_port_another_gateway_listens_on_is_refused_not_shared(
    redis_server: RedisServer, backend_proc: BackendProc, tmp_path: Path, workers: int, taken: str
) -> None:
    """The workers bind with SO_REUSEPORT, which lets any process of the same user bind a port a
    gateway holds: a second ``serve`` (an old version, a trial config in ``mode: report``) used
    to start and silently take a share of the clients, or of the scrapes. Like nginx, a port
    in use is a refusal to start, whoever holds it, and the running gateway is untouched."""
    config = base_config(redis_server.url, backend_proc.url, tmp_path / "spool")
    (tmp_path / "first").mkdir()
    first = start_gateway(copy.deepcopy(config), tmp_path / "first")
    try:
        second = {**copy.deepcopy(config), "mode": "report"}
        other = "admin_listen" if taken == "listen" else "listen"
        second[other] = f"127.0.0.1:{free_port()}"
        (tmp_path / "second").mkdir()
        code, log = run_serve(second, tmp_path / "second", workers, timeout=10)
        assert code == 1, f"still running / exit {code} after 10 s:\n{log[-2000:]}"
        assert f"{taken} {config[taken]}" in log, log[-2000:]
        assert "address already in use" in log.lower(), log[-2000:]
        assert "Traceback" not in log, log[-2000:]
        assert first.proc.poll() is None
        assert send(first.admin_port, "GET", "/healthz").status == 200
    finally:
        first.stop()


def test_a_config_that_does_not_load_stops_serve_with_its_errors_not_a_traceback(
    tmp_path: Path,
) -> None:
    """An operator who forgot to export the signing key's variable got a Python traceback
    with the reason on its last line; the same errors check-config prints, and exit 1."""
    config = base_config("redis://127.0.0.1:9/0", "http://127.0.0.1:9", tmp_path / "spool")
    config["auth"]["keys"] = {"platform": {"secret_env": "UGW_TEST_UNSET_SIGNING_KEY"}}
    config["limits"]["max_files"] = "ten"
    path = tmp_path / "policies.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = child_env()
    for name in ("GATEWAY_SIGNING_KEY", "GATEWAY_CONFIG", "UGW_TEST_UNSET_SIGNING_KEY"):
        env.pop(name, None)
    result = subprocess.run(
        gateway_command("serve", "--config", str(path)),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert (
        "auth.keys.platform.secret_env: environment variable UGW_TEST_UNSET_SIGNING_KEY is not set"
        in (result.stderr)
    )
    assert "limits.max_files: expected an integer" in result.stderr
    assert f"{path}: 2 errors" in result.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_unusable_tls_certificate_exits_non_zero(
    redis_server: RedisServer, backend_proc: BackendProc, tmp_path: Path, workers: int
) -> None:
    config = base_config(redis_server.url, backend_proc.url, tmp_path / "spool")
    bad = tmp_path / "cert.pem"
    bad.write_text("not a certificate\n")
    config["server"] = {**config["server"], "tls_cert_file": str(bad), "tls_key_file": str(bad)}
    code, log = run_serve(config, tmp_path, workers, timeout=10)
    assert code not in (None, 0), f"still running / exit {code} after 10 s:\n{log[-2000:]}"
    assert log.count("restarting") <= 3, log[-2000:]
    # One line naming the setting, not a traceback ending in "PEM lib".
    assert f"cannot load server.tls_cert_file {bad}" in log, log[-2000:]
    assert "Traceback" not in log, log[-2000:]


def worker_pids(parent: int) -> set[int]:
    """The parent's workers (not multiprocessing's resource tracker), zombies left out."""
    pids = set()
    for pid in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"spawn_main" in cmdline:
            pids.add(int(pid))
    return pids


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def serves(gw: GatewayProc, headers: dict[str, str]) -> bool:
    try:
        return send(gw.port, "GET", "/t/status/200", headers=headers).status == 200
    except OSError:
        return False


def test_a_killed_worker_is_restarted_its_uploads_leave_no_stuck_gauge_and_restarts_back_off(
    redis_server: RedisServer, backend_proc: BackendProc, tmp_path: Path
) -> None:
    gw = start_gateway(
        observed_config(redis_server, backend_proc, tmp_path, "ugw-supervisor"), tmp_path, workers=2
    )
    try:
        agent = bearer(mint(gw, new_key(gw, "supervisor-client"), "role=agent"))
        body, headers = upload("photo.png", "image/png", files.png())
        head = "".join(f"{k}: {v}\r\n" for k, v in {**headers, **agent}.items())
        # Uploads in flight on both workers: head and half the body, then nothing.
        conns = []
        for i in range(8):
            sock = socket.create_connection(("127.0.0.1", gw.port))
            sock.sendall(
                f"POST /streams/{700 + i}/objects HTTP/1.1\r\nHost: x\r\n{head}"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body[: len(body) // 2]
            )
            conns.append(sock)
        assert wait_until(lambda: Samples(scrape(gw)).get("inflight_uploads") == 8, 5)
        before = worker_pids(gw.proc.pid)
        assert len(before) == 2
        for pid in before:
            os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: len(worker_pids(gw.proc.pid) - before) == 2, 10), gw.log()[-2000:]
        assert wait_until(lambda: serves(gw, agent), 10)
        for sock in conns:
            sock.close()
        assert Samples(scrape(gw)).get("inflight_uploads") == 0  # not 8 from the dead workers

        # A worker that keeps dying right after its start is restarted later and later.
        victims: list[int] = []
        for _ in range(4):
            current = worker_pids(gw.proc.pid)
            pid = min(current)
            os.kill(pid, signal.SIGKILL)
            victims.append(pid)
            assert wait_until(lambda: len(worker_pids(gw.proc.pid) - set(victims)) == 2, 15)
        delays = [
            float(line.split("restarting in ")[1].split(" s")[0])
            for line in gw.log().splitlines()
            if "restarting in" in line
        ]
        assert delays and delays[-1] >= 2.0, delays
        assert gw.stop() == 0
    finally:
        gw.stop()


def handles_sighup(pid: int) -> bool:
    """SIGHUP (signal 1) is ignored or caught, no longer the default action (terminate)."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return bool((int(fields["SigIgn"], 16) | int(fields["SigCgt"], 16)) & 1)


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_while_starting_does_not_kill_the_gateway(
    redis_server: RedisServer, backend_proc: BackendProc, tmp_path: Path, workers: int
) -> None:
    """A reload right after a (re)start (config management: restart, then reload) is harmless."""
    config = base_config(redis_server.url, backend_proc.url, tmp_path / "spool")
    gw = spawn_gateway(config, tmp_path, workers)
    proc = gw.proc
    try:
        # As soon as the process handles SIGHUP at all (ignores or catches it), a reload
        # request is legitimate: the listeners are not up yet.
        assert wait_until(lambda: handles_sighup(proc.pid), 10), "SIGHUP still kills it"
        proc.send_signal(signal.SIGHUP)
        port = int(str(config["listen"]).rsplit(":", 1)[1])
        wait_for_port(port, timeout=20, proc=None)
        time.sleep(1)
        assert proc.poll() is None
        assert "restarting" not in gw.log()
    finally:
        proc.terminate()
        try:
            assert proc.wait(15) == 0
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
