"""Checks outside wrk: does a peer really forward the whole upload, and how fast is a refusal."""

from __future__ import annotations

import http.client
import socket
import statistics
import time
from typing import Any

from bench.payloads import CONTENT_TYPE, UPLOAD_PATH, Body
from bench.peers import Peer

REFUSED_SIZE = 25 * 1024 * 1024  # announced, never sent


def preflight(peer: Peer, body: Body, secret: str) -> str | None:
    """None if one upload comes back 200 with the sink having read every byte, else why not."""
    conn = http.client.HTTPConnection("127.0.0.1", peer.port, timeout=60)
    try:
        conn.request(
            "POST",
            UPLOAD_PATH,
            body=body.path.read_bytes(),
            headers={
                "Content-Type": CONTENT_TYPE,
                "Authorization": f"Bearer {secret}",
            },
        )
        response = conn.getresponse()
        text = response.read()[:300].decode(errors="replace")
        got = response.getheader("X-Sink-Body-Bytes")
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
    if response.status != 200:
        return f"status {response.status}: {text}"
    if got != str(body.size):
        return f"the sink read {got} bytes of a {body.size}-byte body"
    return None


def refusal_latency(peer: Peer, secret: str, count: int = 300) -> dict[str, Any]:
    """Time from sending the headers of a 25 MB upload (Content-Length, no body) to its status line.

    The client never sends a body byte, so an answer proves the peer decided without reading
    one. Each probe uses a fresh connection (connect time is not counted): a refused upload's
    connection is usually closed by the server.

    The body is announced as a raw PNG (the whole body is one file, SPEC §4), not multipart: a
    25 MB multipart request may legitimately hold two 12.5 MB files under ``max_request_size``
    (50 MB), so no honest gateway can refuse it from the headers; a 25 MB single file it can.
    """
    head = (
        f"POST {UPLOAD_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{peer.port}\r\n"
        f"Authorization: Bearer {secret}\r\nContent-Type: image/png\r\n"
        f'Content-Disposition: attachment; filename="big.png"\r\n'
        f"Content-Length: {REFUSED_SIZE}\r\n\r\n"
    ).encode()
    times: list[float] = []
    statuses: dict[str, int] = {}
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", peer.port), timeout=2) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            started = time.perf_counter()
            sock.sendall(head)
            try:
                status = _read_status(sock)
            except TimeoutError:
                status = "timeout"
            times.append((time.perf_counter() - started) * 1000)
        statuses[status] = statuses.get(status, 0) + 1
        if statuses.get("timeout", 0) >= 3:
            break  # the peer waits for the body: that is the finding, no need for 300 of them
    times.sort()
    return {
        "peer": peer.name,
        "requests": len(times),
        "statuses": statuses,
        "p50_ms": round(statistics.median(times), 3),
        "p99_ms": round(times[min(len(times) - 1, int(len(times) * 0.99))], 3),
        "max_ms": round(times[-1], 3),
    }


def _read_status(sock: socket.socket) -> str:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return "closed"
        data += chunk
    parts = data.split(b"\r\n", 1)[0].split(b" ")
    return parts[1].decode() if len(parts) > 1 else "?"
