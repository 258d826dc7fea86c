"""What a platform team would write instead of the gateway: an nginx ``auth_request`` target.

Deliberately minimal and honest: verify the Secret with PyJWT (HS256 only, ``exp`` required),
take the API key from its ``client_secret`` claim and ask Redis whether SHA-256(key) is in the
gateway's active-key set (``ZSCORE {prefix}:keys digest`` > now, the layout of
``gateway/auth/keystore.py``). One Redis round trip per request, no cache (a cache would need the
revocation channel to stay correct, which is exactly the work the gateway does). 204 lets nginx
go on, 401/403 stop it. No IP allow-list, rate limit or type inspection: nginx cannot inspect.

    GATEWAY_SIGNING_KEY=... BENCH_REDIS_URL=redis://... python -m bench.auth_service \
        --port 18082 --key-prefix upload-gateway --processes 2
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import multiprocessing
import os
import time

import jwt
from aiohttp import web
from redis.asyncio import Redis

SIGNING_KEY = web.AppKey("signing_key", bytes)
REDIS = web.AppKey("redis", Redis)
KEYS_ZSET = web.AppKey("keys_zset", str)


async def check(request: web.Request) -> web.Response:
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer "):
        return web.Response(status=401)
    try:
        claims = jwt.decode(
            header[7:],
            request.app[SIGNING_KEY],
            algorithms=["HS256"],
            options={"require": ["exp"]},
            leeway=30,
        )
    except jwt.InvalidTokenError:
        return web.Response(status=401)
    api_key = claims.get("client_secret")
    if not isinstance(api_key, str):
        return web.Response(status=401)
    digest = hashlib.sha256(api_key.encode()).hexdigest()
    score = await request.app[REDIS].zscore(request.app[KEYS_ZSET], digest)
    if score is None or float(score) <= time.time():
        return web.Response(status=403)
    return web.Response(status=204)


def build_app(redis_url: str, key_prefix: str) -> web.Application:
    app = web.Application()
    app[SIGNING_KEY] = os.environ["GATEWAY_SIGNING_KEY"].encode()
    app[KEYS_ZSET] = "{" + key_prefix + "}:keys"
    app.router.add_route("*", "/{tail:(?s:.*)}", check)

    async def redis_lifetime(app: web.Application):  # type: ignore[no-untyped-def]
        app[REDIS] = Redis.from_url(redis_url, max_connections=64)
        yield
        await app[REDIS].aclose()

    app.cleanup_ctx.append(redis_lifetime)
    return app


def _serve(port: int, redis_url: str, key_prefix: str) -> None:
    loop: asyncio.AbstractEventLoop
    try:
        import uvloop
    except ImportError:
        loop = asyncio.new_event_loop()
    else:
        loop = uvloop.new_event_loop()
    web.run_app(
        build_app(redis_url, key_prefix),
        host="127.0.0.1",
        port=port,
        reuse_port=True,
        access_log=None,
        print=None,
        loop=loop,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL"))
    parser.add_argument("--key-prefix", default="upload-gateway")
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    ctx = multiprocessing.get_context("fork")
    extra = [
        ctx.Process(target=_serve, args=(args.port, args.redis_url, args.key_prefix))
        for _ in range(args.processes - 1)
    ]
    for proc in extra:
        proc.start()
    try:
        _serve(args.port, args.redis_url, args.key_prefix)
    finally:
        for proc in extra:
            proc.terminate()
            proc.join(5)


if __name__ == "__main__":
    main()
