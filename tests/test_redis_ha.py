"""Redis Sentinel and Cluster (issue 8, SPEC §7) against real servers started on loopback.

Sentinel: the primary is SIGKILLed; while the sentinels fail over, authentication fails closed
(503) and never lets an unknown key through; afterwards it works again on the promoted replica,
revocations published there reach the gateway, and keys added there are honoured.

Cluster: three masters; keys written through a client seeded with one node are honoured by
Authenticators seeded with the others (the ``{prefix}`` hash tag keeps a key's data on one slot),
rotation, revocation (via cluster-wide PUBLISH), purge and the shared rate limit all work, and the
real gateway process serves a request with ``redis.cluster: true``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from types import MappingProxyType

import aiohttp
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MovedError

from gateway.auth.authenticator import Authenticator, Identity
from gateway.auth.keystore import KeyStore
from gateway.auth.ratelimit import RateLimit
from gateway.auth.secret import mint
from gateway.config.model import AuthConfig, HostPort, RedisConfig, SecretValue, SigningKey
from gateway.errors import GatewayError
from gateway.redis_client import RedisClient, build_redis
from tests.support.gateway_proc import BackendProc, base_config, cli, start_gateway
from tests.support.procs import free_port
from tests.support.redis_ha import SERVICE, ClusterSetup, SentinelSetup

SIGNING = b"redis-ha-test-signing-key-0123456789abcdef"
AUTH = AuthConfig(
    keys=MappingProxyType({"default": SigningKey("default", secret=SecretValue(SIGNING))}),
    leeway=1.0,
    cache_ttl=5.0,
    retry_after=1,
)
IP = "203.0.113.9"
MakeAuth = Callable[[RedisConfig], Awaitable[Authenticator]]


def bearer(api_key: str) -> dict[str, str]:
    return {"Authorization": "Bearer " + mint(api_key, SIGNING, "HS256", ttl=3600)}


def key_of(new: object) -> str:
    return new.api_key.reveal().decode()  # type: ignore[attr-defined, no-any-return]


async def verdict(auth: Authenticator, headers: dict[str, str]) -> str:
    """``ok:<client>`` or the error code: one attempt, nothing swallowed but GatewayError."""
    try:
        identity: Identity = await auth.authenticate(headers, IP)
    except GatewayError as exc:
        return exc.code
    return f"ok:{identity.client_id}"


async def until(auth: Authenticator, headers: dict[str, str], wanted: str, within: float) -> float:
    """Seconds until ``auth`` answers ``wanted`` for ``headers``; fails after ``within``."""
    start = time.monotonic()
    seen = ""
    while time.monotonic() - start < within:
        seen = await verdict(auth, headers)
        if seen == wanted:
            return time.monotonic() - start
        await asyncio.sleep(0.02)
    pytest.fail(f"wanted {wanted} within {within}s, last answer {seen}")


@pytest.fixture
def prefix() -> str:
    return f"ha-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def clients() -> AsyncIterator[list[RedisClient]]:
    """Every client a test builds, closed at the end even when the test fails."""
    made: list[RedisClient] = []
    yield made
    for client in made:
        await client.aclose()


@pytest.fixture
async def make_auth(clients: list[RedisClient]) -> AsyncIterator[MakeAuth]:
    """Authenticators with their own client each, like separate gateway processes."""
    made: list[Authenticator] = []

    async def make(config: RedisConfig) -> Authenticator:
        redis = build_redis(config)
        clients.append(redis)
        auth = Authenticator(AUTH, redis, config.key_prefix)
        made.append(auth)
        await auth.start()
        await asyncio.wait_for(auth.subscribed.wait(), 5)
        return auth

    yield make
    for auth in made:
        await auth.close()


def store_for(config: RedisConfig, clients: list[RedisClient]) -> KeyStore:
    redis = build_redis(config, client_name="ha-admin")
    clients.append(redis)
    return KeyStore(redis, config.key_prefix)


# -- Sentinel ------------------------------------------------------------------------------


@pytest.fixture
def sentinels() -> Iterator[SentinelSetup]:
    setup = SentinelSetup()
    try:
        yield setup.start()
    finally:
        setup.close()


async def test_sentinel_failover_keeps_authenticating_and_fails_closed_meanwhile(
    sentinels: SentinelSetup, make_auth: MakeAuth, clients: list[RedisClient], prefix: str
) -> None:
    down = HostPort("127.0.0.1", free_port())  # a sentinel that is down is skipped at once
    config = RedisConfig(
        sentinels=(down, *(HostPort("127.0.0.1", s.port) for s in sentinels.sentinels)),
        sentinel_service=SERVICE,
        key_prefix=prefix,
    )
    store = store_for(config, clients)
    old = await store.add("acme")
    # Replication is asynchronous: make sure the replica has the key before the primary dies.
    assert await store.redis.execute_command("WAIT", 1, 2000) == 1
    start = time.monotonic()
    auth = await make_auth(config)
    good, unknown = bearer(key_of(old)), bearer("ugw_never-issued-key")
    assert await verdict(auth, good) == "ok:acme"
    assert time.monotonic() - start < 1.5  # not redis-py's default sentinel retry (seconds)

    sentinels.primary.stop()  # SIGKILL: no goodbye to clients or sentinels
    answers: set[str] = set()
    failover = asyncio.create_task(asyncio.to_thread(sentinels.wait_for_failover, 15.0))
    while not failover.done():
        answers.add(await verdict(auth, unknown))
        await asyncio.sleep(0.05)
    await failover  # raises TimeoutError if the sentinels did not promote the replica
    # Fail closed: during the window an unknown key got 503 or 403, never an identity.
    assert answers <= {"auth_unavailable", "key_not_active"}, answers
    assert "auth_unavailable" in answers

    await until(auth, unknown, "key_not_active", within=5)
    assert await verdict(auth, good) == "ok:acme"
    fresh = await store.add("globex")  # written to the promoted replica
    assert await verdict(auth, bearer(key_of(fresh))) == "ok:globex"
    # The revocation listener re-subscribed on the new primary: a revoke there reaches the
    # cache (which holds "acme" for 5 s) well within a second.
    await asyncio.wait_for(auth.subscribed.wait(), 5)
    assert await verdict(auth, good) == "ok:acme"
    await store.revoke(old.record.key_id)
    assert await until(auth, good, "key_not_active", within=1.0) < 1.0


# -- Cluster -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterSetup]:
    setup = ClusterSetup()
    try:
        yield setup.start()
    finally:
        setup.close()


async def keys_on(cluster: ClusterSetup, node: int, pattern: str) -> list[str]:
    """The keys stored on one node itself (a plain connection: no cluster routing)."""
    plain = Redis.from_url(cluster.url(node), decode_responses=True)
    try:
        return list(await plain.keys(pattern))
    finally:
        await plain.aclose()


async def node_without(cluster: ClusterSetup, key: str) -> int:
    """A node that answers MOVED for ``key``: it does not own the key's slot."""
    for node in range(len(cluster.nodes)):
        plain = Redis.from_url(cluster.url(node))
        try:
            await plain.get(key)
        except MovedError:
            return node
        finally:
            await plain.aclose()
    raise AssertionError(f"every node owns the slot of {key}?")


def seeded(cluster: ClusterSetup, node: int, prefix: str) -> RedisConfig:
    return RedisConfig(url=cluster.url(node), cluster=True, key_prefix=prefix)


async def test_cluster_key_added_via_one_node_is_honoured_via_the_others(
    cluster: ClusterSetup, make_auth: MakeAuth, clients: list[RedisClient], prefix: str
) -> None:
    store = store_for(seeded(cluster, 0, prefix), clients)
    auth_b = await make_auth(seeded(cluster, 1, prefix))
    auth_c = await make_auth(seeded(cluster, 2, prefix))
    new = await store.add("acme", label="cluster")
    headers = bearer(key_of(new))
    assert await verdict(auth_b, headers) == "ok:acme"
    assert await verdict(auth_c, headers) == "ok:acme"
    assert await verdict(auth_b, bearer("ugw_never-issued-key")) == "key_not_active"
    # The hash tag put every key of the set on one node: the one owning the prefix's slot.
    per_node = [sorted(await keys_on(cluster, n, store.prefix + "*")) for n in range(3)]
    assert sorted(len(keys) for keys in per_node) == [0, 0, 4], per_node
    assert [r.key_id for r in await store.list()] == [new.record.key_id]


async def test_cluster_rotate_and_revoke_reach_authenticators_on_other_nodes(
    cluster: ClusterSetup, make_auth: MakeAuth, clients: list[RedisClient], prefix: str
) -> None:
    store = store_for(seeded(cluster, 0, prefix), clients)
    auths = [await make_auth(seeded(cluster, n, prefix)) for n in (1, 2)]
    old = await store.add("acme")
    old_headers = bearer(key_of(old))
    for auth in auths:  # warm the verdict caches: only a revocation message can drop them now
        assert await verdict(auth, old_headers) == "ok:acme"
        assert auth.cache.get(old.record.digest) is not None

    new, ended = await store.rotate("acme", overlap=0)
    assert [r.key_id for r in ended] == [old.record.key_id]
    for auth in auths:
        assert await until(auth, old_headers, "key_not_active", within=1.0) < 1.0
        assert await verdict(auth, bearer(key_of(new))) == "ok:acme"

    assert (await store.revoke(new.record.key_id)) is not None
    for auth in auths:
        assert await until(auth, bearer(key_of(new)), "key_not_active", within=1.0) < 1.0
    remaining = [(r.key_id, r.state(time.time())) for r in await store.list("acme")]
    assert remaining == [(old.record.key_id, "expired")]  # left for purge


async def test_cluster_purge_and_shared_rate_limit(
    cluster: ClusterSetup, make_auth: MakeAuth, clients: list[RedisClient], prefix: str
) -> None:
    store = store_for(seeded(cluster, 2, prefix), clients)
    short = await store.add("brief", expires=time.time() + 60)
    keep = await store.add("lasting")
    assert await store.purge(now=time.time() + 120) == 1
    assert [r.key_id for r in await store.list()] == [keep.record.key_id]
    assert await store.lookup(short.record.digest) is None

    limited = await store.add("metered", rate_limit=RateLimit(3, 60))
    auth_a = await make_auth(seeded(cluster, 0, prefix))
    auth_b = await make_auth(seeded(cluster, 1, prefix))
    headers = bearer(key_of(limited))
    answers = [await verdict(auth, headers) for auth in (auth_a, auth_b, auth_a, auth_b)]
    assert answers == ["ok:metered"] * 3 + ["rate_limited"]  # one budget across both


async def test_gateway_process_serves_requests_with_a_cluster(
    cluster: ClusterSetup, backend: BackendProc, tmp_path: Path
) -> None:
    # Seeded with a node that does NOT own the prefix's slot: only a cluster client works there.
    seed = await node_without(cluster, "{ugw-ha}:probe")
    config = base_config(cluster.url(seed), backend.url, tmp_path / "spool")
    config["redis"] = {"url": cluster.url(seed), "cluster": True, "key_prefix": "ugw-ha"}
    gateway = start_gateway(config, tmp_path)
    try:
        added = cli(gateway.config_path, "keys", "add", "--client", "cl-acme", "--json")
        api_key = json.loads(added.stdout)["api_key"]
        secret = cli(gateway.config_path, "secret", "mint", "--api-key", api_key).stdout.strip()
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.get(gateway.admin_url + "/readyz") as ready:
                assert ready.status == 200, await ready.text()
            headers = {"Authorization": f"Bearer {secret}"}
            async with session.get(gateway.url + "/t/echo", headers=headers) as passed:
                assert passed.status == 200, await passed.text()
            async with session.get(gateway.url + "/t/echo") as refused:
                assert refused.status == 401
        assert [r["path"] for r in backend.records()] == ["/t/echo"]
    finally:
        gateway.stop()


async def test_unreachable_cluster_fails_closed_with_503(prefix: str) -> None:
    """No node answers: the cluster client's own exception becomes a ConnectionError, so the
    auth stage answers 503 auth_unavailable (not a 500) and nothing passes."""
    redis = build_redis(RedisConfig(url=f"redis://127.0.0.1:{free_port()}/0", cluster=True))
    auth = Authenticator(AUTH, redis, prefix)
    try:
        assert await verdict(auth, bearer("ugw_any-key")) == "auth_unavailable"
        with pytest.raises(RedisConnectionError, match="unreachable"):
            await redis.ping()  # what /readyz and the keys commands catch
    finally:
        await redis.aclose()
