"""The one place a Redis client is built from :class:`RedisConfig` (Sentinel/Cluster go here later).

Choices, each from a redis-py pitfall:

* ``BlockingConnectionPool`` with ``timeout``: under a burst the default pool raises "Too many
  connections" at once; this one waits up to ``redis.timeout`` for a free connection, then raises
  ConnectionError, which the auth stage turns into 503 ``auth_unavailable`` (fail closed).
* ``socket_timeout``/``socket_connect_timeout`` = ``redis.timeout``: a stuck server costs one
  bounded wait. Timeouts are left to the socket on purpose: wrapping single commands in
  ``asyncio.wait_for``/``asyncio.timeout`` cancels them mid-reply, the failure mode of
  redis-py#2624/#2665 (a cancelled command's reply read by the next command on that connection).
  redis-py 5+ disconnects a connection whose send or read was interrupted by any BaseException,
  cancellation included, so a cancelled request (client went away) is safe too, and the pool
  refuses to hand out a connection that still has unread data.
* ``Retry(ExponentialBackoff)`` with two retries on ConnectionError: a connection the server closed
  (restart, idle timeout) is re-made transparently instead of failing one request per pooled
  connection; ``health_check_interval`` PINGs a connection idle for long before reusing it.
"""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.config.model import RedisConfig

RETRIES = 2
HEALTH_CHECK_INTERVAL = 30  # seconds idle before a pooled connection is PINGed before use


def build_redis(config: RedisConfig, *, client_name: str = "upload-gateway") -> Redis:
    """A redis.asyncio client that owns its pool: ``await client.aclose()`` closes both."""
    if config.sentinels or config.cluster:
        raise NotImplementedError("redis.sentinels and redis.cluster are not supported yet")
    pool = BlockingConnectionPool.from_url(
        config.url,
        max_connections=config.pool_size,
        timeout=config.timeout,
        socket_timeout=config.timeout,
        socket_connect_timeout=config.timeout,
        socket_keepalive=True,
        health_check_interval=HEALTH_CHECK_INTERVAL,
        # Only a dropped connection is retried: a timeout means a slow server, and asking again
        # would multiply the stall every request sees before its 503.
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.01), RETRIES, (RedisConnectionError,)),
        client_name=client_name,
        decode_responses=True,
    )
    return Redis.from_pool(pool)
