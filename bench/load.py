"""One measured run: wrk against a peer, with Redis command counts and RSS sampled alongside."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from bench.payloads import UPLOAD_PATH, Body
from bench.peers import Peer
from bench.stack import BENCH

# what the gateway's revocation listener sends on its own, per worker, request or not
BACKGROUND_COMMANDS = frozenset({"ping", "subscribe"})
_WRKJSON = re.compile(r"^WRKJSON (\{.*\})$", re.MULTILINE)


@dataclass
class RunResult:
    peer: str
    size: str
    conns: int
    rep: int
    duration_s: float
    requests: int = 0
    rps: float = 0.0
    mib_per_s: float = 0.0  # upload bytes (whole multipart body) per second
    sink_mib_per_s: float = 0.0  # body bytes the backend received per second of the run
    body_bytes: int = 0
    latency_ms: dict[str, float] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    redis_commands_per_request: float | None = None  # background PINGs (1/s/worker) left out
    load_avg_1m: float = 0.0  # the machine's load when the run started: other work on the box
    redis_commands: dict[str, int] = field(default_factory=dict)
    start_rss_mib: dict[str, float] = field(default_factory=dict)  # pid -> VmRSS before
    peak_rss_mib: dict[str, float] = field(default_factory=dict)  # pid -> max VmRSS seen
    # CPU seconds the serving processes spent during the run (nginx-auth: without its auth service)
    cpu_user_s: float = 0.0
    cpu_sys_s: float = 0.0
    sink_bytes: int = 0
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def wrk(url: str, body: Body, headers_file: Path, conns: int, duration: float) -> dict[str, Any]:
    """Run wrk with bench/upload.lua; its ``done()`` prints one JSON line we parse."""
    threads = 1 if conns < 2 else 2
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{conns}",
        f"-d{max(1, math.ceil(duration))}s",
        "--timeout",
        "120s",
        "-s",
        str(BENCH / "upload.lua"),
        url + UPLOAD_PATH,
        "--",
        str(body.path),
        str(headers_file),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 180)
    match = _WRKJSON.search(done.stdout)
    if done.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}\n{done.stderr}")
    result: dict[str, Any] = json.loads(match.group(1))
    return result


def redis_calls(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def calls_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    delta.pop("info", None)  # our own probe
    return {k: v for k, v in delta.items() if v}


class RssSampler:
    """Samples VmRSS of some pids every ``interval`` seconds in a thread; keeps the maximum."""

    def __init__(self, pids: list[int], interval: float = 0.05) -> None:
        self.pids = pids
        self.interval = interval
        self.peak_kib: dict[int, int] = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for pid in self.pids:
                kib = status_kib(pid, "VmRSS")
                if kib is not None and kib > self.peak_kib[pid]:
                    self.peak_kib[pid] = kib
            self._stop.wait(self.interval)


def cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """(user, system) CPU seconds so far of ``pids``, all their threads; gone processes count 0."""
    user = system = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        user, system = user + int(fields[11]), system + int(fields[12])
    ticks = os.sysconf("SC_CLK_TCK")
    return user / ticks, system / ticks


def status_kib(pid: int, field_name: str) -> int | None:
    """A ``kB`` field of /proc/<pid>/status (VmRSS, VmHWM), or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def measure(
    peer: Peer,
    body: Body,
    headers_file: Path,
    conns: int,
    duration: float,
    rep: int,
    redis_client: redis.Redis,
    sink_port: int,
) -> RunResult:
    """One wrk run against ``peer`` with everything we want to know about it."""
    pids = peer.worker_pids()
    start_rss = {str(pid): round((status_kib(pid, "VmRSS") or 0) / 1024, 1) for pid in pids}
    load1 = float(Path("/proc/loadavg").read_text().split()[0])
    before, sink_before, began = redis_calls(redis_client), sink_totals(sink_port), time.monotonic()
    cpu_before = cpu_seconds(pids)
    with RssSampler(pids) as rss:
        raw = wrk(peer.url, body, headers_file, conns, duration)
    cpu_after = cpu_seconds(pids)
    sink_after, elapsed = sink_totals(sink_port), time.monotonic() - began
    delta = calls_delta(before, redis_calls(redis_client))
    seconds = raw["duration_us"] / 1e6
    requests = int(raw["requests"])
    ok = requests - int(raw["errors"]["status"])
    result = RunResult(peer.name, body.label, conns, rep, round(seconds, 3), requests)
    result.body_bytes = body.size
    result.start_rss_mib = start_rss
    received = sink_after["bytes"] - sink_before["bytes"]
    result.sink_bytes = received
    result.cpu_user_s = round(cpu_after[0] - cpu_before[0], 2)
    result.cpu_sys_s = round(cpu_after[1] - cpu_before[1], 2)
    result.sink_mib_per_s = round(received / elapsed / 1048576, 1)
    result.rps = round(ok / seconds, 1)
    result.mib_per_s = round(ok * body.size / seconds / 1048576, 1)
    lat = raw["latency_us"]
    result.latency_ms = {k: round(float(v) / 1000, 3) for k, v in lat.items()}
    result.errors = {k: int(v) for k, v in raw["errors"].items() if v}
    result.redis_commands = delta
    if requests:
        hot = sum(n for cmd, n in delta.items() if cmd not in BACKGROUND_COMMANDS)
        result.redis_commands_per_request = round(hot / requests, 3)
    result.load_avg_1m = load1
    result.peak_rss_mib = {str(pid): round(kib / 1024, 1) for pid, kib in rss.peak_kib.items()}
    if ok < 5 * conns:
        result.note = (
            f"only {ok} requests completed: quantisation error up to {conns / max(ok, 1):.0%}"
        )
    return result


def sink_totals(port: int) -> dict[str, int]:
    """Body bytes and requests the sink has received so far (bench/sink.py ``/_sink/stats``).

    Unlike wrk's count of completed requests this also sees uploads still in flight when a run
    ends, which matters when only a few dozen 20 MB uploads complete in a run."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_sink/stats", timeout=10) as response:
        totals: dict[str, int] = json.loads(response.read())
    return totals


def settle(seconds: float = 0.5) -> None:
    """A pause between runs so one peer's tail (closing sockets, fsync) does not hit the next."""
    time.sleep(seconds)
