"""A backend that misbehaves on purpose, and raw-socket helpers, for the fault tests (issue 7).

:class:`FaultBackend` speaks just enough HTTP/1.1 over plain sockets (one thread per connection)
to fail in ways a framework would not let us: it resets the connection while the gateway is still
sending a body, hangs after reading one, or cuts a response short after its head promised more.
The behaviour is chosen by the request path, so one backend serves every fault:

* ``…/reset-request/…``  read the head and 64 KiB of the body, then RST
* ``…/early/…``          answer 413 on the head, before reading the body, then read (discard)
  the body and go on serving the connection, as RFC 9112 §9.3 allows
* ``…/hang/…``           read the whole body, then never answer
* ``…/stall-request/…``  read the head, then never read the body nor answer (until closed)
* ``…/slow-read/…``      read the body with a :data:`SLOW_READ_PAUSE` s pause after each 4 MiB,
  then answer
* ``/fault/reset-response-length``   promise ``Content-Length: 1000000``, send 1,000 bytes, RST
* ``/fault/reset-response-chunked``  chunked: one 1,000-byte chunk, then RST (no last chunk)
* ``/fault/big/{n}``     send ``n`` bytes with a Content-Length (records how many went out)
* ``/fault/late/{204,304,length}``  answer, then 100 ms later send :data:`POISON` on the same
  (by then idle, pooled) connection: after a 204/304, or past a ``Content-Length``
* ``/fault/whoami/…``    answer with the path asked for, so a client can tell its answer
* ``/fault/chunked``, ``/fault/close-delimited``  a body without a Content-Length
* ``/fault/no-content-type``, ``/fault/latin1-header``, ``/fault/switch`` (101 unasked),
  ``/fault/te/…`` (a transfer coding other than chunked), ``/fault/invalid/…`` (a head aiohttp's
  parser refuses), ``/fault/interim/…`` (1xx first), ``/fault/no-reason``  what a framework
  would not send
* anything else          read the body and answer 200 with a small JSON document

Every request is recorded (:class:`Received`) *as soon as its head arrives*, and completed as the
body is read, so a test can prove a body never reached the backend, or reached it only in part.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import select
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tests.support.procs import free_port

SESSION_TOKEN = b"s3ss10n-" * 1100  # a header value over aiohttp's 8190-byte limit
RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a RST instead of a FIN
POISON = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nContent-Type: text/plain\r\n\r\nPOISONED!"
_ODD_ANSWERS = {
    "/fault/late/204": b"HTTP/1.1 204 No Content\r\n\r\n",
    "/fault/late/304": b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\n\r\n',
    "/fault/late/length": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "/fault/chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n",
    "/fault/close-delimited": b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhello",
    "/fault/no-content-type": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    "/fault/switch": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\n\r\n\x81\x05hello",
    "/fault/latin1-header": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
    b'Content-Disposition: attachment; filename="caf\xe9.pdf"\r\n\r\nok',
    # gzip-coded bytes would reach the client as if they were the content
    "/fault/te/gzip": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n",
    "/fault/te/two-lines": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "/fault/te/chunked-twice": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n",
    "/fault/invalid/huge-header": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nSet-Cookie: sid="
    + SESSION_TOKEN
    + b"\r\n\r\nok",
    "/fault/invalid/many-headers": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
    + b"".join(b"X-H%d: v\r\n" % i for i in range(200))
    + b"\r\nok",
    "/fault/invalid/cl-and-te": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    "/fault/invalid/two-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
    b"Content-Length: 5\r\n\r\nhello",
    "/fault/interim/100": b"HTTP/1.1 100 Continue\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "/fault/interim/103": b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "/fault/no-reason": b"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\nok",
}
EARLY = (
    b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: text/plain\r\nContent-Length: 9\r\n\r\n"
    b"too large"
)
PARTIAL_READ = 64 * 1024
SLOW_READ = 4 << 20
# Well under the send bound of the gateway it is used with (test_faults: ROOMY_READ_TIMEOUT):
# what the gateway sees as one stall is this pause plus however late this thread and the
# gateway get the CPU back, which on a loaded machine can be some tenths of a second.
SLOW_READ_PAUSE = 1.3


@dataclass
class Received:
    """What reached the backend for one request."""

    method: str
    path: str
    headers: dict[str, str]
    length: int = 0  # body bytes read
    sha256: str = ""
    complete: bool = False  # the whole body (per its framing) arrived
    response_sent: int = 0  # body bytes of our response that went out (``/fault/big``)
    _digest: object = field(default_factory=hashlib.sha256, repr=False)

    def add(self, data: bytes) -> None:
        self._digest.update(data)  # type: ignore[attr-defined]
        self.length += len(data)
        self.sha256 = self._digest.hexdigest()  # type: ignore[attr-defined]


class _Conn:
    """A buffered reader over one accepted socket."""

    def __init__(self, sock: socket.socket, stopping: threading.Event) -> None:
        self.sock = sock
        self.buf = b""
        self.stopping = stopping
        sock.settimeout(0.2)

    def _fill(self) -> bool:
        while not self.stopping.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return False
            if not data:
                return False
            self.buf += data
            return True
        return False

    def head(self) -> bytes | None:
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                return None
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        return head

    def take(self, limit: int) -> bytes:
        """Up to ``limit`` bytes (fewer only at EOF)."""
        while len(self.buf) < limit and self._fill():
            pass
        data, self.buf = self.buf[:limit], self.buf[limit:]
        return data

    def line(self) -> bytes | None:
        while b"\r\n" not in self.buf:
            if not self._fill():
                return None
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def wait_closed(self) -> None:
        """Block until the peer goes away (or the backend stops): a hanging backend."""
        while self._fill():
            self.buf = b""

    def stall(self, limit: float = 30.0) -> None:
        """Read nothing more (the receive window fills, the sender blocks) until the peer
        closes or ``limit`` s pass: a backend stuck before reading the request body."""
        deadline = time.monotonic() + limit
        while not self.stopping.is_set() and time.monotonic() < deadline:
            try:  # a peek of the head of the queue: nothing is consumed, a FIN or RST shows
                if not self.sock.recv(1, socket.MSG_PEEK) and not self.buf:
                    return
            except TimeoutError:
                pass
            except OSError:
                return
            time.sleep(0.1)
        self.sock.close()

    def reset(self) -> None:
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
        self.sock.close()


class FaultBackend:
    """Start with :meth:`start`, stop with :meth:`stop`; :meth:`records` is what arrived."""

    def __init__(self) -> None:
        self.port = free_port()
        self._records: list[Received] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: socketserver.ThreadingTCPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def records(self, path_part: str = "") -> list[Received]:
        with self._lock:
            return [r for r in self._records if path_part in r.path]

    def clear(self) -> None:
        with self._lock:
            self._records.clear()

    def start(self) -> FaultBackend:
        backend = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                backend._serve(_Conn(self.request, backend._stopping))

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True
            request_queue_size = 128  # socketserver's 5 resets connections under concurrency

            def server_bind(self) -> None:
                # A small receive window (inherited by accepted sockets), so a backend that stops
                # reading really does stop the gateway's sending mid-body.
                self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
                super().server_bind()

        self._server = Server(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _serve(self, conn: _Conn) -> None:
        """Requests on one keep-alive connection until it closes or a fault ends it."""
        while (head := conn.head()) is not None:
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])
            }
            rec = Received(method, path, headers)
            with self._lock:
                self._records.append(rec)
            if "/reset-request/" in path:
                rec.add(conn.take(PARTIAL_READ))
                conn.reset()
                return
            if "/stall-request/" in path:
                conn.stall()
                return
            if "/early/" in path:
                conn.sock.sendall(EARLY)  # before a byte of the body was read
            self._read_body(conn, rec)
            if "/early/" in path:
                continue  # answered; the body was discarded, the connection serves on
            if not self._answer(conn, rec):
                return

    def _read_body(self, conn: _Conn, rec: Received) -> None:
        if rec.headers.get("transfer-encoding", "").lower() == "chunked":
            while (line := conn.line()) is not None:
                size = int(line.split(b";", 1)[0], 16)
                if size == 0:
                    conn.line()
                    rec.complete = True
                    return
                data = conn.take(size)
                rec.add(data)
                if len(data) < size or conn.take(2) != b"\r\n":
                    return
            return
        length = int(rec.headers.get("content-length", "0"))
        while rec.length < length:
            data = conn.take(min(length - rec.length, 1 << 20))
            if not data:
                return
            rec.add(data)
            if "/slow-read/" in rec.path and rec.length % SLOW_READ == 0:
                time.sleep(SLOW_READ_PAUSE)
        rec.complete = True

    def _answer(self, conn: _Conn, rec: Received) -> bool:
        """Send the path's answer; False when the connection is finished."""
        path = rec.path
        if not rec.complete:
            return False
        if "/hang/" in path:
            conn.wait_closed()
            return False
        if path == "/fault/reset-response-length":
            conn.sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
            time.sleep(0.05)
            conn.reset()
            return False
        if path == "/fault/reset-response-chunked":
            conn.sock.sendall(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n"
                + b"y" * 1000
                + b"\r\n"
            )
            time.sleep(0.05)
            conn.reset()
            return False
        if path.startswith("/fault/big/"):
            return self._send_big(conn, rec, int(path.rsplit("/", 1)[1]))
        if path in _ODD_ANSWERS:
            conn.sock.sendall(_ODD_ANSWERS[path])
            if path.startswith("/fault/late/"):
                time.sleep(0.1)  # the gateway has put the connection back in its pool by now
                conn.sock.sendall(POISON)
            return path != "/fault/close-delimited"
        if path.startswith("/fault/whoami/"):
            body = f"you asked for {path}".encode()
            conn.sock.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            return True
        body = json.dumps(
            {"status": "success", "length": rec.length, "sha256": rec.sha256}
        ).encode()
        conn.sock.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )
        return True

    def _send_big(self, conn: _Conn, rec: Received, size: int) -> bool:
        block = b"z" * 65536
        try:
            conn.sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            while rec.response_sent < size:
                piece = block[: size - rec.response_sent]
                conn.sock.settimeout(5)
                conn.sock.sendall(piece)
                rec.response_sent += len(piece)
        except OSError:
            return False
        finally:
            conn.sock.settimeout(0.2)
        return True


# -- the client side: raw sockets ----------------------------------------------------------


def raw_head(
    method: str,
    path: str,
    secret: str,
    ctype: str = "",
    length: int | None = None,
    chunked: bool = False,
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: gw", f"Authorization: Bearer {secret}"]
    if ctype:
        lines.append(f"Content-Type: {ctype}")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def vanish(sock: socket.socket) -> None:
    """Close with a RST, as a client whose process died or whose network went away."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
    sock.close()


def response_complete(data: bytes) -> bool:
    """Whether ``data`` holds a whole response with a Content-Length body (our problem+json)."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def chunked_complete(body: bytes) -> bool:
    """Whether a chunked body ends with its last (zero-size) chunk."""
    pos = 0
    while True:
        end = body.find(b"\r\n", pos)
        if end < 0:
            return False
        size = int(body[pos:end].split(b";")[0], 16)
        if size == 0:
            return body[end + 2 :].startswith(b"\r\n")
        pos = end + 2 + size + 2
        if pos > len(body):
            return False


def send_while_listening(sock: socket.socket, payload: bytes, piece: int = 65536) -> bytes:
    """Send ``payload`` in pieces, stopping as soon as the server answers or hangs up.

    A gateway that refuses a body midway answers and closes while we are still sending; reading
    between pieces gets that answer before a RST (from unread bytes) could destroy it.
    """
    for start in range(0, len(payload), piece):
        readable, _, _ = select.select([sock], [], [], 0)
        if readable:
            break
        try:
            sock.sendall(payload[start : start + piece])
        except OSError:
            break
    return read_response(sock)


def read_response(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Read until a whole response, EOF, a reset or ``timeout``."""
    sock.settimeout(timeout)
    data = b""
    while not response_complete(data):
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        data += chunk
    return data


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data) if data else b""


async def trickle_upload(
    port: int, head: bytes, body: bytes, release: asyncio.Event, give_up: float
) -> bytes:
    """A slow chunked upload: half the body at once, then 100 bytes every 0.2 s until
    ``release`` (then the rest) or ``give_up`` s. Returns the answer, ``b""`` if cut off."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        sent = len(body) // 2
        writer.write(head + _chunk(body[:sent]))
        await writer.drain()
        deadline = time.monotonic() + give_up
        while not release.is_set() and time.monotonic() < deadline:
            writer.write(_chunk(body[sent : sent + 100]))
            sent += 100
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(release.wait(), 0.2)
        if release.is_set():
            writer.write(_chunk(body[sent:]) + b"0\r\n\r\n")
            await writer.drain()
        return await asyncio.wait_for(reader.read(), 15)
    except OSError:
        return b""
    finally:
        writer.close()


def connect_refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


# -- the gateway process, seen from outside -----------------------------------------------------


def open_fds(pid: int) -> dict[str, str]:
    """fd -> what it points at (``socket:[…]``, a path, …) for a live process."""
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            out[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
    return out


def established_to(port: int) -> int:
    """Established TCP connections on this machine whose far end is local ``port``: what a
    connection pool still holds open to a backend listening there."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                    count += 1
    return count


def wait_until(check: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def gauge(admin_port: int, name: str) -> float:
    """The sum of a Prometheus gauge's samples on the admin listener."""
    with socket.create_connection(("127.0.0.1", admin_port)) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        text = read_response(sock).decode()
    found = re.findall(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", text, re.MULTILINE)
    return sum(float(v) for v in found)
