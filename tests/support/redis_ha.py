"""Real Redis HA topologies on loopback for tests: Sentinel (primary, replica, 3 sentinels) and a
3-master Cluster. Every process gets a free port and its own temp dir; ``close()`` kills them all.

Sentinels run as ``redis-sentinel`` when the Debian package is installed, else as
``redis-server --sentinel``: the same binary in another mode, so redis-server alone is enough.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.support.procs import RedisServer, free_port, wait_for_port

SERVICE = "ugw-primary"
CLUSTER_NODE_TIMEOUT_MS = 2000
MAX_CLUSTER_PORT = 65535 - 10000


def _cli(port: int, *args: str, timeout: float = 5.0) -> str:
    binary = shutil.which("redis-cli")
    if binary is None:
        raise RuntimeError("redis-cli is not installed (make test installs redis-tools)")
    done = subprocess.run(
        [binary, "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return done.stdout + done.stderr


def _info(port: int, section: str) -> dict[str, str]:
    fields = {}
    for line in _cli(port, "info", section).splitlines():
        name, sep, value = line.strip().partition(":")
        if sep:
            fields[name] = value
    return fields


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until ``check()`` holds; raises TimeoutError naming ``what`` after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if check():
                return time.monotonic() - start
        except (OSError, subprocess.SubprocessError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{what} not reached within {timeout}s")


class SentinelProc:
    """One sentinel: a config file it may rewrite (sentinels persist their state there)."""

    def __init__(self, primary_port: int, quorum: int = 2) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="ugw-sentinel-"))
        self.conf = self.dir / "sentinel.conf"
        self.conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndaemonize no\ndir {self.dir}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} {quorum}\n"
            f"sentinel down-after-milliseconds {SERVICE} 1000\n"
            f"sentinel failover-timeout {SERVICE} 3000\n"
            f"sentinel parallel-syncs {SERVICE} 1\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SentinelProc:
        sentinel = shutil.which("redis-sentinel")
        server = shutil.which("redis-server")
        if sentinel is not None:
            command = [sentinel, str(self.conf)]
        elif server is not None:
            command = [server, str(self.conf), "--sentinel"]
        else:
            raise RuntimeError("redis-server is not installed (make test installs it)")
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        wait_for_port(self.port, proc=self.proc)
        return self

    def master(self) -> dict[str, str]:
        """``SENTINEL MASTER`` as a dict (flat name/value lines from redis-cli)."""
        lines = _cli(self.port, "sentinel", "master", SERVICE).splitlines()
        return dict(zip(lines[::2], lines[1::2], strict=False))

    def master_port(self) -> int:
        reply = _cli(self.port, "sentinel", "get-master-addr-by-name", SERVICE).split()
        return int(reply[1]) if len(reply) == 2 else 0

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


class SentinelSetup:
    """A primary, one replica and three sentinels (quorum 2) watching them."""

    def __init__(self) -> None:
        self.primary = RedisServer()
        self.replica = RedisServer()
        self.sentinels: list[SentinelProc] = []

    @property
    def sentinel_addresses(self) -> list[str]:
        return [f"127.0.0.1:{s.port}" for s in self.sentinels]

    def start(self) -> SentinelSetup:
        # Diskless sync waits 5 s by default for more replicas to join; we have just the one.
        no_delay = ["--repl-diskless-sync-delay", "0"]
        self.primary.start(no_delay)
        self.replica.start([*no_delay, "--replicaof", "127.0.0.1", str(self.primary.port)])
        wait_until(
            lambda: _info(self.replica.port, "replication").get("master_link_status") == "up",
            10,
            "replica in sync",
        )
        self.sentinels = [SentinelProc(self.primary.port) for _ in range(3)]
        for sentinel in self.sentinels:
            sentinel.start()
        wait_until(self._all_sentinels_see_everything, 15, "sentinels discovering each other")
        return self

    def _all_sentinels_see_everything(self) -> bool:
        for sentinel in self.sentinels:
            state = sentinel.master()
            if state.get("num-other-sentinels") != "2" or state.get("num-slaves") != "1":
                return False
        return True

    def wait_for_failover(self, timeout: float = 15.0) -> float:
        """Seconds until every sentinel names the replica as the master."""
        return wait_until(
            lambda: (
                all(s.master_port() == self.replica.port for s in self.sentinels)
                and _info(self.replica.port, "replication").get("role") == "master"
            ),
            timeout,
            "failover to the replica",
        )

    def close(self) -> None:
        for sentinel in self.sentinels:
            sentinel.close()
        self.replica.close()
        self.primary.close()


def _cluster_data_port() -> int:
    """A free port Redis accepts in cluster mode: it refuses ports above 55535 (port + 10000)."""
    while True:
        port = free_port()
        if port <= MAX_CLUSTER_PORT:
            return port


class ClusterSetup:
    """Three cluster-enabled masters, no replicas, all 16384 slots assigned."""

    def __init__(self, size: int = 3) -> None:
        self.nodes = [RedisServer(_cluster_data_port()) for _ in range(size)]

    def url(self, index: int) -> str:
        return self.nodes[index].url

    def start(self) -> ClusterSetup:
        for node in self.nodes:
            node.start(
                [
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", str(Path(node.dir) / "nodes.conf"),
                    "--cluster-node-timeout", str(CLUSTER_NODE_TIMEOUT_MS),
                    "--cluster-port", str(free_port()),
                ]
            )  # fmt: skip
        binary = shutil.which("redis-cli")
        if binary is None:
            raise RuntimeError("redis-cli is not installed (make test installs redis-tools)")
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        done = subprocess.run(
            [binary, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{done.stdout}{done.stderr}")
        wait_until(self._ok_everywhere, 15, "cluster_state:ok on every node")
        return self

    def _ok_everywhere(self) -> bool:
        return all("cluster_state:ok" in _cli(node.port, "cluster", "info") for node in self.nodes)

    def close(self) -> None:
        for node in self.nodes:
            node.close()
