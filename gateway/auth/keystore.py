"""The active-key set in Redis (SPEC §3): which API keys are valid, until when, for whom.

Layout (``P`` is ``{<redis.key_prefix>}``; the braces are a Redis Cluster hash tag, so every key
below lives in one slot and MULTI/EXEC works unchanged on a cluster):

``P:keys``                ZSET  sha256hex(api_key) -> expiry, epoch seconds (``+inf``: never).
                                The one source of truth for "active": active iff score > now.
``P:key:<digest>``        HASH  key_id, client, label, created, allow_ips (comma-separated CIDRs,
                                may be empty), rate_limit (e.g. ``100/60s``, may be empty).
``P:client:<client>``     SET   digests of the client's keys (for rotate and ``list --client``).
``P:key_ids``             HASH  key_id -> digest (``revoke KEY_ID`` without scanning).
``P:revocations``         channel; the message is a digest whose cached verdict must be dropped.
``P:rl:<client>:<n>``     rate-limit counters (see ratelimit.py).

Redis never holds a raw key: only its SHA-256. API keys are ``ugw_`` + 32 random bytes, so an
unsalted fast hash is safe (nothing to brute-force). A key id (``k_`` + 12 hex) is the public
handle operators use; it reveals nothing about the key. Writes go through MULTI/EXEC so a reader
never sees half a key; rotation uses WATCH so a concurrent add/revoke makes it retry, not clobber.
Revocations are PUBLISHed right after the EXEC, not inside it: a cluster pipeline refuses PUBLISH,
and publishing after the change is visible means a replica that drops its verdict and asks again
already sees the key gone.
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline
from redis.exceptions import WatchError

from gateway.auth.ratelimit import RateLimit
from gateway.config.model import SecretValue
from gateway.redis_client import RedisClient

AnyPipeline = Pipeline | ClusterPipeline
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._@:+-]{1,128}$")


def digest(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def _text(value: Any) -> str:
    """Works whether or not the client was built with ``decode_responses``."""
    return value.decode() if isinstance(value, bytes) else str(value)


class NoActiveKeyError(ValueError):
    """``rotate`` of a client with no active key: there is nothing to rotate, and a new key
    for a mistyped client id would leave the real client's keys working without an end."""


@dataclass(frozen=True)
class KeyRecord:
    """One key's metadata; never the key itself, and not even its digest in ``repr``."""

    key_id: str
    client: str
    label: str
    created: float
    expires: float  # math.inf: never
    allow_ips: tuple[str, ...] = ()
    rate_limit: RateLimit | None = None
    digest: str = field(default="", repr=False)

    def active(self, now: float) -> bool:
        return self.expires > now

    def state(self, now: float) -> str:
        return "active" if self.active(now) else "expired"


@dataclass(frozen=True)
class NewKey:
    record: KeyRecord
    api_key: SecretValue  # shown to the operator once, then forgotten


def _record(digest_hex: str, fields: dict[Any, Any], score: float | None) -> KeyRecord | None:
    if not fields or score is None:
        return None
    f = {_text(k): _text(v) for k, v in fields.items()}
    rate = f.get("rate_limit", "")
    return KeyRecord(
        key_id=f.get("key_id", ""),
        client=f.get("client", ""),
        label=f.get("label", ""),
        created=float(f.get("created", "0")),
        expires=float(score),
        allow_ips=tuple(c for c in f.get("allow_ips", "").split(",") if c),
        rate_limit=RateLimit.parse(rate) if rate else None,
        digest=digest_hex,
    )


class KeyStore:
    """Add, rotate, revoke, list, purge and look up keys. Takes any redis.asyncio client."""

    def __init__(self, redis: RedisClient, key_prefix: str) -> None:
        self.redis = redis
        self.prefix = "{" + key_prefix + "}"
        self.keys_zset = f"{self.prefix}:keys"
        self.key_ids = f"{self.prefix}:key_ids"
        self.revocations = f"{self.prefix}:revocations"

    def _meta(self, digest_hex: str) -> str:
        return f"{self.prefix}:key:{digest_hex}"

    def _client_set(self, client: str) -> str:
        return f"{self.prefix}:client:{client}"

    # -- the request path -------------------------------------------------------------------------

    async def lookup(self, digest_hex: str) -> KeyRecord | None:
        """The key's record (active or not) or None if unknown; exactly one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zscore(self.keys_zset, digest_hex)
            pipe.hgetall(self._meta(digest_hex))
            score, fields = await pipe.execute()
        return _record(digest_hex, fields, score)

    # -- administration ---------------------------------------------------------------------------

    def _queue_add(
        self,
        pipe: AnyPipeline,
        client: str,
        expires: float,
        label: str,
        allow_ips: Sequence[str],
        rate_limit: RateLimit | None,
        now: float,
    ) -> NewKey:
        api_key = "ugw_" + secrets.token_urlsafe(32)
        digest_hex = digest(api_key)
        key_id = "k_" + secrets.token_hex(6)
        pipe.zadd(self.keys_zset, {digest_hex: expires})
        pipe.hset(
            self._meta(digest_hex),
            mapping={
                "key_id": key_id,
                "client": client,
                "label": label,
                "created": f"{now:.3f}",
                "allow_ips": ",".join(allow_ips),
                "rate_limit": str(rate_limit) if rate_limit else "",
            },
        )
        pipe.sadd(self._client_set(client), digest_hex)
        pipe.hset(self.key_ids, key_id, digest_hex)
        record = KeyRecord(
            key_id, client, label, now, expires, tuple(allow_ips), rate_limit, digest_hex
        )
        return NewKey(record, SecretValue(api_key.encode()))

    async def add(
        self,
        client: str,
        expires: float = math.inf,
        *,
        label: str = "",
        allow_ips: Sequence[str] = (),
        rate_limit: RateLimit | None = None,
    ) -> NewKey:
        """A new active key for ``client``, written atomically."""
        _check_client(client)
        async with self.redis.pipeline(transaction=True) as pipe:
            new = self._queue_add(pipe, client, expires, label, allow_ips, rate_limit, time.time())
            await pipe.execute()
        return new

    async def rotate(
        self,
        client: str,
        overlap: float,
        expires: float = math.inf,
        *,
        label: str = "",
        allow_ips: Sequence[str] = (),
        rate_limit: RateLimit | None = None,
    ) -> tuple[NewKey, list[KeyRecord]]:
        """A new key; the client's other keys now expire at min(their expiry, now + overlap).
        :class:`NoActiveKeyError` when the client has no active key (``add`` makes the first).

        The IP allow-list and rate limit are the client's rules (SPEC §3): those not given are
        taken from the client's newest active key, so a rotation never lifts them.
        Returns the new key and the old keys as they are now. Their digests are published on the
        revocation channel so replicas drop verdicts cached with the old, later expiry.
        """
        _check_client(client)
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    new, ended = await self._rotate_once(
                        pipe, client, overlap, expires, label, allow_ips, rate_limit
                    )
                    break
                except WatchError:  # someone changed the key set meanwhile: read it again
                    await pipe.reset()  # type: ignore[no-untyped-call]
        for record in ended:
            await self.redis.publish(self.revocations, record.digest)
        return new, ended

    async def _rotate_once(
        self,
        pipe: AnyPipeline,
        client: str,
        overlap: float,
        expires: float,
        label: str,
        allow_ips: Sequence[str],
        rate_limit: RateLimit | None,
    ) -> tuple[NewKey, list[KeyRecord]]:
        await pipe.watch(self._client_set(client), self.keys_zset)
        old_digests = sorted(_text(d) for d in await pipe.smembers(self._client_set(client)))
        now = time.time()
        cutoff = now + overlap
        old = [r for r in await self._records_watched(pipe, old_digests) if r.active(now)]
        if not old:  # a mistyped client id would get a first key, and the real one's keep working
            raise NoActiveKeyError(
                f"client {client!r} has no active key to rotate (`keys add` makes a client's"
                " first key): nothing changed"
            )
        newest = max(old, key=lambda r: (r.created, r.key_id))
        allow_ips = allow_ips or newest.allow_ips
        rate_limit = rate_limit or newest.rate_limit
        pipe.multi()  # type: ignore[no-untyped-call]
        new = self._queue_add(pipe, client, expires, label, allow_ips, rate_limit, now)
        ended: list[KeyRecord] = []
        for record in old:
            end = min(record.expires, cutoff)
            pipe.zadd(self.keys_zset, {record.digest: end}, xx=True)
            ended.append(
                KeyRecord(
                    record.key_id,
                    record.client,
                    record.label,
                    record.created,
                    end,
                    record.allow_ips,
                    record.rate_limit,
                    record.digest,
                )
            )
        await pipe.execute()
        return new, ended

    async def _records_watched(self, pipe: AnyPipeline, digests: Sequence[str]) -> list[KeyRecord]:
        """Records read in immediate mode on a WATCHing pipeline (one command each: admin only)."""
        records = []
        for d in digests:
            score = await pipe.zscore(self.keys_zset, d)
            record = _record(d, await pipe.hgetall(self._meta(d)), score)
            if record is not None:
                records.append(record)
        return records

    async def revoke(self, key_id: str) -> KeyRecord | None:
        """Delete the key and tell every replica to drop its cached verdict; None if unknown."""
        digest_hex = await self.redis.hget(self.key_ids, key_id)
        if digest_hex is None:
            return None
        found = await self.records([_text(digest_hex)])
        record = found[0] if found else None
        async with self.redis.pipeline(transaction=True) as pipe:
            self._queue_delete(pipe, _text(digest_hex), key_id, record.client if record else None)
            await pipe.execute()
        await self.redis.publish(self.revocations, _text(digest_hex))
        return record

    def _queue_delete(
        self, pipe: AnyPipeline, digest_hex: str, key_id: str, client: str | None
    ) -> None:
        pipe.zrem(self.keys_zset, digest_hex)
        pipe.delete(self._meta(digest_hex))
        pipe.hdel(self.key_ids, key_id)
        if client:
            pipe.srem(self._client_set(client), digest_hex)

    async def records(self, digests: Iterable[str]) -> list[KeyRecord]:
        """Records for ``digests`` (unknown ones skipped), in one round trip."""
        digests = list(digests)
        if not digests:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for d in digests:
                pipe.zscore(self.keys_zset, d)
                pipe.hgetall(self._meta(d))
            replies = await pipe.execute()
        found = (_record(d, replies[2 * i + 1], replies[2 * i]) for i, d in enumerate(digests))
        return [r for r in found if r is not None]

    async def list(self, client: str | None = None) -> list[KeyRecord]:
        """Every key (or one client's), expired-but-unpurged included, oldest first."""
        members: Iterable[Any]
        if client is None:
            members = await self.redis.zrange(self.keys_zset, 0, -1)
        else:
            members = await self.redis.smembers(self._client_set(client))
        records = await self.records(_text(m) for m in members)
        return sorted(records, key=lambda r: (r.created, r.key_id))

    async def purge(self, now: float | None = None) -> int:
        """Remove keys whose expiry has passed, with their metadata; returns how many."""
        now = time.time() if now is None else now
        expired = [_text(d) for d in await self.redis.zrangebyscore(self.keys_zset, "-inf", now)]
        if not expired:
            return 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for d in expired:
                pipe.hmget(self._meta(d), ["key_id", "client"])
            metas = await pipe.execute()
        async with self.redis.pipeline(transaction=True) as pipe:
            for d, (key_id, client) in zip(expired, metas, strict=True):
                self._queue_delete(pipe, d, _text(key_id or ""), _text(client) if client else None)
            await pipe.execute()
        return len(expired)


def _check_client(client: str) -> None:
    if not _CLIENT_ID.match(client):
        raise ValueError(
            f"client id {client!r} must be 1-128 characters of letters, digits and ._@:+-"
        )
