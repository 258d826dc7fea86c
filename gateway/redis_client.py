"""The one place a Redis client is built from :class:`RedisConfig`: one server, Sentinel or Cluster.

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

Sentinel (``redis.sentinels``): redis-py's ``Sentinel(...).master_for(service)``, whose connections
ask the sentinels for the master's address whenever they (re)connect; a ConnectionError, or a
ReadOnlyError from a primary demoted to replica, drops the connection, so the retry above lands on
the new primary once the sentinels have promoted it. Until then requests fail closed (503). The pool
is the same blocking pool (see :class:`BlockingSentinelPool`); db, username and password still come
from ``redis.url``, whose host and port are ignored. Closing the client also closes the sentinel
connections (:class:`SentinelRedis`).

Cluster (``redis.cluster: true``): ``RedisCluster`` seeded with ``redis.url``'s host and port (any
one node, or a Service name that resolves to some node; the client learns every node from
``CLUSTER SLOTS``). Its pools are per node and do not block: ``pool_size`` is the limit per node and
a burst past it fails closed at once (MaxConnectionsError is a ConnectionError). The key layout uses
the ``{key_prefix}`` hash tag, so every multi-key operation stays on one slot.

Errors: the cluster client raises ``RedisClusterException`` (not a RedisError) when no node can be
reached; :class:`GatewayRedisCluster` turns that into a ConnectionError, so callers catching
RedisError fail closed with 503 as with one server. Rarer cluster states (a slot without an owner
mid-reshard) still raise RedisClusterException: :data:`REDIS_ERRORS` names everything a caller must
treat as "Redis unavailable".
"""

from __future__ import annotations

import re
from typing import Any, TypeAlias
from urllib.parse import urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import (
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedSSLConnection,
)
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError

from gateway.config.model import RedisConfig

RETRIES = 2
HEALTH_CHECK_INTERVAL = 30  # seconds idle before a pooled connection is PINGed before use

RedisClient: TypeAlias = Redis | RedisCluster
"""What :func:`build_redis` returns; every command the gateway uses exists on both."""

REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, RedisClusterException, OSError)
"""Exceptions meaning "Redis cannot answer now": callers fail closed on any of them."""


def display_url(url: str) -> str:
    """``url`` without its password, for output: whoever has Redis's can add API keys to the
    set, and a backend URL's is the gateway's Basic auth there (check-config prints both)."""
    url = re.sub(r"([?&]password=)[^&#]*", r"\1***", url)  # redis-py also reads ?password=
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    return parts._replace(netloc=f"{userinfo.partition(':')[0]}:***@{hostinfo}").geturl()


def build_redis(config: RedisConfig, *, client_name: str = "upload-gateway") -> RedisClient:
    """A redis.asyncio client that owns its pool(s): ``await client.aclose()`` closes all."""
    if config.sentinels:
        return _sentinel_client(config, client_name)
    if config.cluster:
        return _cluster_client(config, client_name)
    pool = BlockingConnectionPool.from_url(config.url, **_connection_options(config, client_name))
    return Redis.from_pool(pool)


async def pubsub(client: RedisClient) -> PubSub:
    """A PubSub on ``client``. A cluster client is initialized first: its ClusterPubSub looks the
    channel's slot up in a slot table that stays empty until the first command (KeyError otherwise).
    The subscription then lives on the node owning the channel's slot; that is enough because a
    PUBLISH on any node of a Redis Cluster is broadcast to every node."""
    if isinstance(client, RedisCluster):
        await client.initialize()
    return client.pubsub()


def _retry() -> Retry:
    # Only a dropped connection is retried: a timeout means a slow server, and asking again
    # would multiply the stall every request sees before its 503.
    return Retry(ExponentialBackoff(cap=0.2, base=0.01), RETRIES, (RedisConnectionError,))


def _connection_options(config: RedisConfig, client_name: str) -> dict[str, Any]:
    options: dict[str, Any] = {
        "max_connections": config.pool_size,
        "timeout": config.timeout,
        "socket_timeout": config.timeout,
        "socket_connect_timeout": config.timeout,
        "health_check_interval": HEALTH_CHECK_INTERVAL,
        "retry": _retry(),
        "client_name": client_name,
        "decode_responses": True,
    }
    if not config.url.startswith("unix://"):  # a Unix socket has no TCP keepalive to set
        options["socket_keepalive"] = True
    return options


class BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel address discovery with the blocking pool's bounded wait for a free connection.

    The MRO puts SentinelConnectionPool's connection handling in front of BlockingConnectionPool's
    ``get_connection``/``release``, which wait on a condition instead of raising at once.
    """


class SentinelRedis(Redis):
    """A master client that also closes the Sentinel's own connections on ``aclose``."""

    sentinel_manager: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            if self.sentinel_manager is not None:
                await self.sentinel_manager.aclose()


def _sentinel_client(config: RedisConfig, client_name: str) -> Redis:
    options = _connection_options(config, client_name)
    url = parse_url(config.url)
    for name in ("db", "username", "password"):
        if url.get(name) is not None:
            options[name] = url[name]
    if url.get("connection_class") is SSLConnection:
        options["connection_class"] = SentinelManagedSSLConnection
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        [(hp.host, hp.port) for hp in config.sentinels],
        sentinel_kwargs={
            "socket_timeout": config.timeout,
            "socket_connect_timeout": config.timeout,
            # Not redis-py's default Retry (3 tries, backoff up to 10 s): a sentinel that is down
            # would stall every discovery for seconds, when asking the next sentinel is instant.
            "retry": Retry(NoBackoff(), 0),
            "client_name": client_name + "-sentinel",
            "decode_responses": True,
        },
    )
    client = sentinel.master_for(
        config.sentinel_service,
        redis_class=SentinelRedis,
        connection_pool_class=BlockingSentinelPool,
        **options,
    )
    assert isinstance(client, SentinelRedis)
    client.sentinel_manager = sentinel
    return client


class GatewayRedisCluster(RedisCluster):
    """RedisCluster whose "no node reachable" is a ConnectionError, like every other client's.

    redis-py raises RedisClusterException (not a RedisError) when no startup node answers;
    callers written for one server catch RedisError and would turn it into a 500 instead of the
    fail-closed 503. Every command, pipeline and pub/sub goes through ``initialize`` first.
    """

    async def initialize(
        self,
        additional_startup_nodes_info: list[tuple[str, int]] | None = None,
        last_failed_node_name: str | None = None,
    ) -> RedisCluster:
        try:
            return await super().initialize(additional_startup_nodes_info, last_failed_node_name)
        except RedisClusterException as exc:
            raise RedisConnectionError(f"Redis Cluster unreachable: {exc}") from exc


def _cluster_client(config: RedisConfig, client_name: str) -> RedisCluster:
    options = _connection_options(config, client_name)
    del options["timeout"]  # the cluster's per-node pools do not block (see the module docstring)
    url: dict[str, Any] = dict(parse_url(config.url))
    if url.pop("db", 0) not in (0, "0"):
        raise ValueError(
            "redis.cluster: a Redis Cluster has only database 0; use .../0 in redis.url"
        )
    if url.pop("connection_class", None) is SSLConnection:
        url["ssl"] = True
    options.update(url)
    return GatewayRedisCluster(**options)
