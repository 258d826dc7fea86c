"""Sample a gateway worker with py-spy while wrk loads it, and say where the time goes.

py-spy (``pip install py-spy``; needs root or ptrace rights) samples without touching the code.
``--nonblocking`` keeps it from pausing the process at every sample, so the load is not
distorted. The collapsed stacks are summarised two ways: *self* time by function (where the CPU
actually is) and *inclusive* time by function (which stage of the request path costs what).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
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
    """Run ``load()`` (a wrk run) while py-spy samples ``pid``; summarise the samples."""
    spy = record(pid, seconds, out)
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(load=load()), daemon=True)
    thread.start()
    _, err = spy.communicate(timeout=seconds + 60)
    thread.join(seconds + 180)
    if spy.returncode != 0 or not out.exists():
        raise RuntimeError(f"py-spy failed: {err.decode(errors='replace')[-500:]}")
    summary = summarise(out.read_text())
    summary["load"] = result.get("load")
    return summary


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
    """Self and inclusive sample shares per function, and per package, from collapsed stacks."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    by_package: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        self_time[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
        by_package[_package(frames[-1])] += count

    def share(counter: Counter[str]) -> list[list[Any]]:
        return [[name, round(100 * n / total, 1)] for name, n in counter.most_common(top)]

    return {
        "samples": total,
        "self_pct": share(self_time),
        "inclusive_pct": share(inclusive),
        "self_by_package_pct": share(by_package),
    }


def _package(frame: str) -> str:
    match = re.search(r"\(([^)]*)\)$", frame)
    path = match.group(1) if match else frame
    head = path.split("/", 1)[0]
    if head.endswith(".py") or head in ("", "<frozen"):
        return "stdlib:" + head
    return head


def render(name: str, summary: dict[str, Any]) -> str:
    lines = [f"## {name}: {summary['samples']} samples", "", "self % | function", "---:|---"]
    lines += [f"{pct} | `{fn}`" for fn, pct in summary["self_pct"]]
    lines += ["", "inclusive % | function", "---:|---"]
    lines += [f"{pct} | `{fn}`" for fn, pct in summary["inclusive_pct"]]
    lines += ["", "self % by package | package", "---:|---"]
    lines += [f"{pct} | `{pkg}`" for pkg, pct in summary["self_by_package_pct"]]
    return "\n".join(lines) + "\n"
