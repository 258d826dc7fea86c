"""``make run`` (scripts/run-demo.sh): when the gateway cannot start it must say so and exit,
not print "Upload Gateway is running" and wait forever in front of nothing."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from tests.support.gateway_proc import BackendProc, base_config, start_gateway
from tests.support.procs import REPO, RedisServer, child_env, free_port


def private_checkout(tmp_path: Path) -> Path:
    """The repository as run-demo.sh sees it, but with its own ``var/``: the script keeps its
    logs (whose tail it prints, and the tests read), its signing key and its spool in ``var/``
    of its checkout. With the repository's own, two of these tests at once in two xdist workers
    (or one beside a developer's ``make run``) read each other's gateway.log and race on
    creating var/signing-key. The script itself is the repository's (a symlink, not a copy)."""
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    (root / "scripts" / "run-demo.sh").symlink_to(REPO / "scripts" / "run-demo.sh")
    for name in (".venv", "config"):
        (root / name).symlink_to(REPO / name)
    return root


def run_demo_that_cannot_start(checkout: Path, **ports: str) -> tuple[str, str]:
    """Run ``make run``'s script with these ports, expecting it to give up; (stdout, stderr)."""
    env = child_env(**ports)
    for name in ("GATEWAY_CONFIG", "GATEWAY_REDIS_URL", "GATEWAY_BACKEND_URL"):
        env.pop(name, None)
    proc = subprocess.Popen(
        ["scripts/run-demo.sh"],
        cwd=checkout,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the script, redis-server and the sample backend
        stdout, stderr = proc.communicate(timeout=15)
        pytest.fail(f"the demo kept running with no gateway of its own:\n{stdout}")
    assert proc.returncode == 1, stdout + stderr
    assert "Upload Gateway is running" not in stdout
    return stdout, stderr


def test_demo_reports_a_gateway_that_could_not_start_and_exits_1(tmp_path: Path) -> None:
    holder = socket.socket()  # the proxy port, taken by someone else
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        _, stderr = run_demo_that_cannot_start(
            private_checkout(tmp_path),
            GATEWAY_LISTEN=f"127.0.0.1:{holder.getsockname()[1]}",
            GATEWAY_ADMIN_LISTEN=f"127.0.0.1:{free_port()}",
            DEMO_REDIS_PORT=str(free_port()),
        )
    finally:
        holder.close()
    assert "address already in use" in stderr.lower()


def test_demo_does_not_take_another_gateways_answers_for_its_own(
    redis_server: RedisServer, backend_proc: BackendProc, tmp_path: Path
) -> None:
    """Another gateway already on the demo's ports (a second ``make run``, another checkout):
    the demo's own gateway cannot listen there, and the demo must say so rather than take the
    other one's ``/healthz`` for its own and print a Secret that gateway knows nothing of."""
    other = start_gateway(base_config(redis_server.url, backend_proc.url, tmp_path / "spool"))
    try:
        _, stderr = run_demo_that_cannot_start(
            private_checkout(tmp_path),
            GATEWAY_LISTEN=str(other.config["listen"]),
            GATEWAY_ADMIN_LISTEN=str(other.config["admin_listen"]),
            DEMO_REDIS_PORT=str(free_port()),
            DEMO_BACKEND_PORT=str(free_port()),
        )
    finally:
        assert other.proc.poll() is None  # untouched
        other.stop()
    assert f"not started: listen {other.config['listen']}" in stderr, stderr
