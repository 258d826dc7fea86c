"""The parent of ``serve --workers N``: it only supervises.

It sets up Prometheus' multiprocess directory so ``/metrics`` on any worker reports totals over
all of them (and removes it at the end), starts the workers, passes SIGHUP (reload) and SIGTERM
(drain) on, and restarts a worker that died, after a delay that doubles (0.5 s up to 30 s) while
it keeps dying within 10 s of its start. A worker that cannot start at all (port in use,
certificate unreadable: an exception before it listened) makes the parent stop the others and
exit 1 (at once on the first start, after 5 failed restarts later) instead of crash-looping.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from typing import Any

LOGGER = logging.getLogger("upload_gateway")
# Supervisor: a worker that dies within BACKOFF_RESET s of its start is restarted after a delay
# doubling from BACKOFF_FIRST up to BACKOFF_MAX; one that never came up (bind, certificate)
# START_FAILURES times in a row makes the parent stop and exit 1 instead of crash-looping.
BACKOFF_FIRST, BACKOFF_MAX, BACKOFF_RESET = 0.5, 30.0, 10.0
START_FAILURES = 5


class _Slot:
    """One worker place: its current process, whether it came up, and its restart backoff."""

    def __init__(
        self, ctx: Any, config_path: str, env: dict[str, str], target: Callable[..., None]
    ) -> None:
        self.ctx, self.config_path, self.env, self.target = ctx, config_path, env, target
        self.failures = 0  # consecutive quick deaths
        self.start_failures = 0  # consecutive deaths before ever being ready
        self.restart_at: float | None = None  # dead, waiting for its backoff
        self.initial = True  # the first process of this slot: it must come up
        self.start()

    def start(self) -> None:
        self.ready = self.ctx.Event()
        self.proc = self.ctx.Process(
            target=self.target, args=(self.config_path, self.env, self.ready), daemon=False
        )
        self.proc.start()
        self.started = time.monotonic()
        self.restart_at = None


def supervise(config_path: str, workers: int, grace: float, run_worker: Callable[..., None]) -> int:
    """Run ``workers`` processes of ``run_worker(config_path, env, ready)`` until SIGTERM or
    SIGINT, restarting those that die; 0 when all stopped cleanly. ``grace``: the workers'
    ``server.shutdown_grace``, after which (plus 5 s) one still running is killed."""
    prom_dir = tempfile.mkdtemp(prefix="upload-gateway-metrics-")
    env = {"PROMETHEUS_MULTIPROC_DIR": prom_dir}
    os.environ.update(env)
    ctx = multiprocessing.get_context("spawn")
    stopping = False
    slots: list[_Slot] = []

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = stopping or signum in (signal.SIGTERM, signal.SIGINT)
        for slot in slots:
            # A worker still starting reads the file anew anyway, and SIGHUP would kill it
            # before its handler is installed.
            if signum == signal.SIGHUP and not slot.ready.is_set():
                continue
            if slot.proc.pid is not None and slot.proc.is_alive():
                os.kill(slot.proc.pid, signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    giving_up = False
    try:
        slots.extend(_Slot(ctx, config_path, env, run_worker) for _ in range(workers))
        if stopping:  # a SIGTERM while they were being spawned reached only the first ones
            forward(signal.SIGTERM, None)
        while not stopping:
            now = time.monotonic()
            for slot in slots:
                if slot.restart_at is not None:
                    if now >= slot.restart_at and not stopping:
                        slot.initial = False
                        slot.start()
                        if stopping:
                            # SIGTERM came while it was being spawned: forward() saw the dead
                            # process, and the new one would run until killed after the grace.
                            os.kill(slot.proc.pid, signal.SIGTERM)
                    continue
                if slot.proc.is_alive():
                    continue
                # Could not start (an exception before it listened: port taken, certificate
                # gone), as opposed to crashing or being killed later.
                cannot_start = not slot.ready.is_set() and (slot.proc.exitcode or 0) > 0
                _mark_dead(slot.proc.pid)
                slot.start_failures = slot.start_failures + 1 if cannot_start else 0
                if cannot_start and (slot.initial or slot.start_failures >= START_FAILURES):
                    giving_up = True
                    break
                slot.failures = slot.failures + 1 if now - slot.started < BACKOFF_RESET else 0
                delay = (
                    min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (slot.failures - 1))
                    if slot.failures
                    else 0.0
                )
                LOGGER.error(
                    "worker %s exited with %s; restarting in %.1f s",
                    slot.proc.pid,
                    slot.proc.exitcode,
                    delay,
                )
                slot.restart_at = now + delay
            if giving_up:
                break
            time.sleep(0.05)
        if giving_up:
            LOGGER.error(
                "a worker cannot start (see its error above); stopping all workers and exiting"
            )
            forward(signal.SIGTERM, None)
        deadline = time.monotonic() + grace + 5
        running = [s for s in slots if s.restart_at is None]
        for slot in running:
            slot.proc.join(max(0.0, deadline - time.monotonic()))
        for slot in running:
            if slot.proc.is_alive():  # past the grace period: nothing may outlive the parent
                LOGGER.error("worker %s did not stop in time; killing it", slot.proc.pid)
                slot.proc.kill()
                slot.proc.join(5)
        stopped_while_starting = (0, -signal.SIGTERM, -signal.SIGINT)
        failed = [
            s
            for s in running
            if s.proc.exitcode != 0
            and not (not s.ready.is_set() and s.proc.exitcode in stopped_while_starting)
        ]
        return 1 if failed or giving_up else 0
    finally:
        shutil.rmtree(prom_dir, ignore_errors=True)


def _mark_dead(pid: int | None) -> None:
    """Tell prometheus_client a worker is gone, so its live gauges stop counting."""
    if pid is None:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
