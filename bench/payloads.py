"""Real upload bodies: a valid PNG padded to size, wrapped in the platform's multipart shape.

libmagic only reads the first ``sniff_bytes``, so a PNG whose padding sits in a private ancillary
chunk (``bnCh``, ignored by decoders, CRC correct) is still "image/png" at any size. The padding is
pseudo-random so nothing on the path can win by compressing it.
"""

from __future__ import annotations

import random
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

BOUNDARY = "----upload-gateway-bench-7c1f3a9e"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
UPLOAD_PATH = "/streams/4711/objects"  # channel id 4711 is not listed: policy "default"

# file bytes per size label; 20MB stays under the agents' 20 MiB (20,971,520 B) file limit
SIZES: dict[str, int] = {"10KB": 10 * 1024, "1MB": 1024 * 1024, "20MB": 20_000_000}


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(size: int, seed: int = 6) -> bytes:
    """A 1x1 PNG of exactly ``size`` bytes (at least 81)."""
    head = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 6, 0, 0, 0))
    idat = _chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00\xff"))
    tail = _chunk(b"IEND", b"")
    pad = size - len(head) - len(idat) - len(tail) - 12
    if pad < 0:
        raise ValueError(f"a PNG needs at least {size - pad} bytes")
    filler = random.Random(seed).randbytes(pad)
    return head + _chunk(b"bnCh", filler) + idat + tail


def multipart(file_bytes: bytes, filename: str = "bench.png") -> bytes:
    """The platform's upload: a ``data`` part with ``IsManager`` and one ``file`` part."""
    dash = b"--" + BOUNDARY.encode()
    disposition = f'Content-Disposition: form-data; name="file"; filename="{filename}"'
    head = [
        dash,
        b'Content-Disposition: form-data; name="data"',
        b"Content-Type: application/json",
        b"",
        b'{"IsManager": true}',
        dash,
        disposition.encode(),
        b"Content-Type: image/png",
        b"",
        b"",
    ]
    return b"\r\n".join(head) + file_bytes + b"\r\n" + dash + b"--\r\n"


@dataclass(frozen=True)
class Body:
    label: str
    file_size: int
    path: Path  # the whole multipart body, as wrk sends it

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def write_bodies(workdir: Path) -> dict[str, Body]:
    """One body file per size label, written once per run."""
    workdir.mkdir(parents=True, exist_ok=True)
    bodies = {}
    for label, size in SIZES.items():
        path = workdir / f"body-{label}.bin"
        path.write_bytes(multipart(png(size)))
        bodies[label] = Body(label, size, path)
    return bodies
