"""Counting bytes against a limit: the one place that says "exactly the limit passes".

Every size rule (per file, per request) is a :class:`ByteCounter`; the caller checks
:attr:`ByteCounter.over` after each chunk, so a body is cut off within one chunk of crossing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ByteCounter:
    limit: int
    count: int = 0

    def add(self, num_bytes: int) -> bool:
        """Count ``num_bytes``; True once the count is over the limit."""
        self.count += num_bytes
        return self.over

    @property
    def over(self) -> bool:
        return self.count > self.limit
