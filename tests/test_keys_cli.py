"""``keys`` and ``secret mint`` run as real subprocesses, the way an operator runs them."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
import uuid
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.auth.authenticator import Authenticator
from gateway.auth.secret import SecretVerifier
from gateway.config.model import AuthConfig, RedisConfig, SecretValue, SigningKey
from gateway.errors import GatewayError
from gateway.redis_client import build_redis
from tests.support.gateway_proc import SIGNING_KEY, base_config, cli
from tests.support.procs import REPO, RedisServer, child_env, free_port, gateway_command

IP = "198.51.100.4"


@pytest.fixture
def prefix() -> str:
    return f"cli-{uuid.uuid4().hex[:8]}"


def write_config(tmp_path: Path, redis_url: str, prefix: str, **auth: Any) -> Path:
    config = base_config(redis_url, "http://127.0.0.1:9", tmp_path / "spool")
    config["redis"]["key_prefix"] = prefix
    config["auth"].update(auth)
    path = tmp_path / "policies.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def config_path(tmp_path: Path, redis_server: RedisServer, prefix: str) -> Path:
    return write_config(tmp_path, redis_server.url, prefix)


def run_json(config_path: Path, *args: str) -> Any:
    return json.loads(cli(config_path, *args, "--json").stdout)


def hs_auth() -> AuthConfig:
    return AuthConfig(
        keys=MappingProxyType(
            {"default": SigningKey("default", secret=SecretValue(SIGNING_KEY.encode()))}
        )
    )


async def authenticate(redis_url: str, prefix: str, secret: str, auth: AuthConfig) -> str:
    """The client id an in-process Authenticator (no cache: not started) gives this Secret."""
    redis = build_redis(RedisConfig(url=redis_url))
    try:
        authenticator = Authenticator(auth, redis, prefix)
        identity = await authenticator.authenticate({"Authorization": "Bearer " + secret}, IP)
        return identity.client_id
    finally:
        await redis.aclose()


async def test_add_mint_and_authenticate(
    config_path: Path, redis_server: RedisServer, prefix: str
) -> None:
    added = run_json(
        config_path,
        "keys",
        "add",
        "--client",
        "acme",
        "--ttl",
        "90d",
        "--label",
        "ci",
        "--allow-ip",
        "198.51.100.0/24",
        "--rate-limit",
        "50/60s",
    )
    assert set(added) == {"key_id", "client", "api_key", "expires"}
    assert added["client"] == "acme" and added["api_key"].startswith("ugw_")
    expires = datetime.fromisoformat(added["expires"].replace("Z", "+00:00")).timestamp()
    assert expires == pytest.approx(time.time() + 90 * 86400, abs=60)

    minted = cli(
        config_path,
        "secret",
        "mint",
        "--api-key",
        added["api_key"],
        "--ttl",
        "1h",
        "--claim",
        "role=agent",
        "--claim",
        "IsManager=true",
    )
    assert minted.stdout.count("\n") == 1 and minted.stdout.count(".") == 2  # the token only
    verified = SecretVerifier(hs_auth()).verify(minted.stdout.strip())
    assert verified.claims["role"] == "agent" and verified.claims["IsManager"] is True
    assert verified.claims["exp"] - verified.claims["iat"] == 3600
    client = await authenticate(redis_server.url, prefix, minted.stdout.strip(), hs_auth())
    assert client == "acme"


async def test_list_never_shows_the_key_or_its_digest(config_path: Path) -> None:
    added = run_json(config_path, "keys", "add", "--client", "acme", "--label", "ci")
    run_json(config_path, "keys", "add", "--client", "globex", "--ttl", "1s")
    time.sleep(1.1)  # a key cannot be added expired (see the test at the end)
    rows = run_json(config_path, "keys", "list")
    assert {(r["client"], r["state"]) for r in rows} == {("acme", "active"), ("globex", "expired")}
    assert [r["key_id"] for r in run_json(config_path, "keys", "list", "--client", "acme")] == [
        added["key_id"]
    ]
    digest = hashlib.sha256(added["api_key"].encode()).hexdigest()
    for output in (cli(config_path, "keys", "list").stdout, json.dumps(rows)):
        assert added["api_key"] not in output and digest not in output
        assert added["key_id"] in output
    assert rows[0].keys() >= {"key_id", "client", "label", "created", "expires", "state"}


async def test_rotate_revoke_and_purge(
    config_path: Path, redis_server: RedisServer, prefix: str
) -> None:
    old = run_json(config_path, "keys", "add", "--client", "acme")
    rotated = run_json(config_path, "keys", "rotate", "--client", "acme", "--overlap", "1s")
    assert [k["key_id"] for k in rotated["old_keys"]] == [old["key_id"]]
    assert rotated["api_key"] != old["api_key"]
    time.sleep(1.2)
    states = {r["key_id"]: r["state"] for r in run_json(config_path, "keys", "list")}
    assert states == {old["key_id"]: "expired", rotated["key_id"]: "active"}
    assert run_json(config_path, "keys", "purge") == {"purged": 1}

    revoked = run_json(config_path, "keys", "revoke", rotated["key_id"])
    assert revoked == {"key_id": rotated["key_id"], "client": "acme", "revoked": True}
    assert run_json(config_path, "keys", "list") == []
    again = cli(config_path, "keys", "revoke", rotated["key_id"], check=False)
    assert again.returncode == 1 and "no key" in again.stderr
    secret = cli(config_path, "secret", "mint", "--api-key", rotated["api_key"]).stdout.strip()
    with pytest.raises(GatewayError) as info:
        await authenticate(redis_server.url, prefix, secret, hs_auth())
    assert info.value.code == "key_not_active"


def test_bad_arguments_and_unreachable_redis(tmp_path: Path, prefix: str) -> None:
    dead = write_config(tmp_path, f"redis://127.0.0.1:{free_port()}/0", prefix)
    for args in (
        ["keys", "add", "--client", "acme", "--ttl", "soon"],
        ["keys", "add", "--client", "acme", "--allow-ip", "10.0.0.300"],
        ["keys", "add", "--client", "acme", "--rate-limit", "lots"],
        ["secret", "mint", "--api-key", "k", "--claim", "exp=1"],
    ):
        assert cli(dead, *args, check=False).returncode == 2, args
    down = cli(dead, "keys", "list", check=False)
    assert down.returncode == 1 and "Redis" in down.stderr
    unknown_kid = cli(dead, "secret", "mint", "--api-key", "k", "--kid", "nope", check=False)
    assert unknown_kid.returncode == 1 and unknown_kid.stdout == ""


def test_the_redis_password_is_never_printed(tmp_path: Path, prefix: str) -> None:
    """``redis.url`` carries the Redis password (README: db/password come from url), and whoever
    can write to that Redis can add API keys. ``keys`` printed the whole URL when Redis failed,
    and ``check-config`` in its summary: both land in CI logs, cron mail and terminals."""
    password = "hunter2-redis-password"
    url = f"redis://gateway:{password}@127.0.0.1:{free_port()}/0"
    dead = write_config(tmp_path, url, prefix)
    down = cli(dead, "keys", "list", check=False)
    assert down.returncode == 1 and "Redis" in down.stderr
    checked = cli(dead, "check-config", str(dead))
    assert "127.0.0.1" in checked.stdout
    for out in (down, checked):
        assert password not in out.stdout + out.stderr


async def test_mint_rs256_with_private_key_file(
    tmp_path: Path, redis_server: RedisServer, prefix: str
) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_file = tmp_path / "signing.pem"
    key_file.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "public.pem").write_bytes(public_pem)
    config_path = write_config(
        tmp_path,
        redis_server.url,
        prefix,
        algorithms=["HS256", "RS256"],
        keys={
            "default": {"secret_env": "GATEWAY_SIGNING_KEY"},
            "platform-2025": {"public_key_file": str(tmp_path / "public.pem")},
        },
    )
    added = run_json(config_path, "keys", "add", "--client", "acme", "--ttl", "never")
    assert added["expires"] is None

    def mint_rs256(check: bool = True) -> subprocess.CompletedProcess[str]:
        return cli(
            config_path, "secret", "mint", "--api-key", added["api_key"],
            "--kid", "platform-2025", "--private-key-file", str(key_file), check=check,
        )  # fmt: skip

    secret = mint_rs256().stdout.strip()
    auth = AuthConfig(
        algorithms=("HS256", "RS256"),
        keys=MappingProxyType(
            {"platform-2025": SigningKey("platform-2025", public_key_pem=public_pem)}
        ),
    )
    assert await authenticate(redis_server.url, prefix, secret, auth) == "acme"
    wrong = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_file.write_bytes(
        wrong.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    mismatch = mint_rs256(check=False)
    assert mismatch.returncode == 1 and mismatch.stdout == ""


def test_a_key_that_would_be_born_expired_is_refused_and_changes_nothing(
    config_path: Path,
) -> None:
    """``--expires`` with a mistyped year (or ``--ttl 0s``) printed a key that never worked,
    exit 0; with ``rotate`` it also put an end date on the client's working keys, so the
    client was locked out once the overlap ran out."""
    old = run_json(config_path, "keys", "add", "--client", "acme")
    for args in (
        ("rotate", "--client", "acme", "--expires", "2020-01-01", "--overlap", "1h"),
        ("rotate", "--client", "acme", "--ttl", "0s"),
        ("add", "--client", "acme", "--expires", "2020-01-01T00:00:00Z"),
    ):
        result = cli(config_path, "keys", *args, "--json", check=False)
        assert result.returncode == 1, (args, result.stdout)
        assert "expired already" in result.stderr and "ugw_" not in result.stdout
    (row,) = run_json(config_path, "keys", "list", "--client", "acme")
    assert row["key_id"] == old["key_id"] and row["expires"] == old["expires"]
    assert row["state"] == "active"


def test_mint_without_the_signing_variable_names_it(tmp_path: Path, prefix: str) -> None:
    """The config names ``secret_env: GATEWAY_SIGNING_KEY``; only the variable was missing, yet
    mint said "set its secret_env", sending the operator to edit a file that was right."""
    config_path = write_config(tmp_path, f"redis://127.0.0.1:{free_port()}/0", prefix)
    env = child_env()
    for name in ("GATEWAY_SIGNING_KEY", "GATEWAY_CONFIG"):
        env.pop(name, None)
    result = subprocess.run(
        gateway_command("--config", str(config_path), "secret", "mint", "--api-key", "k"),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and result.stdout == ""
    assert "environment variable GATEWAY_SIGNING_KEY is not set" in result.stderr, result.stderr
    assert "set its secret_env" not in result.stderr


def test_rotating_a_client_without_an_active_key_is_refused_and_changes_nothing(
    config_path: Path,
) -> None:
    """``keys rotate --client acmee`` (a typo) made a first key for a client that does not
    exist, exit 0, and left the real client's keys without an end: the leaked key the
    rotation was for kept working for good."""
    real = run_json(config_path, "keys", "add", "--client", "acme")
    typo = cli(config_path, "keys", "rotate", "--client", "acmee", "--overlap", "1h", check=False)
    assert typo.returncode == 1, typo.stdout
    assert "no active key" in typo.stderr and "'acmee'" in typo.stderr
    assert "ugw_" not in typo.stdout
    (row,) = run_json(config_path, "keys", "list")
    assert row["key_id"] == real["key_id"] and row["expires"] == real["expires"]
    expired = run_json(config_path, "keys", "add", "--client", "gone", "--ttl", "1s")
    time.sleep(1.2)
    ended = cli(config_path, "keys", "rotate", "--client", "gone", check=False)
    assert ended.returncode == 1 and "no active key" in ended.stderr
    rows = run_json(config_path, "keys", "list", "--client", "gone")
    assert [r["key_id"] for r in rows] == [expired["key_id"]]
