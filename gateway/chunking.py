"""How much chunked framing a request body may carry for the bytes it delivers (SPEC §5).

aiohttp's C parser (llhttp) finds the chunks, but hands each one to Python: the body reader's
``feed_data`` and chunk bookkeeping while parsing, then one step per piece when the handler
reads. That is ~0.7 us of CPU per HTTP chunk whatever its size, so a body sent in 1-byte chunks
(``1\\r\\nX\\r\\n``) cost ~0.7 s per MB delivered, 50 times or more what the same wire bytes
cost in large chunks (``python -m bench.chunking``): one request could hold a worker for tens
of seconds within ``limits.max_request_size``. nginx and Envoy parse chunks in C and have no
such cost to bound.

A chunked body is therefore held to :data:`FREE_CHUNKS` plus one chunk per
:data:`MIN_AVERAGE_CHUNK` bytes it has delivered. What is counted is what costs: the pieces
the parser appended to the body's reader (one per HTTP chunk, or two when a chunk straddles
two socket reads). :class:`ChunkCount` is read by :class:`gateway.protocol.GatewayProtocol`
around each call into the parser, which feeds at most ~2,048 chunks before aiohttp pauses it
(``read_bufsize`` / 16), so the verdict comes within that many chunks of the bound.
"""

from __future__ import annotations

from aiohttp import StreamReader

from gateway.errors import GatewayError

FREE_CHUNKS = 4096
"""Chunks any body may have, however small: clients flush a few small writes (a multipart
part's head and boundary, a streamed JSON's first tokens), and a few hundred such chunks are
ordinary. 4,096 chunks cost ~3 ms of CPU: with one parser step past it, the most a body of
1-byte chunks costs before its refusal (~4 ms measured, against 1.4 s per 2 MB before)."""

MIN_AVERAGE_CHUNK = 64
"""Past :data:`FREE_CHUNKS`, a body must average this many bytes per chunk. Browsers, curl,
aiohttp, Go and okhttp send chunks of KBs, and a body read one TCP segment at a time still
averages ~1,400 bytes a piece. At 64 bytes a chunk a body costs ~15 ms of CPU per MB on the
wire: several times a body in large chunks (~2 ms), but less than ordinary 10 KB uploads (~45
ms per MB), so framing buys nobody more CPU per byte sent than ordinary traffic does, and a
50 MB request (the default ``limits.max_request_size``) spends at most ~0.6 s on it. Smaller
is fragmented on purpose, or a client writing a byte at a time, which should buffer or send a
``Content-Length``."""


class ChunkCount:
    """The chunks one chunked body has delivered so far, against its bound.

    ``mark()`` before the parser is fed and ``over(mark)`` after it: the reader's buffer only
    grows inside the parser (its reader takes pieces out between calls), so the difference is
    what that call fed. Two ``len`` calls and a comparison per socket read: nothing per byte.
    """

    __slots__ = ("chunks", "reader", "refused")

    def __init__(self, reader: StreamReader) -> None:
        self.reader = reader
        self.chunks = len(reader._buffer)  # what the read that ended the head already fed
        self.refused = False

    def mark(self) -> int:
        return len(self.reader._buffer)

    def over(self, mark: int) -> bool:
        """Count what the parser fed since ``mark``; True once the body is past its bound."""
        self.chunks += len(self.reader._buffer) - mark
        return self.chunks > FREE_CHUNKS + self.reader.total_bytes // MIN_AVERAGE_CHUNK

    def error(self) -> GatewayError:
        received = self.reader.total_bytes
        return GatewayError(
            "malformed_request",
            f"the body's chunked framing is out of proportion to its content: {self.chunks} "
            f"HTTP chunks for {received} bytes, past the {FREE_CHUNKS} chunks any body may "
            f"have plus one per {MIN_AVERAGE_CHUNK} bytes; send larger chunks or a "
            "Content-Length",
        )
