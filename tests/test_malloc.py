"""The worker's malloc arena cap: applied on glibc, and an operator's MALLOC_ARENA_MAX wins."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = "from gateway.malloc import limit_arenas; print(limit_arenas())"


def run_probe(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return done.stdout.strip()


def test_the_cap_is_applied_on_glibc() -> None:  # Debian, the supported platform
    assert run_probe() == "True"


def test_an_operators_malloc_arena_max_wins() -> None:
    assert run_probe(MALLOC_ARENA_MAX="4") == "False"
