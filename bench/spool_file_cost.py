"""What a spooled upload's file costs the kernel, in the shapes it could take.

A 20 MB upload spends about half its CPU in the kernel, and the spool file is the largest part
of what the pass-through does not pay. This times the file alone: 20 MB written as the
gateway writes it (records of 256 KiB plus a 16-byte tag, ``pwrite``), read back (``preadv``)
and closed, in a new unlinked file (what the gateway does), a new file given its blocks first
(``fallocate``: tried in session 8 for bodies that announced their length, and dropped,
``bench/NOTES.md``), one made with ``O_TMPFILE``, and one file written over again and again
(what a pool of reused spool files would cost; not done: issue 4 has spool files removed on
every path).

    .venv/bin/python -m bench.spool_file_cost [--dir DIR]   # ~15 s; bench/results-spool-file.md
"""

from __future__ import annotations

import argparse
import os
import resource
import secrets
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from bench.stack import BENCH
from gateway.spool_file import STORED_RECORD

RECORDS = 80  # 20 MiB of plaintext in 256 KiB records
REPEAT = 40
ROUNDS = 3


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _new_file(directory: Path) -> int:
    path = directory / f".cost-{secrets.token_hex(8)}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.unlink(path)
    return fd


def _write_read(fd: int, record: bytes, back: bytearray) -> None:
    for index in range(RECORDS):
        os.pwrite(fd, record, index * len(record))
    for index in range(RECORDS):
        os.preadv(fd, [back], index * len(back))


def variants(directory: Path) -> dict[str, Callable[[], None]]:
    record, back = os.urandom(STORED_RECORD), bytearray(STORED_RECORD)
    reused = _new_file(directory)

    def fresh(make: Callable[[], int]) -> Callable[[], None]:
        def once() -> None:
            fd = make()
            try:
                _write_read(fd, record, back)
            finally:
                os.close(fd)

        return once

    def allocated() -> int:
        fd = _new_file(directory)
        os.posix_fallocate(fd, 0, RECORDS * STORED_RECORD)  # ext4 has fallocate(2): no zeros
        return fd

    return {
        "new unlinked file (the gateway)": fresh(lambda: _new_file(directory)),
        "new file, fallocate first (tried, dropped)": fresh(allocated),
        "new file, O_TMPFILE": fresh(lambda: os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)),
        "one file written over (a reuse pool; not done)": lambda: _write_read(reused, record, back),
    }


def measure(directory: Path) -> dict[str, list[float]]:
    """ms of CPU per 20 MB, the median of REPEAT runs, once per round, variants interleaved."""
    found: dict[str, list[float]] = {}
    work = variants(directory)
    for _ in range(ROUNDS):
        for name, once in work.items():
            times = []
            for _ in range(REPEAT):
                start = _cpu()
                once()
                times.append((_cpu() - start) * 1000)
            found.setdefault(name, []).append(statistics.median(times))
    return found


def _shown(directory: Path) -> str:
    """The directory as the results file names it: relative to the repository when inside it."""
    try:
        return str(directory.resolve().relative_to(BENCH.parent))
    except ValueError:
        return str(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=BENCH / "work" / "spool-file-cost")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    found = measure(args.dir)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        "# The spool file's cost per 20 MB upload (`python -m bench.spool_file_cost`)",
        "",
        f"{stamp}, in `{_shown(args.dir)}`: 80 records of 256 KiB + tag written with",
        f"`pwrite`, read back with `preadv`, closed; ms of CPU (user + kernel), median of {REPEAT}",
        "runs, per round.",
        "",
        "| the file | " + " | ".join(f"round {n + 1}" for n in range(ROUNDS)) + " |",
        "|---|" + "---:|" * ROUNDS,
    ]
    lines += [
        f"| {name} | " + " | ".join(f"{v:.2f}" for v in row) + " |" for name, row in found.items()
    ]
    text = "\n".join(lines) + "\n"
    (BENCH / "results-spool-file.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
