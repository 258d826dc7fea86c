"""What authentication costs per request (issue 3): the Authenticator alone, in-process, against a
real redis-server, with the verdict cache warm (a client reuses its Secret all day).

Reports the median and p99 of ``authenticate()`` and the Redis commands it sent per request
(from ``INFO commandstats``), cold (first use of a Secret) and warm. Written to
``bench/results-auth.md`` and ``bench/results-auth.json``. Run: ``python -m bench.auth_cost``.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path
from types import MappingProxyType

import jwt
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.auth.authenticator import Authenticator
from gateway.config.model import AuthConfig, RedisConfig, SecretValue, SigningKey
from gateway.redis_client import build_redis
from tests.support.procs import RedisServer

KEY = b"bench-auth-signing-key-0123456789abcdef"
REQUESTS = 20_000
OUT = Path(__file__).resolve().parent


async def commands(redis: object) -> int:
    stats = await redis.info("commandstats")  # type: ignore[attr-defined]
    return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")


async def measure(url: str) -> dict[str, float]:
    config = AuthConfig(
        algorithms=("HS256",),
        keys=MappingProxyType({"default": SigningKey("default", secret=SecretValue(KEY))}),
        cache_ttl=60,
    )
    redis = build_redis(RedisConfig(url=url, key_prefix="bench"))
    auth = Authenticator(config, redis, "bench")
    await auth.start()
    try:
        await asyncio.wait_for(auth.subscribed.wait(), 5)
        new = await auth.store.add("bench")
        token = jwt.encode(
            {"client_secret": new.api_key.reveal().decode(), "exp": int(time.time()) + 3600},
            KEY,
            algorithm="HS256",
        )
        headers = CIMultiDictProxy(CIMultiDict({"Authorization": f"Bearer {token}"}))
        before = await commands(redis)
        started = time.perf_counter()
        await auth.authenticate(headers, "127.0.0.1")
        cold_ms = (time.perf_counter() - started) * 1000
        cold_commands = await commands(redis) - before  # INFO itself is not counted
        before = await commands(redis)
        samples = []
        for _ in range(REQUESTS):
            started = time.perf_counter()
            await auth.authenticate(headers, "127.0.0.1")
            samples.append((time.perf_counter() - started) * 1000)
        warm_commands = (await commands(redis) - before) / REQUESTS
    finally:
        await auth.close()
        await redis.aclose()
    samples.sort()
    return {
        "requests": REQUESTS,
        "warm_median_ms": round(statistics.median(samples), 4),
        "warm_p99_ms": round(samples[int(len(samples) * 0.99)], 4),
        "warm_redis_commands_per_request": round(warm_commands, 4),
        "cold_ms": round(cold_ms, 3),
        "cold_redis_commands": cold_commands,
    }


def main() -> None:
    server = RedisServer().start()
    try:
        result = asyncio.run(measure(server.url))
    finally:
        server.close()
    (OUT / "results-auth.json").write_text(json.dumps(result, indent=2) + "\n")
    (OUT / "results-auth.md").write_text(
        "# Authentication cost per request (`python -m bench.auth_cost`)\n\n"
        f"In-process `Authenticator.authenticate()`, {REQUESTS:,} requests, real redis-server, "
        "one Secret reused (warm verdict cache).\n\n"
        "| figure | value | goal |\n|---|---:|---|\n"
        f"| median, warm | {result['warm_median_ms']} ms | <= 0.2 ms |\n"
        f"| p99, warm | {result['warm_p99_ms']} ms | |\n"
        f"| Redis commands per request, warm | {result['warm_redis_commands_per_request']} | 0 |\n"
        f"| first use of a Secret (JWT verify + lookup) | {result['cold_ms']} ms, "
        f"{result['cold_redis_commands']} Redis commands in one round trip | |\n"
    )
    print((OUT / "results-auth.md").read_text())


if __name__ == "__main__":
    main()
