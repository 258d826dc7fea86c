"""The numbers of a bench run: medians per cell, RSS per body size, ratios, the issues' targets.

Apart from the rendering so that a verdict is computed once, from the raw runs, and the same way
by ``bench.run`` and by a re-render of an old ``results.json``; the markdown only shows it.
"""

from __future__ import annotations

import statistics
from typing import Any

RSS_LIMIT_MIB = 150.0
REFUSAL_P99_MS = 5.0
Medians = dict[str, dict[str, dict[str, Any]]]


def medians(runs: list[dict[str, Any]]) -> Medians:
    """peer -> "size/cN" -> medians over the repetitions of that cell."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["peer"], f"{run['size']}/c{run['conns']}"), []).append(run)
    out: Medians = {}
    for (peer, cell), group in groups.items():

        def med(key: str, group: list[dict[str, Any]] = group) -> float:
            return round(statistics.median(float(r[key]) for r in group), 1)

        redis_calls = [r["redis_commands_per_request"] for r in group]
        out.setdefault(peer, {})[cell] = {
            "reps": len(group),
            "rps": med("rps"),
            "mib_per_s": med("mib_per_s"),
            "sink_mib_per_s": med("sink_mib_per_s"),
            "p99_ms": round(statistics.median(r["latency_ms"].get("p99", 0) for r in group), 2),
            "rps_all": [r["rps"] for r in group],
            "errors": sum(sum(r["errors"].values()) for r in group),
            "redis_per_request": (
                round(statistics.median(c for c in redis_calls if c is not None), 3)
                if any(c is not None for c in redis_calls)
                else None
            ),
            "peak_rss_mib": max(max(r["peak_rss_mib"].values(), default=0) for r in group),
            "cpu": _cpu_cost(group),
            "load_avg_1m": round(statistics.median(r["load_avg_1m"] for r in group), 2),
        }
    return out


def _cpu_cost(group: list[dict[str, Any]]) -> dict[str, float] | None:
    """Median CPU of the serving processes per unit of work: ms per MiB that reached the backend
    (and the share spent in the kernel), or us per request for 10KB; None for older results."""
    costs, kernel = [], []
    for run in group:
        user, system = run.get("cpu_user_s"), run.get("cpu_sys_s")
        work = run.get("sink_bytes", 0) / 1048576 if run["size"] != "10KB" else run["requests"]
        if user is None or system is None or not work:
            continue
        scale = 1000 if run["size"] != "10KB" else 1e6
        costs.append((user + system) * scale / work)
        kernel.append(system / (user + system) if user + system else 0.0)
    if not costs:
        return None
    return {
        "per_unit": round(statistics.median(costs), 2),
        "kernel_share": round(statistics.median(kernel), 2),
    }


def rss_summary(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per peer: RSS per serving process before its first run, and the peak per body size, from
    the first repetition only (it runs 10KB, 1MB, 20MB, 20MB/c64 in that order; later ones would
    carry what 20MB/c64 left behind, as freed memory is only partly given back)."""
    out: dict[str, dict[str, float]] = {}
    for run in runs:
        if run["rep"] != 0:
            continue
        row = out.setdefault(run["peer"], {})
        if "before_first_run" not in row:
            row["before_first_run"] = max(run["start_rss_mib"].values(), default=0.0)
        key = "20MB/c64" if (run["size"], run["conns"]) == ("20MB", 64) else run["size"]
        peak = max(run["peak_rss_mib"].values(), default=0.0)
        row[key] = max(row.get(key, 0.0), peak)
    return out


def cell_value(med: Medians, peer: str, cell: str, key: str) -> float | None:
    value = med.get(peer, {}).get(cell, {}).get(key)
    return float(value) if value is not None else None


def ratio(a: float | None, b: float | None) -> float | None:
    """Unrounded: a verdict is taken on the ratio itself (0.995 is not >= 1.0); only the
    figures shown are rounded."""
    return a / b if a is not None and b else None


def ratio_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def targets(
    med: Medians, refusal: list[dict[str, Any]], rss: dict[str, dict[str, float]]
) -> list[dict[str, Any]]:
    """Each target of issue 6 (and issue 4's inspection cost) with its figure and verdict."""
    out: list[dict[str, Any]] = []

    def add(name: str, figure: float | None, goal: str, ok: bool, how: str) -> None:
        out.append(
            {
                "target": name,
                "figure": None if figure is None else round(figure, 3),
                "goal": goal,
                "met": None if figure is None else ok,
                "detail": how,
            }
        )

    for size in ("1MB", "20MB"):
        cell = f"{size}/c16"
        r = ratio(
            cell_value(med, "gateway-w2", cell, "mib_per_s"),
            cell_value(med, "nginx-buffered", cell, "mib_per_s"),
        )
        sink = ratio(
            cell_value(med, "gateway-w2", cell, "sink_mib_per_s"),
            cell_value(med, "nginx-buffered", cell, "sink_mib_per_s"),
        )
        add(
            f"{size} uploads, 16 conns: gateway-w2 / nginx-buffered throughput",
            r,
            ">= 1.0x",
            r is not None and r >= 1.0,
            f"median MiB/s of completed uploads (bytes reaching the backend: {ratio_text(sink)})",
        )

    def add_ratio(name: str, peers: tuple[str, str], cell: str, floor: float) -> None:
        r = ratio(cell_value(med, peers[0], cell, "rps"), cell_value(med, peers[1], cell, "rps"))
        add(name, r, f">= {floor:.1f}x", r is not None and r >= floor, "median req/s ratio")

    for conns in (16, 64):
        name = f"10KB uploads, {conns} conns: gateway-w2 / nginx+auth_request req/s"
        add_ratio(name, ("gateway-w2", "nginx-auth"), f"10KB/c{conns}", 1.0)
    peaks = [
        rss[p]["20MB/c64"] for p in ("gateway-w2", "gateway-w1") if "20MB/c64" in rss.get(p, {})
    ]
    peak = max(peaks, default=None)
    add(
        "peak RSS per gateway process, 64 concurrent 20 MB uploads",
        peak,
        f"<= {RSS_LIMIT_MIB:g} MiB",
        peak is not None and peak <= RSS_LIMIT_MIB,
        "max VmRSS (sampled every 50 ms) of gateway-w1 and each gateway-w2 worker",
    )
    gw = [r for r in refusal if r["peer"].startswith("gateway")]
    worst = max((r["p99_ms"] for r in gw), default=None)
    add(
        "25 MB upload with Content-Length refused, p99",
        worst,
        f"< {REFUSAL_P99_MS:g} ms",
        worst is not None and worst < REFUSAL_P99_MS,
        "worst p99 over the gateway peers; the client never sends a body byte",
    )
    for conns in (16, 64):
        name = f"--workers 2 / --workers 1, 10KB, {conns} conns"
        add_ratio(name, ("gateway-w2", "gateway-w1"), f"10KB/c{conns}", 1.7)
    for size in ("10KB", "1MB", "20MB"):
        r = ratio(
            cell_value(med, "gateway-w2", f"{size}/c16", "mib_per_s"),
            cell_value(med, "gateway-pass-w2", f"{size}/c16", "mib_per_s"),
        )
        cost = None if r is None else 100 * (1 - r)
        add(
            f"issue 4: inspection+spool+encryption cost, {size}, 16 conns",
            cost,
            "<= 25 %",
            cost is not None and cost <= 25,
            "100 * (1 - gateway-w2 / gateway-pass-w2), in %",
        )
    return out


def others(med: Medians) -> list[dict[str, Any]]:
    """Figures asked for besides the targets: what the JSON access log costs."""
    out = []
    for cell in ("10KB/c16", "10KB/c64", "1MB/c16"):
        key = "rps" if cell.startswith("10KB") else "mib_per_s"
        r = ratio(
            cell_value(med, "gateway-info-w2", cell, key), cell_value(med, "gateway-w2", cell, key)
        )
        cost = None if r is None else round(100 * (1 - r), 1)
        out.append(
            {
                "figure": f"access log (log_level INFO) cost, {cell}",
                "value": cost,
                "detail": "100 * (1 - gateway-info-w2 / gateway-w2), in %",
            }
        )
    return out
