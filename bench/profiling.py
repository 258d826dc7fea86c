"""Sample a gateway worker with py-spy while wrk loads it, and say where the time goes.

py-spy (``pip install py-spy``; needs root or ptrace rights) samples without touching the code.
``--nonblocking`` keeps it from pausing the process at every sample, so the load is not
distorted. The collapsed stacks are summarised two ways: *self* time by function (where the CPU
actually is) and *inclusive* time by function (which stage of the request path costs what).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")
_TRIM = ("site-packages/", "lib/python3", "/work/main/")


def py_spy() -> str | None:
    found = Path(sys.executable).with_name("py-spy")
    return str(found) if found.exists() else shutil.which("py-spy")


def record(pid: int, seconds: float, out: Path, rate: int = 200) -> subprocess.Popen[bytes]:
    """Start py-spy on ``pid`` for ``seconds``; returns the running process (wait on it)."""
    binary = py_spy()
    if binary is None:
        raise RuntimeError("py-spy is not installed (.venv/bin/pip install py-spy)")
    argv = [
        binary,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(int(seconds)),
        "--rate",
        str(rate),
        "--nonblocking",
        "--format",
        "raw",
        "--output",
        str(out),
    ]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def profile_during(pid: int, seconds: float, out: Path, load: Any) -> dict[str, Any]:
    """Run ``load()`` (a wrk run) while py-spy samples ``pid``; summarise the samples.

    Also the CPU each thread of the process used meanwhile (from /proc): the ground truth for
    "is the event loop thread saturated", which sampling profiles blur (py-spy may count a
    pool thread waiting on its queue as busy).
    """
    before, started = thread_cpu(pid), time.monotonic()
    spy = record(pid, seconds, out)
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(load=load()), daemon=True)
    thread.start()
    _, err = spy.communicate(timeout=seconds + 60)
    after, elapsed = thread_cpu(pid), time.monotonic() - started
    thread.join(seconds + 180)
    if spy.returncode != 0 or not out.exists():
        raise RuntimeError(f"py-spy failed: {err.decode(errors='replace')[-500:]}")
    summary = summarise(out.read_text())
    summary["load"] = result.get("load")
    main = (after.get(pid, 0.0) - before.get(pid, 0.0)) / elapsed
    others = sum(v - before.get(t, 0.0) for t, v in after.items() if t != pid) / elapsed
    summary["cpu_pct"] = {
        "event_loop_thread": round(100 * main, 1),
        "other_threads": round(100 * others, 1),
    }
    return summary


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) used so far by each thread of ``pid``."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def _short(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match["file"]
    for marker in _TRIM:
        if marker in path:
            path = path.split(marker, 1)[1]
    path = re.sub(r"^\d+(\.\d+)?/(site-packages/)?", "", path)
    return f"{match['func']} ({path})"


def summarise(raw: str, top: int = 25) -> dict[str, Any]:
    """Sample shares from collapsed stacks: for the event-loop thread, self and inclusive time
    per function and self time per package; for the pool threads (``asyncio.to_thread``,
    aiofiles), what they ran. Shares are of all samples, so they add up across the two."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    by_package: Counter[str] = Counter()
    pool: Counter[str] = Counter()
    total = loop_total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        frames = [_short(f) for f in stack.split(";") if f]
        if not frames or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        if any(f.startswith("Thread._bootstrap ") for f in frames):
            pool[_pool_task(frames)] += count
            continue
        loop_total += count
        self_time[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
        by_package[_package(frames[-1])] += count

    def share(counter: Counter[str]) -> list[list[Any]]:
        return [[name, round(100 * n / max(total, 1), 1)] for name, n in counter.most_common(top)]

    return {
        "samples": total,
        "event_loop_samples_pct": round(100 * loop_total / max(total, 1), 1),
        "self_pct": share(self_time),
        "inclusive_pct": share(inclusive),
        "self_by_package_pct": share(by_package),
        "pool_threads_pct": share(pool),
    }


def _pool_task(frames: list[str]) -> str:
    """What a pool thread was doing: the callable under ``_WorkItem.run``, else waiting."""
    for i, frame in enumerate(frames):
        if frame.startswith("_WorkItem.run "):
            return frames[i + 1] if i + 1 < len(frames) else "C call via _WorkItem.run"
    return "_worker: waiting for work (py-spy may count this as busy)"


def _package(frame: str) -> str:
    match = re.search(r"\(([^)]*)\)$", frame)
    path = match.group(1) if match else frame
    head = path.split("/", 1)[0]
    if head.endswith(".py") or head in ("", "<frozen"):
        return "stdlib:" + head
    return head


def render(name: str, summary: dict[str, Any]) -> str:
    cpu = summary.get("cpu_pct", {})
    lines = [
        f"## {name}: {summary['samples']} samples",
        "",
        f"CPU meanwhile: event-loop thread {cpu.get('event_loop_thread')} %, other threads "
        f"{cpu.get('other_threads')} %.",
        "",
        "self % | function",
        "---:|---",
    ]
    lines += [f"{pct} | `{fn}`" for fn, pct in summary["self_pct"]]
    lines += ["", "inclusive % | function", "---:|---"]
    lines += [f"{pct} | `{fn}`" for fn, pct in summary["inclusive_pct"]]
    lines += ["", "self % by package | package", "---:|---"]
    lines += [f"{pct} | `{pkg}`" for pkg, pct in summary["self_by_package_pct"]]
    lines += ["", "pool threads % | running", "---:|---"]
    lines += [f"{pct} | `{task}`" for task, pct in summary["pool_threads_pct"]]
    return "\n".join(lines) + "\n"
