"""``results.md``: the figures of ``results.json`` as markdown tables, one section per concern.

Apart from the numbers because it decides nothing: every verdict and ratio shown comes from
``bench/report_figures.py``, so a change of wording or layout cannot change a result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench.report_figures import Medians, cell_value, ratio, ratio_text

ORDER = (
    "gateway-w2",
    "gateway-w1",
    "gateway-pass-w2",
    "gateway-info-w2",
    "nginx-buffered",
    "nginx-auth",
)


def _peers(med: Medians) -> list[str]:
    return [p for p in ORDER if p in med] + [p for p in med if p not in ORDER]


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


def _table_head(peers: list[str], *extra: str) -> list[str]:
    """The head of a table with a row per cell: body, conns, one column per peer, then ``extra``."""
    columns = [*peers, *extra]
    return ["| body | conns | " + " | ".join(columns) + " |", "|---|---:|" + "---:|" * len(columns)]


def _throughput_md(result: dict[str, Any]) -> list[str]:
    med, peers = result["medians"], _peers(result["medians"])
    lines = [
        "",
        "## Throughput (median over repetitions)",
        "",
        "10KB cells in requests/s, larger ones in MiB/s of upload body (and requests/s), "
        "counting completed 200 responses only.",
        "",
        *_table_head(peers, "w2 / buffered", "w2 / auth"),
    ]
    for cell in result["cells"]:
        size, conns = cell.split("/c")
        key = "rps" if size == "10KB" else "mib_per_s"
        row = [_cell_text(med.get(p, {}).get(cell), size) for p in peers]
        rb = ratio(
            cell_value(med, "gateway-w2", cell, key), cell_value(med, "nginx-buffered", cell, key)
        )
        ra = ratio(
            cell_value(med, "gateway-w2", cell, key), cell_value(med, "nginx-auth", cell, key)
        )
        lines.append(
            f"| {size} | {conns} | " + " | ".join(row) + f" | {ratio_text(rb)} | {ratio_text(ra)} |"
        )
    lines += [
        "",
        "### Bytes reaching the backend, MiB/s (median)",
        "",
        "Counted by the sink as they arrive, so uploads still in flight when a run ends count "
        "too: the check on the large-body cells, where a run completes only a few dozen uploads.",
        "",
        *_table_head(peers, "w2 / buffered"),
    ]
    for cell in result["cells"]:
        if cell.startswith("10KB"):
            continue
        size, conns = cell.split("/c")
        values = [cell_value(med, p, cell, "sink_mib_per_s") for p in peers]
        row = ["-" if v is None else f"{v:,.0f}" for v in values]
        r = ratio(
            cell_value(med, "gateway-w2", cell, "sink_mib_per_s"),
            cell_value(med, "nginx-buffered", cell, "sink_mib_per_s"),
        )
        lines.append(f"| {size} | {conns} | " + " | ".join(row) + f" | {ratio_text(r)} |")
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
        value = cell_value(result["medians"], peer, cell, key)
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
