"""Start the real ``upload-gateway`` and the recording test backend as processes, for tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.support.procs import REPO, child_env, free_port, gateway_command, wait_for_port

SIGNING_KEY = "test-signing-key-0123456789abcdef0123456789"


@dataclass
class BackendProc:
    port: int
    store: Path
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def records(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(self.url + "/_sample/requests", timeout=5) as r:
            return list(json.loads(r.read()))

    def clear(self) -> None:
        req = urllib.request.Request(self.url + "/_sample/requests", method="DELETE")
        urllib.request.urlopen(req, timeout=5).close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def start_backend(store: Path, port: int | None = None) -> BackendProc:
    port = port or free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.support.test_backend",
            "--port",
            str(port),
            "--store",
            str(store),
        ],
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    wait_for_port(port, proc=proc)
    return BackendProc(port, store, proc)


def base_config(redis_url: str, backend_url: str, spool_dir: Path) -> dict[str, Any]:
    """The SPEC §2/§4 shape, on free ports; tests override parts of it."""
    return {
        "listen": f"127.0.0.1:{free_port()}",
        "admin_listen": f"127.0.0.1:{free_port()}",
        "backend": {"url": backend_url, "connect_timeout": "2s", "read_timeout": "3s"},
        "redis": {"url": redis_url, "key_prefix": "ugw-test"},
        "auth": {
            "header": "Authorization",
            "algorithms": ["HS256"],
            "keys": {"default": {"secret_env": "GATEWAY_SIGNING_KEY"}},
            "leeway": "5s",
            "cache_ttl": "5s",
        },
        "spool": {"dir": str(spool_dir), "memory_threshold": "64KiB", "max_bytes": "2GiB"},
        "mode": "enforce",
        "cors": {"allowed_origins": ["https://chat.example.com"]},
        "limits": {"max_file_size": "20MB", "max_request_size": "50MB", "max_files": 10},
        "uploads": {
            "routes": [
                {"path": "/streams/{channel}/objects"},
                {"path": "/streams/{channel}/objects/{object}/child"},
                {"path": "/whatsapp/uploadmedia/{channel}", "methods": ["POST", "PUT"]},
            ],
            "role": {
                "from_claim": "role",
                "from_form": {"field": "data", "json_key": "IsManager", "agent_when": True},
                "default": "customer",
            },
            "sniff_bytes": "8KiB",
        },
        "channels": {
            "default": {
                "agents": {
                    "enabled": True,
                    "max_file_size": "20MB",
                    "allowed_types": ["images", "documents", "application/zip"],
                },
                "customers": {
                    "enabled": True,
                    "max_file_size": "10MB",
                    "allowed_types": ["image/png", "image/jpeg", ".pdf"],
                },
            },
            "whatsapp": {
                "agents": {
                    "enabled": True,
                    "max_file_size": "16MB",
                    "allowed_types": ["image/*", "audio/ogg", "video/mp4", ".pdf"],
                },
                "customers": {"enabled": False},
            },
        },
        "server": {"body_timeout": "3s", "shutdown_grace": "5s"},
        "log_level": "INFO",
    }


@dataclass
class GatewayProc:
    config: dict[str, Any]
    config_path: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def port(self) -> int:
        return int(self.config["listen"].rsplit(":", 1)[1])

    @property
    def admin_port(self) -> int:
        return int(self.config["admin_listen"].rsplit(":", 1)[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def readyz_checks(self) -> dict[str, Any]:
        """``/readyz``'s checks, ready or not (a 503 carries them too)."""
        try:
            with urllib.request.urlopen(f"{self.admin_url}/readyz", timeout=5) as reply:
                body = reply.read()
        except urllib.error.HTTPError as not_ready:
            body = not_ready.read()
        return dict(json.loads(body)["checks"])

    def config_generation(self) -> int:
        """How many reloads this worker applied (a failed one does not count)."""
        return int(self.readyz_checks()["config_generation"])

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def spawn_gateway(
    config: dict[str, Any], workdir: Path, workers: int = 1, **env: str
) -> GatewayProc:
    """Write ``config`` and start ``serve`` on it, its output in a log; no waiting."""
    port = config["listen"].rsplit(":", 1)[1]
    config_path = workdir / f"policies-{port}.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    log_path = workdir / f"gateway-{port}.log"
    full_env = child_env(GATEWAY_SIGNING_KEY=SIGNING_KEY, **env)
    full_env.pop("GATEWAY_CONFIG", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            gateway_command("serve", "--config", str(config_path), "--workers", str(workers)),
            cwd=REPO,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return GatewayProc(config, config_path, proc, log_path, full_env)


def start_gateway(
    config: dict[str, Any], workdir: Path | None = None, workers: int = 1, **env: str
) -> GatewayProc:
    workdir = workdir or Path(tempfile.mkdtemp(prefix="ugw-gw-"))
    gw = spawn_gateway(config, workdir, workers, **env)
    try:
        wait_for_port(gw.port, timeout=20, proc=None)
        wait_for_port(gw.admin_port, timeout=20, proc=None)
    except TimeoutError:
        gw.stop()
        raise RuntimeError("gateway did not start:\n" + gw.log()) from None
    return gw


def cli(config_path: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run an ``upload-gateway`` command the way an operator would."""
    env = child_env(GATEWAY_SIGNING_KEY=SIGNING_KEY)
    env.pop("GATEWAY_CONFIG", None)
    return subprocess.run(
        gateway_command("--config", str(config_path), *args),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=check,
        timeout=60,
    )


def write_atomically(path: Path, data: str | bytes, keep_stat: bool = False) -> None:
    """Replace ``path`` as a deploy tool or a certificate renewal does: a new file renamed over
    it, so the gateway's watcher never sees half a file. With ``keep_stat`` the new file also
    keeps the old mtime (same size is the caller's job), so only SIGHUP can make it notice."""
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(raw)
    if keep_stat:
        before = os.stat(path)
        assert len(raw) == before.st_size, "keep_stat needs a same-size file"
        os.utime(tmp, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(tmp, path)


def spool_files(spool_dir: Path) -> list[str]:
    return sorted(os.listdir(spool_dir)) if spool_dir.exists() else []
