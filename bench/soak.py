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

# -- the sink: records SHA-256 and length per X-Request-Id -----------------------------------------


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


# -- the mix ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One request shape: ``status``/``codes`` expected; ``raw`` ones go over a bare socket."""

    name: str
    weight: float
    status: int
    codes: frozenset[str] = frozenset()
    raw: str = ""  # "", "head-only", "stall", "abort"
    bodies: tuple[tuple[str, str, bytes, str], ...] = ()  # (path, secret, body, content type)


@dataclass
class Secrets:
    agent: str
    customer: str
    revoked: str

    @property
    def forged(self) -> str:
        head, payload, sig = self.customer.split(".")
        return f"{head}.{payload}.{sig[::-1]}"


def part(kind: str, size: int | None = None, name: str | None = None, field: str = "file",
         ctype: str | None = None) -> tuple[str, str | None, str | None, bytes]:
    names = {"png": "p.png", "jpeg": "p.jpg", "pdf": "d.pdf", "docx": "l.docx", "zip": "b.zip",
             "gif": "a.gif", "mp4": "c.mp4", "ogg": "v.ogg", "elf": "tool", "pe": "setup.exe"}
    return (field, name or names[kind], ctype, make(kind, size))


def build_cases(s: Secrets, rng: random.Random) -> list[Case]:
    up = "/streams/{}/objects"

    def variants(secret: str, path: str, make_parts: Any, n: int = 6) -> tuple[Any, ...]:
        out = []
        for _ in range(n):
            body, ctype = multipart(make_parts())
            out.append((path, secret, body, ctype))
        return tuple(out)

    ok = "accepted"
    manager = ("data", None, "application/json", b'{"IsManager": true}')
    return [
        Case(f"{ok} png (1-300 KiB)", 20, 200, bodies=variants(
            s.customer, up.format(4711), lambda: [part("png", rng.randint(KiB, 300 * KiB))])),
        Case(f"{ok} jpeg (<64 KiB, in memory)", 12, 200, bodies=variants(
            s.customer, up.format("4712"), lambda: [part("jpeg", rng.randint(KiB, 60 * KiB))])),
        Case(f"{ok} pdf (0.5-3 MiB, disk spool)", 8, 200, bodies=variants(
            s.customer, up.format("big"), lambda: [part("pdf", rng.randint(MiB // 2, 3 * MiB))])),
        Case(f"{ok} docx + zip (agent)", 8, 200, bodies=variants(
            s.agent, up.format("4713") + "/9/child",
            lambda: [part("docx"), part("zip", rng.randint(4 * KiB, 200 * KiB))])),
        Case(f"{ok} 3 files, IsManager marker", 6, 200, bodies=variants(
            s.customer, up.format("4714"),
            lambda: [manager, part("png"), part("pdf", rng.randint(KiB, 100 * KiB)), part("gif")])),
        Case(f"{ok} whatsapp mp4 + ogg (agent)", 6, 200, bodies=variants(
            s.agent, "/whatsapp/uploadmedia/whatsapp",
            lambda: [part("mp4", rng.randint(KiB, 500 * KiB), field="pic"), part("ogg", field="pic")])),
        Case("413 file_too_large", 5, 413, frozenset({"file_too_large"}), bodies=variants(
            s.customer, up.format("small"), lambda: [part("png", rng.randint(65 * KiB, 90 * KiB))])),
        Case("413 too_many_files", 3, 413, frozenset({"too_many_files"}), bodies=variants(
            s.customer, up.format(1), lambda: [part("png", name=f"{i}.png") for i in range(11)], 1)),
        Case("415 type_not_allowed", 5, 415, frozenset({"type_not_allowed"}), bodies=variants(
            s.customer, up.format(2), lambda: [part("docx")], 1)),
        Case("415 type_mismatch (ELF as invoice.pdf)", 5, 415, frozenset({"type_mismatch"}),
             bodies=variants(s.agent, up.format(3),
                             lambda: [part("elf", name="invoice.pdf", ctype="application/pdf")], 1)),
        Case("415 executable", 3, 415, frozenset({"type_not_allowed", "type_mismatch"}),
             bodies=variants(s.agent, up.format(4), lambda: [part("pe")], 1)),
        Case("403 uploads_disabled", 3, 403, frozenset({"uploads_disabled"}), bodies=variants(
            s.customer, "/whatsapp/uploadmedia/whatsapp", lambda: [part("png", field="pic")], 1)),
        Case("403 key_not_active (revoked)", 3, 403, frozenset({"key_not_active"}), bodies=variants(
            s.revoked, up.format(5), lambda: [part("png")], 1)),
        Case("401 missing_secret", 2, 401, frozenset({"missing_secret"}), bodies=variants(
            "", up.format(6), lambda: [part("png")], 1)),
        Case("401 invalid_secret", 2, 401, frozenset({"invalid_secret"}), bodies=variants(
            s.forged, up.format(7), lambda: [part("png")], 1)),
        Case("400 malformed_request", 2, 400, frozenset({"malformed_request"}), bodies=tuple(
            (up.format(8), s.customer, b"--x\r\nnot a part", "multipart/form-data") for _ in [0])),
        Case("413 request_too_large (headers only)", 2, 413, frozenset({"request_too_large"}),
             raw="head-only", bodies=variants(s.customer, up.format(9), lambda: [part("png")], 1)),
        Case("408 body_timeout (client stalls)", 0.3, 408, frozenset({"body_timeout"}), raw="stall",
             bodies=variants(s.customer, up.format(10), lambda: [part("pdf", 200 * KiB)], 1)),
        Case("aborted mid-body (RST)", 1.5, 0, raw="abort", bodies=variants(
            s.customer, up.format(11), lambda: [part("pdf", rng.randint(100 * KiB, 2 * MiB))], 3)),
    ]


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


SHA: dict[int, str] = {}


def sha_of(body: bytes) -> str:
    key = id(body)
    if key not in SHA:
        SHA[key] = hashlib.sha256(body).hexdigest()
    return SHA[key]


async def send(session: aiohttp.ClientSession, port: int, case: Case, rid: str,
               rng: random.Random) -> Sent:
    path, secret, body, ctype = rng.choice(case.bodies)
    sent = Sent(rid, case, sha_of(body), len(body))
    headers = {"Content-Type": ctype, "X-Request-Id": rid}
    if secret:
        headers["Authorization"] = f"Bearer {secret}"
    try:
        if case.raw:
            sent.status, sent.code = await send_raw(port, case.raw, path, headers, body)
        else:
            async with session.post(f"http://127.0.0.1:{port}{path}", data=body,
                                    headers=headers) as r:
                doc = json.loads(await r.read() or b"{}")
                sent.status, sent.code = r.status, doc.get("code")
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
        sent.error = type(exc).__name__
    return sent


async def send_raw(port: int, mode: str, path: str, headers: dict[str, str],
                   body: bytes) -> tuple[int, str | None]:
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
        data = await asyncio.wait_for(reader.read(), BODY_TIMEOUT + 10)
        head_bytes, _, payload = data.partition(b"\r\n\r\n")
        return int(head_bytes.split(b" ", 2)[1]), json.loads(payload).get("code")
    finally:
        writer.close()


async def run_phase(port: int, cases: list[Case], count: int, concurrency: int, first_rid: int,
                    rng: random.Random) -> list[Sent]:
    weights = [c.weight for c in cases]
    plan = rng.choices(cases, weights, k=count)
    results: list[Sent] = []
    queue = iter(enumerate(plan, start=first_rid))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:

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
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.wait(0.25):
            for pid in self.pids:
                self.peak[pid] = max(self.peak.get(pid, 0), rss(pid))


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


def key_secret(config_path: Path, client: str, role: str) -> tuple[str, str]:
    out = json.loads(cli(config_path, "keys", "add", "--client", client, "--json").stdout)
    secret = cli(config_path, "secret", "mint", "--api-key", out["api_key"], "--ttl", "2h",
                 "--claim", f"role={role}").stdout.strip()
    return out["key_id"], secret


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
    stack.start("soak-sink", [sys.executable, "-m", "bench.soak", "--sink", str(sink_port)],
                sink_port)
    spool = work / "spool"
    config = soak_config(stack.redis_url, f"http://127.0.0.1:{sink_port}", spool)
    config_path = work / "soak.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    port = int(config["listen"].rsplit(":", 1)[1])
    admin = int(config["admin_listen"].rsplit(":", 1)[1])
    gateway = stack.start("soak-gateway", gateway_command(
        "serve", "--config", str(config_path), "--workers", str(args.workers)), port,
        env={"GATEWAY_SIGNING_KEY": SIGNING_KEY})
    wait_for_port(admin)
    wait_ready(f"http://127.0.0.1:{admin}/readyz")
    _, agent = key_secret(config_path, "soak-agent", "agent")
    _, customer = key_secret(config_path, "soak-customer", "customer")
    revoked_id, revoked = key_secret(config_path, "soak-revoked", "customer")
    cli(config_path, "keys", "revoke", revoked_id)
    rng = random.Random(args.seed)
    cases = build_cases(Secrets(agent, customer, revoked), rng)
    pids = workers_of(gateway)
    assert len(pids) == args.workers, f"expected {args.workers} workers, found {pids}"
    ports = {"gateway": port, "backend": sink_port, "redis": stack.redis.port if stack.redis else 0}

    def snapshot() -> dict[int, tuple[int, Counter[str]]]:
        time.sleep(3)  # let closed connections and released spools settle
        return {pid: (rss(pid), fd_kinds(pid, str(spool), ports)) for pid in pids}

    asyncio.run(run_phase(port, cases, args.warmup, args.concurrency, 0, rng))
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
    with aiohttp_get(f"http://127.0.0.1:{sink_port}/_soak/records") as records:
        problems = verify(results, records)
    problems += check_workers(before, after, config)
    write_report(args, results, records, before, after, watch.peak, elapsed, problems,
                 time.monotonic() - started)
    print(args.out.read_text())
    return 1 if problems else 0


class aiohttp_get:  # noqa: N801 - reads like the context manager it is
    """A tiny blocking GET of a JSON document (the sink's records)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def __enter__(self) -> dict[str, list[Any]]:
        import urllib.request

        with urllib.request.urlopen(self.url, timeout=30) as r:
            return dict(json.loads(r.read()))

    def __exit__(self, *_: object) -> None:
        return None


def check_workers(before: dict[int, tuple[int, Counter[str]]],
                  after: dict[int, tuple[int, Counter[str]]], config: dict[str, Any]) -> list[str]:
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
                problems.append(f"worker {pid}: {kind} descriptors {kinds_start[kind]} -> "
                                f"{kinds_end[kind]}")
        if kinds_end["backend"] > 256 or kinds_end["redis"] > 50:
            problems.append(f"worker {pid}: pools over their limits: {dict(kinds_end)}")
        if rss_end > rss_start * 1.15 + 16 * MiB:
            problems.append(f"worker {pid}: RSS grew {rss_start / MiB:.0f} -> {rss_end / MiB:.0f} MiB")
    return problems


def write_report(args: argparse.Namespace, results: list[Sent], records: dict[str, list[Any]],
                 before: dict[int, tuple[int, Counter[str]]],
                 after: dict[int, tuple[int, Counter[str]]], peak: dict[int, int],
                 elapsed: float, problems: list[str], total: float) -> None:
    by_case: dict[str, Counter[str]] = {}
    for s in results:
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
        "| case | sent | outcomes |",
        "|---|---:|---|",
    ]
    for name, outcomes in by_case.items():
        text = ", ".join(f"{k}: {v:,}" for k, v in outcomes.most_common())
        lines.append(f"| {name} | {sum(outcomes.values()):,} | {text} |")
    lines += ["", "Per worker, idle before and after the run (3 s after the traffic stopped):", "",
              "| worker | RSS start | RSS peak | RSS end | fds start | fds end | spool fds end |",
              "|---|---:|---:|---:|---|---|---:|"]
    for pid, (rss_end, kinds_end) in after.items():
        rss_start, kinds_start = before[pid]
        lines.append(
            f"| {pid} | {rss_start / MiB:.1f} MiB | {peak.get(pid, 0) / MiB:.1f} MiB | "
            f"{rss_end / MiB:.1f} MiB | {_kinds(kinds_start)} | {_kinds(kinds_end)} | "
            f"{kinds_end['spool']} |")
    lines += ["", "Problems:" if problems else "Problems: none.", ""]
    lines += [f"- {p}" for p in problems[:50]]
    args.out.write_text("\n".join(lines) + "\n")


def _kinds(kinds: Counter[str]) -> str:
    return f"{sum(kinds.values())} (" + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) + ")"


if __name__ == "__main__":
    raise SystemExit(main())
