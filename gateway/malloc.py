"""How a worker's C heap is arranged, so its memory follows the uploads in flight.

glibc gives each thread that allocates its own malloc arena (up to 8 per core). Work that runs
in the thread pool (spool writes, libmagic on large heads, the fallback spool reads) allocates in
one arena what the event loop frees into another, and every arena keeps its own free pages.
With the spool of session 2, whose read buffers came from pool threads, one arena took the
peak RSS of 64 concurrent 20 MB uploads into one worker from 178 to 145 MiB at the same
throughput. Since the spool writes from its own mapping and reads on the event loop
(``spool_file.py``) the pool allocates little, and the difference is inside the run-to-run
noise (134-155 MiB either way, ``bench/NOTES.md``); the cap is kept because it costs nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os

LOGGER = logging.getLogger("upload_gateway.malloc")
M_ARENA_MAX = -8  # glibc's malloc.h
ARENAS = 1


def limit_arenas(count: int = ARENAS) -> bool:
    """Cap glibc's malloc arenas at ``count``; a ``MALLOC_ARENA_MAX`` already set wins.

    Call it before any thread is started. Returns whether the cap was applied (False on a libc
    without ``mallopt``, such as musl, where the question does not arise).
    """
    if "MALLOC_ARENA_MAX" in os.environ:  # glibc read it at process start: the operator's choice
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    applied = bool(mallopt(M_ARENA_MAX, count))
    if not applied:
        LOGGER.debug("mallopt(M_ARENA_MAX) refused; keeping the libc's default arenas")
    return applied
