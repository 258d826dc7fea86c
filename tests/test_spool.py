"""The spool: memory, then an unlinked AES-256-GCM file; exact bytes back; nothing left behind."""

from __future__ import annotations

import mmap
import os
import stat
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from gateway.config.model import SpoolConfig
from gateway.errors import GatewayError
from gateway.metrics import Metrics
from gateway.spool import Spool, SpoolBudget
from gateway.spool_file import (
    BATCH_RECORDS,
    LARGE_BATCH_RECORDS,
    MAX_RECORD,
    MIN_RECORD,
    STORED_RECORD,
    TAG_SIZE,
    SpoolFile,
)

LARGE_BATCH_EXTRA = (LARGE_BATCH_RECORDS - BATCH_RECORDS) * STORED_RECORD


def spool_fds(directory: Path) -> list[str]:
    """Open descriptors of this process on files (even deleted ones) in ``directory``."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(directory) + "/"):
            found.append(target)
    return found


async def read_all(spool: Spool) -> bytes:
    return b"".join([chunk async for chunk in spool.chunks()])


def spills(metrics: Metrics) -> dict[str, float]:
    return {
        reason: metrics.registry.get_sample_value(
            "upload_gateway_spool_spills_total", {"reason": reason}
        )
        or 0
        for reason in ("budget", "threshold", "announced")
    }


def count_thread_reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(offset, size) of every read the spool makes in a worker thread (``os.pread``), from
    now on; reads on the event loop use ``os.preadv`` and are not counted."""
    reads: list[tuple[int, int]] = []
    real_pread = os.pread

    def counted_pread(fd: int, size: int, offset: int) -> bytes:
        reads.append((offset, size))
        return real_pread(fd, size, offset)

    monkeypatch.setattr(os, "pread", counted_pread)
    return reads


def pattern(size: int) -> bytes:
    unit = b"plaintext-secret-pattern-0123456789;"
    return (unit * (size // len(unit) + 1))[:size]


@pytest.mark.parametrize(
    "size",
    [
        0,
        1,
        999,
        1000,
        1001,
        MAX_RECORD - 1,
        MAX_RECORD,
        MAX_RECORD + 1,
        3 * MAX_RECORD,
        3 * MAX_RECORD + 17,
    ],
)
@pytest.mark.parametrize("chunk", [1000, MIN_RECORD - 1, 65536, 100_000])
async def test_round_trip_is_exact(tmp_path: Path, size: int, chunk: int) -> None:
    data = pattern(size)
    spool = Spool(
        SpoolConfig(str(tmp_path), memory_threshold=1000, max_bytes=10**9), SpoolBudget(10**9)
    )
    for start in range(0, size, chunk):
        await spool.write(data[start : start + chunk])
    await spool.seal()
    assert spool.on_disk == (size > 1000)
    assert await read_all(spool) == data
    assert await read_all(spool) == data  # a retry reads it again
    await spool.aclose()
    assert os.listdir(tmp_path) == [] and spool_fds(tmp_path) == []


async def test_the_file_is_private_unlinked_and_holds_no_plaintext(tmp_path: Path) -> None:
    data = pattern(5 * MAX_RECORD + 3)
    spool = Spool(
        SpoolConfig(str(tmp_path), memory_threshold=1024, max_bytes=10**9), SpoolBudget(10**9)
    )
    await spool.write(data)
    await spool.seal()
    fd = spool.fileno()
    assert fd is not None
    assert os.listdir(tmp_path) == []  # never visible by name
    assert len(spool_fds(tmp_path)) == 1
    mode = os.fstat(fd).st_mode
    assert stat.S_IMODE(mode) == 0o600
    with open(f"/proc/self/fd/{fd}", "rb") as raw:
        cipher = raw.read()
    assert len(cipher) == len(data) + 6 * TAG_SIZE
    assert b"plaintext-secret" not in cipher
    assert repr(spool).startswith("<Spool") and "key" not in repr(spool).lower()
    await spool.aclose()
    await spool.aclose()  # idempotent
    assert spool_fds(tmp_path) == []


@pytest.mark.parametrize("damage", ["flip", "truncate_record", "swap"])
async def test_tampering_is_detected(tmp_path: Path, damage: str) -> None:
    data = pattern(3 * MAX_RECORD + 10)
    spool = Spool(
        SpoolConfig(str(tmp_path), memory_threshold=10, max_bytes=10**9), SpoolBudget(10**9)
    )
    await spool.write(data)
    await spool.seal()
    path = f"/proc/self/fd/{spool.fileno()}"
    with open(path, "rb") as raw:
        cipher = bytearray(raw.read())
    record = STORED_RECORD
    if damage == "flip":
        cipher[100] ^= 1
    elif damage == "truncate_record":  # drop the last record: the one before is not "last"
        cipher = cipher[: 3 * record]
        assert spool._file is not None
        spool._file._sizes.pop()
    else:
        cipher[:record], cipher[record : 2 * record] = cipher[record : 2 * record], cipher[:record]
    with open(path, "r+b") as raw:
        raw.truncate(0)
        raw.write(cipher)
    with pytest.raises(RuntimeError, match="authentication"):
        await read_all(spool)
    await spool.aclose()


async def test_budget_refuses_with_507_and_is_returned_on_close(tmp_path: Path) -> None:
    budget = SpoolBudget(3000)
    metrics = Metrics(CollectorRegistry())
    config = SpoolConfig(str(tmp_path), memory_threshold=100, max_bytes=3000)
    first, second = Spool(config, budget, metrics), Spool(config, budget, metrics)
    await first.write(b"a" * 2000)
    await second.write(b"b" * 1000)  # exactly the budget
    assert metrics.registry.get_sample_value("upload_gateway_spool_bytes") == 3000
    with pytest.raises(GatewayError) as refused:
        await second.write(b"c")
    assert refused.value.code == "spool_full" and refused.value.status == 507
    await first.aclose()
    await second.aclose()
    assert budget.used == 0
    assert metrics.registry.get_sample_value("upload_gateway_spool_bytes") == 0
    assert spool_fds(tmp_path) == []


async def test_memory_budget_sends_uploads_past_it_to_disk_and_is_returned(
    tmp_path: Path,
) -> None:
    """The process-wide memory share: uploads within the threshold stay in memory only while
    the in-memory total fits; a spill and a close give the share back, byte for byte."""
    budget = SpoolBudget(10**9, memory_bytes=1500)
    metrics = Metrics(CollectorRegistry())
    config = SpoolConfig(str(tmp_path), memory_threshold=1000, max_bytes=10**9)
    first, second, third = (Spool(config, budget, metrics) for _ in range(3))
    await first.write(pattern(1000))
    assert not first.on_disk and budget.in_memory == 1000
    await second.write(pattern(600))  # within its threshold, but not within the budget
    assert second.on_disk and budget.in_memory == 1000
    await third.write(pattern(400))
    assert not third.on_disk and budget.in_memory == 1400
    await third.write(pattern(700))  # past its own threshold: spills, its 400 come back
    assert third.on_disk and budget.in_memory == 1000
    assert spills(metrics) == {"budget": 1, "threshold": 1, "announced": 0}
    assert await read_all(first) == pattern(1000)
    assert await read_all(second) == pattern(600)
    assert await read_all(third) == pattern(400) + pattern(700)
    await first.aclose()
    assert budget.in_memory == 0
    fourth = Spool(config, budget)
    await fourth.write(pattern(1000))
    assert not fourth.on_disk and budget.in_memory == 1000
    for spool in (second, third, fourth):
        await spool.aclose()
    assert budget.in_memory == 0 and budget.used == 0
    assert spool_fds(tmp_path) == []


async def test_a_body_announced_past_the_threshold_goes_to_disk_from_its_first_byte(
    tmp_path: Path,
) -> None:
    budget = SpoolBudget(10**9)
    metrics = Metrics(CollectorRegistry())
    config = SpoolConfig(str(tmp_path), memory_threshold=1000, max_bytes=10**9)
    announced = Spool(config, budget, metrics, expected_size=1001)
    await announced.write(pattern(10))
    # on disk at once; the budget holds only its large write batch (returned when sealed)
    assert announced.on_disk and budget.in_memory == LARGE_BATCH_EXTRA
    assert spills(metrics) == {"budget": 0, "threshold": 0, "announced": 1}
    await announced.seal()
    assert budget.in_memory == 0
    small = Spool(config, budget, metrics, expected_size=1000)
    await small.write(pattern(10))
    assert not small.on_disk and budget.in_memory == 10
    assert await read_all(announced) == pattern(10) and await read_all(small) == pattern(10)
    await announced.aclose()
    await small.aclose()
    assert budget.in_memory == 0 and spool_fds(tmp_path) == []


@pytest.mark.parametrize(
    ("memory_budget", "budget_room"),
    [(0, 0), (8 * LARGE_BATCH_EXTRA - 1, 0), (8 * LARGE_BATCH_EXTRA, LARGE_BATCH_EXTRA)],
)
async def test_write_batches_use_the_memory_budget_only_while_it_has_room(
    tmp_path: Path, memory_budget: int, budget_room: int
) -> None:
    """A spilled body's records go to disk in batches: large ones (fewer trips to the writing
    thread) only while an eighth of the memory budget has room for them, else small ones;
    the same bytes either way."""
    budget = SpoolBudget(10**9, memory_bytes=memory_budget)
    config = SpoolConfig(str(tmp_path), memory_threshold=0, max_bytes=10**9)
    spool = Spool(config, budget)
    written: list[int] = []
    data = pattern(40 * MAX_RECORD + 5)
    await spool.write(data[:1])
    assert spool._file is not None
    aiofile = spool._file._file
    real_write = aiofile.write

    async def counting_write(view: memoryview) -> int:
        written.append(len(view))
        return int(await real_write(view))

    aiofile.write = counting_write
    for start in range(1, len(data), 50_000):
        await spool.write(data[start : start + 50_000])
    assert budget.in_memory == budget_room  # a large batch takes the budget's share, or none
    await spool.seal()
    assert budget.in_memory == 0
    capacity = (LARGE_BATCH_RECORDS if budget_room else BATCH_RECORDS) * STORED_RECORD
    # A batch is written when the next record would not fit: every write but the last is full
    # to within one record; all of them together are the ciphertext.
    assert all(capacity - STORED_RECORD < size <= capacity for size in written[:-1])
    assert sum(written) == len(data) + TAG_SIZE * len(spool._file._sizes)
    assert await read_all(spool) == data
    await spool.aclose()
    assert spool_fds(tmp_path) == []


@pytest.mark.parametrize(
    ("chunks", "records"),
    [
        ([50_000] * 3, [50_000] * 3 + [0]),  # the last record may be empty
        ([2 * MAX_RECORD + 5], [MAX_RECORD, MAX_RECORD, 5]),
        ([7] * 5000, [MIN_RECORD, MIN_RECORD, 35_000 - 2 * MIN_RECORD]),
        ([10, MAX_RECORD], [MIN_RECORD, MAX_RECORD + 10 - MIN_RECORD, 0]),
    ],
)
async def test_records_follow_the_chunks_and_small_pieces_are_gathered(
    tmp_path: Path, chunks: list[int], records: list[int]
) -> None:
    """Each chunk becomes one record, encrypted where it lies (cut at MAX_RECORD); a client
    sending tiny pieces gets records of MIN_RECORD, so the tags add 0.1 % on disk, not 16
    bytes per piece."""
    data = pattern(sum(chunks))
    spool = Spool(SpoolConfig(str(tmp_path), memory_threshold=0), SpoolBudget(10**9))
    start = 0
    for size in chunks:
        await spool.write(data[start : start + size])
        start += size
    await spool.seal()
    assert spool._file is not None and list(spool._file._sizes) == records
    assert os.fstat(spool._file.fileno()).st_size == len(data) + TAG_SIZE * len(records)
    assert await read_all(spool) == data
    await spool.aclose()


async def test_spool_reads_come_from_the_page_cache_or_from_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records the page cache holds are read on the loop (RWF_NOWAIT, where the filesystem
    supports it); a record it does not hold (simulated: as if the kernel answered EAGAIN) is
    read by a worker thread, a batch at a time. Same bytes either way."""
    config = SpoolConfig(str(tmp_path), memory_threshold=0, max_bytes=10**9)
    data = pattern(9 * MAX_RECORD + 77)
    spool = Spool(config, SpoolBudget(10**9))
    await spool.write(data)
    assert await read_all(spool) == data
    thread_reads = count_thread_reads(monkeypatch)
    misses = iter([True, False, True, True])

    file = spool._file
    assert file is not None

    def sometimes_cached(fd: int, into: memoryview, offset: int) -> memoryview | None:
        return None if next(misses, False) else SpoolFile._read_cached(file, fd, into, offset)

    file._read_cached = sometimes_cached  # type: ignore[method-assign]
    assert await read_all(spool) == data
    assert thread_reads[0] == (0, STORED_RECORD) and len(thread_reads) >= 2
    await spool.aclose()


async def test_thread_reads_take_small_records_a_batch_of_bytes_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the page cache does not hold them, a slow client's small records are read back
    as many per thread trip as fit in a write batch's bytes, not one trip each."""
    config = SpoolConfig(str(tmp_path), memory_threshold=0, max_bytes=10**9)
    data = pattern(40 * MIN_RECORD + 5)
    spool = Spool(config, SpoolBudget(10**9))
    for start in range(0, len(data), MIN_RECORD):
        await spool.write(data[start : start + MIN_RECORD])
    file = spool._file
    assert file is not None
    thread_reads = count_thread_reads(monkeypatch)
    file._read_cached = lambda *_: None  # type: ignore[method-assign]
    assert await read_all(spool) == data
    reads = [size for _, size in thread_reads]
    capacity = BATCH_RECORDS * STORED_RECORD
    assert all(capacity - STORED_RECORD < size <= capacity for size in reads[:-1])
    assert sum(reads) == len(data) + TAG_SIZE * len(file._sizes)
    assert len(reads) < len(file._sizes) // 10
    await spool.aclose()


async def test_closed_spool_cannot_be_used(tmp_path: Path) -> None:
    spool = Spool(SpoolConfig(str(tmp_path)), SpoolBudget(10**6))
    await spool.aclose()
    with pytest.raises(RuntimeError):
        await spool.write(b"x")
    with pytest.raises(RuntimeError):
        await read_all(spool)


async def test_no_descriptor_survives_a_spill_that_cannot_get_its_buffers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_memory(*_: object) -> None:
        raise MemoryError

    monkeypatch.setattr(mmap, "mmap", no_memory)  # spool_file maps its buffers with it
    budget = SpoolBudget(10**9)
    spool = Spool(SpoolConfig(str(tmp_path), memory_threshold=0, max_bytes=10**9), budget)
    with pytest.raises(MemoryError):
        await spool.write(b"x" * 100)
    await spool.aclose()
    assert spool_fds(tmp_path) == [] and os.listdir(tmp_path) == []
    assert budget.used == 0 and budget.in_memory == 0


@pytest.mark.parametrize("spill_at", [None, 30_000])
async def test_tiny_pieces_held_in_memory_are_gathered_not_kept_one_object_each(
    tmp_path: Path, spill_at: int | None
) -> None:
    """The memory budget counts body bytes; a ``bytes`` object per 4-byte piece would cost
    ~14 bytes of memory per byte counted (a client pacing its body so). Small pieces are
    joined up to MIN_RECORD; pieces as large as a socket read are still kept as they came.
    Whether the body stays in memory or spills midway, the bytes handed on are exact."""
    data = pattern(50_000)
    threshold = spill_at if spill_at is not None else 10**6
    spool = Spool(SpoolConfig(str(tmp_path), memory_threshold=threshold), SpoolBudget(10**9))
    for start in range(0, len(data), 4):
        await spool.write(data[start : start + 4])
    await spool.seal()
    if spill_at is None:
        pieces = spool.in_memory()
        assert pieces is not None and len(pieces) <= len(data) // MIN_RECORD + 1
    else:
        assert spool.in_memory() is None
    assert await read_all(spool) == data
    await spool.aclose()
    assert spool_fds(tmp_path) == []
