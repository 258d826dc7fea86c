"""What the soak proves: body integrity at the backend, and no leak in the workers at idle.

Integrity needs a witness on the far side, so the recording sink lives here: it keeps length and
SHA-256 per X-Request-Id, and :func:`verify` holds every request sent against it. Leaks only show
once the traffic has stopped, so the rest reads each worker from /proc (RSS, descriptors by kind)
and the gateway's own gauges and spool dir, and compares them with the idle baseline.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from bench.soak_traffic import KiB, MiB, Sent
from bench.stack import Proc, cmdline

# -- the sink: records SHA-256 and length per X-Request-Id ------------------------------------


def run_sink(port: int) -> None:
    records: dict[str, list[Any]] = {}

    async def receive(request: web.Request) -> web.Response:
        digest, length = hashlib.sha256(), 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            length += len(chunk)
        records[request.headers.get("X-Request-Id", "-")] = [length, digest.hexdigest()]
        return web.json_response({"status": "success", "description": "stored"})

    async def listing(request: web.Request) -> web.Response:
        return web.json_response(records)

    app = web.Application(client_max_size=1024**3)
    app.router.add_get("/_soak/records", listing)
    app.router.add_route("*", "/{tail:(?s:.*)}", receive)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def get_json(url: str) -> dict[str, list[Any]]:
    """A blocking GET of a JSON document (the sink's records), after the load has stopped."""
    with urllib.request.urlopen(url, timeout=30) as r:
        return dict(json.loads(r.read()))


# -- watching the workers ---------------------------------------------------------------------


@dataclass
class Watch:
    """Samples each worker's RSS every 0.25 s in a thread (the harness loop is busy)."""

    pids: list[int]
    peak: dict[int, int] = field(default_factory=dict)
    series: list[tuple[float, int, int]] = field(default_factory=list)  # (time, pid, rss)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.wait(0.25):
            now = time.monotonic()
            for pid in self.pids:
                value = rss(pid)
                self.peak[pid] = max(self.peak.get(pid, 0), value)
                self.series.append((now, pid, value))

    def at(self, pid: int, fraction: float) -> int:
        """RSS of ``pid`` at ``fraction`` of the run (the sample nearest to it)."""
        mine = [(t, v) for t, p, v in self.series if p == pid]
        if not mine:
            return 0
        start, end = mine[0][0], mine[-1][0]
        return min(mine, key=lambda tv: abs(tv[0] - (start + fraction * (end - start))))[1]


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * KiB
    return 0


def tcp_ports_by_inode() -> dict[str, tuple[int, int]]:
    """socket inode -> (local port, remote port), from /proc/net/tcp{,6}."""
    out = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(name).read_text().splitlines()[1:]:
            cols = line.split()
            out[cols[9]] = (int(cols[1].rsplit(":", 1)[1], 16), int(cols[2].rsplit(":", 1)[1], 16))
    return out


def fd_kinds(pid: int, spool: str, ports: dict[str, int]) -> Counter[str]:
    """Open descriptors by what they are: spool file, client/backend/redis socket, other."""
    tcp = tcp_ports_by_inode()
    kinds: Counter[str] = Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        kind = "other"
        if target.startswith(spool):
            kind = "spool"
        elif target.startswith("socket:["):
            local, remote = tcp.get(target[8:-1], (0, 0))
            kind = next((k for k, p in ports.items() if p in (remote, local)), "socket-other")
            if kind == "gateway" and remote == 0:
                kind = "listening"
        kinds[kind] += 1
    return kinds


def workers_of(gateway: Proc) -> list[int]:
    return sorted(p for p in gateway.descendants() if "spawn_main" in cmdline(p))


# -- the checks -------------------------------------------------------------------------------


def verify(results: list[Sent], records: dict[str, list[Any]]) -> list[str]:
    """Every accepted body arrived intact; nothing else arrived at all."""
    problems = []
    for s in results:
        got = records.get(s.rid)
        if s.case.status == 200:
            if s.status != 200:
                problems.append(f"{s.rid} {s.case.name}: {s.status} {s.code} {s.error}")
            elif got != [s.length, s.sha256]:
                problems.append(f"{s.rid} {s.case.name}: backend got {got}, sent {s.length}")
            continue
        if got is not None:
            problems.append(f"{s.rid} {s.case.name}: refused/aborted, yet the backend got {got}")
        if s.case.status and (s.status != s.case.status or s.code not in s.case.codes):
            problems.append(f"{s.rid} {s.case.name}: got {s.status} {s.code} {s.error}")
    unknown = set(records) - {s.rid for s in results if s.case.status == 200}
    if unknown:
        problems.append(f"the backend got requests nobody sent as accepted: {sorted(unknown)[:5]}")
    return problems


def check_gateway(admin: int, spool: Path, gateway: Proc) -> list[str]:
    """At idle the gateway's own gauges read zero and the spool dir is empty; no worker died."""
    problems = []
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10).read().decode()
    for gauge in ("upload_gateway_inflight_uploads", "upload_gateway_spool_bytes"):
        values = [
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(gauge) and not line.startswith("#")
        ]
        if sum(values) != 0:
            problems.append(f"{gauge} reads {sum(values)} at idle")
    if list(spool.iterdir()):
        problems.append(f"spool dir not empty: {sorted(p.name for p in spool.iterdir())[:5]}")
    if "restarting" in gateway.log.read_text(errors="replace"):
        problems.append("a worker died and was restarted during the run")
    return problems


def check_workers(
    before: dict[int, tuple[int, Counter[str]]],
    after: dict[int, tuple[int, Counter[str]]],
    config: dict[str, Any],
) -> list[str]:
    """Leaks show at idle: compare each worker's descriptors and RSS with its idle baseline."""
    problems = []
    for pid, (rss_end, kinds_end) in after.items():
        rss_start, kinds_start = before[pid]
        if kinds_end["spool"]:
            problems.append(f"worker {pid}: {kinds_end['spool']} spool descriptors still open")
        if kinds_end["gateway"]:
            problems.append(f"worker {pid}: {kinds_end['gateway']} client connections still open")
        for kind in ("other", "socket-other", "listening"):
            if kinds_end[kind] > kinds_start[kind]:
                problems.append(
                    f"worker {pid}: {kind} descriptors {kinds_start[kind]} -> {kinds_end[kind]}"
                )
        pools = config["backend"].get("pool_size", 256), config["redis"].get("pool_size", 50)
        if kinds_end["backend"] > pools[0] or kinds_end["redis"] > pools[1]:
            problems.append(f"worker {pid}: pools over their limits: {dict(kinds_end)}")
        if rss_end > rss_start * 1.15 + 16 * MiB:
            problems.append(
                f"worker {pid}: RSS grew {rss_start / MiB:.0f} -> {rss_end / MiB:.0f} MiB"
            )
    return problems
