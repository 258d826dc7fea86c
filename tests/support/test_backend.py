"""The sample backend plus behaviours the proxy tests need.

Run as ``python -m tests.support.test_backend --port P --store DIR``.

Every route records what it received (``GET /_sample/requests`` on the backend's own port), so a
test can prove that a refused request sent the backend nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
from pathlib import Path

from aiohttp import web

from gateway.sample_backend import build_sample_backend, record

routes = web.RouteTableDef()


def pattern(size: int) -> bytes:
    """Deterministic, non-repeating-looking bytes a test can regenerate to compare."""
    block = hashlib.sha256(str(size).encode()).digest() * 2048  # 64 KiB
    return (block * (size // len(block) + 1))[:size]


@routes.route("*", "/t/echo")
async def echo(request: web.Request) -> web.StreamResponse:
    """Stream the body back as received; headers tell what framing arrived."""
    response = web.StreamResponse(
        headers={
            "X-Seen-Content-Length": request.headers.get("Content-Length", "-"),
            "X-Seen-Transfer-Encoding": request.headers.get("Transfer-Encoding", "-"),
        }
    )
    response.enable_chunked_encoding()
    await response.prepare(request)
    digest = hashlib.sha256()
    total = 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        total += len(chunk)
        await response.write(chunk)
    request.app["t_last_echo"] = (total, digest.hexdigest())
    record(request, b"")
    await response.write_eof()
    return response


@routes.get("/t/big/{size}")
async def big(request: web.Request) -> web.StreamResponse:
    size = int(request.match_info["size"])
    record(request, b"")
    response = web.StreamResponse()
    response.content_length = size
    await response.prepare(request)
    if request.method == "HEAD":
        if "broken" not in request.query:
            return response  # aiohttp would send the body after a HEAD answer if we wrote it
        await asyncio.sleep(0.05)  # broken on purpose: a body, late, once the answer is read
    data = pattern(size)
    for i in range(0, size, 1 << 20):
        await response.write(data[i : i + (1 << 20)])
    await response.write_eof()
    return response


@routes.get("/t/chunked/{size}")
async def chunked(request: web.Request) -> web.StreamResponse:
    size = int(request.match_info["size"])
    record(request, b"")
    response = web.StreamResponse()
    response.enable_chunked_encoding()
    await response.prepare(request)
    data = pattern(size)
    for i in range(0, size, 7777):
        await response.write(data[i : i + 7777])
    await response.write_eof()
    return response


@routes.route("*", "/t/status/{code}")
async def status(request: web.Request) -> web.Response:
    body = await request.read()
    record(request, body)
    code = int(request.match_info["code"])
    if code in (204, 304):
        return web.Response(status=code, headers={"ETag": '"v1"'})
    return web.Response(status=code, text=f"status {code}")


@routes.get("/t/cookies")
async def cookies(request: web.Request) -> web.Response:
    record(request, b"")
    response = web.Response(text="cookies")
    response.headers.add("Set-Cookie", "a=1; Path=/")
    response.headers.add("Set-Cookie", "b=2; Path=/")
    response.headers.add("X-Multi", "one")
    response.headers.add("X-Multi", "two")
    return response


@routes.route("*", "/t/hang")
async def hang(request: web.Request) -> web.Response:
    record(request, b"")
    await asyncio.sleep(3600)
    return web.Response(text="late")


@routes.get("/t/reset-mid")
async def reset_mid(request: web.Request) -> web.StreamResponse:
    """Promise 100,000 bytes, send 1,000, then drop the connection."""
    record(request, b"")
    response = web.StreamResponse()
    response.content_length = 100_000
    await response.prepare(request)
    await response.write(b"x" * 1000)
    await asyncio.sleep(0.05)
    assert request.transport is not None
    request.transport.abort()
    return response


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--store", required=True)
    args = parser.parse_args()
    app = build_sample_backend(Path(args.store), routes)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
