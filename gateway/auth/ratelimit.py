"""Per-client rate limits counted in Redis, so every replica shares one budget (SPEC §3).

A fixed window: the counter ``{prefix}:rl:<client>:<window index>`` is incremented and given an
absolute expiry in one MULTI/EXEC round trip, so it can never outlive its window by much nor be
left without a TTL. Fixed windows allow up to twice the limit across a window boundary; for an
abuse brake that is an acceptable price for one cheap round trip and no Lua. The window index comes
from each replica's clock; replicas with NTP-synchronised clocks agree on it.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

from redis.asyncio import Redis

from gateway.config.units import parse_duration

_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\S+)\s*$")


@dataclass(frozen=True)
class RateLimit:
    limit: int
    window: float  # seconds

    @classmethod
    def parse(cls, text: str) -> RateLimit:
        """``"100/60s"`` → 100 requests per 60 s; ``"10/1m"``; raises ValueError otherwise."""
        match = _RATE.match(text)
        if not match:
            raise ValueError(f"expected a rate limit such as 100/60s, got {text!r}")
        limit, window = int(match.group(1)), parse_duration(match.group(2))
        if limit < 1 or window < 1:
            raise ValueError(f"a rate limit needs at least 1 request per at least 1s, got {text!r}")
        return cls(limit, window)

    def __str__(self) -> str:
        window = int(self.window) if self.window == int(self.window) else self.window
        return f"{self.limit}/{window}s"


@dataclass(frozen=True)
class RateVerdict:
    allowed: bool
    retry_after: int  # whole seconds until the window ends (meaningful when not allowed)


async def hit(
    redis: Redis, prefix: str, client: str, rate: RateLimit, now: float | None = None
) -> RateVerdict:
    """Count one request of ``client``; one round trip. Redis errors propagate (fail closed)."""
    now = time.time() if now is None else now
    index = math.floor(now / rate.window)
    window_end = (index + 1) * rate.window
    key = f"{prefix}:rl:{client}:{index}"
    async with redis.pipeline(transaction=True) as pipe:
        pipe.incr(key)
        pipe.expireat(key, math.ceil(window_end) + 1)
        count, _ = await pipe.execute()
    if int(count) <= rate.limit:
        return RateVerdict(True, 0)
    return RateVerdict(False, max(1, math.ceil(window_end - now)))
