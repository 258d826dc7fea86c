"""CPU of one chunked request body by chunk size: what framing costs the gateway per byte.

aiohttp's C parser hands every HTTP chunk to Python (the reader's ``feed_data`` and its chunk
bookkeeping), so a body's cost grows with its number of chunks, not only its bytes. This runs
the gateway app in this process (the bench's config, one worker) and sends one body of about
``--size`` bytes, framed in chunks of each ``--chunks`` size, to the upload route and to a path
that is only proxied, from a client in another process; it prints this process's CPU time per
request, the wire bytes the client got through before the answer, and the answer's status.

    .venv/bin/python -m bench.chunking [--size 2000000] [--chunks 1,16,1024,65536] [--repeat 3]
    .venv/bin/python -m bench.chunking --chunks 1 --profile     # cProfile of the loop thread

It starts its own redis-server and sink, in ``bench/work/inprocess/``, and stops them at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import resource
import socket
import sys
import time
from pathlib import Path

import uvloop

from bench import payloads
from bench.inprocess import PASS_PATH, _listening, bench_setup


def framed(body: bytes, chunk: int) -> bytes:
    """``body`` as a chunked body of ``chunk``-byte HTTP chunks."""
    size = f"{chunk:x}\r\n".encode()
    full, rest = divmod(len(body), chunk)
    parts = [size + body[i * chunk : (i + 1) * chunk] + b"\r\n" for i in range(full)]
    if rest:
        parts.append(f"{rest:x}\r\n".encode() + body[full * chunk :] + b"\r\n")
    return b"".join(parts) + b"0\r\n\r\n"


def send(port: int, path: str, chunk: int, body_file: str, headers_file: str) -> None:
    """The client (run in its own process, so its CPU is not counted): one request, then
    ``STATUS SENT`` on stdout, SENT being the body's wire bytes the gateway took."""
    headers = [line for line in Path(headers_file).read_text().splitlines() if line]
    head = [f"POST {path} HTTP/1.1", "Host: bench", "Transfer-Encoding: chunked", *headers]
    wire = framed(Path(body_file).read_bytes(), chunk)
    sys.stdin.readline()  # ready: the gateway's CPU is measured from here
    sent = 0
    answer = b""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        view = memoryview(wire)
        try:
            while sent < len(wire):
                sent += sock.send(view[sent : sent + 65536])
        except (BrokenPipeError, ConnectionResetError):
            pass
        sock.settimeout(30)
        try:
            while b"\r\n\r\n" not in answer and (piece := sock.recv(65536)):
                answer += piece
        except (ConnectionResetError, TimeoutError):
            pass
    status = answer.split(b" ", 2)[1].decode() if answer else "none"
    print(status, sent)


async def _one(port: int, path: str, chunk: int, body: Path, headers: Path) -> tuple[float, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.chunking", "--send", str(port), path, str(chunk),
        str(body), str(headers), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    await asyncio.sleep(0.5)  # the client starts and frames its body (not this process's CPU)
    began = resource.getrusage(resource.RUSAGE_SELF)
    out, _ = await proc.communicate(b"go\n")
    await asyncio.sleep(0.2)  # let the gateway finish with the request (spool removal, log)
    now = resource.getrusage(resource.RUSAGE_SELF)
    cpu = now.ru_utime - began.ru_utime + now.ru_stime - began.ru_stime
    return cpu, out.decode().strip()


async def _run(args: argparse.Namespace, body: Path, headers: Path, config: object) -> None:
    async with _listening(config) as base:  # type: ignore[arg-type]
        port = int(base.rsplit(":", 1)[1])
        for path in (payloads.UPLOAD_PATH, PASS_PATH):  # warm: auth cache, backend pool
            await _one(port, path, 65536, body, headers)
        small = body.with_name("chunking-small.bin")
        small.write_bytes(payloads.multipart(payloads.png(1000)))
        floor = [(await _one(port, payloads.UPLOAD_PATH, 65536, small, headers))[0]]
        floor += [(await _one(port, PASS_PATH, 65536, small, headers))[0]]
        print(
            f"floor: a 1 KB body in one chunk costs {min(floor):.3f}-{max(floor):.3f} s here "
            "(the request, and this harness's own subprocess and timers)"
        )
        wire_mb = {c: len(framed(body.read_bytes(), c)) / 1e6 for c in args.chunks}
        print(f"body {body.stat().st_size} bytes; CPU seconds of the gateway process")
        for chunk in args.chunks:
            for name, path in (("upload", payloads.UPLOAD_PATH), ("pass-through", PASS_PATH)):
                profiler = cProfile.Profile(time.thread_time) if args.profile else None
                cpus = []
                for _ in range(args.repeat):
                    if profiler is not None:
                        profiler.enable()
                    cpu, answer = await _one(port, path, chunk, body, headers)
                    if profiler is not None:
                        profiler.disable()
                    cpus.append(cpu)
                status, sent = answer.split()
                text = " ".join(f"{c:.3f}" for c in cpus)
                print(
                    f"{chunk:>6}-byte chunks, {name:<12} wire {wire_mb[chunk]:6.2f} MB: "
                    f"cpu {text} s; answer {status}, {int(sent) / 1e6:.2f} MB sent"
                )
                if profiler is not None:
                    pstats.Stats(profiler).sort_stats("tottime").print_stats(12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", type=int, default=2_000_000, help="file bytes in the body")
    parser.add_argument("--chunks", default="1,16,1024,65536")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--send", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.send:
        port, path, chunk, body_file, headers_file = args.send
        send(int(port), path, int(chunk), body_file, headers_file)
        return
    args.chunks = [int(c) for c in args.chunks.split(",")]
    with bench_setup("10KB") as setup:
        body = setup.body.with_name(f"chunking-{args.size}.bin")
        body.write_bytes(payloads.multipart(payloads.png(args.size)))
        uvloop.run(_run(args, body, setup.headers, setup.config))


if __name__ == "__main__":
    main()
