"""``make run`` (scripts/run-demo.sh): when the gateway cannot start it must say so and exit,
not print "Upload Gateway is running" and wait forever in front of nothing."""

from __future__ import annotations

import os
import signal
import socket
import subprocess

import pytest

from tests.support.procs import REPO, child_env, free_port


def test_demo_reports_a_gateway_that_could_not_start_and_exits_1() -> None:
    holder = socket.socket()  # the proxy port, taken by someone else
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    env = child_env(
        GATEWAY_LISTEN=f"127.0.0.1:{holder.getsockname()[1]}",
        GATEWAY_ADMIN_LISTEN=f"127.0.0.1:{free_port()}",
        DEMO_REDIS_PORT=str(free_port()),
    )
    for name in ("GATEWAY_CONFIG", "GATEWAY_REDIS_URL", "GATEWAY_BACKEND_URL"):
        env.pop(name, None)
    proc = subprocess.Popen(
        ["scripts/run-demo.sh"],
        cwd=REPO,
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
        pytest.fail(f"the demo kept running with no gateway:\n{stdout}")
    finally:
        holder.close()
    assert proc.returncode == 1, stdout + stderr
    assert "Upload Gateway is running" not in stdout
    assert "address already in use" in stderr
