"""Every process of a benchmark run, started on free ports and always stopped again.

Each child gets its own session (process group), so stopping it also stops what it forked (nginx
workers, gateway workers, the sink's second process) and a Ctrl-C in the terminal reaches only
the harness, whose ``finally`` then stops them in reverse order.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.procs import REPO, RedisServer, free_port, wait_for_port

BENCH = Path(__file__).resolve().parent


@dataclass
class Proc:
    """A started child process and where its output went."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    port: int

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def descendants(self) -> list[int]:
        """Pids of the process's children, grandchildren, ... (from /proc)."""
        found: list[int] = []
        todo = [self.popen.pid]
        while todo:
            pid = todo.pop()
            for task in _listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    kids = [
                        int(k)
                        for k in Path(f"/proc/{pid}/task/{task}/children").read_text().split()
                    ]
                    found.extend(kids)
                    todo.extend(kids)
        return found

    def stop(self, sig: int = signal.SIGTERM, grace: float = 15.0) -> None:
        """``sig`` to the process group, then SIGKILL to whatever is left of it."""
        pgid = self.popen.pid  # start_new_session: the group id is the child's own pid
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(grace)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)  # stragglers: workers whose parent already exited
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


@dataclass
class Stack:
    """Owns every process of the run; ``close()`` stops them, newest first."""

    work: Path
    procs: list[Proc] = field(default_factory=list)
    redis: RedisServer | None = None
    redis_password: str = field(default_factory=lambda: secrets.token_hex(16))
    sink_port: int = 0

    def __post_init__(self) -> None:
        self.work = self.work.resolve()  # nginx -p resolves relative paths against its prefix

    def start(
        self,
        name: str,
        argv: Sequence[str],
        port: int,
        env: dict[str, str] | None = None,
        ready_timeout: float = 30.0,
    ) -> Proc:
        log = self.work / f"{name}.log"
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        full_env.pop("GATEWAY_CONFIG", None)
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                list(argv),
                cwd=REPO,
                env=full_env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        proc = Proc(name, popen, log, port)
        self.procs.append(proc)
        try:
            wait_for_port(port, timeout=ready_timeout)
        except TimeoutError:
            raise RuntimeError(f"{name} did not start listening:\n{proc.tail()}") from None
        if not proc.alive():
            raise RuntimeError(f"{name} exited at once:\n{proc.tail()}")
        return proc

    def start_redis(self) -> RedisServer:
        """redis-server with a password: other programs on this machine that happen to dial a
        reused port (tests restarting their own Redis) must not add commands to our counts."""
        self.redis = RedisServer().start(["--requirepass", self.redis_password])
        return self.redis

    @property
    def redis_url(self) -> str:
        assert self.redis is not None
        return f"redis://:{self.redis_password}@127.0.0.1:{self.redis.port}/0"

    def start_sink(self, processes: int = 2) -> Proc:
        port = free_port()
        argv = [
            sys.executable,
            "-m",
            "bench.sink",
            "--port",
            str(port),
            "--processes",
            str(processes),
        ]
        proc = self.start("sink", argv, port)
        self.sink_port = port
        return proc

    def start_auth_service(
        self, redis_url: str, key_prefix: str, signing_key: str, processes: int = 2
    ) -> Proc:
        port = free_port()
        argv = [
            sys.executable,
            "-m",
            "bench.auth_service",
            "--port",
            str(port),
            "--key-prefix",
            key_prefix,
            "--processes",
            str(processes),
        ]
        env = {"GATEWAY_SIGNING_KEY": signing_key, "BENCH_REDIS_URL": redis_url}
        return self.start("auth-service", argv, port, env)

    def start_nginx(self, name: str, template: str, **values: int) -> Proc:
        """nginx from ``bench/nginx/<template>`` with its own prefix, temp dirs and logs."""
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        prefix = self.work / name
        shutil.rmtree(prefix, ignore_errors=True)
        prefix.mkdir(parents=True)
        port = free_port()
        text = (BENCH / "nginx" / template).read_text()
        for key, value in {"WORK": str(prefix), "PORT": port, **values}.items():
            text = text.replace(f"@@{key}@@", str(value))
        conf = prefix / "nginx.conf"
        conf.write_text(text)
        return self.start(name, [binary, "-p", str(prefix), "-c", str(conf)], port)

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()
        if self.redis is not None:
            self.redis.close()
            self.redis = None


def wait_ready(url: str, timeout: float = 30.0) -> None:
    """Poll a ``/readyz``-style URL until it answers 200."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout}s: {last}")
