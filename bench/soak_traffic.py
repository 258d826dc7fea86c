"""The soak's traffic: the weighted mix of request shapes and the clients that send it.

Kept apart from the checks so the mix can be read (and tuned) as one table, and so what a
request looked like on the wire (``Sent``: its id, SHA-256, status, problem ``code``) is defined
next to the code that fills it in. Accepted uploads go through aiohttp; the shapes aiohttp will
not produce (a head announcing 60 MiB, a stall, an RST mid-body) go over a bare socket.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import socket
import time
from dataclasses import dataclass

import aiohttp

from tests.support.files import make, multipart

KiB, MiB = 1024, 1024 * 1024
BODY_TIMEOUT = 2.0


# -- the mix ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class P:
    """One multipart part: a real ``kind`` file padded to a random size in ``[lo, hi]``."""

    kind: str
    lo: int = 0
    hi: int = 0
    name: str | None = None
    field: str = "file"
    ctype: str | None = None

    def build(self, rng: random.Random) -> tuple[str, str | None, str | None, bytes]:
        if self.kind == "data":  # the platform's role marker, not a file
            return ("data", None, "application/json", b'{"IsManager": true}')
        size = rng.randint(self.lo, self.hi) if self.hi else None
        return (self.field, self.name or f"f.{self.kind}", self.ctype, make(self.kind, size))


@dataclass(frozen=True)
class Case:
    """One request shape: ``status``/``codes`` expected; ``raw`` ones go over a bare socket."""

    name: str
    weight: float
    status: int  # 200: accepted; 0: an aborted client (no answer expected)
    codes: frozenset[str]
    raw: str  # "", "head-only" (Content-Length 60 MiB), "stall" (half, then silence), "abort"
    bodies: tuple[tuple[str, str, bytes, str], ...]  # (path, secret, body, content type)


UP, WA = "/streams/{}/objects", "/whatsapp/uploadmedia/whatsapp"
EXE = "type_not_allowed type_mismatch"
# fmt: off
MIX = [  # name, weight, status, codes, raw, who, path, parts, variants
    ("accepted png 1-300 KiB", 20, 200, "", "", "customer", UP.format(4711), [P("png", KiB, 300 * KiB)], 6),  # noqa: E501
    ("accepted jpeg < 64 KiB (memory spool)", 12, 200, "", "", "customer", UP.format(4712), [P("jpeg", KiB, 60 * KiB)], 6),  # noqa: E501
    ("accepted pdf 0.5-3 MiB (disk spool)", 8, 200, "", "", "customer", UP.format("big"), [P("pdf", MiB // 2, 3 * MiB)], 6),  # noqa: E501
    ("accepted docx + zip (agent, /child)", 8, 200, "", "", "agent", UP.format(4713) + "/9/child", [P("docx"), P("zip", 4 * KiB, 200 * KiB)], 6),  # noqa: E501
    ("accepted 3 files, IsManager marker", 6, 200, "", "", "plain", UP.format(4714), [P("data"), P("png"), P("pdf", KiB, 100 * KiB), P("gif")], 6),  # noqa: E501
    ("accepted whatsapp mp4 + ogg (agent)", 6, 200, "", "", "agent", WA, [P("mp4", KiB, 500 * KiB, field="pic"), P("ogg", field="pic")], 6),  # noqa: E501
    ("413 file_too_large", 5, 413, "file_too_large", "", "customer", UP.format("small"), [P("png", 65 * KiB, 90 * KiB)], 6),  # noqa: E501
    ("413 too_many_files", 3, 413, "too_many_files", "", "customer", UP.format(1), [P("png")] * 11, 1),  # noqa: E501
    ("413 request_too_large (headers only)", 2, 413, "request_too_large", "head-only", "customer", UP.format(9), [P("png")], 1),  # noqa: E501
    ("415 type_not_allowed", 5, 415, "type_not_allowed", "", "customer", UP.format(2), [P("docx")], 1),  # noqa: E501
    ("415 type_mismatch (ELF as invoice.pdf)", 5, 415, "type_mismatch", "", "agent", UP.format(3), [P("elf", name="invoice.pdf", ctype="application/pdf")], 1),  # noqa: E501
    ("415 executable (PE)", 3, 415, EXE, "", "agent", UP.format(4), [P("pe", name="setup.exe")], 1),
    ("403 uploads_disabled", 3, 403, "uploads_disabled", "", "customer", WA, [P("png", field="pic")], 1),  # noqa: E501
    ("403 key_not_active (revoked key)", 3, 403, "key_not_active", "", "revoked", UP.format(5), [P("png")], 1),  # noqa: E501
    ("401 missing_secret", 2, 401, "missing_secret", "", "nobody", UP.format(6), [P("png")], 1),
    ("401 invalid_secret (forged signature)", 2, 401, "invalid_secret", "", "forged", UP.format(7), [P("png")], 1),  # noqa: E501
    ("400 malformed_request (no boundary)", 2, 400, "malformed_request", "", "customer", UP.format(8), [], 1),  # noqa: E501
    ("408 body_timeout (client stalls)", 0.3, 408, "body_timeout", "stall", "customer", UP.format(10), [P("pdf", 200 * KiB, 200 * KiB)], 1),  # noqa: E501
    ("aborted mid-body (RST)", 1.5, 0, "", "abort", "customer", UP.format(11), [P("pdf", 100 * KiB, 2 * MiB)], 3),  # noqa: E501
]
# fmt: on


def build_cases(secrets: dict[str, str], rng: random.Random) -> list[Case]:
    cases = []
    for name, weight, status, codes, raw, who, path, parts, count in MIX:
        bodies = []
        for _ in range(count):
            if parts:
                body, ctype = multipart([p.build(rng) for p in parts])
            else:
                body, ctype = b"--x\r\nnot a part", "multipart/form-data"
            bodies.append((path, secrets[who], body, ctype))
        cases.append(Case(name, weight, status, frozenset(codes.split()), raw, tuple(bodies)))
    return cases


# -- sending ----------------------------------------------------------------------------------


@dataclass
class Sent:
    rid: str
    case: Case
    sha256: str
    length: int
    status: int = 0
    code: str | None = None
    error: str = ""
    seconds: float = 0.0


SHA: dict[int, str] = {}


def sha_of(body: bytes) -> str:
    key = id(body)
    if key not in SHA:
        SHA[key] = hashlib.sha256(body).hexdigest()
    return SHA[key]


async def send(
    session: aiohttp.ClientSession, port: int, case: Case, rid: str, rng: random.Random
) -> Sent:
    path, secret, body, ctype = rng.choice(case.bodies)
    sent = Sent(rid, case, sha_of(body), len(body))
    headers = {"Content-Type": ctype, "X-Request-Id": rid}
    if secret:
        headers["Authorization"] = f"Bearer {secret}"
    started = time.monotonic()
    try:
        if case.raw:
            sent.status, sent.code = await send_raw(port, case.raw, path, headers, body)
        else:
            async with session.post(
                f"http://127.0.0.1:{port}{path}", data=body, headers=headers
            ) as r:
                doc = json.loads(await r.read() or b"{}")
                sent.status, sent.code = r.status, doc.get("code")
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
        sent.error = type(exc).__name__
    sent.seconds = time.monotonic() - started
    return sent


async def send_raw(
    port: int, mode: str, path: str, headers: dict[str, str], body: bytes
) -> tuple[int, str | None]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    length = 60 * MiB if mode == "head-only" else len(body)
    head = f"POST {path} HTTP/1.1\r\nHost: soak\r\nContent-Length: {length}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    try:
        writer.write(head.encode() + (b"" if mode == "head-only" else body[: len(body) // 2]))
        await writer.drain()
        if mode == "abort":
            await asyncio.sleep(0.02)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            writer.transport.abort()
            return 0, None
        return await asyncio.wait_for(read_problem(reader), BODY_TIMEOUT + 10)
    finally:
        writer.close()


async def read_problem(reader: asyncio.StreamReader) -> tuple[int, str | None]:
    """Status and ``code`` of one response, read by its Content-Length (not to EOF: after a
    refusal aiohttp keeps the connection open for a lingering read of the unsent body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    payload = await reader.readexactly(length)
    return int(head.split(b" ", 2)[1]), json.loads(payload or b"{}").get("code")


async def run_phase(
    port: int, cases: list[Case], count: int, concurrency: int, first_rid: int, rng: random.Random
) -> list[Sent]:
    weights = [c.weight for c in cases]
    plan = rng.choices(cases, weights, k=count)
    results: list[Sent] = []
    queue = iter(enumerate(plan, start=first_rid))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=60)
    ) as session:

        async def worker() -> None:
            for i, case in queue:
                results.append(await send(session, port, case, f"soak-{i:06d}", rng))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results
