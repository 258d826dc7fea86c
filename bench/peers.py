"""The peers under test: the gateway in its variants and the two nginx set-ups.

Every gateway variant uses the test suite's config shape (``tests/support/gateway_proc.py``) with
production values where they matter for speed: the spool settings of ``config/policies.yaml``
(``memory_threshold`` 2 MiB within a ``memory_budget`` of 32 MiB per worker, so a 1 MB upload
stays in memory while the budget has room and every 20 MB upload goes to an AES-GCM encrypted
file), generous timeouts, and ``log_level: WARNING`` (no access log) except in the ``-info``
variant.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.stack import Proc, Stack, wait_ready
from tests.support.gateway_proc import base_config
from tests.support.procs import REPO

SIGNING_KEY = "bench-signing-key-6f0c2d1e9a8b7c6d5e4f3a2b1c0d9e8f"
KEY_PREFIX = "ugw-bench"


@dataclass
class Peer:
    """Something wrk can load: a URL plus the processes behind it (for RSS and profiles)."""

    name: str
    kind: str  # gateway | nginx
    port: int
    proc: Proc
    workers: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def worker_pids(self) -> list[int]:
        """The processes that serve requests (gateway workers; the single-process server)."""
        if self.kind == "gateway" and self.workers <= 1:
            return [self.proc.popen.pid]
        from bench.stack import cmdline

        return [p for p in self.proc.descendants() if "resource_tracker" not in cmdline(p)]


@dataclass(frozen=True)
class GatewayVariant:
    name: str
    workers: int
    upload_routes: bool = True  # False: the upload path is proxied uninspected (pass-through)
    log_level: str = "WARNING"
    description: str = ""


VARIANTS: dict[str, GatewayVariant] = {
    v.name: v
    for v in (
        GatewayVariant("gateway-w1", 1, description="auth+inspection+spool+encryption, 1 worker"),
        GatewayVariant("gateway-w2", 2, description="auth+inspection+spool+encryption, 2 workers"),
        GatewayVariant(
            "gateway-pass-w2",
            2,
            upload_routes=False,
            description="auth + streaming pass-through, no inspection, 2 workers",
        ),
        GatewayVariant(
            "gateway-info-w2",
            2,
            log_level="INFO",
            description="gateway-w2 with the JSON access log on (INFO)",
        ),
    )
}
NGINX_PEERS = {
    "nginx-buffered": "buffered.conf.tmpl",
    "nginx-auth": "auth_request.conf.tmpl",
}


def gateway_config(
    variant: GatewayVariant, redis_url: str, sink_url: str, work: Path
) -> dict[str, Any]:
    spool = work / "spool" / variant.name
    spool.mkdir(parents=True, exist_ok=True)
    config = base_config(redis_url, sink_url, spool)
    config["redis"]["key_prefix"] = KEY_PREFIX
    config["backend"].update({"connect_timeout": "5s", "read_timeout": "120s"})
    config["spool"].update(memory_threshold="2MiB", memory_budget="32MiB")
    config["server"] = {"body_timeout": "60s", "shutdown_grace": "5s"}
    config["log_level"] = variant.log_level
    if not variant.upload_routes:
        config["uploads"]["routes"] = [{"path": "/bench-never-an-upload/{channel}"}]
    return config


def start_gateway(stack: Stack, variant: GatewayVariant, redis_url: str, sink_url: str) -> Peer:
    config = gateway_config(variant, redis_url, sink_url, stack.work)
    path = stack.work / f"{variant.name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    port = int(config["listen"].rsplit(":", 1)[1])
    argv = [
        sys.executable,
        "-m",
        "gateway",
        "serve",
        "--config",
        str(path),
        "--workers",
        str(variant.workers),
    ]
    proc = stack.start(variant.name, argv, port, {"GATEWAY_SIGNING_KEY": SIGNING_KEY})
    wait_ready(f"http://{config['admin_listen']}/readyz")
    config["_path"] = str(path)
    return Peer(variant.name, "gateway", port, proc, variant.workers, config, variant.description)


def start_nginx(stack: Stack, name: str, sink_port: int, auth_port: int) -> Peer:
    proc = stack.start_nginx(name, NGINX_PEERS[name], SINK_PORT=sink_port, AUTH_PORT=auth_port)
    desc = {
        "nginx-buffered": "client_max_body_size 20m + proxy_request_buffering on, 2 workers",
        "nginx-auth": "nginx-buffered + auth_request to bench/auth_service.py (2 processes)",
    }[name]
    return Peer(name, "nginx", proc.port, proc, 2, description=desc)


def cli(config_path: str, *args: str) -> str:
    """An ``upload-gateway`` command, as an operator runs it; returns its stdout."""
    env = dict(os.environ, GATEWAY_SIGNING_KEY=SIGNING_KEY)
    env.pop("GATEWAY_CONFIG", None)
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "--config", config_path, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        raise RuntimeError(f"upload-gateway {args[0]} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def issue_secret(config_path: str) -> str:
    """A new API key for client ``bench`` and an agent Secret for it (24 h)."""
    key = json.loads(cli(config_path, "keys", "add", "--client", "bench", "--json"))["api_key"]
    return cli(
        config_path, "secret", "mint", "--api-key", key, "--ttl", "24h", "--claim", "role=agent"
    )
