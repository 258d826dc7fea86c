"""How many client connections a worker holds at once (``server.max_connections``).

Each connection is bounded in bytes and time (``gateway/protocol.py``), but not in number, and
every one costs a descriptor; an upload in flight holds two more (its spool file, a backend
connection). A flood of connections would exhaust the process's descriptors, and then not the
flood but everyone's requests fail: no spool file (507), no backend connection (502), no Redis
(503). So each listener of a worker holds at most ``max_connections``; one accepted past that
is closed at once and counted (``upload_gateway_connections_refused_total``), the way Envoy's
downstream connection limit does it. nginx's ``worker_connections`` stops accepting instead,
which leaves the client in the kernel's backlog until it gives up; a closed connection tells a
load balancer at once to try another replica. The connections already open are not touched.

The cap only protects if the descriptors are there: like nginx's ``worker_rlimit_nofile``, a
worker raises its soft descriptor limit to what the cap needs (up to the hard limit), and says
so at startup when the hard limit is lower (Debian's default soft limit is 1,024).
"""

from __future__ import annotations

import asyncio
import logging
import resource

from prometheus_client import Counter

from gateway.config.model import Config
from gateway.metrics import Metrics

LOGGER = logging.getLogger("upload_gateway")
# The admin listener serves probes and scrapes: a few connections at a time.
ADMIN_CONNECTIONS = 64
_SPARE_DESCRIPTORS = 64  # logs, the config watcher, the listening sockets, the thread pool


class RefusedConnection(asyncio.Protocol):
    """A connection past the cap: counted, then closed before anything is read from it."""

    def __init__(self, refused: Counter) -> None:
        self._refused = refused  # upload_gateway_connections_refused_total, this listener's

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._refused.inc()
        transport.close()


def refused_counter(metrics: Metrics, listener: str) -> Counter:
    """The listener's series, labelled at startup: exported at 0 before the first refusal, so
    ``rate()`` in an alert sees that one too."""
    return metrics.connections_refused.labels(listener=listener)


def descriptors_needed(config: Config) -> int:
    """Descriptors a worker may hold with both listeners full: a client connection and a spool
    file per proxy connection, the backend and Redis pools, the admin listener's connections."""
    return (
        2 * config.server.max_connections
        + config.backend.pool_size
        + config.redis.pool_size
        + ADMIN_CONNECTIONS
        + _SPARE_DESCRIPTORS
    )


def raise_descriptor_limit(config: Config) -> None:
    """Raise the soft ``RLIMIT_NOFILE`` to what ``server.max_connections`` needs (never lower
    it), up to the hard limit; warn when the hard limit is short of it."""
    if not config.server.max_connections:
        return
    needed = descriptors_needed(config)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < needed:
        LOGGER.warning(
            "server.max_connections %d needs about %d open files, but this process may open "
            "only %d (hard limit): raise it (ulimit -n, LimitNOFILE=) or lower max_connections",
            config.server.max_connections,
            needed,
            target,
        )
