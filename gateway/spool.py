"""Where an upload waits while it is inspected: memory first, then an encrypted file.

Nothing may reach the backend before every check passed (SPEC §4), so the whole body is held
until then. Small bodies stay in memory (``spool.memory_threshold``, while the worker's
``spool.memory_budget`` has room: :class:`SpoolBudget`); the others go to a file in
``spool.dir``, written with aiofiles and encrypted with AES-256-GCM under a random key that exists
only in this object, so a spool file on disk, in a backup or after a crash is unreadable.

The file is encrypted in records of :data:`RECORD_SIZE` plaintext bytes. Record *i* uses nonce
*i* and authenticates *i* and a "last record" flag, so records cannot be reordered, replayed or
cut off at a record boundary without :meth:`Spool.chunks` failing.

No spool file is ever left behind: it is created ``0600`` with ``O_EXCL`` under an unguessable
name and *unlinked at once*, keeping only the open descriptor. Even a ``kill -9`` leaves nothing
in ``spool.dir``; the space is returned when the descriptor closes (:meth:`Spool.aclose`,
idempotent, called on every path).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import secrets
import struct
from collections.abc import AsyncIterator
from typing import Any, BinaryIO

import aiofiles.threadpool
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.config.model import SpoolConfig
from gateway.errors import GatewayError
from gateway.metrics import Metrics

LOGGER = logging.getLogger("upload_gateway.spool")
RECORD_SIZE = 64 * 1024
BATCH_RECORDS = 4  # records per disk write/read: 256 KiB, one thread trip
TAG_SIZE = 16
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT)
_MADE_DIRS: set[str] = set()


def spool_full(detail: str) -> GatewayError:
    return GatewayError("spool_full", detail)


class SpoolBudget:
    """Bytes spooled by all in-flight uploads of this process, and how many of them in memory.

    ``spool.max_bytes`` bounds everything spooled (memory and disk), per process: with
    ``--workers N`` the disk may hold up to N times it. Reserving past it answers 507 instead of
    filling the disk.

    ``spool.memory_budget`` bounds the bodies held in memory, so a worker's memory does not grow
    with the number of uploads in flight: an upload stays in memory only while it is within
    ``memory_threshold`` *and* the process's in-memory total is within the budget; otherwise it
    goes to its encrypted file. Under light load, bodies up to the threshold never touch the disk.
    """

    def __init__(self, max_bytes: int, memory_bytes: int | None = None) -> None:
        self.max_bytes = max_bytes
        self.memory_bytes = max_bytes if memory_bytes is None else memory_bytes
        self.used = 0
        self.in_memory = 0

    def hold_in_memory(self, num_bytes: int) -> bool:
        """Take ``num_bytes`` of the memory budget if it has room; False means: spill."""
        if self.in_memory + num_bytes > self.memory_bytes:
            return False
        self.in_memory += num_bytes
        return True

    def release_memory(self, num_bytes: int) -> None:
        self.in_memory = max(0, self.in_memory - num_bytes)

    def reserve(self, num_bytes: int) -> None:
        if self.used + num_bytes > self.max_bytes:
            raise spool_full("the gateway's spool is full; try again shortly")
        self.used += num_bytes

    def release(self, num_bytes: int) -> None:
        self.used = max(0, self.used - num_bytes)


def _nonce(index: int) -> bytes:
    return struct.pack(">4xQ", index)


def _aad(index: int, last: bool) -> bytes:
    return struct.pack(">QB", index, 1 if last else 0)


class Spool:
    """One upload's body. Write with :meth:`write`, then :meth:`seal`, read with :meth:`chunks`."""

    def __init__(
        self,
        config: SpoolConfig,
        budget: SpoolBudget,
        metrics: Metrics | None = None,
        expected_size: int | None = None,
    ) -> None:
        self._config = config
        self._budget = budget
        self._metrics = metrics
        # A body announced (Content-Length) past the threshold would spill anyway: it goes to
        # its file from the first byte and leaves the memory budget to bodies that fit.
        self._to_disk = expected_size is not None and expected_size > config.memory_threshold
        self._memory: list[bytes] = []
        self._held = 0  # bytes of _memory counted in the budget's memory share
        self._pending = bytearray()  # plaintext of the record being filled (< one record)
        self._ready: list[bytes] = []  # encrypted records not yet written
        self._file: Any = None  # an aiofiles binary file, once spilled
        self._aead: AESGCM | None = None
        self._records = 0
        self.size = 0
        self.sealed = False
        self.closed = False

    def __repr__(self) -> str:
        where = "file" if self._file is not None else "memory"
        return f"<Spool {self.size} bytes in {where}{' closed' if self.closed else ''}>"

    @property
    def on_disk(self) -> bool:
        return self._file is not None

    def fileno(self) -> int | None:
        """The spool file's descriptor (tests read the ciphertext through /proc)."""
        return None if self._file is None else int(self._file.fileno())

    async def write(self, chunk: bytes) -> None:
        """Append ``chunk``; 507 when the budget or the disk has no room."""
        if self.closed or self.sealed:
            raise RuntimeError("write to a closed or sealed spool")
        if not chunk:
            return
        self._budget.reserve(len(chunk))
        self.size += len(chunk)
        if self._metrics is not None:
            self._metrics.spool_bytes.inc(len(chunk))
        if self._file is None:
            spill = self._spill_reason(len(chunk))
            if spill is None:
                self._held += len(chunk)
                self._memory.append(bytes(chunk))
                return
            await self._spill(spill)
        self._encrypt_records(chunk)
        await self._flush(final=False)

    def _spill_reason(self, more: int) -> str | None:
        """None when ``more`` bytes may join the body in memory (taking their budget share)."""
        if self._to_disk:
            return "announced"
        if self.size > self._config.memory_threshold:
            return "threshold"
        if not self._budget.hold_in_memory(more):
            return "budget"
        return None

    async def seal(self) -> None:
        """The body is complete: write the last record (once)."""
        if self.sealed:
            return
        self.sealed = True
        if self._file is not None:
            await self._flush(final=True)

    async def _spill(self, reason: str) -> None:
        """Create the unlinked, encrypted file and move what memory held into it."""
        path = os.path.join(self._config.dir, f".spool-{secrets.token_hex(16)}")
        try:
            # Create and unlink in one thread call: a cancellation while awaiting it cannot
            # separate the two and leave a file behind.
            raw = await asyncio.to_thread(_create_unlinked, self._config.dir, path)
        except OSError as exc:
            if exc.errno in _NO_ROOM:
                raise spool_full("no disk space to spool the upload") from None
            # Not writable (ENOTDIR, EACCES, EROFS...): an operator problem, but to the client
            # it is the same fact: there is no room to hold the upload (SPEC §5: 507).
            LOGGER.error("cannot create a spool file in %s: %s", self._config.dir, exc.strerror)
            raise spool_full("the gateway cannot write its spool; try again shortly") from None
        self._file = aiofiles.threadpool.wrap(raw)
        if self._metrics is not None:
            self._metrics.spool_spills.labels(reason=reason).inc()
        self._aead = AESGCM(AESGCM.generate_key(bit_length=256))
        # Hand what memory held to the file piece by piece, so this upload never holds its
        # memory part, a joined copy and the ciphertext at once.
        held, self._memory = self._memory[::-1], []
        while held:
            piece = held.pop()
            self._encrypt_records(piece)
            self._forget_memory(len(piece))
            await self._flush(final=False)

    def _forget_memory(self, num_bytes: int) -> None:
        """Give back memory-budget share for bytes no longer held in ``_memory``."""
        num_bytes = min(num_bytes, self._held)
        self._held -= num_bytes
        self._budget.release_memory(num_bytes)

    def _encrypt_records(self, chunk: bytes) -> None:
        """Encrypt every whole record of ``_pending`` + ``chunk`` that more bytes follow.

        All records but the last hold exactly :data:`RECORD_SIZE` bytes, so the reader knows
        where each ends; only :meth:`seal` may write the last one, so a record that ends exactly
        where the bytes so far end stays pending. Whole records are encrypted straight from
        ``chunk``: only the tail (less than a record) is copied, and nothing grows with the
        size of the network chunks.
        """
        view = memoryview(chunk)
        if self._pending:
            room = RECORD_SIZE - len(self._pending)
            self._pending += view[:room]
            view = view[room:]
            if not view:
                return
            self._ready.append(self._encrypt(memoryview(self._pending), last=False))
            self._pending = bytearray()
        whole = (len(view) - 1) // RECORD_SIZE
        for i in range(whole):
            self._ready.append(
                self._encrypt(view[i * RECORD_SIZE : (i + 1) * RECORD_SIZE], last=False)
            )
        self._pending = bytearray(view[whole * RECORD_SIZE :])

    async def _flush(self, final: bool) -> None:
        """Write the encrypted records once a batch is due; with ``final`` also the last one.

        Records are written :data:`BATCH_RECORDS` at a time: one trip to aiofiles' thread per
        batch rather than per record or network chunk.
        """
        assert self._file is not None
        if final:
            self._ready.append(self._encrypt(memoryview(self._pending), last=True))
            self._pending = bytearray()
        elif len(self._ready) < BATCH_RECORDS:
            return
        out, self._ready = self._ready, []
        try:
            await self._file.writelines(out)  # one thread trip, no joined copy
            if final:
                await self._file.flush()
        except OSError as exc:
            if exc.errno in _NO_ROOM:
                raise spool_full("the disk filled up while spooling the upload") from None
            raise

    def _encrypt(self, plain: memoryview, last: bool) -> bytes:
        assert self._aead is not None
        record = self._aead.encrypt(_nonce(self._records), plain, _aad(self._records, last))
        self._records += 1
        return record

    def in_memory(self) -> list[bytes] | None:
        """The pieces of a body that never left memory, else None.

        Such a body needs no decryption and no thread: the forwarder can hand the pieces to the
        connection as they are, without the async iterators a spilled body goes through.
        """
        if self.closed or self._file is not None or not self.sealed:
            return None
        return self._memory

    async def chunks(self) -> AsyncIterator[bytes]:
        """The exact bytes written, decrypted and authenticated record by record."""
        if self.closed:
            raise RuntimeError("read from a closed spool")
        await self.seal()
        if self._file is None:
            for piece in self._memory:
                yield piece
            return
        assert self._aead is not None
        await self._file.seek(0)
        stored = RECORD_SIZE + TAG_SIZE
        for first in range(0, self._records, BATCH_RECORDS):
            count = min(BATCH_RECORDS, self._records - first)
            batch = memoryview(await self._file.read(stored * count))
            for offset in range(count):
                index = first + offset
                record = batch[offset * stored : (offset + 1) * stored]
                try:
                    yield self._aead.decrypt(
                        _nonce(index), record, _aad(index, index == self._records - 1)
                    )
                except InvalidTag:
                    raise RuntimeError(f"spool record {index} failed authentication") from None

    async def aclose(self) -> None:
        """Release everything; safe to call any number of times, from any path."""
        if self.closed:
            return
        self.closed = True
        self._budget.release(self.size)
        self._forget_memory(self._held)
        if self._metrics is not None:
            self._metrics.spool_bytes.dec(self.size)
        self._memory = []
        self._pending = bytearray()
        self._ready = []
        self._aead = None
        handle, self._file = self._file, None
        if handle is not None:
            # Closing flushes what the buffer still holds; on a full disk that fails again.
            # The file is unlinked and its bytes unwanted: the descriptor is closed regardless.
            with contextlib.suppress(OSError):
                await handle.close()


def _create_unlinked(directory: str, path: str) -> BinaryIO:
    """A new ``0600`` file (never through a planted symlink), already removed from ``directory``."""
    if directory not in _MADE_DIRS:  # one makedirs per directory, not one per spill
        os.makedirs(directory, mode=0o700, exist_ok=True)
        _MADE_DIRS.add(directory)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)
    try:
        os.unlink(path)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "w+b")
