"""``occurs`` must answer exactly what ``bytes.find`` answers, on every path it takes."""

from __future__ import annotations

import random

import pytest

from gateway.inspect import occurs as module
from gateway.inspect.occurs import LONG_WINDOW, occurs

NEEDLE = b"----WebKitFormBoundary7MA4YWxkTrZu0gW"


def test_memmem_is_used_here() -> None:
    """The fast path is what production takes on glibc; the cases below would pass without it."""
    assert module._FROM_START is not None and module._FROM_ADDRESS is not None


@pytest.mark.parametrize("seed", range(40))
def test_agrees_with_bytes_find(seed: int) -> None:
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(rng.choice([100, LONG_WINDOW - 1, LONG_WINDOW, 300_000])))
    for _ in range(rng.randrange(3)):  # the needle, whole or cut, anywhere (edges included)
        at = rng.choice([0, len(data) - len(NEEDLE), rng.randrange(len(data) - len(NEEDLE))])
        piece = NEEDLE if rng.random() < 0.7 else NEEDLE[: rng.randrange(1, len(NEEDLE))]
        data[at : at + len(piece)] = piece
    raw = bytes(data)
    for _ in range(25):
        start = rng.choice([0, rng.randrange(len(raw))])  # from the first byte, or further in
        end = rng.randrange(start, len(raw) + 1)
        expected = raw.find(NEEDLE, start, end) != -1
        assert occurs(NEEDLE, raw, start, end) is expected, (start, end)
        assert occurs(NEEDLE, bytearray(raw), start, end) is expected  # not bytes: find
