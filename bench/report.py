"""Medians, ratios, the issue's targets, and the two result files (results.md, results.json)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

CORE = (
    "gateway-w2",
    "gateway-w1",
    "gateway-pass-w2",
    "gateway-info-w2",
    "nginx-buffered",
    "nginx-auth",
)
RSS_LIMIT_MIB = 150.0
REFUSAL_P99_MS = 5.0


def medians(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """peer -> "size/conns" -> median rps, MiB/s, p99 latency over its repetitions."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["peer"], f"{run['size']}/c{run['conns']}"), []).append(run)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for (peer, cell), group in groups.items():
        out.setdefault(peer, {})[cell] = {
            "reps": len(group),
            "rps": round(statistics.median(r["rps"] for r in group), 1),
            "mib_per_s": round(statistics.median(r["mib_per_s"] for r in group), 1),
            "p99_ms": round(statistics.median(r["latency_ms"].get("p99", 0) for r in group), 2),
            "mib_per_s_littles_law": round(
                statistics.median(r["rps_littles_law"] * r["body_bytes"] for r in group) / 1048576,
                1,
            ),
            "load_avg_1m": round(statistics.median(r["load_avg_1m"] for r in group), 2),
            "rps_all": [r["rps"] for r in group],
            "errors": sum(sum(r["errors"].values()) for r in group),
            "redis_per_request": _median_or_none(r["redis_commands_per_request"] for r in group),
            "peak_rss_mib": max(
                (max(r["peak_rss_mib"].values(), default=0) for r in group), default=0
            ),
        }
    return out


def _median_or_none(values: Any) -> float | None:
    found = [v for v in values if v is not None]
    return round(statistics.median(found), 3) if found else None


def _get(med: dict[str, Any], peer: str, cell: str, key: str) -> float | None:
    value = med.get(peer, {}).get(cell, {}).get(key)
    return float(value) if value is not None else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def targets(med: dict[str, Any], refusal: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target of issue 6 (and issue 4's inspection cost) with its figure and verdict."""
    out: list[dict[str, Any]] = []

    def add(name: str, figure: float | None, goal: str, met: bool | None, detail: str) -> None:
        out.append(
            {
                "target": name,
                "figure": figure,
                "goal": goal,
                "met": None if figure is None else met,
                "detail": detail,
            }
        )

    for size in ("1MB", "20MB"):
        r = _ratio(
            _get(med, "gateway-w2", f"{size}/c16", "mib_per_s"),
            _get(med, "nginx-buffered", f"{size}/c16", "mib_per_s"),
        )
        add(
            f"{size} uploads, 16 conns: gateway-w2 / nginx-buffered throughput",
            r,
            ">= 1.0x",
            r is not None and r >= 1.0,
            "median MiB/s ratio",
        )
    for conns in (16, 64):
        r = _ratio(
            _get(med, "gateway-w2", f"10KB/c{conns}", "rps"),
            _get(med, "nginx-auth", f"10KB/c{conns}", "rps"),
        )
        add(
            f"10KB uploads, {conns} conns: gateway-w2 / nginx+auth_request req/s",
            r,
            ">= 1.0x",
            r is not None and r >= 1.0,
            "median req/s ratio",
        )
    rss = [_get(med, p, "20MB/c64", "peak_rss_mib") for p in ("gateway-w2", "gateway-w1")]
    peak = max((v for v in rss if v), default=None)
    add(
        "peak RSS per gateway process, 64 concurrent 20 MB uploads",
        peak,
        f"<= {RSS_LIMIT_MIB:g} MiB",
        peak is not None and peak <= RSS_LIMIT_MIB,
        "max VmRSS sampled every 50 ms over gateway-w1 and each gateway-w2 worker",
    )
    gw = [r for r in refusal if r["peer"].startswith("gateway")]
    worst = max((r["p99_ms"] for r in gw), default=None)
    add(
        "25 MB upload with Content-Length refused (p99)",
        worst,
        f"< {REFUSAL_P99_MS:g} ms",
        worst is not None and worst < REFUSAL_P99_MS,
        "worst p99 over the gateway peers; no body byte is ever sent",
    )
    for conns in (16, 64):
        r = _ratio(
            _get(med, "gateway-w2", f"10KB/c{conns}", "rps"),
            _get(med, "gateway-w1", f"10KB/c{conns}", "rps"),
        )
        add(
            f"--workers 2 / --workers 1, 10KB, {conns} conns",
            r,
            ">= 1.7x",
            r is not None and r >= 1.7,
            "median req/s ratio",
        )
    for size in ("10KB", "1MB", "20MB"):
        r = _ratio(
            _get(med, "gateway-w2", f"{size}/c16", "mib_per_s"),
            _get(med, "gateway-pass-w2", f"{size}/c16", "mib_per_s"),
        )
        cost = None if r is None else round(100 * (1 - r), 1)
        add(
            f"issue 4: inspection+spool+encryption cost, {size}, 16 conns",
            cost,
            "<= 25 %",
            cost is not None and cost <= 25,
            "100 * (1 - gateway-w2 / gateway-pass-w2)",
        )
    return out


def _cell_text(m: dict[str, Any] | None, size: str) -> str:
    if not m:
        return "-"
    if size == "10KB":
        return f"{m['rps']:,.0f} r/s"
    return f"{m['mib_per_s']:,.0f} MiB/s ({m['rps']:,.1f} r/s)"


def render_markdown(result: dict[str, Any]) -> str:
    med = result["medians"]
    peers = [p for p in CORE if p in med] + [p for p in med if p not in CORE]
    cells = result["cells"]
    lines = [
        "# Benchmark: upload-gateway vs nginx peers",
        "",
        f"Produced by `{result['command']}` on {result['finished']} ({result['elapsed_s']:.0f} s).",
        "",
        f"Machine: {result['machine']['cpu_model']}, nproc={result['machine']['nproc']}, "
        f"{result['machine']['mem_gib']} GiB RAM, {result['machine']['kernel']}; "
        f"{result['machine']['versions']}.",
        "",
        "Everything (wrk, sink, Redis, the peer under test) shares those CPUs: the figures are "
        "ratios between peers measured alternately in one run, not absolute capacities.",
        "",
        "## Throughput (median over repetitions)",
        "",
        "10KB cells in requests/s, larger ones in MiB/s of upload body (and requests/s).",
        "",
        "| body | conns | " + " | ".join(peers) + " | w2 / buffered | w2 / auth |",
        "|---|---:|" + "---:|" * len(peers) + "---:|---:|",
    ]
    for cell in cells:
        size, conns = cell.split("/c")
        row = [_cell_text(med.get(p, {}).get(cell), size) for p in peers]
        key = "rps" if size == "10KB" else "mib_per_s"
        rb = _ratio(_get(med, "gateway-w2", cell, key), _get(med, "nginx-buffered", cell, key))
        ra = _ratio(_get(med, "gateway-w2", cell, key), _get(med, "nginx-auth", cell, key))
        lines.append(f"| {size} | {conns} | " + " | ".join(row) + f" | {_x(rb)} | {_x(ra)} |")
    lines += [
        "",
        "## Latency p99 (ms, median over repetitions)",
        "",
        "| body | conns | " + " | ".join(peers) + " |",
        "|---|---:|" + "---:|" * len(peers),
    ]
    for cell in cells:
        size, conns = cell.split("/c")
        row = [f"{v:g}" if (v := _get(med, p, cell, "p99_ms")) is not None else "-" for p in peers]
        lines.append(f"| {size} | {conns} | " + " | ".join(row) + " |")
    lines += _targets_md(result["targets"]) + _extras_md(result, peers)
    return "\n".join(lines) + "\n"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _targets_md(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "",
        "## Targets (issue 6, and issue 4's inspection cost)",
        "",
        "| target | figure | goal | verdict |",
        "|---|---:|---|---|",
    ]
    for t in rows:
        verdict = {True: "**met**", False: "**not met**", None: "not measured"}[t["met"]]
        fig = "-" if t["figure"] is None else f"{t['figure']:g}"
        lines.append(f"| {t['target']} | {fig} | {t['goal']} | {verdict} | {t['detail']} |")
    return lines


def _littles_md(result: dict[str, Any], peers: list[str]) -> list[str]:
    """Large bodies: wrk counts only completed requests, so a run cut off with 16-64 uploads
    of 20 MB in flight under-counts; conns / mean latency (Little's law) does not."""
    med = result["medians"]
    cells = [c for c in result["cells"] if not c.startswith("10KB")]
    lines = [
        "",
        "## MiB/s by Little's law (connections / mean latency), cross-check for large bodies",
        "",
        "| body | conns | " + " | ".join(peers) + " | w2 / buffered | load avg |",
        "|---|---:|" + "---:|" * len(peers) + "---:|---:|",
    ]
    for cell in cells:
        size, conns = cell.split("/c")
        values = [_get(med, p, cell, "mib_per_s_littles_law") for p in peers]
        row = ["-" if v is None else f"{v:,.0f}" for v in values]
        ratio = _ratio(
            _get(med, "gateway-w2", cell, "mib_per_s_littles_law"),
            _get(med, "nginx-buffered", cell, "mib_per_s_littles_law"),
        )
        loads = [_get(med, p, cell, "load_avg_1m") for p in peers]
        load = max((v for v in loads if v is not None), default=0.0)
        lines.append(f"| {size} | {conns} | " + " | ".join(row) + f" | {_x(ratio)} | {load:g} |")
    return lines


def _extras_md(result: dict[str, Any], peers: list[str]) -> list[str]:
    lines = [
        "",
        "## Refusing a 25 MB upload announced by Content-Length (no body sent)",
        "",
        "| peer | requests | statuses | p50 ms | p99 ms | max ms |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for r in result["refusal"]:
        lines.append(
            f"| {r['peer']} | {r['requests']} | {r['statuses']} | {r['p50_ms']} | "
            f"{r['p99_ms']} | {r['max_ms']} |"
        )
    med = result["medians"]
    lines += _littles_md(result, peers)
    lines += [
        "",
        "## Redis commands per request, peak RSS per process",
        "",
        "Redis: INFO commandstats delta over the run / requests, without the PINGs each gateway "
        "worker's revocation listener sends once a second (a pipeline of N commands is one "
        "round trip). RSS: max VmRSS, sampled every 50 ms, of any serving process of the peer.",
        "",
        "| body | conns | " + " | ".join(f"{p} redis / RSS MiB" for p in peers) + " |",
        "|---|---:|" + "---:|" * len(peers),
    ]
    for cell in result["cells"]:
        size, conns = cell.split("/c")
        row = []
        for p in peers:
            m = med.get(p, {}).get(cell)
            row.append("-" if not m else f"{m['redis_per_request']} / {m['peak_rss_mib']:g}")
        lines.append(f"| {size} | {conns} | " + " | ".join(row) + " |")
    lines += ["", "## Peers", ""]
    lines += [f"- **{name}**: {desc}" for name, desc in result["peers"].items()]
    if result.get("skipped"):
        lines += ["", "Skipped peers:"] + [f"- {p}: {why}" for p, why in result["skipped"].items()]
    lines += ["", "## How it ran", "", *[f"- {n}" for n in result["notes"]]]
    if result.get("profiles"):
        lines += [
            "",
            "Profiles (py-spy, top self-time frames) are summarised in "
            "`bench/NOTES.md`; the raw summaries are in `results.json` under `profiles`.",
        ]
    return lines


def write(result: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(result, indent=1, sort_keys=False) + "\n")
    (out_dir / "results.md").write_text(render_markdown(result))
