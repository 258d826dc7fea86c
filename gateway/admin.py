"""The admin listener (SPEC §2): ``/metrics``, ``/healthz`` (alive) and ``/readyz`` (can serve).

On its own port so that metrics and probes are never exposed where clients connect, and so that a
load balancer can take a draining replica out of rotation through ``/readyz``.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.redis_client import REDIS_ERRORS
from gateway.state import STATE, GatewayState


def build_admin_app(state: GatewayState) -> web.Application:
    app = web.Application()
    app[STATE] = state
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    return app


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    redis_ok, backend_ok = await asyncio.gather(_redis_ok(state), state.forwarder.ping())
    checks = {
        "redis": "ok" if redis_ok else "unreachable",
        "backend": "ok" if backend_ok else "unreachable",
        "config": "ok"
        if state.config.last_error is None
        else "last reload failed, old policy kept",
        "config_generation": state.config.generation,
        # The reason a reload was refused (FILE:LINE: key: message), so an operator sees why the
        # new policy is not live without grepping the log; None once a good file loaded.
        "config_error": state.config.last_error,
        "draining": state.draining,
    }
    ready = redis_ok and backend_ok and not state.draining
    return web.json_response(
        {"status": "ready" if ready else "not ready", "checks": checks},
        status=200 if ready else 503,
    )


async def _redis_ok(state: GatewayState) -> bool:
    try:
        return bool(await state.redis.ping())
    except REDIS_ERRORS:
        return False


async def _metrics(request: web.Request) -> web.Response:
    state: GatewayState = request.app[STATE]
    body = state.metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
