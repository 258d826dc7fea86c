"""The active-key set in a real redis-server: layout, no raw keys, rotation, revocation, purge."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from gateway.auth.keystore import KeyStore, digest
from gateway.auth.ratelimit import RateLimit
from gateway.config.model import RedisConfig
from gateway.redis_client import build_redis
from tests.support.procs import RedisServer


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = build_redis(RedisConfig(url=redis_server.url))
    yield client
    await client.aclose()


@pytest.fixture
def store(redis: Redis) -> KeyStore:
    return KeyStore(redis, f"ks-{uuid.uuid4().hex[:8]}")


async def _all_values(redis: Redis, prefix: str) -> str:
    """Every key name and stored value under the prefix, as one string to search."""
    parts: list[str] = []
    async for name in redis.scan_iter(match=prefix + "*"):
        parts.append(name)
        kind = await redis.type(name)
        if kind == "hash":
            parts += [f"{k}={v}" for k, v in (await redis.hgetall(name)).items()]
        elif kind == "zset":
            parts += [m for m, _ in await redis.zrange(name, 0, -1, withscores=True)]
        elif kind == "set":
            parts += list(await redis.smembers(name))
    return "\n".join(parts)


async def test_add_stores_only_the_digest_under_one_hash_tag(store: KeyStore, redis: Redis) -> None:
    new = await store.add(
        "acme",
        time.time() + 60,
        label="ci",
        allow_ips=["10.0.0.0/8"],
        rate_limit=RateLimit.parse("5/10s"),
    )
    api_key = new.api_key.reveal().decode()
    assert api_key.startswith("ugw_") and len(api_key) > 40
    assert new.record.key_id.startswith("k_")
    stored = await _all_values(redis, store.prefix)
    assert api_key not in stored
    assert digest(api_key) in stored
    names = [n async for n in redis.scan_iter(match=store.prefix + "*")]
    assert names and all(n.startswith(store.prefix + ":") for n in names)
    assert store.prefix.startswith("{") and store.prefix.endswith("}")
    assert api_key not in repr(new) and digest(api_key) not in repr(new.record)


async def test_lookup_returns_record_with_rules(store: KeyStore) -> None:
    new = await store.add(
        "acme",
        time.time() + 60,
        label="ci",
        allow_ips=["10.0.0.0/8"],
        rate_limit=RateLimit.parse("5/10s"),
    )
    record = await store.lookup(digest(new.api_key.reveal().decode()))
    assert record is not None
    assert (record.client, record.key_id, record.label) == ("acme", new.record.key_id, "ci")
    assert record.allow_ips == ("10.0.0.0/8",)
    assert record.rate_limit == RateLimit(5, 10.0)
    assert record.active(time.time())
    assert await store.lookup(digest("ugw_unknown")) is None


async def test_list_shows_state_and_never_the_key(store: KeyStore) -> None:
    live = await store.add("acme", math.inf)
    gone = await store.add("acme", time.time() - 1)
    other = await store.add("globex", time.time() + 60)
    now = time.time()
    states = {r.key_id: r.state(now) for r in await store.list("acme")}
    assert states == {live.record.key_id: "active", gone.record.key_id: "expired"}
    assert {r.key_id for r in await store.list()} == {
        live.record.key_id,
        gone.record.key_id,
        other.record.key_id,
    }


async def test_rotate_caps_old_keys_at_the_overlap_and_publishes(
    store: KeyStore, redis: Redis
) -> None:
    old_far = await store.add("acme", time.time() + 3600)
    old_near = await store.add("acme", time.time() + 0.5)
    untouched = await store.add("globex", time.time() + 3600)
    pubsub = redis.pubsub()
    await pubsub.subscribe(store.revocations)
    new, ended = await store.rotate("acme", overlap=30, expires=time.time() + 7200)
    by_id = {r.key_id: r for r in await store.list()}
    now = time.time()
    assert by_id[old_far.record.key_id].expires == pytest.approx(now + 30, abs=2)
    assert by_id[old_near.record.key_id].expires == old_near.record.expires  # min() keeps earlier
    assert by_id[untouched.record.key_id].expires == untouched.record.expires
    assert by_id[new.record.key_id].expires == pytest.approx(now + 7200, abs=2)
    assert {r.key_id for r in ended} == {old_far.record.key_id, old_near.record.key_id}
    published = set()
    for _ in range(20):
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
        if message:
            published.add(message["data"])
        if len(published) == 2:
            break
    assert published == {old_far.record.digest, old_near.record.digest}
    await pubsub.aclose()


async def test_concurrent_rotations_keep_exactly_the_new_keys(store: KeyStore) -> None:
    """WATCH makes a rotation that raced another retry, so neither new key is left uncapped."""
    await store.add("acme", math.inf)
    results = await asyncio.gather(*(store.rotate("acme", overlap=10) for _ in range(5)))
    now = time.time()
    uncapped = [r for r in await store.list("acme") if r.expires > now + 100]
    assert len(uncapped) == 1
    assert uncapped[0].key_id in {new.record.key_id for new, _ in results}


async def test_revoke_deletes_everything_and_publishes(store: KeyStore, redis: Redis) -> None:
    new = await store.add("acme", math.inf)
    pubsub = redis.pubsub()
    await pubsub.subscribe(store.revocations)
    await pubsub.get_message(timeout=1)  # the subscribe confirmation
    record = await store.revoke(new.record.key_id)
    assert record is not None and record.client == "acme"
    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
    assert message is not None and message["data"] == new.record.digest
    assert await _all_values(redis, store.prefix) == ""
    assert await store.revoke(new.record.key_id) is None
    await pubsub.aclose()


async def test_purge_removes_expired_keys_and_their_metadata(store: KeyStore, redis: Redis) -> None:
    live = await store.add("acme", time.time() + 60)
    for _ in range(3):
        await store.add("acme", time.time() - 1)
    assert await store.purge() == 3
    assert [r.key_id for r in await store.list()] == [live.record.key_id]
    assert await redis.scard(f"{store.prefix}:client:acme") == 1
    assert await redis.hlen(store.key_ids) == 1
    assert len([n async for n in redis.scan_iter(match=store.prefix + ":key:*")]) == 1
    assert await store.purge() == 0


async def test_bad_client_ids_are_refused(store: KeyStore) -> None:
    for client in ("", "has space", "x" * 200):
        with pytest.raises(ValueError):
            await store.add(client)


def test_rate_limit_parsing() -> None:
    assert RateLimit.parse("100/60s") == RateLimit(100, 60.0)
    assert RateLimit.parse("10/1m") == RateLimit(10, 60.0)
    assert str(RateLimit(100, 60.0)) == "100/60s"
    for bad in ("100", "0/60s", "5/0s", "x/1s", "5/abc"):
        with pytest.raises(ValueError):
            RateLimit.parse(bad)
