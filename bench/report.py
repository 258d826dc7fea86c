"""Medians, ratios, the issue's targets, and the two result files (results.md, results.json)."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

ORDER = (
    "gateway-w2",
    "gateway-w1",
    "gateway-pass-w2",
    "gateway-info-w2",
    "nginx-buffered",
    "nginx-auth",
)
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


def _get(med: Medians, peer: str, cell: str, key: str) -> float | None:
    value = med.get(peer, {}).get(cell, {}).get(key)
    return float(value) if value is not None else None


def _ratio(a: float | None, b: float | None) -> float | None:
    """Unrounded: a verdict is taken on the ratio itself (0.995 is not >= 1.0); only the
    figures shown are rounded."""
    return a / b if a is not None and b else None


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
        r = _ratio(
            _get(med, "gateway-w2", cell, "mib_per_s"),
            _get(med, "nginx-buffered", cell, "mib_per_s"),
        )
        sink = _ratio(
            _get(med, "gateway-w2", cell, "sink_mib_per_s"),
            _get(med, "nginx-buffered", cell, "sink_mib_per_s"),
        )
        add(
            f"{size} uploads, 16 conns: gateway-w2 / nginx-buffered throughput",
            r,
            ">= 1.0x",
            r is not None and r >= 1.0,
            f"median MiB/s of completed uploads (bytes reaching the backend: {_x(sink)})",
        )

    def add_ratio(name: str, peers: tuple[str, str], cell: str, floor: float) -> None:
        r = _ratio(_get(med, peers[0], cell, "rps"), _get(med, peers[1], cell, "rps"))
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
        r = _ratio(
            _get(med, "gateway-w2", f"{size}/c16", "mib_per_s"),
            _get(med, "gateway-pass-w2", f"{size}/c16", "mib_per_s"),
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
        r = _ratio(_get(med, "gateway-info-w2", cell, key), _get(med, "gateway-w2", cell, key))
        cost = None if r is None else round(100 * (1 - r), 1)
        out.append(
            {
                "figure": f"access log (log_level INFO) cost, {cell}",
                "value": cost,
                "detail": "100 * (1 - gateway-info-w2 / gateway-w2), in %",
            }
        )
    return out


def _peers(med: Medians) -> list[str]:
    return [p for p in ORDER if p in med] + [p for p in med if p not in ORDER]


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _cell_text(m: dict[str, Any] | None, size: str) -> str:
    if not m:
        return "-"
    if size == "10KB":
        return f"{m['rps']:,.0f} r/s"
    return f"{m['mib_per_s']:,.0f} MiB/s ({m['rps']:,.1f} r/s)"


def render_markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Benchmark: upload-gateway vs nginx peers",
        "",
        f"Produced by `{result['command']}` on {result['finished']} ({result['elapsed_s']:.0f} s).",
        "",
        f"Machine: {m['cpu_model']}, nproc={m['nproc']}, {m['mem_gib']} GiB RAM, kernel "
        f"{m['kernel']}; {m['versions']}. Load average while runs started (median): "
        f"{result['load_avg_median']}.",
        "",
        "Everything (wrk, sink, Redis, the peer under test, and whatever else runs on the box) "
        "shares those CPUs: read the figures as ratios between peers measured alternately in "
        "one run, not as capacities.",
    ]
    lines += _throughput_md(result) + _latency_md(result) + _targets_md(result)
    lines += _refusal_md(result) + _rss_md(result) + _cpu_md(result) + _redis_md(result)
    lines += _about_md(result)
    return "\n".join(lines) + "\n"


def _throughput_md(result: dict[str, Any]) -> list[str]:
    med, peers = result["medians"], _peers(result["medians"])
    lines = [
        "",
        "## Throughput (median over repetitions)",
        "",
        "10KB cells in requests/s, larger ones in MiB/s of upload body (and requests/s), "
        "counting completed 200 responses only.",
        "",
        "| body | conns | " + " | ".join(peers) + " | w2 / buffered | w2 / auth |",
        "|---|---:|" + "---:|" * len(peers) + "---:|---:|",
    ]
    for cell in result["cells"]:
        size, conns = cell.split("/c")
        key = "rps" if size == "10KB" else "mib_per_s"
        row = [_cell_text(med.get(p, {}).get(cell), size) for p in peers]
        rb = _ratio(_get(med, "gateway-w2", cell, key), _get(med, "nginx-buffered", cell, key))
        ra = _ratio(_get(med, "gateway-w2", cell, key), _get(med, "nginx-auth", cell, key))
        lines.append(f"| {size} | {conns} | " + " | ".join(row) + f" | {_x(rb)} | {_x(ra)} |")
    lines += [
        "",
        "### Bytes reaching the backend, MiB/s (median)",
        "",
        "Counted by the sink as they arrive, so uploads still in flight when a run ends count "
        "too: the check on the large-body cells, where a run completes only a few dozen uploads.",
        "",
        "| body | conns | " + " | ".join(peers) + " | w2 / buffered |",
        "|---|---:|" + "---:|" * len(peers) + "---:|",
    ]
    for cell in result["cells"]:
        if cell.startswith("10KB"):
            continue
        size, conns = cell.split("/c")
        values = [_get(med, p, cell, "sink_mib_per_s") for p in peers]
        row = ["-" if v is None else f"{v:,.0f}" for v in values]
        r = _ratio(
            _get(med, "gateway-w2", cell, "sink_mib_per_s"),
            _get(med, "nginx-buffered", cell, "sink_mib_per_s"),
        )
        lines.append(f"| {size} | {conns} | " + " | ".join(row) + f" | {_x(r)} |")
    return lines


def _per_cell_table(
    result: dict[str, Any], title: str, intro: str, text: Callable[[str, str, str], str]
) -> list[str]:
    """A section with one row per cell and one column per peer; ``text(peer, cell, size)``."""
    peers = _peers(result["medians"])
    lines = ["", f"## {title}", ""] + ([intro, ""] if intro else [])
    lines += ["| body | conns | " + " | ".join(peers) + " |", "|---|---:|" + "---:|" * len(peers)]
    for cell in result["cells"]:
        size, conns = cell.split("/c")
        row = [text(peer, cell, size) for peer in peers]
        lines.append(f"| {size} | {conns} | " + " | ".join(row) + " |")
    return lines


def _number(result: dict[str, Any], key: str) -> Callable[[str, str, str], str]:
    def text(peer: str, cell: str, _size: str) -> str:
        value = _get(result["medians"], peer, cell, key)
        return "-" if value is None else f"{value:g}"

    return text


def _latency_md(result: dict[str, Any]) -> list[str]:
    title = "Latency p99, ms (median over repetitions)"
    return _per_cell_table(result, title, "", _number(result, "p99_ms"))


def _targets_md(result: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## Targets (issue 6, and issue 4's inspection cost)",
        "",
        "| target | figure | goal | verdict | how |",
        "|---|---:|---|---|---|",
    ]
    for t in result["targets"]:
        verdict = {True: "**met**", False: "**not met**", None: "not measured"}[t["met"]]
        fig = "-" if t["figure"] is None else f"{t['figure']:g}"
        lines.append(f"| {t['target']} | {fig} | {t['goal']} | {verdict} | {t['detail']} |")
    lines += ["", "Other figures:", ""]
    for o in result["other_figures"]:
        value = "-" if o["value"] is None else f"{o['value']:g} %"
        lines.append(f"- {o['figure']}: {value} ({o['detail']})")
    return lines


def _refusal_md(result: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## Refusing a 25 MB upload announced by Content-Length (no body sent)",
        "",
        "| peer | probes | statuses | p50 ms | p99 ms | max ms |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for r in result["refusal"]:
        statuses = ", ".join(f"{k}: {v}" for k, v in r["statuses"].items())
        lines.append(
            f"| {r['peer']} | {r['requests']} | {statuses} | {r['p50_ms']} | "
            f"{r['p99_ms']} | {r['max_ms']} |"
        )
    return lines


def _rss_md(result: dict[str, Any]) -> list[str]:
    cols = ["before_first_run", "10KB", "1MB", "20MB", "20MB/c64"]
    lines = [
        "",
        "## Peak RSS per serving process, MiB",
        "",
        "Max VmRSS, sampled every 50 ms, during the cells of the first repetition (which runs "
        "them in the column order; '20MB' is c1 and c16). Freed memory is only partly given "
        "back, so a column also carries what earlier cells left. 'before first run' follows "
        "the preflight (one upload of each size) and the warm-up.",
        "",
        "| peer | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for peer in _peers(result["rss"]):
        row = result["rss"][peer]
        lines.append(
            f"| {peer} | " + " | ".join(f"{row[c]:g}" if c in row else "-" for c in cols) + " |"
        )
    return lines


def _cpu_md(result: dict[str, Any]) -> list[str]:
    def text(peer: str, cell: str, size: str) -> str:
        cost = result["medians"].get(peer, {}).get(cell, {}).get("cpu")
        unit = "us/req" if size == "10KB" else "ms/MiB"
        return "-" if not cost else f"{cost['per_unit']:g} {unit} ({cost['kernel_share']:.0%})"

    intro = (
        "user + system CPU of the peer's serving processes over a run (all threads; nginx-auth "
        "without its auth service), per request for 10KB and per MiB that reached the backend "
        "otherwise; in brackets the share spent in the kernel. With both cores busy, throughput "
        "follows this cost."
    )
    return _per_cell_table(result, "CPU of the serving processes (median)", intro, text)


def _redis_md(result: dict[str, Any]) -> list[str]:
    intro = (
        "INFO commandstats delta over the run / requests, without the PINGs each gateway "
        "worker's revocation listener sends once a second. A pipeline of N commands is one "
        "round trip (the gateway's key lookup is ZSCORE+HGETALL in one pipeline)."
    )
    title = "Redis commands per request (median)"
    return _per_cell_table(result, title, intro, _number(result, "redis_per_request"))


def _about_md(result: dict[str, Any]) -> list[str]:
    lines = ["", "## Peers", ""]
    lines += [f"- **{name}**: {desc}" for name, desc in result["peers"].items()]
    if result.get("skipped"):
        lines += ["", "Skipped peers:"] + [f"- {p}: {why}" for p, why in result["skipped"].items()]
    lines += ["", "## How it ran", "", *[f"- {n}" for n in result["notes"]]]
    if result.get("profiles"):
        lines += [
            "",
            "Profiles: py-spy summaries in `results.json` under `profiles`; where the "
            "time goes is discussed in `bench/NOTES.md`.",
        ]
    return lines


def write(result: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / "results.md").write_text(render_markdown(result))


def rerender(path: Path) -> None:
    """Recompute medians, RSS and targets from the raw runs of a results.json, rewrite both."""
    result = json.loads(path.read_text())
    result["medians"] = medians(result["runs"])
    result["rss"] = rss_summary(result["runs"])
    result["targets"] = targets(result["medians"], result["refusal"], result["rss"])
    result["other_figures"] = others(result["medians"])
    write(result, path.parent)


if __name__ == "__main__":
    import sys

    rerender(Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results.json"))
