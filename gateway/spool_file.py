"""The spool's file: AES-256-GCM records under a key that exists only in this object.

A spool file on disk, in a backup or after a crash is unreadable. It is created ``0600`` with
``O_EXCL`` under an unguessable name and *unlinked at once*, keeping only the open descriptor,
so even a ``kill -9`` leaves nothing in ``spool.dir``; the space is returned when the descriptor
closes.

Each chunk the client sent becomes one record, as it is (cut at :data:`MAX_RECORD`; pieces
under :data:`MIN_RECORD` are gathered first), so a byte is encrypted where it lies and never
copied into a record buffer; the record sizes are kept in memory. Record *i* uses nonce *i* and
authenticates *i* and a "last record" flag (the last record may be empty), so records cannot be
reordered, replayed or cut off at a record boundary without :meth:`SpoolFile.chunks` failing.

What costs the event loop here is not the disk but crossing to a thread and back (and the
thread taking the GIL back after each syscall): records are encrypted into one buffer and
written a batch at a time through aiofiles (:meth:`SpoolFile._write_batch`), and read back on
the loop itself while the page cache holds them (:meth:`SpoolFile.chunks`).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import logging
import mmap
import os
import secrets
import struct
from collections.abc import AsyncIterator, Iterator
from typing import Any, BinaryIO

import aiofiles.threadpool
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.errors import GatewayError

LOGGER = logging.getLogger("upload_gateway.spool")
# Larger chunks are cut (uvloop reads 256 KiB at most, so a chunk rarely is); also the size of
# the read-back buffer. 64 KiB records cost 46 instead of 40 ms of CPU per 20 MB upload.
MAX_RECORD = 256 * 1024
# Smaller pieces (a slow client's) are gathered into one record first: every record costs a
# 16-byte tag on disk and an AEAD call, and one record per byte would be a 17x amplification.
MIN_RECORD = 16 * 1024
TAG_SIZE = 16
STORED_RECORD = MAX_RECORD + TAG_SIZE  # the largest record on disk
# Records per disk write: one (up to 256 KiB), or two when the spool's memory budget has room for
# them (Spool decides). Also the records per read when the page cache no longer holds them.
BATCH_RECORDS = 1
LARGE_BATCH_RECORDS = 2
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT)
_MADE_DIRS: set[str] = set()
_RWF_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None)  # Linux 4.14+


def spool_full(detail: str) -> GatewayError:
    return GatewayError("spool_full", detail)


@contextlib.contextmanager
def _full_disk_is_507() -> Iterator[None]:
    """A write or flush that finds the disk (or quota) full is the client's 507, not a 500."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _NO_ROOM:
            raise spool_full("the disk filled up while spooling the upload") from None
        raise


def _nonce(index: int) -> bytes:
    return struct.pack(">4xQ", index)


def _aad(index: int, last: bool) -> bytes:
    return struct.pack(">QB", index, 1 if last else 0)


class SpoolFile:
    """One upload's encrypted file: :meth:`append`, then :meth:`seal`, then :meth:`chunks`."""

    def __init__(self, raw: BinaryIO, batch_records: int) -> None:
        self._file: Any = aiofiles.threadpool.wrap(raw)
        self._aead: AESGCM | None = AESGCM(AESGCM.generate_key(bit_length=256))
        self._area: mmap.mmap | None = None
        self._pending = memoryview(b"")  # small pieces gathered into a record (in _area)
        self._filled = 0  # bytes of _pending in use (< MIN_RECORD)
        self._batch = memoryview(b"")  # encrypted records not yet written (in _area)
        self._batched = 0  # bytes of _batch in use
        self._allocate(batch_records)
        # Plaintext bytes of each record, in order: 4 bytes each (a client trickling its body
        # gets 16 KiB records, up to 131,072 of them under a 2 GiB spool.max_bytes).
        self._sizes = array.array("I")
        self._nowait = _RWF_NOWAIT is not None
        self.sealed = False

    @classmethod
    async def create(cls, directory: str, batch_records: int) -> SpoolFile:
        """A new file in ``directory``; 507 when it cannot be created."""
        path = os.path.join(directory, f".spool-{secrets.token_hex(16)}")
        try:
            # Create and unlink in one thread call: a cancellation while awaiting it cannot
            # separate the two and leave a file behind.
            raw = await asyncio.to_thread(_create_unlinked, directory, path)
        except OSError as exc:
            if exc.errno in _NO_ROOM:
                raise spool_full("no disk space to spool the upload") from None
            # Not writable (ENOTDIR, EACCES, EROFS...): an operator problem, but to the client
            # it is the same fact: there is no room to hold the upload (SPEC §5: 507).
            LOGGER.error("cannot create a spool file in %s: %s", directory, exc.strerror)
            raise spool_full("the gateway cannot write its spool; try again shortly") from None
        try:
            return cls(raw, batch_records)
        except BaseException:
            raw.close()  # e.g. no memory for the buffers: the descriptor must not outlive this
            raise

    def fileno(self) -> int:
        return int(self._file.fileno())

    def _allocate(self, records: int) -> None:
        """One anonymous mapping: room to gather small pieces into a record, then the batch
        of encrypted records waiting for their write.

        Its own mapping, not the heap: it lives as long as the upload is being received, and
        many such buffers of different lifetimes fragment glibc's heap. Unmapped, the memory is
        back with the kernel at once.
        """
        self._area = mmap.mmap(-1, MIN_RECORD + records * STORED_RECORD)
        whole = memoryview(self._area)
        self._pending, self._batch = whole[:MIN_RECORD], whole[MIN_RECORD:]
        whole.release()

    def _release_buffers(self) -> None:
        """The write buffers are gone once the body is sealed or dropped."""
        area, self._area = self._area, None
        self._pending = self._batch = memoryview(b"")
        self._filled = self._batched = 0
        if area is not None:
            # A view still held elsewhere (a write cancelled mid-flight) keeps the mapping
            # until it goes; it is unmapped then.
            with contextlib.suppress(BufferError):
                area.close()

    async def append(self, chunk: bytes) -> None:
        """Encrypt ``chunk`` as one record (or several, past :data:`MAX_RECORD`).

        Only pieces under :data:`MIN_RECORD` are copied, gathered into a record of that size;
        a client that sends large chunks has every byte encrypted straight from the chunk.
        """
        if self.sealed:
            raise RuntimeError("append to a sealed spool file")
        view = memoryview(chunk)
        if self._filled:
            take = min(MIN_RECORD - self._filled, len(view))
            self._pending[self._filled : self._filled + take] = view[:take]
            self._filled += take
            if self._filled < MIN_RECORD:
                return
            view = view[take:]
            await self._add_record(self._pending, last=False)
            self._filled = 0
        while len(view) >= MIN_RECORD:
            size = min(len(view), MAX_RECORD)
            await self._add_record(view[:size], last=False)
            view = view[size:]
        self._pending[: len(view)] = view
        self._filled = len(view)

    async def seal(self) -> None:
        """Write the last record (what is gathered, maybe nothing) and flush (once); the write
        buffers are released."""
        if self.sealed:
            return
        await self._add_record(self._pending[: self._filled], last=True)
        await self._write_batch()
        self.sealed = True
        self._release_buffers()
        with _full_disk_is_507():
            await self._file.flush()

    async def _add_record(self, plain: memoryview, last: bool) -> None:
        """Encrypt one record into the batch, writing the batch first if it is full."""
        assert self._aead is not None
        if self._batched + len(plain) + TAG_SIZE > len(self._batch):
            await self._write_batch()
        end = self._batched + len(plain) + TAG_SIZE
        slot = self._batch[self._batched : end]
        index = len(self._sizes)
        self._aead.encrypt_into(_nonce(index), plain, _aad(index, last), slot)
        self._sizes.append(len(plain))
        self._batched = end

    async def _write_batch(self) -> None:
        """The batch's records in one ``write``: one trip to aiofiles' thread, one syscall.

        Both counts matter: each trip, and each time the thread takes the GIL back after a
        syscall, costs the event loop far more than the write itself (``bench/NOTES.md``,
        third round), so records are not handed over one by one.
        """
        if not self._batched:
            return
        with _full_disk_is_507():
            await self._file.write(self._batch[: self._batched])
        self._batched = 0

    async def chunks(self) -> AsyncIterator[bytes]:
        """The exact bytes appended, decrypted and authenticated record by record.

        Each record is read on the event loop when the page cache holds it (``preadv`` with
        ``RWF_NOWAIT``: the kernel answers from memory or says it would block, so the loop
        never waits for the disk) and through a worker thread, a write batch's worth of bytes at
        a time, only when it would. A body spooled moments ago is almost always still cached.
        """
        if not self.sealed or self._aead is None:
            raise RuntimeError("read from an unsealed or closed spool file")
        fd = self.fileno()
        buffer = memoryview(bytearray(STORED_RECORD))  # reused for every cached read
        index, offset = 0, 0
        while index < len(self._sizes):
            size = self._sizes[index] + TAG_SIZE
            record = self._read_cached(fd, buffer[:size], offset)
            if record is not None:
                yield self._decrypt(index, record)  # decrypted before the generator pauses
                offset += size
                index += 1
                continue
            sizes = self._thread_batch(index)
            batch = memoryview(await asyncio.to_thread(os.pread, fd, sum(sizes), offset))
            start = 0
            for size in sizes:
                yield self._decrypt(index, batch[start : start + size])
                start += size
                index += 1
            offset += start

    def _thread_batch(self, index: int) -> list[int]:
        """Stored sizes of the records from ``index`` that one thread read takes: as many as
        fit in a write batch's bytes (at least one), so small records cost no more trips."""
        end, total = index, 0
        while end < len(self._sizes):
            size = self._sizes[end] + TAG_SIZE
            if end > index and total + size > BATCH_RECORDS * STORED_RECORD:
                break
            total += size
            end += 1
        return [plain + TAG_SIZE for plain in self._sizes[index:end]]

    def _read_cached(self, fd: int, into: memoryview, offset: int) -> memoryview | None:
        """``into`` filled from the page cache, or None when that would block (or cannot be
        asked: no ``RWF_NOWAIT`` on this platform or this filesystem, e.g. tmpfs)."""
        if not self._nowait or _RWF_NOWAIT is None:
            return None
        try:
            got = os.preadv(fd, [into], offset, _RWF_NOWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            self._nowait = False
            return None
        return into if got == len(into) else None

    def _decrypt(self, index: int, record: memoryview) -> bytes:
        assert self._aead is not None
        last = index == len(self._sizes) - 1
        try:
            return self._aead.decrypt(_nonce(index), record, _aad(index, last))
        except InvalidTag:
            raise RuntimeError(f"spool record {index} failed authentication") from None

    async def aclose(self) -> None:
        """Forget the key, release the buffers, close the descriptor; idempotent."""
        self._aead = None
        self._release_buffers()
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
    try:
        fd = os.open(path, flags, 0o600)
    except FileNotFoundError:
        # The directory went away since it was made (a tmp cleaner, an operator): make it
        # again, once, rather than answer 507 to every spill until a restart.
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd = os.open(path, flags, 0o600)
    try:
        os.unlink(path)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "w+b")
