"""Shared fixtures: a real redis-server, a real recording backend and the real gateway process.

Session-scoped because each is a process that takes a moment to start; tests that need a
differently configured gateway start their own with ``start_gateway``.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.faults import FaultBackend
from tests.support.gateway_proc import (
    BackendProc,
    GatewayProc,
    base_config,
    cli,
    start_backend,
    start_gateway,
)
from tests.support.procs import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def backend_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackendProc]:
    proc = start_backend(tmp_path_factory.mktemp("backend-store"))
    yield proc
    proc.stop()


@pytest.fixture
def backend(backend_proc: BackendProc) -> BackendProc:
    """The shared backend with its record of received requests cleared for this test."""
    backend_proc.clear()
    return backend_proc


@pytest.fixture(scope="module")
def fault_backend() -> Iterator[FaultBackend]:
    """A backend that misbehaves on purpose (``tests/support/faults.py``), one per module."""
    backend = FaultBackend().start()
    yield backend
    backend.stop()


@pytest.fixture(scope="session")
def spool_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("spool")


@pytest.fixture(scope="session")
def gateway(
    redis_server: RedisServer,
    backend_proc: BackendProc,
    spool_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GatewayProc]:
    config = base_config(redis_server.url, backend_proc.url, spool_dir)
    gw = start_gateway(config, tmp_path_factory.mktemp("gateway"))
    yield gw
    gw.stop()


@pytest.fixture(scope="session")
def api_key(gateway: GatewayProc) -> str:
    out = cli(gateway.config_path, "keys", "add", "--client", "acme", "--label", "tests", "--json")
    return str(json.loads(out.stdout)["api_key"])


def mint(gateway: GatewayProc, api_key: str, *claims: str, ttl: str = "1h") -> str:
    args = ["secret", "mint", "--api-key", api_key, "--ttl", ttl]
    for claim in claims:
        args += ["--claim", claim]
    return cli(gateway.config_path, *args).stdout.strip()


@pytest.fixture(scope="session")
def secret(gateway: GatewayProc, api_key: str) -> str:
    return mint(gateway, api_key)


@pytest.fixture(scope="session")
def agent_secret(gateway: GatewayProc, api_key: str) -> str:
    return mint(gateway, api_key, "role=agent")


@pytest.fixture
def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a real ENOSPC (we run as root in the test sandbox, so mount works)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
