"""Authentication through the real gateway process (issue 3): every refusal is problem+json,
carries the right challenge, and sends the backend nothing; revocation and rate limits hold
across two gateway processes sharing one Redis."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import jwt
import pytest
import redis
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.auth.keystore import KeyStore, digest
from tests.conftest import mint
from tests.support.faults import wait_until
from tests.support.gateway_proc import (
    SIGNING_KEY,
    BackendProc,
    GatewayProc,
    base_config,
    cli,
    start_gateway,
    write_atomically,
)
from tests.support.procs import RedisServer
from tests.support.rawhttp import request as raw_request


def new_key(gateway: GatewayProc, *extra: str) -> tuple[str, str]:
    out = cli(gateway.config_path, "keys", "add", "--client", "e2e", "--json", *extra)
    doc = json.loads(out.stdout)
    return doc["key_id"], doc["api_key"]


async def get(url: str, token: str | None) -> tuple[int, dict, aiohttp.typedefs.LooseHeaders]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with aiohttp.ClientSession() as s, s.get(url + "/t/status/200", headers=headers) as r:
        raw = await r.read()
        doc = json.loads(raw) if r.content_type == "application/problem+json" else {}
        return r.status, doc, r.headers


def forge(api_key: str | None, **claims: object) -> str:
    payload: dict[str, object] = {"exp": int(time.time()) + 600, **claims}
    if api_key is not None:
        payload["client_secret"] = api_key
    return jwt.encode(payload, SIGNING_KEY, algorithm="HS256", headers={"kid": "default"})


@pytest.mark.parametrize(
    ("token", "code"),
    [
        (None, "missing_secret"),
        ("not-a-jwt", "invalid_secret"),
        ("FORGED_WRONG_KEY", "invalid_secret"),
        ("FORGED_EXPIRED", "expired_secret"),
        ("FORGED_NO_CLIENT_SECRET", "invalid_secret"),
        ("FORGED_ALG_NONE", "invalid_secret"),
        ("SIGNED_UNENCODABLE_KEY", "invalid_secret"),
        ("SIGNED_HUGE_EXP", "invalid_secret"),
    ],
)
async def test_bad_secrets_are_401_and_reach_nothing(
    gateway: GatewayProc, backend: BackendProc, api_key: str, token: str | None, code: str
) -> None:
    if token == "FORGED_WRONG_KEY":
        token = jwt.encode(
            {"exp": int(time.time()) + 60, "client_secret": api_key},
            "another-key-entirely-0123456789abcdef",
            algorithm="HS256",
        )
    elif token == "FORGED_EXPIRED":
        token = forge(api_key, exp=int(time.time()) - 3600)
    elif token == "FORGED_NO_CLIENT_SECRET":
        token = forge(None)
    elif token == "FORGED_ALG_NONE":
        token = jwt.encode(
            {"exp": int(time.time()) + 60, "client_secret": api_key}, None, algorithm="none"
        )
    elif token == "SIGNED_UNENCODABLE_KEY":  # valid JSON, but no UTF-8: was a 500
        token = forge(api_key[:8] + "\ud800")
    elif token == "SIGNED_HUGE_EXP":  # an int to PyJWT, too large for a float: was a 500
        token = forge(api_key, exp=10**400)
    status, doc, headers = await get(gateway.url, token)
    assert status == 401
    assert doc["code"] == code
    assert headers["WWW-Authenticate"].startswith("Bearer")
    if token is not None:
        assert 'error="invalid_token"' in headers["WWW-Authenticate"]
    assert backend.records() == []
    assert api_key not in json.dumps(doc)


async def test_an_unknown_key_is_403(gateway: GatewayProc, backend: BackendProc) -> None:
    status, doc, _ = await get(gateway.url, forge("ugw_never_issued_0000000000000000"))
    assert status == 403 and doc["code"] == "key_not_active"
    assert backend.records() == []


async def test_ip_allow_list(gateway: GatewayProc, backend: BackendProc) -> None:
    _, outside = new_key(gateway, "--allow-ip", "10.0.0.0/8")
    status, doc, _ = await get(gateway.url, mint(gateway, outside))
    assert status == 403 and doc["code"] == "ip_not_allowed"
    assert backend.records() == []
    _, inside = new_key(gateway, "--allow-ip", "10.0.0.0/8", "--allow-ip", "127.0.0.0/8")
    status, _, _ = await get(gateway.url, mint(gateway, inside))
    assert status == 200


@pytest.fixture
def second_gateway(
    redis_server: RedisServer, backend_proc: BackendProc, tmp_path: Path, gateway: GatewayProc
) -> Iterator[GatewayProc]:
    config = base_config(redis_server.url, backend_proc.url, tmp_path / "spool")
    config["auth"]["cache_ttl"] = "60s"  # a long cache: only the revocation message can clear it
    other = start_gateway(config, tmp_path)
    yield other
    other.stop()


async def test_revocation_reaches_every_running_gateway_within_a_second(
    gateway: GatewayProc, second_gateway: GatewayProc, backend: BackendProc
) -> None:
    key_id, api_key = new_key(gateway)
    token = mint(gateway, api_key)
    for gw in (gateway, second_gateway):  # both now hold an "active" verdict in their cache
        assert (await get(gw.url, token))[0] == 200
    cli(gateway.config_path, "keys", "revoke", key_id)
    revoked_at = time.monotonic()
    pending = {gateway.url, second_gateway.url}
    while pending and time.monotonic() - revoked_at < 1.0:
        for url in list(pending):
            if (await get(url, token))[0] == 403:
                pending.discard(url)
    assert not pending, f"still accepted more than 1 s after revocation by {pending}"
    backend.clear()
    for gw in (gateway, second_gateway):
        status, doc, _ = await get(gw.url, token)
        assert status == 403 and doc["code"] == "key_not_active"
    assert backend.records() == []


async def test_a_revocation_missed_while_the_subscription_was_down_is_not_served_from_cache(
    second_gateway: GatewayProc, redis_server: RedisServer, backend: BackendProc
) -> None:
    """The subscription drops for a moment (a Redis restart, a failover, an idle reset, ``CLIENT
    KILL``) and a key is revoked in that moment: its message reaches nobody. redis-py reconnects
    and resubscribes on its own, so the listener sees no error; the reconnect itself must drop
    the cached verdicts, or the revoked key works for the whole ``cache_ttl`` (60 s here)."""
    _, api_key = new_key(second_gateway)
    token = mint(second_gateway, api_key)
    assert (await get(second_gateway.url, token))[0] == 200  # an "active" verdict is cached
    names = KeyStore(None, str(second_gateway.config["redis"]["key_prefix"]))  # names only
    logged = len(second_gateway.log())
    client = redis.Redis.from_url(redis_server.url)
    try:
        with client.pipeline(transaction=True) as pipe:  # one step: drop, revoke, announce
            pipe.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
            pipe.zrem(names.keys_zset, digest(api_key))
            pipe.publish(names.revocations, digest(api_key))
            pipe.execute()
    finally:
        client.close()
    # Wait for the gateway to have noticed the drop (it logs it, then clears its cache, with no
    # await between), not a fixed 1.5 s a busy machine may not give it. The bound stays far
    # below cache_ttl (60 s): a verdict kept in the cache would still answer 200 below.
    noticed = ("revocation subscription re-connected", "revocation subscription lost")
    assert wait_until(
        lambda: any(line in second_gateway.log()[logged:] for line in noticed), timeout=10
    ), second_gateway.log()[logged:]
    assert [(await get(second_gateway.url, token))[0] for _ in range(3)] == [403, 403, 403]
    assert [rec["path"] for rec in backend.records()] == ["/t/status/200"]  # the first only


def test_an_authorization_header_given_twice_is_refused(
    gateway: GatewayProc, backend: BackendProc, secret: str
) -> None:
    """Only one would be verified and both forwarded: the backend (which may check the Secret
    too) could act on the one nobody checked, here a revoked key's."""
    key_id, api_key = new_key(gateway)
    revoked = mint(gateway, api_key)
    cli(gateway.config_path, "keys", "revoke", key_id)
    response = raw_request(
        gateway.port,
        (
            "GET /t/status/200 HTTP/1.1\r\nHost: gw\r\n"
            f"Authorization: Bearer {secret}\r\nAuthorization: Bearer {revoked}\r\n"
            "Connection: close\r\n\r\n"
        ).encode(),
    )
    assert response.status == 400
    assert json.loads(response.body)["code"] == "malformed_request"
    assert backend.records() == []


async def test_the_rate_limit_is_shared_by_two_gateways(
    gateway: GatewayProc, second_gateway: GatewayProc, backend: BackendProc
) -> None:
    _, api_key = new_key(gateway, "--rate-limit", "6/60s")
    token = mint(gateway, api_key)
    statuses = [(await get(gw.url, token))[0] for gw in (gateway, second_gateway) * 3]
    assert statuses == [200] * 6
    backend.clear()
    for gw in (gateway, second_gateway):
        status, doc, headers = await get(gw.url, token)
        assert status == 429 and doc["code"] == "rate_limited"
        assert int(headers["Retry-After"]) >= 1
    assert backend.records() == []


async def test_rotation_keeps_the_old_key_during_the_overlap_only(
    gateway: GatewayProc, backend: BackendProc
) -> None:
    out = cli(gateway.config_path, "keys", "add", "--client", "rotating", "--json")
    old_token = forge(json.loads(out.stdout)["api_key"])
    out = cli(
        gateway.config_path, "keys", "rotate", "--client", "rotating", "--overlap", "3s", "--json"
    )
    rotated_at = time.monotonic()
    new_token = forge(json.loads(out.stdout)["api_key"])
    assert (await get(gateway.url, old_token))[0] == 200
    assert (await get(gateway.url, new_token))[0] == 200
    assert time.monotonic() - rotated_at < 3, "too slow to observe the overlap"
    time.sleep(max(0.0, 3.2 - (time.monotonic() - rotated_at)))
    status, doc, _ = await get(gateway.url, old_token)
    assert status == 403 and doc["code"] == "key_not_active"
    assert (await get(gateway.url, new_token))[0] == 200


def _ec_key_files(tmp_path: Path, name: str, curve: ec.EllipticCurve) -> Path:
    """A fresh EC key pair on ``curve``: returns the private PEM's path, the public beside it."""
    private = ec.generate_private_key(curve)
    (tmp_path / f"{name}.pem").write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    private_file = tmp_path / f"{name}-private.pem"
    private_file.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return private_file


async def test_ec_signing_keys_on_two_curves_refuse_a_mismatched_alg_with_401(
    redis_server: RedisServer, backend_proc: BackendProc, tmp_path: Path
) -> None:
    """Rotating EC signing keys from P-256 to P-384 needs ``algorithms: [ES256, ES384]``. A
    forged token naming the P-256 kid with ``alg: ES384`` made PyJWT raise InvalidKeyError, which
    is not an InvalidTokenError: any client could turn a 401 into a 500 with an ERROR traceback
    in the log. And ``secret mint`` signed with the first ES algorithm whatever the key's curve,
    so minting for the P-384 kid crashed."""
    p256 = _ec_key_files(tmp_path, "p256", ec.SECP256R1())
    p384 = _ec_key_files(tmp_path, "p384", ec.SECP384R1())
    config = base_config(redis_server.url, backend_proc.url, tmp_path / "spool")
    config["auth"]["algorithms"] = ["HS256", "ES256", "ES384"]
    config["auth"]["keys"]["ec-2024"] = {"public_key_file": str(tmp_path / "p256.pem")}
    config["auth"]["keys"]["ec-2025"] = {"public_key_file": str(tmp_path / "p384.pem")}
    gw = start_gateway(config, tmp_path)
    try:
        _, api_key = new_key(gw)
        payload = {"exp": int(time.time()) + 600, "client_secret": api_key}
        header = {"alg": "ES384", "kid": "ec-2024", "typ": "JWT"}
        mismatched = [
            jwt.encode(payload, "x" * 32, algorithm="HS256", headers={"kid": "ec-2024"}),
            ".".join(  # alg ES384 on the P-256 kid: anyone can send this, no key needed
                jwt.utils.base64url_encode(json.dumps(part).encode()).decode()
                for part in (header, payload, "signature")
            ),
        ]
        for token in mismatched:
            status, doc, headers = await get(gw.url, token)
            assert (status, doc.get("code")) == (401, "invalid_secret"), token
            assert 'error="invalid_token"' in headers["WWW-Authenticate"]
        assert "Traceback" not in gw.log()
        for kid, private_file in (("ec-2024", p256), ("ec-2025", p384)):
            minted = cli(
                gw.config_path, "secret", "mint", "--api-key", api_key,
                "--kid", kid, "--private-key-file", str(private_file), check=False,
            )  # fmt: skip
            assert minted.returncode == 0, minted.stderr
            assert (await get(gw.url, minted.stdout.strip()))[0] == 200
    finally:
        gw.stop()


def _es256(api_key: str, kid: str, private_file: Path) -> str:
    """A Secret signed as the platform would, with the private half of an EC P-256 key."""
    private = serialization.load_pem_private_key(private_file.read_bytes(), password=None)
    payload = {"exp": int(time.time()) + 600, "client_secret": api_key}
    return jwt.encode(payload, private, algorithm="ES256", headers={"kid": kid})


def _reloaded(gw: GatewayProc, before: int) -> None:
    assert wait_until(lambda: gw.config_generation() > before, timeout=15), "no reload"


async def test_a_reload_replaces_the_signing_keys_at_once(
    redis_server: RedisServer, backend_proc: BackendProc, tmp_path: Path
) -> None:
    """A leaked signing key is removed from the file (SECURITY.md): the verifier was built at
    start and a reload kept it, so the key went on verifying Secrets, and a Secret it had
    verified stayed remembered as verified, until every replica restarted. Now an edit that
    removes its ``kid`` refuses its Secrets at once and one that adds a ``kid`` verifies with
    it at once; a key file replaced under the same ``kid`` is read again."""
    old_private = _ec_key_files(tmp_path, "old", ec.SECP256R1())
    new_private = _ec_key_files(tmp_path, "new", ec.SECP256R1())
    config = base_config(redis_server.url, backend_proc.url, tmp_path / "spool")
    config["auth"]["algorithms"] = ["HS256", "ES256"]
    config["auth"]["keys"]["ec-old"] = {"public_key_file": str(tmp_path / "old.pem")}
    gw = start_gateway(config, tmp_path)
    try:
        _, api_key = new_key(gw)
        leaked = _es256(api_key, "ec-old", old_private)
        fresh = _es256(api_key, "ec-new", new_private)
        assert (await get(gw.url, leaked))[0] == 200  # verified, and remembered as verified
        assert (await get(gw.url, fresh))[0] == 401
        del config["auth"]["keys"]["ec-old"]
        config["auth"]["keys"]["ec-new"] = {"public_key_file": str(tmp_path / "new.pem")}
        generation = gw.config_generation()
        write_atomically(gw.config_path, yaml.safe_dump(config, sort_keys=False))  # polled
        _reloaded(gw, generation)
        status, doc, _ = await get(gw.url, leaked)
        assert (status, doc.get("code")) == (401, "invalid_secret")
        assert "signing key (kid)" in doc["detail"]
        assert (await get(gw.url, fresh))[0] == 200
        assert "after a restart" not in gw.log()  # nothing left waiting for one

        generation = gw.config_generation()
        replaced_private = _ec_key_files(tmp_path, "new", ec.SECP256R1())  # over new.pem
        replaced = _es256(api_key, "ec-new", replaced_private)
        _reloaded(gw, generation)  # the key file is watched too, as a mounted Secret renews it
        assert (await get(gw.url, replaced))[0] == 200
        status, doc, _ = await get(gw.url, fresh)
        assert (status, doc.get("code")) == (401, "invalid_secret")
    finally:
        gw.stop()


async def test_rotation_keeps_the_clients_ip_allow_list_and_rate_limit(
    gateway: GatewayProc, backend: BackendProc
) -> None:
    """SPEC §3's IP allow-list and rate limit are the client's rules, kept with its keys. A
    rotation (the remedy SECURITY.md gives for a leaked key) issued the new key without them,
    so the client's replacement key worked from any address and without a limit."""
    fenced = ("--allow-ip", "10.0.0.0/8", "--rate-limit", "2/60s")
    cli(gateway.config_path, "keys", "add", "--client", "fenced", *fenced)
    cli(gateway.config_path, "keys", "add", "--client", "limited", "--rate-limit", "2/60s")
    for client in ("fenced", "limited"):
        out = cli(gateway.config_path, "keys", "rotate", "--client", client, "--json")
        new = json.loads(out.stdout)
        listed = json.loads(
            cli(gateway.config_path, "keys", "list", "--client", client, "--json").stdout
        )
        rules = {(tuple(k["allow_ips"]), k["rate_limit"]) for k in listed}
        assert len(rules) == 1, f"the new key's rules differ from the old key's: {rules}"
        token = mint(gateway, new["api_key"])
        statuses = [(await get(gateway.url, token))[0] for _ in range(3)]
        assert statuses == ([403] * 3 if client == "fenced" else [200, 200, 429])
