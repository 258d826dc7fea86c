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
    # ``(?s:.*)``, not ``.*``: a path with an encoded line feed (``/a%0Ab``) decodes to one that
    # ``.`` does not match, and aiohttp would answer its own text/plain 404, unlogged, uncounted
    # and never proxied.
    app.router.add_route("*", "/{tail:(?s:.*)}", handle, expect_handler=_no_automatic_continue)
    app.on_response_prepare.append(keep_backend_content_type)
    app.on_response_prepare.append(_close_while_draining)
    app.cleanup_ctx.append(_lifetimes)
    return app


async def _close_while_draining(request: web.Request, response: web.StreamResponse) -> None:
    """During a drain, an answer says ``Connection: close`` (Envoy's and Go's drain do too):
    the connection is closed once it is idle, and a keep-alive client that sent its next
    request on it meanwhile would get no answer, not knowing whether an upload was taken.
    aiohttp runs this hook after it chose the ``Connection`` header: both are set here."""
    if request.app[STATE].draining:
        response.force_close()
        response.headers["Connection"] = "close"


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
