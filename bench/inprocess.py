"""CPU per request of the upload path against pass-through, in one process, optionally profiled.

py-spy shows where one worker's samples fall, in proportion; it cannot say that one path costs
twice the other. This runs the gateway app in this process (one worker, the bench's config),
drives it with wrk once at the upload route and once at a path that is only proxied, and divides
this process's CPU time by the requests answered. With ``--profile`` it also runs cProfile (on
the event-loop thread's CPU clock, so waiting for a core does not count) and prints, per
function, the difference in own time per request between the two paths.

    .venv/bin/python -m bench.inprocess [--size 10KB] [--conns 16] [--seconds 5] [--profile]
    .venv/bin/python -m bench.inprocess --download 20MB   # CPU per response relayed back

It starts its own redis-server and sink, in ``bench/work/inprocess/``, and stops them at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import pstats
import resource
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import uvloop
import yaml
from aiohttp import web

from bench import payloads
from bench.peers import SIGNING_KEY, GatewayVariant, gateway_config, issue_secret
from bench.stack import BENCH, Stack
from gateway.app import build_state
from gateway.collector import tune_collector
from gateway.config import load_config
from gateway.config.model import Config
from gateway.server import proxy_runner

PASS_PATH = "/not-an-upload-route/4711/objects"


async def _wrk(
    url: str, body: Path, headers: Path, seconds: float, conns: int, method: str = "POST"
) -> int:
    """Completed 200 responses of one wrk run (one thread)."""
    proc = await asyncio.create_subprocess_exec(
        "wrk", "-t1", f"-c{conns}", f"-d{seconds:g}s", "-s", str(BENCH / "upload.lua"), url, "--",
        str(body), str(headers), method, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    line = next(x for x in out.decode().splitlines() if x.startswith("WRKJSON "))
    summary = json.loads(line.removeprefix("WRKJSON "))
    return int(summary["requests"]) - int(summary["errors"]["status"])


@contextlib.asynccontextmanager
async def _listening(config: Config) -> AsyncIterator[str]:
    """The gateway's proxy listener in this process, exactly as a worker sets it up; its URL."""
    runner = proxy_runner(build_state(config), config)
    await runner.setup()
    await web.TCPSite(runner, config.listen.host, config.listen.port).start()
    tune_collector()
    try:
        yield f"http://{config.listen.host}:{config.listen.port}"
    finally:
        await runner.cleanup()


async def _measure_download(
    config: Config, headers: Path, size: int, seconds: float, conns: int
) -> None:
    """CPU per response of GETs the gateway relays from the sink (``/_sink/bytes/N``, a path
    that is only proxied): what a download through the gateway costs."""
    empty = headers.with_name("empty-body")
    empty.write_bytes(b"")
    async with _listening(config) as base:
        url = f"{base}/_sink/bytes/{size}"
        await _wrk(url, empty, headers, 1, conns, "GET")
        began = resource.getrusage(resource.RUSAGE_SELF)
        done = await _wrk(url, empty, headers, seconds, conns, "GET")
        print(f"download of {size} bytes: {done} responses, {_per_request(began, done)[1]}")


@dataclass
class PathCost:
    """One path's run: requests answered, CPU per request, and the profile if one was taken."""

    done: int
    cpu_us: float
    stats: pstats.Stats | None


async def _measure(
    config: Config, body: Path, headers: Path, seconds: float, conns: int, profile: bool
) -> dict[str, PathCost]:
    results: dict[str, PathCost] = {}
    async with _listening(config) as base:
        for path in (payloads.UPLOAD_PATH, PASS_PATH):  # warm both paths first
            await _wrk(base + path, body, headers, 1, conns)
        for name, path in (("upload", payloads.UPLOAD_PATH), ("pass-through", PASS_PATH)):
            # CPU time of this (the event-loop) thread: wall time would count waiting for a core
            profiler = cProfile.Profile(time.thread_time) if profile else None
            began = resource.getrusage(resource.RUSAGE_SELF)
            if profiler is not None:
                profiler.enable()
            done = await _wrk(base + path, body, headers, seconds, conns)
            if profiler is not None:
                profiler.disable()
            cpu_us, text = _per_request(began, done)
            results[name] = PathCost(done, cpu_us, pstats.Stats(profiler) if profiler else None)
            print(f"{name}: {done} requests, {text}")
    return results


def _per_request(began: resource.struct_rusage, done: int) -> tuple[float, str]:
    """CPU (user, kernel), voluntary context switches and minor page faults of this process,
    per request: a thread trip shows up in the first three, memory the allocator keeps handing
    back to the kernel and faulting in again in the last."""
    now = resource.getrusage(resource.RUSAGE_SELF)
    done = max(done, 1)
    user = (now.ru_utime - began.ru_utime) / done * 1e6
    kernel = (now.ru_stime - began.ru_stime) / done * 1e6
    switches = (now.ru_nvcsw - began.ru_nvcsw) / done
    faults = (now.ru_minflt - began.ru_minflt) / done
    return user + kernel, (
        f"{user + kernel:.0f} us of CPU per request (user {user:.0f}, kernel {kernel:.0f}), "
        f"{switches:.1f} voluntary context switches, {faults:.1f} minor page faults"
    )


def _own_time_delta(upload: PathCost, passing: PathCost) -> None:
    """Functions by how much more own time per request they take on the upload path (cProfile's
    own overhead inflates every figure; the differences are what to read)."""

    def per_request(cost: PathCost) -> dict[tuple[str, int, str], float]:
        table = cost.stats.stats  # type: ignore[union-attr]
        return {key: row[2] / max(cost.done, 1) * 1e6 for key, row in table.items()}

    a, b = per_request(upload), per_request(passing)
    rows = sorted(((a.get(k, 0.0) - b.get(k, 0.0), k) for k in set(a) | set(b)), reverse=True)
    print(
        "\nown CPU time of the event-loop thread, us per request under cProfile: "
        "upload - pass-through, upload, pass-through"
    )
    for diff, key in rows[:30]:
        file, line, func = key
        where = file.split("site-packages/")[-1].replace(os.getcwd() + "/", "")
        print(f"{diff:+8.1f} {a.get(key, 0.0):8.1f} {b.get(key, 0.0):8.1f}  {where}:{line} {func}")


@dataclass
class Setup:
    """The bench's gateway config, one upload body and the wrk headers (with a valid Secret)."""

    config: Config
    body: Path
    headers: Path


@contextlib.contextmanager
def bench_setup(size: str) -> Iterator[Setup]:
    """A redis-server and a sink in ``bench/work/inprocess/``, stopped on the way out."""
    os.environ["GATEWAY_SIGNING_KEY"] = SIGNING_KEY
    work = BENCH / "work" / "inprocess"
    work.mkdir(parents=True, exist_ok=True)
    stack = Stack(work)
    try:
        stack.start_redis()
        sink = stack.start_sink(1)
        variant = GatewayVariant("inprocess", 1)
        config_file = stack.work / "inprocess.yaml"
        data = gateway_config(variant, stack.redis_url, f"http://127.0.0.1:{sink.port}", stack.work)
        config_file.write_text(yaml.safe_dump(data, sort_keys=False))
        secret = issue_secret(str(config_file))
        headers = stack.work / "headers.txt"
        headers.write_text(
            f"Content-Type: {payloads.CONTENT_TYPE}\nAuthorization: Bearer {secret}\n"
        )
        body = payloads.write_bodies(stack.work)[size].path
        yield Setup(load_config(str(config_file)), body, headers)
    finally:
        stack.close()


def measure_paths(
    size: str, seconds: float = 5.0, conns: int = 16, profile: bool = False
) -> dict[str, PathCost]:
    """CPU per request of the upload route and of the pass-through, ``size`` bodies."""
    with bench_setup(size) as setup:
        return uvloop.run(
            _measure(setup.config, setup.body, setup.headers, seconds, conns, profile)
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", default="10KB", choices=sorted(payloads.SIZES))
    parser.add_argument("--conns", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--download", choices=sorted(payloads.SIZES), help="measure this instead")
    args = parser.parse_args()
    if args.download:
        size = payloads.SIZES[args.download]
        with bench_setup(args.size) as setup:
            uvloop.run(
                _measure_download(setup.config, setup.headers, size, args.seconds, args.conns)
            )
        return
    results = measure_paths(args.size, args.seconds, args.conns, args.profile)
    if args.profile:
        _own_time_delta(results["upload"], results["pass-through"])


if __name__ == "__main__":
    main()
