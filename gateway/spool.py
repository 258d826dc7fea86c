"""Where an upload waits while it is inspected: memory first, then an encrypted file.

Nothing may reach the backend before every check passed (SPEC §4), so the whole body is held
until then. Small bodies stay in memory (``spool.memory_threshold``); larger ones go to a file in
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
    """Bytes spooled (memory and disk) by all in-flight uploads of this process.

    ``spool.max_bytes`` is therefore a per-process bound: with ``--workers N`` the disk may hold
    up to N times it. Reserving past it answers 507 instead of filling the disk.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = 0

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
        self, config: SpoolConfig, budget: SpoolBudget, metrics: Metrics | None = None
    ) -> None:
        self._config = config
        self._budget = budget
        self._metrics = metrics
        self._memory: list[bytes] = []
        self._pending = bytearray()  # plaintext not yet a whole record
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
        if self._file is None and self.size <= self._config.memory_threshold:
            self._memory.append(bytes(chunk))
            return
        if self._file is None:
            await self._spill()
        self._pending += chunk
        await self._flush(final=False)

    async def seal(self) -> None:
        """The body is complete: write the last record (once)."""
        if self.sealed:
            return
        self.sealed = True
        if self._file is not None:
            await self._flush(final=True)

    async def _spill(self) -> None:
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
        self._aead = AESGCM(AESGCM.generate_key(bit_length=256))
        # Hand what memory held to the file piece by piece, so this upload never holds its
        # memory part, a joined copy and the ciphertext at once.
        held, self._memory = self._memory[::-1], []
        while held:
            self._pending += held.pop()
            await self._flush(final=False)

    async def _flush(self, final: bool) -> None:
        """Encrypt and write whole records once a batch is due; with ``final`` everything,
        including the last (partial or empty) record.

        All records but the last hold exactly :data:`RECORD_SIZE` bytes, so the reader knows
        where each ends; the last may be shorter and is the only one flagged last. Records are
        written :data:`BATCH_RECORDS` at a time: one trip to aiofiles' thread per batch rather
        than per network chunk, and no copy of the plaintext but the one into ``_pending``.
        """
        assert self._file is not None
        whole = len(self._pending) // RECORD_SIZE
        if not final and whole < BATCH_RECORDS:
            return
        if not final and whole * RECORD_SIZE == len(self._pending):
            whole -= 1  # keep a non-empty tail: only the final flush may write the last record
        view = memoryview(self._pending)
        out = [
            self._encrypt(view[i * RECORD_SIZE : (i + 1) * RECORD_SIZE], last=False)
            for i in range(whole)
        ]
        if final:
            out.append(self._encrypt(view[whole * RECORD_SIZE :], last=True))
        view.release()
        del self._pending[: whole * RECORD_SIZE if not final else len(self._pending)]
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
        if self._metrics is not None:
            self._metrics.spool_bytes.dec(self.size)
        self._memory = []
        self._pending = bytearray()
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
