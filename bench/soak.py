"""``make soak``: a bounded run of mixed uploads against ``serve --workers 2`` (issue 7).

    .venv/bin/python -m bench.soak                    # 10,000 requests after a 1,000 warm-up
    .venv/bin/python -m bench.soak --requests 2000    # a quicker look

Starts Redis, a recording sink and the real gateway; from this (separate) process sends accepted
uploads of several types and sizes (memory and encrypted-disk spools), every kind of refusal and
a few clients that vanish mid-body, 32 at a time, over loopback. Then it proves, and writes to
``bench/SOAK.md``: every accepted body reached the sink byte-identical (SHA-256 per request id),
no refused or aborted request reached it at all, no spool descriptor is open, each worker's
descriptors are back to their idle baseline, and each worker's RSS is flat. Exit 1 if not.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import socket
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from bench.stack import BENCH, Proc, Stack, cmdline, wait_ready
from tests.support.files import make, multipart
from tests.support.gateway_proc import SIGNING_KEY, base_config, cli
from tests.support.procs import free_port, gateway_command, wait_for_port

KiB, MiB = 1024, 1024 * 1024
BODY_TIMEOUT = 2.0

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
    app.router.add_route("*", "/{tail:.*}", receive)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# -- the mix ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class P:
    """One multipart part: a real ``kind`` file padded to a random size in ``[lo, hi]``."""

    kind: str
    lo: int = 0
    hi: int = 0
    name: str | None = None
    field: str = "file"
    ctype: str | None = None

    def build(self, rng: random.Random) -> tuple[str, str | None, str | None, bytes]:
        if self.kind == "data":  # the platform's role marker, not a file
            return ("data", None, "application/json", b'{"IsManager": true}')
        size = rng.randint(self.lo, self.hi) if self.hi else None
        return (self.field, self.name or f"f.{self.kind}", self.ctype, make(self.kind, size))


@dataclass(frozen=True)
class Case:
    """One request shape: ``status``/``codes`` expected; ``raw`` ones go over a bare socket."""

    name: str
    weight: float
    status: int  # 200: accepted; 0: an aborted client (no answer expected)
    codes: frozenset[str]
    raw: str  # "", "head-only" (Content-Length 60 MiB), "stall" (half, then silence), "abort"
    bodies: tuple[tuple[str, str, bytes, str], ...]  # (path, secret, body, content type)


UP, WA = "/streams/{}/objects", "/whatsapp/uploadmedia/whatsapp"
EXE = "type_not_allowed type_mismatch"
# fmt: off
MIX = [  # name, weight, status, codes, raw, who, path, parts, variants
    ("accepted png 1-300 KiB", 20, 200, "", "", "customer", UP.format(4711), [P("png", KiB, 300 * KiB)], 6),  # noqa: E501
    ("accepted jpeg < 64 KiB (memory spool)", 12, 200, "", "", "customer", UP.format(4712), [P("jpeg", KiB, 60 * KiB)], 6),  # noqa: E501
    ("accepted pdf 0.5-3 MiB (disk spool)", 8, 200, "", "", "customer", UP.format("big"), [P("pdf", MiB // 2, 3 * MiB)], 6),  # noqa: E501
    ("accepted docx + zip (agent, /child)", 8, 200, "", "", "agent", UP.format(4713) + "/9/child", [P("docx"), P("zip", 4 * KiB, 200 * KiB)], 6),  # noqa: E501
    ("accepted 3 files, IsManager marker", 6, 200, "", "", "plain", UP.format(4714), [P("data"), P("png"), P("pdf", KiB, 100 * KiB), P("gif")], 6),  # noqa: E501
    ("accepted whatsapp mp4 + ogg (agent)", 6, 200, "", "", "agent", WA, [P("mp4", KiB, 500 * KiB, field="pic"), P("ogg", field="pic")], 6),  # noqa: E501
    ("413 file_too_large", 5, 413, "file_too_large", "", "customer", UP.format("small"), [P("png", 65 * KiB, 90 * KiB)], 6),  # noqa: E501
    ("413 too_many_files", 3, 413, "too_many_files", "", "customer", UP.format(1), [P("png")] * 11, 1),  # noqa: E501
    ("413 request_too_large (headers only)", 2, 413, "request_too_large", "head-only", "customer", UP.format(9), [P("png")], 1),  # noqa: E501
    ("415 type_not_allowed", 5, 415, "type_not_allowed", "", "customer", UP.format(2), [P("docx")], 1),  # noqa: E501
    ("415 type_mismatch (ELF as invoice.pdf)", 5, 415, "type_mismatch", "", "agent", UP.format(3), [P("elf", name="invoice.pdf", ctype="application/pdf")], 1),  # noqa: E501
    ("415 executable (PE)", 3, 415, EXE, "", "agent", UP.format(4), [P("pe", name="setup.exe")], 1),
    ("403 uploads_disabled", 3, 403, "uploads_disabled", "", "customer", WA, [P("png", field="pic")], 1),  # noqa: E501
    ("403 key_not_active (revoked key)", 3, 403, "key_not_active", "", "revoked", UP.format(5), [P("png")], 1),  # noqa: E501
    ("401 missing_secret", 2, 401, "missing_secret", "", "nobody", UP.format(6), [P("png")], 1),
    ("401 invalid_secret (forged signature)", 2, 401, "invalid_secret", "", "forged", UP.format(7), [P("png")], 1),  # noqa: E501
    ("400 malformed_request (no boundary)", 2, 400, "malformed_request", "", "customer", UP.format(8), [], 1),  # noqa: E501
    ("408 body_timeout (client stalls)", 0.3, 408, "body_timeout", "stall", "customer", UP.format(10), [P("pdf", 200 * KiB, 200 * KiB)], 1),  # noqa: E501
    ("aborted mid-body (RST)", 1.5, 0, "", "abort", "customer", UP.format(11), [P("pdf", 100 * KiB, 2 * MiB)], 3),  # noqa: E501
]
# fmt: on


def build_cases(secrets: dict[str, str], rng: random.Random) -> list[Case]:
    cases = []
    for name, weight, status, codes, raw, who, path, parts, count in MIX:
        bodies = []
        for _ in range(count):
            if parts:
                body, ctype = multipart([p.build(rng) for p in parts])
            else:
                body, ctype = b"--x\r\nnot a part", "multipart/form-data"
            bodies.append((path, secrets[who], body, ctype))
        cases.append(Case(name, weight, status, frozenset(codes.split()), raw, tuple(bodies)))
    return cases


# -- sending ----------------------------------------------------------------------------------


@dataclass
class Sent:
    rid: str
    case: Case
    sha256: str
    length: int
    status: int = 0
    code: str | None = None
    error: str = ""
    seconds: float = 0.0


SHA: dict[int, str] = {}


def sha_of(body: bytes) -> str:
    key = id(body)
    if key not in SHA:
        SHA[key] = hashlib.sha256(body).hexdigest()
    return SHA[key]


async def send(
    session: aiohttp.ClientSession, port: int, case: Case, rid: str, rng: random.Random
) -> Sent:
    path, secret, body, ctype = rng.choice(case.bodies)
    sent = Sent(rid, case, sha_of(body), len(body))
    headers = {"Content-Type": ctype, "X-Request-Id": rid}
    if secret:
        headers["Authorization"] = f"Bearer {secret}"
    started = time.monotonic()
    try:
        if case.raw:
            sent.status, sent.code = await send_raw(port, case.raw, path, headers, body)
        else:
            async with session.post(
                f"http://127.0.0.1:{port}{path}", data=body, headers=headers
            ) as r:
                doc = json.loads(await r.read() or b"{}")
                sent.status, sent.code = r.status, doc.get("code")
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
        sent.error = type(exc).__name__
    sent.seconds = time.monotonic() - started
    return sent


async def send_raw(
    port: int, mode: str, path: str, headers: dict[str, str], body: bytes
) -> tuple[int, str | None]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    length = 60 * MiB if mode == "head-only" else len(body)
    head = f"POST {path} HTTP/1.1\r\nHost: soak\r\nContent-Length: {length}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    try:
        writer.write(head.encode() + (b"" if mode == "head-only" else body[: len(body) // 2]))
        await writer.drain()
        if mode == "abort":
            await asyncio.sleep(0.02)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            writer.transport.abort()
            return 0, None
        return await asyncio.wait_for(read_problem(reader), BODY_TIMEOUT + 10)
    finally:
        writer.close()


async def read_problem(reader: asyncio.StreamReader) -> tuple[int, str | None]:
    """Status and ``code`` of one response, read by its Content-Length (not to EOF: after a
    refusal aiohttp keeps the connection open for a lingering read of the unsent body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    payload = await reader.readexactly(length)
    return int(head.split(b" ", 2)[1]), json.loads(payload or b"{}").get("code")


async def run_phase(
    port: int, cases: list[Case], count: int, concurrency: int, first_rid: int, rng: random.Random
) -> list[Sent]:
    weights = [c.weight for c in cases]
    plan = rng.choices(cases, weights, k=count)
    results: list[Sent] = []
    queue = iter(enumerate(plan, start=first_rid))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=60)
    ) as session:

        async def worker() -> None:
            for i, case in queue:
                results.append(await send(session, port, case, f"soak-{i:06d}", rng))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


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


# -- the run ----------------------------------------------------------------------------------


def soak_config(redis_url: str, sink_url: str, spool: Path) -> dict[str, Any]:
    config = base_config(redis_url, sink_url, spool)
    config["spool"].update(memory_threshold="64KiB", max_bytes="1GiB")
    config["server"].update(body_timeout=f"{BODY_TIMEOUT:g}s")
    config["backend"]["read_timeout"] = "30s"
    config["channels"]["small"] = {
        "agents": {"max_file_size": "64KiB", "allowed_types": ["images"]},
        "customers": {"max_file_size": "64KiB", "allowed_types": ["images"]},
    }
    config["log_level"] = "WARNING"
    return config


def key_secret(config_path: Path, client: str, *roles: str) -> tuple[str, list[str]]:
    """A new key, and one Secret for it per role ("" for a Secret without a role claim)."""
    out = json.loads(cli(config_path, "keys", "add", "--client", client, "--json").stdout)
    secrets = []
    for role in roles:
        claim = ["--claim", f"role={role}"] if role else []
        secrets.append(
            cli(
                config_path, "secret", "mint", "--api-key", out["api_key"], "--ttl", "2h", *claim
            ).stdout.strip()
        )
    return out["key_id"], secrets


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--warmup", type=int, default=1_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=BENCH / "SOAK.md")
    parser.add_argument("--sink", type=int, help=argparse.SUPPRESS)  # internal: run the sink
    args = parser.parse_args()
    if args.sink:
        run_sink(args.sink)
        return 0
    work = BENCH / "work" / "soak"
    work.mkdir(parents=True, exist_ok=True)
    stack = Stack(work)
    try:
        return soak(stack, work, args)
    finally:
        stack.close()


def soak(stack: Stack, work: Path, args: argparse.Namespace) -> int:
    started = time.monotonic()
    stack.start_redis()
    sink_port = free_port()
    stack.start(
        "soak-sink", [sys.executable, "-m", "bench.soak", "--sink", str(sink_port)], sink_port
    )
    spool = work / "spool"
    config = soak_config(stack.redis_url, f"http://127.0.0.1:{sink_port}", spool)
    config_path = work / "soak.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    port = int(config["listen"].rsplit(":", 1)[1])
    admin = int(config["admin_listen"].rsplit(":", 1)[1])
    gateway = stack.start(
        "soak-gateway",
        gateway_command("serve", "--config", str(config_path), "--workers", str(args.workers)),
        port,
        env={"GATEWAY_SIGNING_KEY": SIGNING_KEY},
    )
    wait_for_port(admin)
    wait_ready(f"http://127.0.0.1:{admin}/readyz")
    _, (agent, customer, plain) = key_secret(config_path, "soak", "agent", "customer", "")
    revoked_id, (revoked,) = key_secret(config_path, "soak-revoked", "customer")
    cli(config_path, "keys", "revoke", revoked_id)
    head, payload, signature = customer.split(".")
    secrets = {
        "agent": agent,
        "customer": customer,
        "plain": plain,
        "revoked": revoked,
        "forged": f"{head}.{payload}.{signature[::-1]}",
        "nobody": "",
    }
    rng = random.Random(args.seed)
    cases = build_cases(secrets, rng)
    pids = workers_of(gateway)
    assert len(pids) == args.workers, f"expected {args.workers} workers, found {pids}"
    ports = {"gateway": port, "backend": sink_port, "redis": stack.redis.port if stack.redis else 0}

    def snapshot() -> dict[int, tuple[int, Counter[str]]]:
        time.sleep(3)  # let closed connections and released spools settle
        return {pid: (rss(pid), fd_kinds(pid, str(spool), ports)) for pid in pids}

    warmup = asyncio.run(run_phase(port, cases, args.warmup, args.concurrency, 0, rng))
    before = snapshot()
    watch = Watch(pids)
    thread = threading.Thread(target=watch.run, daemon=True)
    thread.start()
    t0 = time.monotonic()
    results = asyncio.run(run_phase(port, cases, args.requests, args.concurrency, args.warmup, rng))
    elapsed = time.monotonic() - t0
    watch.stop.set()
    thread.join()
    after = snapshot()
    records = get_json(f"http://127.0.0.1:{sink_port}/_soak/records")
    problems = verify(warmup + results, records)
    problems += check_workers(before, after, config)
    problems += check_gateway(admin, spool, gateway)
    write_report(
        args, results, records, before, after, watch, elapsed, problems, time.monotonic() - started
    )
    print(args.out.read_text())
    return 1 if problems else 0


def get_json(url: str) -> dict[str, list[Any]]:
    """A blocking GET of a JSON document (the sink's records), after the load has stopped."""
    with urllib.request.urlopen(url, timeout=30) as r:
        return dict(json.loads(r.read()))


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


def write_report(
    args: argparse.Namespace,
    results: list[Sent],
    records: dict[str, list[Any]],
    before: dict[int, tuple[int, Counter[str]]],
    after: dict[int, tuple[int, Counter[str]]],
    watch: Watch,
    elapsed: float,
    problems: list[str],
    total: float,
) -> None:
    by_case: dict[str, Counter[str]] = {}
    times: dict[str, list[float]] = {}
    for s in results:
        times.setdefault(s.case.name, []).append(s.seconds * 1000)
        outcome = f"{s.status} {s.code or ''}".strip() if s.status else (s.error or "aborted")
        by_case.setdefault(s.case.name, Counter())[outcome] += 1
    accepted = [s for s in results if s.case.status == 200]
    lines = [
        "# Soak run",
        "",
        f"Produced by `python -m bench.soak --requests {args.requests} --concurrency "
        f"{args.concurrency} --workers {args.workers}` on "
        f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} ({total:.0f} s in all). "
        f"Loopback only; the harness, sink, Redis and gateway share nproc={os.cpu_count()} CPUs.",
        "",
        f"**Verdict: {'PASS' if not problems else 'FAIL'}.** {len(results):,} requests (after "
        f"{args.warmup:,} warm-up) in {elapsed:.1f} s ({len(results) / elapsed:,.0f} req/s); "
        f"{len(accepted):,} accepted uploads, {sum(s.length for s in accepted) / MiB:,.0f} MiB "
        f"verified by SHA-256 at the backend; the backend holds {len(records):,} records in all "
        "(warm-up included) and none for a refused or aborted request.",
        "",
        "| case | sent | outcomes | p50 ms | p99 ms |",
        "|---|---:|---|---:|---:|",
    ]
    order = [row[0] for row in MIX]
    for name, outcomes in sorted(by_case.items(), key=lambda item: order.index(item[0])):
        text = ", ".join(f"{k}: {v:,}" for k, v in outcomes.most_common())
        ms = sorted(times[name])
        p50, p99 = ms[len(ms) // 2], ms[min(len(ms) - 1, int(len(ms) * 0.99))]
        lines.append(f"| {name} | {sum(outcomes.values()):,} | {text} | {p50:.0f} | {p99:.0f} |")
    lines += [
        "",
        "Per worker, idle before and after the run (3 s after the traffic stopped):",
        "",
        "| worker | RSS start | RSS 25% / 50% / 75% of run | RSS peak | RSS end | fds start "
        "| fds end | spool fds end |",
        "|---|---:|---:|---:|---:|---|---|---:|",
    ]
    for pid, (rss_end, kinds_end) in after.items():
        rss_start, kinds_start = before[pid]
        lines.append(
            f"| {pid} | {rss_start / MiB:.1f} MiB | "
            f"{' / '.join(f'{watch.at(pid, f) / MiB:.1f}' for f in (0.25, 0.5, 0.75))} MiB | "
            f"{watch.peak.get(pid, 0) / MiB:.1f} MiB | "
            f"{rss_end / MiB:.1f} MiB | {_kinds(kinds_start)} | {_kinds(kinds_end)} | "
            f"{kinds_end['spool']} |"
        )
    lines += [
        "",
        "Checks (any failure is listed below and makes `make soak` exit 1): every accepted "
        "upload answered 200 and its body reached the backend with the same length and SHA-256 "
        "(looked up by X-Request-Id); every refusal answered its status and problem `code`; no "
        "refused or aborted request reached the backend at all, nor any request id not sent as "
        "accepted; at idle after the run: no spool descriptor open, `spool.dir` empty, the "
        "`inflight_uploads` and `spool_bytes` gauges at 0, no client connection left, pipes, "
        "eventfds and other descriptors back to the idle baseline, backend and Redis pools "
        "within their limits, no worker restarted, RSS at most 15 % + 16 MiB above the idle "
        "baseline taken after the warm-up (allocator warm-up is a step at the start; a leak "
        "grows with the request count).",
    ]
    lines += ["", "Problems:" if problems else "Problems: none.", ""]
    lines += [f"- {p}" for p in problems[:50]]
    args.out.write_text("\n".join(lines) + "\n")


def _kinds(kinds: Counter[str]) -> str:
    return (
        f"{sum(kinds.values())} (" + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) + ")"
    )


if __name__ == "__main__":
    raise SystemExit(main())
