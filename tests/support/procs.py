"""Real processes for tests: redis-server on a free port, the gateway and backend as subprocesses.

Nothing here is a fake: integration tests talk to these over real sockets.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


# A port from free_port() is only free until its user binds it, often a process started a second
# or more later, and the kernel may hand the same port to the next bind(("127.0.0.1", 0)) at
# once (base_config's listen and admin_listen came out equal that way). So this process does not
# hand out a port again within its last _RECENT answers, and under pytest-xdist each worker only
# hands out its own share of the ports, so no two workers can be given the same one.
_RECENT = 512
_recent: deque[int] = deque(maxlen=_RECENT)


def _xdist_share() -> tuple[int, int]:
    """This pytest-xdist worker's (index, count) from the variables xdist sets; (0, 1) alone."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1, ...
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    index = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
    return index % max(count, 1), max(count, 1)


def free_port() -> int:
    """A loopback port nothing listens on that no other test of this run will be given soon.

    The share is decided on ``port // 2``: bind() to port 0 answers odd ports (the kernel keeps
    even ones for connect()), so ``port % count`` would leave some workers no port at all.
    """
    index, count = _xdist_share()
    for _ in range(100 * count):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if (port // 2) % count == index and port not in _recent:
            _recent.append(port)
            return port
    raise RuntimeError(f"no free port in worker {index}'s share of {count}")


def wait_for_port(
    port: int, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise RuntimeError(f"process exited with {proc.returncode} before listening:\n{out}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout}s")


class RedisServer:
    """A throwaway redis-server: no persistence, its own dir, killed and restartable on one port."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="ugw-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, extra: Sequence[str] = ()) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (make test installs it)")
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        wait_for_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def gateway_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "gateway", *args]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env
