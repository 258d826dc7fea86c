"""``make soak``: a bounded run of mixed uploads against ``serve --workers 2`` (issue 7).

    .venv/bin/python -m bench.soak                    # 10,000 requests after a 1,000 warm-up
    .venv/bin/python -m bench.soak --requests 2000    # a quicker look

Starts Redis, a recording sink and the real gateway; from this (separate) process sends accepted
uploads of several types and sizes (memory and encrypted-disk spools), every kind of refusal and
a few clients that vanish mid-body, 32 at a time, over loopback. Then it proves, and writes to
``bench/SOAK.md``: every accepted body reached the sink byte-identical (SHA-256 per request id),
no refused or aborted request reached it at all, no spool descriptor is open, each worker's
descriptors are back to their idle baseline, and each worker's RSS is flat. Exit 1 if not.

This module only wires the run together; the mix and its senders are in
``bench/soak_traffic.py``, the sink and the checks in ``bench/soak_checks.py``, and
``bench/SOAK.md`` is written by ``bench/soak_report.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from bench.soak_checks import (
    Watch,
    check_gateway,
    check_workers,
    fd_kinds,
    get_json,
    rss,
    run_sink,
    verify,
    workers_of,
)
from bench.soak_report import write_report
from bench.soak_traffic import BODY_TIMEOUT, build_cases, run_phase
from bench.stack import BENCH, Stack, wait_ready
from tests.support.gateway_proc import SIGNING_KEY, base_config, cli
from tests.support.procs import free_port, gateway_command, wait_for_port

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


if __name__ == "__main__":
    raise SystemExit(main())
