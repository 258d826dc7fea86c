"""Where an upload waits while it is inspected: memory first, then an encrypted file.

Nothing may reach the backend before every check passed (SPEC §4), so the whole body is held
until then. Small bodies stay in memory (``spool.memory_threshold``, while the worker's
``spool.memory_budget`` has room: :class:`SpoolBudget`); the others go to a file in
``spool.dir``, written with aiofiles and encrypted with AES-256-GCM under a random key that exists
only in memory (``spool_file.py``). No spool file is ever left behind, whatever the path
(accepted, refused, client gone, backend failed, cancelled): the file never has a name on disk,
and :meth:`Spool.aclose` (idempotent, called on every path) returns everything.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from gateway.config.model import SpoolConfig
from gateway.metrics import Metrics
from gateway.spool_file import (
    BATCH_RECORDS,
    LARGE_BATCH_RECORDS,
    MIN_RECORD,
    STORED_RECORD,
    SpoolFile,
    spool_full,
)

_LARGE_BATCH_SHARE = 8  # large write batches take at most 1/8 of the memory budget
_LARGE_BATCH_EXTRA = (LARGE_BATCH_RECORDS - BATCH_RECORDS) * STORED_RECORD
# In memory, pieces under this are gathered (up to MIN_RECORD) instead of kept one object each:
# a bytes object costs ~40 bytes (plus a list slot) that the memory budget does not see, ~10 %
# of a piece this size, but 14x the share of a body paced in 4-byte pieces.
_SMALL_PIECE = 512


class SpoolBudget:
    """Bytes spooled by all in-flight uploads of this process, and how many of them in memory.

    ``spool.max_bytes`` bounds everything spooled (memory and disk), per process: with
    ``--workers N`` the disk may hold up to N times it. Reserving past it answers 507 instead of
    filling the disk.

    ``spool.memory_budget`` bounds the upload bytes held in memory, so a worker's memory does
    not grow with the number of uploads in flight: an upload stays in memory only while it is
    within ``memory_threshold`` *and* the process's in-memory total is within the budget;
    otherwise it goes to its encrypted file. Under light load, bodies up to the threshold never
    touch the disk. An eighth of the budget may also go to larger write batches of spilled
    uploads (:meth:`Spool._batch_records`).
    """

    def __init__(self, max_bytes: int, memory_bytes: int | None = None) -> None:
        self.max_bytes = max_bytes
        self.memory_bytes = max_bytes if memory_bytes is None else memory_bytes
        self.used = 0
        self.in_memory = 0

    def resize(self, max_bytes: int, memory_bytes: int) -> bool:
        """New limits from a reload; True if they differ. What uploads in flight hold stays
        counted: lowered below it, the budget refuses (or spills) new bytes until enough of
        them are released, and nothing already taken is cut off."""
        if (max_bytes, memory_bytes) == (self.max_bytes, self.memory_bytes):
            return False
        self.max_bytes, self.memory_bytes = max_bytes, memory_bytes
        return True

    def hold_in_memory(self, num_bytes: int, keep_free: int = 0) -> bool:
        """Take ``num_bytes`` of the memory budget if it has room (leaving ``keep_free`` of it
        untaken); False means: spill."""
        if self.in_memory + num_bytes > self.memory_bytes - keep_free:
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
        self._gather = bytearray()  # pieces under _SMALL_PIECE, joining _memory at MIN_RECORD
        self._held = 0  # bytes of _memory counted in the budget's memory share
        self._batch_held = 0  # the budget's share taken for a large write batch
        self._file: SpoolFile | None = None
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
        return None if self._file is None else self._file.fileno()

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
                if len(chunk) < _SMALL_PIECE:
                    self._gather += chunk
                    if len(self._gather) >= MIN_RECORD:
                        self._flush_gathered()
                else:
                    self._flush_gathered()
                    self._memory.append(bytes(chunk))
                return
            await self._spill(spill)
        assert self._file is not None
        await self._file.append(chunk)

    def _flush_gathered(self) -> None:
        if self._gather:
            self._memory.append(bytes(self._gather))
            self._gather = bytearray()

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
        self._flush_gathered()
        if self._file is not None:
            await self._file.seal()
            self._release_batch_share()

    async def _spill(self, reason: str) -> None:
        """Create the encrypted file and move what memory held into it."""
        self._file = await SpoolFile.create(self._config.dir, self._batch_records())
        if self._metrics is not None:
            self._metrics.spool_spills.labels(reason=reason).inc()
        # Hand what memory held to the file piece by piece, so this upload never holds its
        # memory part, a joined copy and the ciphertext at once.
        self._flush_gathered()
        held, self._memory = self._memory[::-1], []
        while held:
            piece = held.pop()
            await self._file.append(piece)
            self._forget_memory(len(piece))

    def _batch_records(self) -> int:
        """Large write batches while the budget has room for them, else the minimum.

        They may take only an eighth of the memory budget (with the default, 15 uploads at a
        time), so memory stays flat however many are in flight (64 x 20 MB into one worker
        peaked 3 MiB higher with a quarter). The rest stays for small bodies, for which memory
        saves the whole trip through the disk, not just some thread trips.
        """
        budget = self._budget
        keep_free = budget.memory_bytes - budget.memory_bytes // _LARGE_BATCH_SHARE
        if not budget.hold_in_memory(_LARGE_BATCH_EXTRA, keep_free=keep_free):
            return BATCH_RECORDS
        self._batch_held = _LARGE_BATCH_EXTRA
        return LARGE_BATCH_RECORDS

    def _release_batch_share(self) -> None:
        self._budget.release_memory(self._batch_held)
        self._batch_held = 0

    def _forget_memory(self, num_bytes: int) -> None:
        """Give back memory-budget share for bytes no longer held in ``_memory``."""
        num_bytes = min(num_bytes, self._held)
        self._held -= num_bytes
        self._budget.release_memory(num_bytes)

    def in_memory(self) -> list[bytes] | None:
        """The pieces of a body that never left memory, else None.

        Such a body needs no decryption and no thread: the forwarder can hand the pieces to the
        connection as they are, without the async iterators a spilled body goes through.
        """
        if self.closed or self._file is not None or not self.sealed:
            return None
        return self._memory

    async def chunks(self) -> AsyncIterator[bytes]:
        """The exact bytes written (decrypted from the file if the body spilled)."""
        if self.closed:
            raise RuntimeError("read from a closed spool")
        await self.seal()
        if self._file is None:
            for piece in self._memory:
                yield piece
            return
        async for chunk in self._file.chunks():
            yield chunk

    async def aclose(self) -> None:
        """Release everything; safe to call any number of times, from any path."""
        if self.closed:
            return
        self.closed = True
        self._budget.release(self.size)
        self._forget_memory(self._held)
        self._release_batch_share()
        if self._metrics is not None:
            self._metrics.spool_bytes.dec(self.size)
        self._memory = []
        self._gather = bytearray()
        handle, self._file = self._file, None
        if handle is not None:
            await handle.aclose()
