"""In-process cache of "active" verdicts, and the listener that drops them on revocation.

Why it is safe to cache at all: a verdict lives at most ``auth.cache_ttl`` and never past the key's
own expiry; a revocation (or rotation) published on ``{prefix}:revocations`` drops it on every
replica at once. The cache is only trusted while the revocation subscription is up: when the
pub/sub connection drops we may miss a revocation, so the cache is cleared and stays disabled
(every request asks Redis) until the subscription is re-established. Negative verdicts are never
cached, so a freshly added key works at once.

A lookup that started before a revocation must not cache its (now stale) "active" answer after the
revocation was processed: every drop or clear bumps a generation counter, and :meth:`put` refuses a
verdict whose lookup began in an older generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from gateway.auth.keystore import KeyRecord
from gateway.redis_client import REDIS_ERRORS, RedisClient
from gateway.redis_client import pubsub as redis_pubsub

log = logging.getLogger(__name__)
MAX_ENTRIES = 100_000
MAX_RETRY_DELAY = 2.0
PING_INTERVAL = 1.0
SILENCE_LIMIT = 3.0  # seconds without any message or PONG before the subscription is re-made


class VerdictCache:
    """digest -> (record, monotonic deadline). Bounded; oldest entries go first."""

    def __init__(self, ttl: float, max_entries: int = MAX_ENTRIES) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.enabled = False  # True only while the revocation subscription is up
        self.generation = 0
        self._entries: OrderedDict[str, tuple[KeyRecord, float]] = OrderedDict()

    def get(self, digest_hex: str) -> KeyRecord | None:
        if not self.enabled:
            return None
        entry = self._entries.get(digest_hex)
        if entry is None:
            return None
        record, deadline = entry
        if time.monotonic() >= deadline:
            del self._entries[digest_hex]
            return None
        return record

    def put(self, digest_hex: str, record: KeyRecord, generation: int) -> None:
        """Cache an active verdict seen by a lookup that began at ``generation``."""
        if not self.enabled or generation != self.generation or self.ttl <= 0:
            return
        lifetime = min(self.ttl, record.expires - time.time())
        if lifetime <= 0:
            return
        self._entries[digest_hex] = (record, time.monotonic() + lifetime)
        self._entries.move_to_end(digest_hex)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def drop(self, digest_hex: str) -> None:
        self.generation += 1
        self._entries.pop(digest_hex, None)

    def clear(self) -> None:
        self.generation += 1
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class RevocationListener:
    """Subscribes to the revocation channel for as long as it runs, reconnecting forever."""

    def __init__(
        self,
        redis: RedisClient,
        channel: str,
        cache: VerdictCache,
        on_error: Callable[[], None] | None = None,
        retry_delay: float = 0.2,
    ) -> None:
        self._redis = redis
        self._channel = channel
        self._cache = cache
        self._on_error = on_error
        self._retry_delay = retry_delay
        self.subscribed = asyncio.Event()  # for tests and readiness checks

    async def run(self) -> None:
        delay = self._retry_delay
        while True:
            try:
                await self._listen_once()
            except REDIS_ERRORS as exc:
                _reraise_if_cancelled()
                log.warning("revocation subscription lost: %s", type(exc).__name__)
                if self._on_error is not None:
                    self._on_error()
            finally:
                self._cache.enabled = False
                self._cache.clear()
                if self.subscribed.is_set():  # it had worked: retry quickly, then back off
                    delay = self._retry_delay
                self.subscribed.clear()
            _reraise_if_cancelled()
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_RETRY_DELAY)

    async def _listen_once(self) -> None:
        # Subscribe confirmations and PONGs are read as messages on purpose: with
        # ignore_subscribe_messages, get_message returns None at once after swallowing one, so
        # None would not mean "a quiet second" (and the loop would spin).
        # On a Redis Cluster this is a ClusterPubSub on one node, which hears every PUBLISH.
        pubsub = await redis_pubsub(self._redis)
        connection = None
        try:
            await pubsub.subscribe(self._channel)
            # redis-py re-connects and re-subscribes a PubSub by itself (its Retry on
            # ConnectionError), so a short drop never reaches this loop as an error; yet a
            # revocation PUBLISHed during it reached nobody. Every re-connect therefore counts
            # as a loss: the cache is cleared (after redis-py's own callback re-subscribed).
            connection = pubsub.connection
            if connection is not None:
                connection.register_connect_callback(self._reconnected)
            # Only now can no revocation slip by: anything cached before may be stale.
            self._cache.clear()
            self._cache.enabled = True
            self.subscribed.set()
            heard = pinged = time.monotonic()
            while True:
                message = await pubsub.get_message(timeout=PING_INTERVAL)
                # redis-py can swallow a cancel inside get_message (it returns None): a cancel
                # is requested once, so without this check the task would never stop.
                _reraise_if_cancelled()
                now = time.monotonic()
                if message is not None:
                    heard = now
                    if message.get("type") == "message":
                        data = message["data"]
                        self._cache.drop(data.decode() if isinstance(data, bytes) else str(data))
                if now - pinged >= PING_INTERVAL:
                    # A server gone without a RST (half-open socket) is noticed when even a PING
                    # gets no answer, within seconds rather than never.
                    if now - heard > SILENCE_LIMIT:
                        raise ConnectionError("no answer to PING on the revocation subscription")
                    await pubsub.ping()
                    pinged = now
        finally:
            if connection is not None:  # it goes back to the pool: it is not ours to watch
                connection.deregister_connect_callback(self._reconnected)
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _reconnected(self, connection: object) -> None:
        """The subscription's connection was re-made: revocations may have been missed."""
        log.warning("revocation subscription re-connected; dropping cached verdicts")
        self._cache.clear()
        if self._on_error is not None:
            self._on_error()


def _reraise_if_cancelled() -> None:
    """A cancel that a library turned into an error must still stop the task."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
