"""Whether a byte string occurs in a window of a chunk, at the speed of glibc's ``memmem``.

The multipart inspection looks for its boundary inside every part's data (``multipart.py``),
which reads every byte of an upload once more. ``bytes.find`` does it at ~10 GB/s here; glibc's
``memmem`` (a shift table over byte pairs) at ~20 GB/s: 1.0 instead of 2.1 ms per 20 MB
(`bench/NOTES.md`, fifth round), about 2.5 % of what a 20 MB upload costs. Short windows, and
anything that is not ``bytes`` (whose buffer ctypes cannot lend without a copy), use
``bytes.find``: a ctypes call costs 0.5-2.5 us.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

LONG_WINDOW = 16 * 1024

_Memmem = Callable[[Any, int, bytes, int], int | None]


def _libc_memmem(haystack: type) -> _Memmem | None:
    """glibc's ``memmem`` taking the haystack as ``haystack`` (a new function object each
    time: ``CDLL.__getitem__`` does not cache, so the two prototypes do not clash)."""
    try:
        memmem = ctypes.CDLL(None)["memmem"]
    except (OSError, AttributeError):  # no such symbol (not glibc): bytes.find it is
        return None
    memmem.restype = ctypes.c_void_p
    memmem.argtypes = (haystack, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t)
    return memmem


# From a bytes object's first byte (ctypes lends its buffer as it is, no copy), and from an
# address, for a window further in.
_FROM_START = _libc_memmem(ctypes.c_char_p)
_FROM_ADDRESS = _libc_memmem(ctypes.c_void_p)


def occurs(needle: bytes, data: bytes, start: int, end: int) -> bool:
    """``data.find(needle, start, end) != -1``, faster on long windows."""
    short = end - start < LONG_WINDOW or type(data) is not bytes
    if short or _FROM_START is None or _FROM_ADDRESS is None:
        return data.find(needle, start, end) != -1
    if start == 0:  # the usual case: a chunk that is all file data
        return _FROM_START(data, end, needle, len(needle)) is not None
    base = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value
    assert base is not None  # valid while ``data`` is referenced, as it is here
    return _FROM_ADDRESS(base + start, end - start, needle, len(needle)) is not None
