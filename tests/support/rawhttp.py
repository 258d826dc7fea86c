"""Raw HTTP/1.1 over a socket, for requests a well-behaved client library would not send."""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    raw: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


def parse_response(data: bytes) -> RawResponse:
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
    return RawResponse(status, headers, rest, data)


def exchange(port: int, payload: bytes, timeout: float = 10.0, read_all: bool = True) -> bytes:
    """Send ``payload``, read until the server closes (or times out), return everything read."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        chunks = []
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                if not read_all:
                    break
        except TimeoutError:
            pass
        return b"".join(chunks)


def request(port: int, payload: bytes, timeout: float = 10.0) -> RawResponse:
    return parse_response(exchange(port, payload, timeout))


def send_chunks_until_answered(
    sock: socket.socket, most: int, block_size: int = 65536
) -> tuple[int, bytes]:
    """Send zero-filled HTTP chunks of ``block_size`` on ``sock`` (its head and any first
    chunk already sent) until the server answers, stops taking them, or ``most`` bytes went;
    (body bytes sent, what was read back so far). A server that cuts a body off early answers
    well before ``most``; the caller reads the rest of the answer."""
    block = b"\0" * block_size
    frame = f"{len(block):x}\r\n".encode() + block + b"\r\n"
    sent, data = 0, b""
    sock.settimeout(0.5)
    while sent < most and b"\r\n\r\n" not in data:
        try:
            sock.sendall(frame)
            sent += len(block)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            break
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            data += sock.recv(65536)
        sock.settimeout(0.5)
    return sent, data
