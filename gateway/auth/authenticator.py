"""The request path's authentication stage: Secret → active key → IP allow-list → rate limit.

Order matters and is cheapest-first: the JWT is verified in-process before any Redis call, so
garbage costs nothing; the key verdict usually comes from the in-process cache (zero round trips);
the rate limit, when the key has one, is always one round trip because a budget shared by every
replica can only be counted in Redis.

Fail closed: any Redis error or timeout is a 503 ``auth_unavailable`` with ``Retry-After``, never a
pass. Recovery needs nothing: the pool re-connects on the next request, and the revocation listener
keeps re-subscribing in the background (the cache stays off until it has).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.auth import ratelimit
from gateway.auth.cache import RevocationListener, VerdictCache
from gateway.auth.keystore import KeyRecord, KeyStore, digest
from gateway.auth.secret import MISSING_TOKEN_CHALLENGE, SecretVerifier
from gateway.client_ip import networks, parse_address, within
from gateway.config.model import AuthConfig
from gateway.errors import GatewayError
from gateway.metrics import Metrics
from gateway.redis_client import REDIS_ERRORS, RedisClient

log = logging.getLogger(__name__)
PURGE_INTERVAL = 60.0
CLOSE_TIMEOUT = 2.0


@dataclass(frozen=True)
class Identity:
    client_id: str
    key_id: str
    claims: Mapping[str, Any]  # verified claims WITHOUT client_secret


class Authenticator:
    """One per process; ``start`` after the event loop runs, ``close`` on shutdown."""

    def __init__(
        self,
        config: AuthConfig,
        redis: RedisClient,
        key_prefix: str,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.store = KeyStore(redis, key_prefix)
        self.cache = VerdictCache(config.cache_ttl)
        self._redis = redis
        self._verifier = SecretVerifier(config)
        self._listener = RevocationListener(
            redis, self.store.revocations, self.cache, on_error=lambda: self._redis_error("pubsub")
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._lookups: dict[str, asyncio.Future[KeyRecord]] = {}

    def apply(self, config: AuthConfig) -> bool:
        """Verify with ``config`` from now on (a hot reload); True if anything changed.

        A leaked signing key must stop verifying the moment its ``kid`` leaves the file, not
        at the next restart. The new verifier starts with no Secrets remembered as verified, so
        one verified under a removed or replaced key is checked again, and refused. Cached key
        verdicts are dropped too: they were given a lifetime under the old ``cache_ttl``.
        """
        if config == self.config:
            return False
        verifier = SecretVerifier(config)  # built before anything changes: all or nothing
        self.config, self._verifier = config, verifier
        self.cache.ttl = config.cache_ttl
        self.cache.clear()
        return True

    @property
    def subscribed(self) -> asyncio.Event:
        """Set while revocations are being received (and the cache is therefore in use)."""
        return self._listener.subscribed

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._listener.run(), name="auth-revocations"),
            asyncio.create_task(self._purge_forever(), name="auth-purge"),
        ]

    async def close(self) -> None:
        """Stop the background tasks; bounded, so a library that swallows a cancel can never
        hold up a drain (the tasks only read from Redis: abandoning them loses nothing)."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=CLOSE_TIMEOUT)
        self._tasks = []

    async def authenticate(self, headers: Mapping[str, str], client_ip: str) -> Identity:
        """The caller's identity, or GatewayError (401/403/429/503) — never a silent pass."""
        try:
            return await self._authenticate(headers, client_ip)
        except GatewayError as exc:
            if self.metrics is not None:
                self.metrics.auth_failures.labels(reason=exc.code).inc()
            raise

    async def _authenticate(self, headers: Mapping[str, str], client_ip: str) -> Identity:
        token = self._token(headers)
        secret = self._verifier.verify(token)
        record = await self._active_record(digest(secret.api_key.reveal().decode()))
        _check_ip(record, client_ip)
        if record.rate_limit is not None:
            await self._count(record)
        return Identity(client_id=record.client, key_id=record.key_id, claims=secret.claims)

    def _token(self, headers: Mapping[str, str]) -> str:
        """The JWT from the configured header: ``Bearer <jwt>``, or bare in a custom header."""
        getall = getattr(headers, "getall", None)
        if getall is not None and len(getall(self.config.header, [])) > 1:
            # A singleton field given twice: we would verify one and forward both, and the
            # backend (which may check the Secret too) could act on the one never verified.
            raise GatewayError(
                "malformed_request", f"the {self.config.header} header is given more than once"
            )
        value = (headers.get(self.config.header) or "").strip()
        scheme, _, rest = value.partition(" ")
        if scheme.lower() == "bearer":
            value = rest.strip()
        elif self.config.header.lower() == "authorization":
            value = ""  # another scheme (Basic…) carries no Secret
        if not value:
            raise GatewayError(
                "missing_secret",
                f"send the Secret as '{self.config.header}: Bearer <Secret>'",
                headers=MISSING_TOKEN_CHALLENGE,
            )
        return value

    async def _active_record(self, digest_hex: str) -> KeyRecord:
        cached = self.cache.get(digest_hex)
        if self.metrics is not None:
            self.metrics.auth_cache.labels("hit" if cached else "miss").inc()
        if cached is not None:
            return cached
        # Single flight: when a verdict expires under load, every concurrent request for that
        # key would miss at once and each open its own Redis round trip (and connection).
        # They share one lookup instead; shielded, so one caller going away cancels nothing.
        lookup = self._lookups.get(digest_hex)
        if lookup is None:
            lookup = asyncio.ensure_future(self._lookup(digest_hex))
            self._lookups[digest_hex] = lookup
            lookup.add_done_callback(lambda done: self._lookup_done(digest_hex, done))
        return await asyncio.shield(lookup)

    def _lookup_done(self, digest_hex: str, done: asyncio.Future[KeyRecord]) -> None:
        self._lookups.pop(digest_hex, None)
        if not done.cancelled():
            done.exception()  # retrieved: a failure nobody still awaited is not an asyncio error

    async def _lookup(self, digest_hex: str) -> KeyRecord:
        generation = self.cache.generation
        try:
            record = await self.store.lookup(digest_hex)
        except REDIS_ERRORS as exc:
            raise self._unavailable("lookup", exc) from None
        if record is None or not record.active(time.time()):
            raise GatewayError(
                "key_not_active", "the API key in the Secret is unknown, expired or revoked"
            )
        self.cache.put(digest_hex, record, generation)
        return record

    async def _count(self, record: KeyRecord) -> None:
        assert record.rate_limit is not None
        try:
            verdict = await ratelimit.hit(
                self._redis, self.store.prefix, record.client, record.rate_limit
            )
        except REDIS_ERRORS as exc:
            raise self._unavailable("ratelimit", exc) from None
        if not verdict.allowed:
            raise GatewayError(
                "rate_limited",
                f"client {record.client!r} exceeded {record.rate_limit}",
                headers={"Retry-After": str(verdict.retry_after)},
                limit=str(record.rate_limit),
            )

    def _unavailable(self, operation: str, exc: BaseException) -> GatewayError:
        log.warning("redis %s failed: %s", operation, type(exc).__name__)
        self._redis_error(operation)
        return GatewayError(
            "auth_unavailable",
            "the active-key store cannot be reached; try again shortly",
            headers={"Retry-After": str(self.config.retry_after)},
        )

    def _redis_error(self, operation: str) -> None:
        if self.metrics is not None:
            self.metrics.redis_errors.labels(operation=operation).inc()

    async def _purge_forever(self) -> None:
        """Every replica purges now and then; it is idempotent and one cheap ZRANGEBYSCORE."""
        while True:
            await asyncio.sleep(PURGE_INTERVAL)
            try:
                purged = await self.store.purge()
            except REDIS_ERRORS as exc:
                if task_cancelling():
                    raise asyncio.CancelledError from exc
                log.warning("purging expired keys failed: %s", type(exc).__name__)
                self._redis_error("purge")
                continue
            if purged:
                log.info("purged %d expired API keys", purged)


def task_cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _check_ip(record: KeyRecord, client_ip: str) -> None:
    """Refuse a client IP outside the key's allow-list (an empty list allows every address)."""
    if not record.allow_ips:
        return
    address = parse_address(client_ip)  # ::ffff:10.0.0.1 is 10.0.0.1 for the allow-list
    if address is not None and within(address, networks(record.allow_ips)):
        return
    raise GatewayError("ip_not_allowed", "the client's IP address is not in the key's allow-list")
