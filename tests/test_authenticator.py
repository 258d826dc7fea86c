"""The request-path auth stage against a real redis-server: verdicts, cache, revocation, failure.

Round trips are measured on the server (``INFO commandstats``), never assumed from mocks.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from types import MappingProxyType
from typing import Any

import pytest
from redis.asyncio import Redis

from gateway.auth.authenticator import Authenticator, Identity
from gateway.auth.keystore import KeyStore, digest
from gateway.auth.ratelimit import RateLimit
from gateway.auth.secret import mint
from gateway.config.model import AuthConfig, RedisConfig, SecretValue, SigningKey
from gateway.errors import GatewayError
from gateway.metrics import Metrics
from gateway.redis_client import build_redis
from tests.support.procs import RedisServer

SIGNING = b"authenticator-test-key-0123456789abcdef"
AUTH = AuthConfig(
    keys=MappingProxyType({"default": SigningKey("default", secret=SecretValue(SIGNING))}),
    leeway=1.0,
    cache_ttl=5.0,
    retry_after=2,
)
IP = "203.0.113.7"
MakeAuth = Callable[..., Awaitable[Authenticator]]


def bearer(api_key: str, **claims: object) -> dict[str, str]:
    return {"Authorization": "Bearer " + mint(api_key, SIGNING, "HS256", ttl=3600, claims=claims)}


def key_of(new: object) -> str:
    return new.api_key.reveal().decode()  # type: ignore[attr-defined, no-any-return]


@pytest.fixture
def prefix() -> str:
    return f"auth-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def make_auth(prefix: str) -> AsyncIterator[MakeAuth]:
    """Authenticators, each with its own client and pool (like separate gateway processes)."""
    made: list[tuple[Authenticator, Redis]] = []

    async def make(url: str, metrics: Metrics | None = None, **redis_options: Any) -> Authenticator:
        redis = build_redis(RedisConfig(url=url, key_prefix=prefix, **redis_options))
        auth = Authenticator(AUTH, redis, prefix, metrics)
        await auth.start()
        await asyncio.wait_for(auth.subscribed.wait(), 5)
        made.append((auth, redis))
        return auth

    yield make
    for auth, redis in made:
        await auth.close()
        await redis.aclose()


@pytest.fixture
async def admin(redis_server: RedisServer, prefix: str) -> AsyncIterator[KeyStore]:
    redis = build_redis(RedisConfig(url=redis_server.url))
    yield KeyStore(redis, prefix)
    await redis.aclose()


async def refused(
    auth: Authenticator, headers: dict[str, str], code: str, ip: str = IP
) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        await auth.authenticate(headers, ip)
    assert info.value.code == code, info.value
    return info.value


async def until_refused(
    auth: Authenticator, headers: dict[str, str], code: str, within: float
) -> float:
    """Seconds until ``auth`` refuses ``headers`` with ``code``; fails after ``within``."""
    start = time.monotonic()
    while time.monotonic() - start < within:
        try:
            await auth.authenticate(headers, IP)
        except GatewayError as exc:
            if exc.code == code:
                return time.monotonic() - start
        await asyncio.sleep(0.02)
    pytest.fail(f"not refused with {code} within {within}s")


async def command_calls(redis: Redis) -> dict[str, int]:
    stats = await redis.info("commandstats")
    return {name: int(v["calls"]) for name, v in stats.items()}


def delta(before: dict[str, int], after: dict[str, int], ignore: tuple[str, ...]) -> dict[str, int]:
    names = set(before) | set(after)
    changes = {n: after.get(n, 0) - before.get(n, 0) for n in names}
    return {n: d for n, d in changes.items() if d and not any(i in n for i in ignore)}


# -- verdicts ------------------------------------------------------------------------------


async def test_valid_secret_gives_identity_without_the_key(
    make_auth: MakeAuth, admin: KeyStore, redis_server: RedisServer
) -> None:
    auth = await make_auth(redis_server.url)
    new = await admin.add("acme", math.inf)
    identity = await auth.authenticate(bearer(key_of(new), role="agent"), IP)
    assert identity == Identity("acme", new.record.key_id, identity.claims)
    assert identity.claims["role"] == "agent" and "client_secret" not in identity.claims
    assert key_of(new) not in repr(identity)


async def test_missing_or_non_bearer_secret(make_auth: MakeAuth, redis_server: RedisServer) -> None:
    auth = await make_auth(redis_server.url)
    for headers in (
        {},
        {"Authorization": ""},
        {"Authorization": "Basic dXNlcjpwdw=="},
        {"Authorization": "Bearer "},
    ):
        error = await refused(auth, headers, "missing_secret")
        assert error.status == 401 and error.headers == {"WWW-Authenticate": "Bearer"}


async def test_bad_secrets_cost_no_redis_command(
    make_auth: MakeAuth, admin: KeyStore, redis_server: RedisServer
) -> None:
    auth = await make_auth(redis_server.url)
    before = await command_calls(admin.redis)
    for token in ("garbage", mint("ugw_x", b"wrong-key-0123456789abcdef0123456789", "HS256")):
        error = await refused(auth, {"Authorization": "Bearer " + token}, "invalid_secret")
        assert error.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    after = await command_calls(admin.redis)
    assert delta(before, after, ignore=("info", "ping")) == {}


async def test_unknown_expired_and_revoked_keys_are_403(
    make_auth: MakeAuth, admin: KeyStore, redis_server: RedisServer
) -> None:
    auth = await make_auth(redis_server.url)
    await refused(auth, bearer("ugw_never-issued"), "key_not_active")
    expired = await admin.add("acme", time.time() - 1)
    await refused(auth, bearer(key_of(expired)), "key_not_active")
    revoked = await admin.add("acme", math.inf)
    await admin.revoke(revoked.record.key_id)
    error = await refused(auth, bearer(key_of(revoked)), "key_not_active")
    assert error.status == 403


async def test_key_expiring_while_its_secret_is_valid(
    make_auth: MakeAuth, admin: KeyStore, redis_server: RedisServer
) -> None:
    """The cached verdict must not outlive the key, although cache_ttl (5 s) is longer."""
    auth = await make_auth(redis_server.url)
    new = await admin.add("acme", time.time() + 1.0)
    headers = bearer(key_of(new))
    await auth.authenticate(headers, IP)
    assert auth.cache.get(new.record.digest) is not None
    await until_refused(auth, headers, "key_not_active", within=2.0)


async def test_rotation_overlap_then_only_the_new_key(
    make_auth: MakeAuth, admin: KeyStore, redis_server: RedisServer
) -> None:
    auth = await make_auth(redis_server.url)
    old = await admin.add("acme", math.inf)
    old_headers = bearer(key_of(old))
    await auth.authenticate(old_headers, IP)  # cached with the old, endless expiry
    new, _ = await admin.rotate("acme", overlap=1.0)
    new_headers = bearer(key_of(new))
    assert (await auth.authenticate(old_headers, IP)).key_id == old.record.key_id
    assert (await auth.authenticate(new_headers, IP)).key_id == new.record.key_id
    await until_refused(auth, old_headers, "key_not_active", within=2.0)
    assert (await auth.authenticate(new_headers, IP)).key_id == new.record.key_id


# -- cache and revocation ------------------------------------------------------------------


async def test_cache_hit_makes_zero_redis_commands(
    make_auth: MakeAuth, admin: KeyStore, redis_server: RedisServer
) -> None:
    metrics = Metrics()
    auth = await make_auth(redis_server.url, metrics)
    new = await admin.add("acme", math.inf)
    headers = bearer(key_of(new))
    await refused(auth, bearer("ugw_unknown"), "key_not_active")  # opens the pooled connection
    before = await command_calls(admin.redis)
    await auth.authenticate(headers, IP)  # the miss: the measurement must see it
    middle = await command_calls(admin.redis)
    for _ in range(200):
        await auth.authenticate(headers, IP)
    after = await command_calls(admin.redis)
    ignore = ("info", "ping")  # our own INFO, and the revocation listener's keep-alive
    assert delta(before, middle, ignore) == {"cmdstat_zscore": 1, "cmdstat_hgetall": 1}
    assert delta(middle, after, ignore) == {}
    assert metrics.auth_cache.labels(result="hit")._value.get() == 200
    assert metrics.auth_cache.labels(result="miss")._value.get() == 2  # unknown + first


async def test_revocation_reaches_a_second_gateway_within_a_second(
    make_auth: MakeAuth, admin: KeyStore, redis_server: RedisServer
) -> None:
    first = await make_auth(redis_server.url)
    second = await make_auth(redis_server.url)
    new = await admin.add("acme", math.inf)
    headers = bearer(key_of(new))
    for auth in (first, second):
        await auth.authenticate(headers, IP)
        assert auth.cache.get(new.record.digest) is not None  # would pass for 5 s unchecked
    await admin.revoke(new.record.key_id)
    assert await until_refused(second, headers, "key_not_active", within=1.0) < 1.0
    await refused(first, headers, "key_not_active")


async def test_redis_down_fails_closed_and_recovers(make_auth: MakeAuth, prefix: str) -> None:
    server = RedisServer().start()
    try:
        auth = await make_auth(server.url)
        store_redis = build_redis(RedisConfig(url=server.url))
        cached = await KeyStore(store_redis, prefix).add("acme", math.inf)
        await auth.authenticate(bearer(key_of(cached)), IP)
        server.stop()
        error = await refused(auth, bearer("ugw_fresh"), "auth_unavailable")
        assert error.status == 503 and error.headers == {"Retry-After": "2"}
        # The verdict cached before the outage is not trusted once revocations may be missed.
        await until_refused(auth, bearer(key_of(cached)), "auth_unavailable", within=1.0)
        server.start()
        restarted = await KeyStore(store_redis, prefix).add("acme", math.inf)  # no persistence
        deadline = time.monotonic() + 5
        while True:
            try:
                identity = await auth.authenticate(bearer(key_of(restarted)), IP)
                break
            except GatewayError as exc:
                assert exc.code == "auth_unavailable" and time.monotonic() < deadline
                await asyncio.sleep(0.05)
        assert identity.key_id == restarted.record.key_id
        await asyncio.wait_for(auth.subscribed.wait(), 5)  # the listener is back too
        await store_redis.aclose()
    finally:
        server.close()


async def test_timeouts_fail_closed_and_cancellation_keeps_replies_in_step(
    make_auth: MakeAuth, admin: KeyStore, redis_server: RedisServer
) -> None:
    """CLIENT PAUSE holds replies: a timed-out and a cancelled lookup must not shift later ones.

    With a pool of two (one is the revocation subscription) every lookup shares one connection,
    so a reply left unread by an interrupted command would be read by the next one (redis-py#2665).
    """
    auth = await make_auth(redis_server.url, timeout=0.3, pool_size=2)
    a = await admin.add("client-a", math.inf)
    b = await admin.add("client-b", math.inf)
    await admin.redis.execute_command("CLIENT", "PAUSE", "600", "ALL")
    error = await refused(auth, bearer(key_of(a)), "auth_unavailable")  # socket timeout
    assert error.headers["Retry-After"] == "2"
    task = asyncio.create_task(auth.authenticate(bearer(key_of(a)), IP))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.7)  # the pause ends; any stale replies arrive now
    for _ in range(3):
        assert (await auth.authenticate(bearer(key_of(b)), IP)).client_id == "client-b"
        auth.cache.clear()
        assert (await auth.authenticate(bearer(key_of(a)), IP)).client_id == "client-a"
        auth.cache.clear()


# -- per-client rules ----------------------------------------------------------------------


async def test_rate_limit_is_shared_by_two_gateways(
    make_auth: MakeAuth, admin: KeyStore, redis_server: RedisServer
) -> None:
    window = 60
    if window - time.time() % window < 3:  # never straddle a window boundary
        await asyncio.sleep(window - time.time() % window + 0.1)
    first = await make_auth(redis_server.url)
    second = await make_auth(redis_server.url)
    new = await admin.add("acme", math.inf, rate_limit=RateLimit(3, window))
    other = await admin.add("globex", math.inf, rate_limit=RateLimit(3, window))
    headers = bearer(key_of(new))
    for auth in (first, second, first):
        await auth.authenticate(headers, IP)
    for auth in (second, first):
        error = await refused(auth, headers, "rate_limited")
        assert error.status == 429 and 1 <= int(error.headers["Retry-After"]) <= window
    await second.authenticate(bearer(key_of(other)), IP)  # another client's budget is its own


async def test_ip_allow_list(
    make_auth: MakeAuth, admin: KeyStore, redis_server: RedisServer
) -> None:
    auth = await make_auth(redis_server.url)
    new = await admin.add("acme", math.inf, allow_ips=["10.0.0.0/8", "2001:db8::/32"])
    headers = bearer(key_of(new))
    for ip in ("10.1.2.3", "::ffff:10.1.2.3", "2001:db8::1"):
        await auth.authenticate(headers, ip)
    for ip in ("192.168.1.1", "11.0.0.1", "2001:db9::1", "not-an-ip", ""):
        error = await refused(auth, headers, "ip_not_allowed", ip=ip)
        assert error.status == 403


async def test_failures_are_counted_by_reason(
    make_auth: MakeAuth, redis_server: RedisServer
) -> None:
    metrics = Metrics()
    auth = await make_auth(redis_server.url, metrics)
    await refused(auth, {}, "missing_secret")
    await refused(auth, bearer("ugw_unknown"), "key_not_active")
    await refused(auth, bearer("ugw_unknown"), "key_not_active")
    assert metrics.auth_failures.labels(reason="missing_secret")._value.get() == 1
    assert metrics.auth_failures.labels(reason="key_not_active")._value.get() == 2


async def test_custom_header_takes_a_bare_token(
    admin: KeyStore, redis_server: RedisServer, prefix: str
) -> None:
    redis = build_redis(RedisConfig(url=redis_server.url))
    auth = Authenticator(replace(AUTH, header="X-Secret"), redis, prefix)
    new = await admin.add("acme", math.inf)
    token = bearer(key_of(new))["Authorization"].removeprefix("Bearer ")
    assert (await auth.authenticate({"X-Secret": token}, IP)).client_id == "acme"
    assert (await auth.authenticate({"X-Secret": "Bearer " + token}, IP)).client_id == "acme"
    await refused(auth, {"Authorization": "Bearer " + token}, "missing_secret")
    assert auth.cache.get(digest(key_of(new))) is None  # never started: no subscription, no cache
    await redis.aclose()


async def test_concurrent_misses_share_one_lookup(
    make_auth: MakeAuth, admin: KeyStore, redis_server: RedisServer
) -> None:
    """A verdict expiring under load: 50 concurrent requests for one key, one round trip."""
    auth = await make_auth(redis_server.url)
    new = await admin.add("acme", math.inf)
    headers = bearer(key_of(new))
    await refused(auth, bearer("ugw_unknown"), "key_not_active")  # opens the pooled connection
    before = await command_calls(admin.redis)
    identities = await asyncio.gather(*(auth.authenticate(headers, IP) for _ in range(50)))
    after = await command_calls(admin.redis)
    assert {i.client_id for i in identities} == {"acme"}
    assert delta(before, after, ("info", "ping")) == {"cmdstat_zscore": 1, "cmdstat_hgetall": 1}


async def test_concurrent_misses_for_an_unknown_key_all_fail(
    make_auth: MakeAuth, redis_server: RedisServer
) -> None:
    auth = await make_auth(redis_server.url)
    results = await asyncio.gather(
        *(auth.authenticate(bearer("ugw_never_issued"), IP) for _ in range(20)),
        return_exceptions=True,
    )
    assert all(isinstance(r, GatewayError) and r.code == "key_not_active" for r in results)
