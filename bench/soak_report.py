"""``bench/SOAK.md``: the soak's verdict, per-case outcomes and latency, per-worker RSS and fds.

Apart from the run and the checks because it only formats what they produced; the checks decide
the verdict, this module never does.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter
from typing import Any

from bench.soak_checks import Watch
from bench.soak_traffic import MIX, MiB, Sent


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
