"""Whether a byte string occurs in a window of a chunk, at the speed of glibc's ``memmem``.

The multipart inspection looks for its boundary inside every part's data (``multipart.py``),
which reads every byte of an upload once more. ``bytes.find`` does it at ~10 GB/s here; glibc's
``memmem`` (a shift table over byte pairs) at ~20 GB/s: 1.0 instead of 2.1 ms per 20 MB
(`bench/NOTES.md`, fifth round), about 2.5 % of what a 20 MB upload costs. Short windows, and
anything that is not ``bytes`` (whose buffer ctypes cannot lend without a copy), use
``bytes.find``: a ctypes call costs about a microsecond.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

LONG_WINDOW = 16 * 1024

_Memmem = Callable[[int, int, bytes, int], int | None]


def _libc_memmem() -> _Memmem | None:
    try:
        memmem = ctypes.CDLL(None).memmem
    except (OSError, AttributeError):  # no such symbol (not glibc): bytes.find it is
        return None
    memmem.restype = ctypes.c_void_p
    memmem.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t)
    return memmem


_MEMMEM = _libc_memmem()


def occurs(needle: bytes, data: bytes, start: int, end: int) -> bool:
    """``data.find(needle, start, end) != -1``, faster on long windows."""
    if _MEMMEM is None or end - start < LONG_WINDOW or type(data) is not bytes:
        return data.find(needle, start, end) != -1
    # c_char_p lends a bytes object's own buffer: no copy, valid while ``data`` is referenced
    base = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value
    assert base is not None
    return _MEMMEM(base + start, end - start, needle, len(needle)) is not None
