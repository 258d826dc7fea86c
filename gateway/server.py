"""Running the gateway: one process per worker, all on one port (SO_REUSEPORT), and signals.

The parent of ``--workers N`` only supervises: it sets up Prometheus' multiprocess directory so
``/metrics`` on any worker reports totals over all of them, starts the workers, passes SIGHUP
(reload) and SIGTERM (drain) on, and restarts a worker that died, after a delay that doubles
(0.5 s up to 30 s) while it keeps dying within 10 s of its start. A worker that cannot start at
all (port in use, certificate unreadable: an exception before it listened) makes the parent stop
the others and exit 1 (at once on the first start, after 5 failed restarts later) instead of
crash-looping. Before any of that, ``serve`` refuses to start on a port something already
listens on (``ports.py``: SO_REUSEPORT alone would let it join another gateway's port). A worker
drains on SIGTERM: it stops accepting, reports not-ready, lets in-flight
requests finish within ``server.shutdown_grace``, then exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import signal
import ssl
import sys
import tempfile
import time
from typing import Any

from aiohttp import web

from gateway.accesslog import JsonFormatter, set_log_level
from gateway.app import build_admin_app, build_app, build_state
from gateway.collector import tune_collector
from gateway.config import ConfigError, load_config
from gateway.config.model import Config
from gateway.malloc import limit_arenas
from gateway.metrics import Metrics
from gateway.ports import first_unavailable
from gateway.protocol import GatewayProtocol, GatewayRunner, ProtocolOptions
from gateway.reload import ConfigWatcher
from gateway.state import GatewayState

LOGGER = logging.getLogger("upload_gateway")
# prometheus_client's multiprocess directory, by its name and its older lower-case one
_MULTIPROC_VARIABLES = ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir")
LINGERING_SECONDS = 2.0
DRAIN_CANCEL_TIMEOUT = 1.0  # after the grace: how long cancelled handlers get to unwind
READ_BUFFER = 32 * 1024  # aiohttp read_bufsize: see serve_worker
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"
# Supervisor: a worker that dies within BACKOFF_RESET s of its start is restarted after a delay
# doubling from BACKOFF_FIRST up to BACKOFF_MAX; one that never came up (bind, certificate)
# START_FAILURES times in a row makes the parent stop and exit 1 instead of crash-looping.
BACKOFF_FIRST, BACKOFF_MAX, BACKOFF_RESET = 0.5, 30.0, 10.0
START_FAILURES = 5


def setup_logging(level: str) -> None:
    """Every line on stdout is one JSON object: access lines as built, the rest JsonFormatter's."""
    root = logging.getLogger()
    root.handlers.clear()
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    access = logging.getLogger("upload_gateway.access")
    access.propagate = False
    access.handlers.clear()
    access_handler = logging.StreamHandler(sys.stdout)
    access_handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(access_handler)
    set_log_level(level)


def tls_context(config: Config) -> ssl.SSLContext | None:
    """TLS termination with TLS 1.2 as the floor (SPEC §7), when a certificate is configured."""
    if not config.server.tls_cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # TLS 1.2: forward secrecy and AEAD only (no CBC, no RSA key exchange); TLS 1.3's suites
    # are all modern and are not affected by this string.
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.load_cert_chain(config.server.tls_cert_file, config.server.tls_key_file)
    return context


def proxy_runner(state: GatewayState, config: Config) -> GatewayRunner:
    """The proxy listener's runner, set up as every worker runs it (``bench.inprocess`` too)."""
    return GatewayRunner(
        build_app(state),
        _protocol_options(config, state.metrics),
        handle_signals=False,
        access_log=None,
        auto_decompress=False,  # the backend must get the bytes the client sent (SPEC §4)
        max_line_size=config.server.max_line_size,
        max_field_size=config.server.max_header_size,
        keepalive_timeout=config.server.keepalive_timeout,
        # After an early refusal, read (and drop) what the client is still sending for at most
        # this long, so it sees the 413 instead of a reset; aiohttp's 10 s default held sockets.
        lingering_time=LINGERING_SECONDS,
        shutdown_timeout=DRAIN_CANCEL_TIMEOUT,
        # Body bytes aiohttp buffers per connection before it stops reading the socket (it
        # pauses past twice this, after the read that crossed it): with 64 uploads arriving at
        # once, its 64 KiB default held ~25 MiB of one worker's peak (tracemalloc); 32 KiB took
        # 8-16 MiB off that peak, at a throughput price within the bench's noise (NOTES.md).
        read_bufsize=READ_BUFFER,
    )


def _protocol_options(config: Config, metrics: Metrics | None) -> ProtocolOptions:
    server = config.server
    return ProtocolOptions(
        header_timeout=server.header_timeout,
        metrics=metrics,
        send_timeout=server.send_timeout,
        max_head_size=server.max_head_size,
    )


def admin_runner(state: GatewayState, config: Config) -> GatewayRunner:
    """The admin listener's runner: the same head timer, send timeout and keep-alive timeout as
    the proxy's (in Kubernetes it listens on the pod's address for probes and scrapes, and
    aiohttp alone would let a connection that never finishes its head stay open for ever, and
    an idle one for an hour), nothing counted."""
    return GatewayRunner(
        build_admin_app(state),
        _protocol_options(config, None),
        handle_signals=False,
        access_log=None,
        # the proxy's, not aiohttp's default of an hour: the head timer does not cover an
        # idle keep-alive connection
        keepalive_timeout=config.server.keepalive_timeout,
        lingering_time=LINGERING_SECONDS,
    )


async def serve_worker(config_path: str, config: Config, ready: Any = None) -> None:
    """One worker: the proxy and admin listeners, until SIGTERM/SIGINT.

    ``ready`` (a multiprocessing Event) is set once both listeners are bound and the signal
    handlers are installed, so the supervisor can tell a worker that cannot start from one
    that crashed later.
    """
    state = build_state(config)
    runner = proxy_runner(state, config)
    admin_app_runner = admin_runner(state, config)
    await runner.setup()
    await admin_app_runner.setup()
    listen, admin = config.listen, config.admin_listen
    tls = tls_context(config)
    await web.TCPSite(
        runner, listen.host, listen.port, reuse_port=True, backlog=1024, ssl_context=tls
    ).start()
    await web.TCPSite(admin_app_runner, admin.host, admin.port, reuse_port=True).start()
    LOGGER.info("listening on %s (admin %s), pid %d", listen, admin, os.getpid())
    watcher = ConfigWatcher(config_path, state.config, state.metrics)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, watcher.request_reload)
    await watcher.start()
    tune_collector()  # what exists now lives as long as the worker
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        await _drain(state, runner, admin_app_runner, watcher, config.server.shutdown_grace)


async def _drain(
    state: GatewayState,
    runner: web.AppRunner,
    admin: web.AppRunner,
    watcher: ConfigWatcher,
    grace: float,
) -> None:
    """Stop accepting, let in-flight requests finish within ``grace``, then close the rest.

    Not ``runner.cleanup()`` at once: aiohttp's graceful shutdown first marks every connection
    closing, and a closing connection discards what the client sends next
    (``RequestHandler.data_received`` returns early; aiohttp#2298), so an upload whose body was
    still arriving could never complete. So: close the listening sockets, close connections
    as soon as they are idle, wait while any request is in progress, and only then
    ``cleanup()``, which cancels whatever overran the grace (an upload never forwarded).
    """
    LOGGER.info("draining: no new connections, in-flight requests may finish")
    state.draining = True
    await watcher.close()
    for site in list(runner.sites):
        await site.stop()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    server = runner.server
    while server is not None and loop.time() < deadline:
        busy = False
        for conn in list(server.connections):
            if isinstance(conn, GatewayProtocol) and conn.busy:
                busy = True
            else:
                conn.close()  # idle keep-alive: nothing in flight to wait for
        if not busy:
            break
        await asyncio.sleep(0.05)
    await runner.cleanup()
    await admin.cleanup()


def run_worker(config_path: str, env: dict[str, str] | None = None, ready: Any = None) -> None:
    """Process entry point of a ``--workers N`` worker."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the event loop handles it
    if env:
        os.environ.update(env)
    config = load_config(config_path)
    setup_logging(config.log_level)
    _run(serve_worker(config_path, config, ready))


def _run(coro: Any) -> None:
    limit_arenas()  # before the event loop and its thread pool exist
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


def serve(config_path: str, workers: int) -> int:
    try:
        config = load_config(config_path)  # fail fast, in the parent, on a bad file
    except ConfigError as exc:  # as check-config says it: every error, no traceback
        count = len(exc.errors)
        print(
            f"{exc}\n{config_path}: {count} error{'s' * (count != 1)}, not started", file=sys.stderr
        )
        return 1
    in_use = first_unavailable({"listen": config.listen, "admin_listen": config.admin_listen})
    if in_use is not None:
        setup_logging(config.log_level)
        LOGGER.error("not started: %s", in_use)
        return 1
    try:
        tls_context(config)  # and on a certificate or key that cannot be loaded
    except (OSError, ssl.SSLError) as exc:
        setup_logging(config.log_level)
        LOGGER.error(
            "cannot load server.tls_cert_file %s / tls_key_file %s: %s",
            config.server.tls_cert_file,
            config.server.tls_key_file,
            exc,
        )
        return 1
    if workers <= 1:
        setup_logging(config.log_level)
        _single_process_metrics()
        _run(serve_worker(config_path, config))
        return 0
    return _supervise(config_path, config, workers)


def _single_process_metrics() -> None:
    """One worker counts in memory, whatever directory its environment names.

    An inherited ``PROMETHEUS_MULTIPROC_DIR`` (an image made for gunicorn sets one) would put
    one worker in multiprocess mode in a directory nobody wipes: every restart's files would
    add up in ``/metrics``, and a dead process's in-flight gauge would count for ever. The
    supervisor of ``--workers N`` makes, and removes, a directory of its own instead.
    prometheus_client picks its value class when first imported, before this runs (the
    command line's modules import it), so that choice is undone here, before any metric
    exists.
    """
    from prometheus_client import values

    inherited = [name for name in _MULTIPROC_VARIABLES if os.environ.pop(name, None) is not None]
    if inherited:
        values.ValueClass = values.MutexValue
        LOGGER.info("one worker: ignoring %s, metrics are kept in memory", inherited[0])


class _Slot:
    """One worker place: its current process, whether it came up, and its restart backoff."""

    def __init__(self, ctx: Any, config_path: str, env: dict[str, str]) -> None:
        self.ctx, self.config_path, self.env = ctx, config_path, env
        self.failures = 0  # consecutive quick deaths
        self.start_failures = 0  # consecutive deaths before ever being ready
        self.restart_at: float | None = None  # dead, waiting for its backoff
        self.initial = True  # the first process of this slot: it must come up
        self.start()

    def start(self) -> None:
        self.ready = self.ctx.Event()
        self.proc = _start(self.ctx, self.config_path, self.env, self.ready)
        self.started = time.monotonic()
        self.restart_at = None


def _supervise(config_path: str, config: Config, workers: int) -> int:
    setup_logging(config.log_level)
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
        slots.extend(_Slot(ctx, config_path, env) for _ in range(workers))
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
        deadline = time.monotonic() + config.server.shutdown_grace + 5
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


def _start(ctx: Any, config_path: str, env: dict[str, str], ready: Any) -> Any:
    proc = ctx.Process(target=run_worker, args=(config_path, env, ready), daemon=False)
    proc.start()
    return proc


def _mark_dead(pid: int | None) -> None:
    """Tell prometheus_client a worker is gone, so its live gauges stop counting."""
    if pid is None:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
