"""The benchmark's backend: reads every request body to the end and answers 200 with tiny JSON.

A raw asyncio protocol on uvloop rather than a web framework, so the sink is never what limits a
run: body bytes are only counted (no copy, no parsing), only header blocks and chunk-size lines
are ever buffered. It speaks enough HTTP/1.1 for its two clients: ``Content-Length`` and chunked
bodies (nginx and aiohttp may send either), keep-alive, ``Expect: 100-continue``.

Each response carries ``X-Sink-Body-Bytes`` (the body length it read) so the harness can check
that a peer forwarded the whole upload. ``GET /_sink/bytes/N`` answers N bytes instead of the
tiny JSON (a download, for ``bench.inprocess --download``). ``GET /_sink/stats`` answers the
body bytes and requests received so far by all processes (shared memory): bytes per second
measured at the backend do not depend on how many uploads happened to complete inside a run.
Run several processes on one port (SO_REUSEPORT):

    python -m bench.sink --port 18081 --processes 2
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import functools
import json
import multiprocessing
import signal
from typing import cast

_HEADERS, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _TRAILERS = range(5)
_MAX_HEAD = 64 * 1024
_PAYLOAD = b'{"ok":true}'
_STATS_PATH = b"/_sink/stats"
_BYTES_PATH = b"/_sink/bytes/"
# [bytes, requests] per process, in memory shared by every process of the sink
_STATS: ctypes.Array[ctypes.c_uint64] | None = None
_SLOT = 0


class SinkProtocol(asyncio.Protocol):
    """One connection; a small state machine over the byte stream."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buf = b""  # only an incomplete header block or chunk-size line, never body bytes
        self._state = _HEADERS
        self._remaining = 0
        self._body_bytes = 0
        self._close_after = False
        self._stats_request = False
        self._download = 0  # bytes to answer with, for GET /_sink/bytes/N

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self._buf:
            data, self._buf = self._buf + data, b""
        pos, end = 0, len(data)
        while pos < end:
            if self._state == _BODY or self._state == _CHUNK_DATA:
                take = min(self._remaining, end - pos)
                pos += take
                self._remaining -= take
                if self._state == _BODY:
                    self._body_bytes += take
                    _count(take)
                    if not self._remaining:
                        self._respond()
                elif not self._remaining:
                    self._state = _CHUNK_SIZE
            elif self._state == _HEADERS:
                pos = self._headers(data, pos)
            else:
                pos = self._line(data, pos)
            if pos < 0:
                return

    def _headers(self, data: bytes, pos: int) -> int:
        i = data.find(b"\r\n\r\n", pos)
        if i < 0:
            return self._keep(data, pos)
        lines = data[pos:i].split(b"\r\n")
        request_line = lines[0].split(b" ")
        version = request_line[-1]
        target = request_line[1] if len(request_line) == 3 else b""
        self._stats_request = target == _STATS_PATH
        size = target[len(_BYTES_PATH) :] if target.startswith(_BYTES_PATH) else b""
        self._download = int(size) if size.isdigit() else 0
        length, chunked, expect = 0, False, False
        self._close_after = version == b"HTTP/1.0"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = value.endswith(b"chunked")
            elif name == b"connection":
                self._close_after = value == b"close"
            elif name == b"expect":
                expect = value == b"100-continue"
        if expect and self._transport is not None:
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._body_bytes = 0
        if chunked:
            self._state = _CHUNK_SIZE
        elif length:
            self._state, self._remaining = _BODY, length
        else:
            self._respond()
        return i + 4

    def _line(self, data: bytes, pos: int) -> int:
        """A chunk-size line, or a trailer line after the last chunk."""
        i = data.find(b"\r\n", pos)
        if i < 0:
            return self._keep(data, pos)
        line = data[pos:i]
        if self._state == _TRAILERS:
            if not line:
                self._respond()
            return i + 2
        size = int(line.split(b";", 1)[0], 16)
        if size:
            self._state, self._remaining = _CHUNK_DATA, size + 2  # the data and its CRLF
            self._body_bytes += size
            _count(size)
        else:
            self._state = _TRAILERS
        return i + 2

    def _keep(self, data: bytes, pos: int) -> int:
        self._buf = data[pos:]
        if len(self._buf) > _MAX_HEAD and self._transport is not None:
            self._transport.close()
        return -1

    def _respond(self) -> None:
        self._state = _HEADERS
        if self._transport is None:
            return
        payload = _PAYLOAD
        if self._stats_request:
            payload = json.dumps(totals()).encode()
        elif self._download:
            payload = _download_body(self._download)
        elif _STATS is not None:
            _STATS[2 * _SLOT + 1] += 1
        self._transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"X-Sink-Body-Bytes: %d\r\nContent-Length: %d\r\n%s\r\n%s"
            % (
                self._body_bytes,
                len(payload),
                b"Connection: close\r\n" if self._close_after else b"",
                payload,
            )
        )
        if self._close_after:
            self._transport.close()


@functools.lru_cache(maxsize=4)
def _download_body(size: int) -> bytes:
    """Made once per size: the sink must never be what limits a download run."""
    return bytes(size)


def _count(body_bytes: int) -> None:
    """Bytes are counted as they arrive, so a run's byte rate includes unfinished uploads."""
    if _STATS is not None:
        _STATS[2 * _SLOT] += body_bytes


def totals() -> dict[str, int]:
    if _STATS is None:
        return {"bytes": 0, "requests": 0}
    values = list(_STATS)
    return {"bytes": sum(values[0::2]), "requests": sum(values[1::2])}


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(SinkProtocol, host, port, reuse_port=True, backlog=4096)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def _run(host: str, port: int, stats: ctypes.Array[ctypes.c_uint64], slot: int) -> None:
    global _STATS, _SLOT
    _STATS, _SLOT = stats, slot
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(host, port))
    else:
        uvloop.run(serve(host, port))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    ctx = multiprocessing.get_context("fork")
    stats = ctx.RawArray(ctypes.c_uint64, 2 * args.processes)
    procs = [
        ctx.Process(target=_run, args=(args.host, args.port, stats, slot))
        for slot in range(1, args.processes)
    ]
    for proc in procs:
        proc.start()
    try:
        _run(args.host, args.port, stats, 0)
    finally:
        for proc in procs:
            proc.terminate()
            proc.join(5)


if __name__ == "__main__":
    main()
