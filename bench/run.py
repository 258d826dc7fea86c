"""``make bench``: the gateway against nginx peers, alternately, in one run (issue 6).

    .venv/bin/python -m bench.run              # the full run (~15 min), writes bench/results.*
    .venv/bin/python -m bench.run --quick      # 1 short repetition, writes bench/work/results.*
    .venv/bin/python -m bench.run --peers nginx-buffered,nginx-auth --no-profile

Starts redis-server, the sink (bench/sink.py), the auth service (bench/auth_service.py), every
gateway variant and both nginx peers at once (idle peers cost nothing), checks each with one real
upload, then loops: for each repetition, for each cell (body size x connections), every peer in
a rotating order. Medians over repetitions go to the report. Afterwards: refusal latency, py-spy
profiles of a single gateway worker. Every process is stopped at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import yaml

from bench import load, peers, probes, profiling, report, report_figures
from bench.payloads import CONTENT_TYPE, Body, write_bodies
from bench.stack import BENCH, Stack

CORE_PEERS = ("gateway-w2", "nginx-buffered", "nginx-auth", "gateway-w1")
DURATIONS = {"10KB": 3.0, "1MB": 5.0, "20MB": 8.0}
BIG_CELL_SECONDS = 20.0  # 20MB/c64


@dataclass(frozen=True)
class Cell:
    size: str
    conns: int
    duration: float
    peers: tuple[str, ...]
    reps: int

    @property
    def key(self) -> str:
        return f"{self.size}/c{self.conns}"


def plan(args: argparse.Namespace, available: set[str]) -> list[Cell]:
    """Core peers in every cell; pass-through at 16 conns; the access-log variant on 10KB/1MB.

    20MB/c64 keeps 1.3 GB in flight: a round of 64 uploads takes the gateway 5-20 s here, so it
    runs once, for longer, instead of three short runs that would mostly count nothing.
    """
    cells = []
    for size in args.sizes:
        for conns in args.conns:
            wanted = list(CORE_PEERS)
            if conns == 16:
                wanted.append("gateway-pass-w2")
            if (size, conns) in (("10KB", 16), ("10KB", 64), ("1MB", 16)):
                wanted.append("gateway-info-w2")
            chosen = tuple(p for p in wanted if p in available)
            if not chosen:
                continue
            duration, reps = DURATIONS[size], args.reps
            if (size, conns) == ("20MB", 64):
                duration, reps = BIG_CELL_SECONDS, 1
            cells.append(Cell(size, conns, duration * args.scale, chosen, reps))
    return cells


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem = int(Path("/proc/meminfo").read_text().split()[1]) / 1048576
    tools = {
        "nginx": _version(["nginx", "-v"]),
        "wrk": _version(["wrk", "-v"]).split(" [")[0],
        "redis": _version(["redis-server", "--version"]).split(" sha")[0],
        "python": platform.python_version(),
    }
    tools.update({name: importlib.metadata.version(name) for name in ("aiohttp", "uvloop")})
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "mem_gib": round(mem, 1),
        "kernel": platform.release(),
        "versions": ", ".join(f"{k} {v}" for k, v in tools.items()),
    }


def _version(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True)
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0].replace("nginx version: ", "") if text else "?"


def start_peers(stack: Stack, names: list[str], skipped: dict[str, str]) -> dict[str, peers.Peer]:
    stack.start_redis()
    sink = stack.start_sink()
    sink_url = f"http://127.0.0.1:{sink.port}"
    started: dict[str, peers.Peer] = {}
    auth_port = 0
    if "nginx-auth" in names:
        auth = stack.start_auth_service(stack.redis_url, peers.KEY_PREFIX, peers.SIGNING_KEY)
        auth_port = auth.port
    for name in names:
        try:
            if name in peers.VARIANTS:
                started[name] = peers.start_gateway(
                    stack, peers.VARIANTS[name], stack.redis_url, sink_url
                )
            else:
                started[name] = peers.start_nginx(stack, name, sink.port, auth_port)
        except RuntimeError as exc:
            skipped[name] = str(exc)[-600:]
            print(f"! {name} did not start: {str(exc)[-300:]}", flush=True)
    return started


def check_peers(
    started: dict[str, peers.Peer], bodies: dict[str, Body], secret: str, skipped: dict[str, str]
) -> None:
    """Drop a peer that cannot move one real upload of each size to the sink intact."""
    for name, peer in list(started.items()):
        for body in bodies.values():
            problem = probes.preflight(peer, body, secret)
            if problem:
                skipped[name] = f"preflight {body.label}: {problem}"
                print(f"! {name}: {skipped[name]}", flush=True)
                del started[name]
                break


def run_matrix(cells: list[Cell], ready: Prepared) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    total = sum(len(c.peers) * c.reps for c in cells)
    for rep in range(max(c.reps for c in cells)):
        for index, cell in enumerate(cells):
            if rep >= cell.reps:
                continue
            order = [p for p in cell.peers if p in ready.started]
            shift = (rep + index) % max(len(order), 1)
            for name in order[shift:] + order[:shift]:
                result = ready.measure(
                    ready.started[name], cell.size, cell.conns, cell.duration, rep
                )
                runs.append(result.as_dict())
                print(
                    f"[{len(runs)}/{total}] rep {rep} {cell.key:10} {name:16} "
                    f"{result.rps:10,.1f} r/s {result.mib_per_s:9,.1f} MiB/s "
                    f"(sink {result.sink_mib_per_s:9,.1f}) "
                    f"p99 {result.latency_ms.get('p99', 0):8.1f} ms "
                    f"{result.errors or ''} {result.note}",
                    flush=True,
                )
                load.settle(2.0 if cell.size == "20MB" else 0.5)
    return runs


def run_profiles(ready: Prepared, name: str, seconds: float) -> dict[str, Any]:
    """py-spy on one serving process of ``name`` under 1MB/c16 and 10KB/c64 load."""
    peer = ready.started.get(name)
    if peer is None or profiling.py_spy() is None:
        return {}
    pid = peer.worker_pids()[0]
    out = {}
    for size, conns in (("1MB", 16), ("10KB", 64)):
        raw = ready.work / f"profile-{name}-{size}-c{conns}.txt"

        def wrk_run(size: str = size, conns: int = conns) -> dict[str, Any]:
            return ready.measure(peer, size, conns, seconds + 1, 0).as_dict()

        label = f"{name} {size}/c{conns}"
        summary = profiling.profile_during(pid, seconds, raw, wrk_run)
        out[label] = summary
        raw.with_suffix(".md").write_text(profiling.render(label, summary))
        print(f"profiled {label}: {summary['samples']} samples", flush=True)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="upload-gateway vs nginx benchmark (issue 6)")
    parser.add_argument("--quick", action="store_true", help="1 repetition, short runs")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every run's duration")
    parser.add_argument(
        "--peers", default=",".join([*CORE_PEERS, "gateway-pass-w2", "gateway-info-w2"])
    )
    parser.add_argument("--sizes", default="10KB,1MB,20MB")
    parser.add_argument("--conns", default="1,16,64")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--profile-only", action="store_true", help="only the py-spy profiles")
    parser.add_argument("--profile-peer", default="gateway-w1", help="gateway variant to profile")
    parser.add_argument("--profile-seconds", type=float, default=8.0)
    parser.add_argument("--refusals", type=int, default=300, help="probes per peer")
    parser.add_argument(
        "--out", type=Path, default=None, help="default bench/ (--quick: bench/work/)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.scale, args.refusals = 1, args.scale * 0.5, 200
        args.profile_seconds = min(args.profile_seconds, 4.0)
    args.peers = [p for p in args.peers.split(",") if p]
    args.sizes = [s for s in args.sizes.split(",") if s]
    args.conns = [int(c) for c in args.conns.split(",") if c]
    args.out = args.out or (BENCH / "work" if args.quick else BENCH)
    return args


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@dataclass
class Prepared:
    """Everything a measured run needs, once the processes are up."""

    work: Path
    started: dict[str, peers.Peer]
    rdb: redis.Redis
    bodies: dict[str, Body]
    secret: str
    headers_file: Path
    sink_port: int

    def measure(
        self, peer: peers.Peer, size: str, conns: int, duration: float, rep: int
    ) -> load.RunResult:
        return load.measure(
            peer,
            self.bodies[size],
            self.headers_file,
            conns,
            duration,
            rep,
            self.rdb,
            self.sink_port,
        )


def prepare(stack: Stack, names: list[str], skipped: dict[str, str]) -> Prepared:
    """Processes, bodies, a key and its Secret, and peers that passed the preflight upload."""
    started = start_peers(stack, names, skipped)
    assert stack.redis is not None
    rdb = redis.Redis(port=stack.redis.port, password=stack.redis_password)
    bodies = write_bodies(stack.work)
    keys_config = stack.work / "keys.yaml"
    no_backend = "http://127.0.0.1:9"  # the CLI only needs Redis and the signing key
    variant = peers.VARIANTS["gateway-w2"]
    config = peers.gateway_config(variant, stack.redis_url, no_backend, stack.work)
    keys_config.write_text(yaml.safe_dump(config))
    secret = peers.issue_secret(str(keys_config))
    headers_file = stack.work / "headers.txt"
    headers_file.write_text(f"Content-Type: {CONTENT_TYPE}\nAuthorization: Bearer {secret}\n")
    check_peers(started, bodies, secret, skipped)
    return Prepared(stack.work, started, rdb, bodies, secret, headers_file, stack.sink_port)


def benchmark(args: argparse.Namespace, stack: Stack, began: float) -> None:
    skipped: dict[str, str] = {}
    ready = prepare(stack, args.peers, skipped)
    cells = plan(args, set(ready.started))
    minutes = sum(len(c.peers) * c.reps * (c.duration + 1.2) for c in cells) / 60
    print(
        f"running {sum(len(c.peers) * c.reps for c in cells)} runs, about {minutes:.0f} min "
        "(+ warm-up, refusals, profiles)",
        flush=True,
    )
    for peer in ready.started.values():  # warm-up, not recorded
        load.wrk(peer.url, ready.bodies["10KB"], ready.headers_file, 16, 1.0)
    runs = run_matrix(cells, ready)
    refusal = [  # the pass-through variant has no upload route: nothing to refuse
        probes.refusal_latency(p, ready.secret, args.refusals)
        for name, p in ready.started.items()
        if name != "gateway-pass-w2"
    ]
    profiles = {}
    if not args.no_profile:
        profiles = run_profiles(ready, args.profile_peer, args.profile_seconds)
    result = _result(args, began, cells, ready.started, skipped, runs, refusal, profiles)
    report.write(result, args.out)
    print(f"wrote {args.out / 'results.md'} and results.json", flush=True)


def profile_only(args: argparse.Namespace, stack: Stack) -> None:
    """Just the py-spy profiles (to iterate on a hot spot quickly)."""
    skipped: dict[str, str] = {}
    ready = prepare(stack, [args.profile_peer], skipped)
    if skipped:
        raise SystemExit(f"{args.profile_peer} unusable: {skipped}")
    load.wrk(
        ready.started[args.profile_peer].url, ready.bodies["10KB"], ready.headers_file, 16, 1.0
    )
    for name, summary in run_profiles(ready, args.profile_peer, args.profile_seconds).items():
        print(profiling.render(name, summary))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for signum in (
        signal.SIGTERM,
        signal.SIGINT,
    ):  # SIGINT too: it may be ignored when backgrounded
        signal.signal(signum, _interrupt)
    began = time.monotonic()
    work = BENCH / "work"
    work.mkdir(exist_ok=True)
    stack = Stack(work)
    try:
        if args.profile_only:
            profile_only(args, stack)
        else:
            benchmark(args, stack, began)
        return 0
    except KeyboardInterrupt:
        print("interrupted: stopping every process", file=sys.stderr)
        return 130
    finally:
        stack.close()


NOTES = [
    "wrk -t2 (-t1 at 1 connection), keep-alive, --timeout 120s, bench/upload.lua: a multipart "
    'body with a `data` part ({"IsManager": true}) and a `file` part holding a real PNG padded to '
    "10,240 / 1,048,576 / 20,000,000 bytes, and an agent Secret (HS256, claim role=agent)",
    "peers run alternately (rotating order per cell and repetition) and were all up during the "
    "whole run; medians reported; non-2xx responses are not counted as throughput",
    "every peer was checked first with one upload per size: 200, and the sink read every byte",
    "sink: bench/sink.py, raw asyncio protocol on uvloop, 2 processes (SO_REUSEPORT)",
    "nginx: 2 workers, access_log off, sendfile on (Debian's default), keepalive to the sink",
    "auth service: bench/auth_service.py, aiohttp + PyJWT + one Redis ZSCORE per request, no "
    "cache, 2 processes",
    "gateway: the test suite's config shape (tests/support/gateway_proc.py) with "
    "spool.memory_threshold 2MiB and memory_budget 32MiB per worker (10 KB and 1 MB bodies stay "
    "in memory while the budget has room; 20 MB bodies go to an AES-256-GCM encrypted spool "
    "file), auth.cache_ttl 5s, log_level WARNING (no access log) "
    "except gateway-info-w2; gateway-pass-w2 has no upload route, so the same request is only "
    "authenticated and streamed through",
    "Redis: its own redis-server with a password (so no other program on the machine can add "
    "commands to the counts)",
    "refusal probe: a raw 25 MiB PNG body announced by Content-Length (a 25 MB multipart body may "
    "hold two 12.5 MB files under max_request_size 50MB, so no peer may refuse that from the "
    "headers), fresh connection per probe, time from sending the headers to the status line",
]


def _result(
    args: argparse.Namespace,
    began: float,
    cells: list[Cell],
    started: dict[str, peers.Peer],
    skipped: dict[str, str],
    runs: list[dict[str, Any]],
    refusal: list[dict[str, Any]],
    profiles: dict[str, Any],
) -> dict[str, Any]:
    med = report_figures.medians(runs)
    rss = report_figures.rss_summary(runs)
    durations = ", ".join(f"{c.key} {c.duration:g}s x{c.reps}" for c in cells)
    loads = [r["load_avg_1m"] for r in runs]
    return {
        "command": "make bench"
        if not sys.argv[1:]
        else "python -m bench.run " + " ".join(sys.argv[1:]),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "elapsed_s": round(time.monotonic() - began, 1),
        "machine": machine(),
        "load_avg_median": round(sorted(loads)[len(loads) // 2], 2) if loads else None,
        "peers": {name: p.description for name, p in started.items()},
        "skipped": skipped,
        "cells": [c.key for c in cells],
        "notes": [f"cells (duration x repetitions): {durations}", *NOTES],
        "medians": med,
        "rss": rss,
        "targets": report_figures.targets(med, refusal, rss),
        "other_figures": report_figures.others(med),
        "refusal": refusal,
        "profiles": profiles,
        "runs": runs,
    }


if __name__ == "__main__":
    sys.exit(main())
