"""build_app(config): the proxy and admin applications, their routes and lifetimes.

Long-lived resources (the Redis pool, the backend ``ClientSession``, the revocation listener) are
opened and closed in ``cleanup_ctx``, so a test or a reload never leaks a connection.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from gateway.admin import build_admin_app
from gateway.auth.authenticator import Authenticator
from gateway.config.model import Config
from gateway.forward import Forwarder, keep_backend_content_type
from gateway.handler import handle
from gateway.metrics import Metrics
from gateway.redis_client import build_redis
from gateway.spool import SpoolBudget
from gateway.state import STATE, ConfigHolder, GatewayState


async def _no_automatic_continue(request: web.Request) -> None:
    """aiohttp would answer ``Expect: 100-continue`` before any check; the handler does it
    itself once auth and the upload prechecks passed (SPEC §4 early rejection)."""
    return None


def build_state(config: Config, metrics: Metrics | None = None) -> GatewayState:
    metrics = metrics or Metrics()
    redis = build_redis(config.redis)
    return GatewayState(
        config=ConfigHolder(config),
        metrics=metrics,
        forwarder=Forwarder(config.backend, metrics),
        auth=Authenticator(config.auth, redis, config.redis.key_prefix, metrics),
        redis=redis,
        spool_budget=SpoolBudget(config.spool.max_bytes, config.spool.memory_budget),
    )


def build_app(state: GatewayState) -> web.Application:
    """The proxy: one catch-all route, since every path is either proxied or inspected."""
    app = web.Application(client_max_size=0)  # the handler counts bytes itself (SPEC §4)
    app[STATE] = state
    app.router.add_route("*", "/{tail:.*}", handle, expect_handler=_no_automatic_continue)
    app.on_response_prepare.append(keep_backend_content_type)
    app.cleanup_ctx.append(_lifetimes)
    return app


async def _lifetimes(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    await state.forwarder.start()
    await state.auth.start()
    try:
        yield
    finally:
        await state.auth.close()
        await state.forwarder.close()
        await state.redis.aclose()


__all__ = ["build_admin_app", "build_app", "build_state"]
