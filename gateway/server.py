"""Running the gateway: one process per worker, all on one port (SO_REUSEPORT), and signals.

``serve`` refuses to start on a port something already listens on (``ports.py``: SO_REUSEPORT
alone would let it join another gateway's port), then runs one worker here or hands
``--workers N`` to :mod:`gateway.supervisor`. A worker drains on SIGTERM: it stops accepting,
reports not-ready, lets in-flight requests finish within ``server.shutdown_grace``, then exits 0.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import ssl
import sys
from typing import Any

from aiohttp import web
from prometheus_client import Counter

from gateway.accesslog import JsonFormatter, set_log_level
from gateway.app import build_admin_app, build_app, build_state
from gateway.collector import tune_collector
from gateway.config import ConfigError, load_config
from gateway.config.model import Config
from gateway.connections import ADMIN_CONNECTIONS, raise_descriptor_limit, refused_counter
from gateway.listener import GatewayRunner, ListenerSite
from gateway.malloc import limit_arenas
from gateway.metrics import Metrics
from gateway.ports import first_unavailable
from gateway.protocol import GatewayProtocol, ProtocolOptions
from gateway.reload import ConfigWatcher
from gateway.state import GatewayState
from gateway.supervisor import supervise
from gateway.tls import ServerTls, tls_context

LOGGER = logging.getLogger("upload_gateway")
# prometheus_client's multiprocess directory, by its name and its older lower-case one
_MULTIPROC_VARIABLES = ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir")
LINGERING_SECONDS = 2.0
DRAIN_CANCEL_TIMEOUT = 1.0  # after the grace: how long cancelled handlers get to unwind
READ_BUFFER = 32 * 1024  # aiohttp read_bufsize: see serve_worker


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


def proxy_runner(state: GatewayState, config: Config) -> GatewayRunner:
    """The proxy listener's runner, set up as every worker runs it (``bench.inprocess`` too)."""
    return GatewayRunner(
        build_app(state),
        _proxy_options(state, config),
        handle_signals=False,
        access_log=None,
        auto_decompress=False,  # the backend must get the bytes the client sent (SPEC §4)
        **_proxy_settings(config),
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


def _proxy_options(state: GatewayState, config: Config) -> ProtocolOptions:
    """Its refusals are counted as proxy traffic, and so are the connections it closes past
    ``server.max_connections``."""
    refused = refused_counter(state.metrics, "proxy")
    return _protocol_options(config, state.metrics, refused, config.server.max_connections)


def _proxy_settings(config: Config) -> dict[str, Any]:
    """aiohttp's settings for each connection the proxy listener accepts."""
    return {
        "max_line_size": config.server.max_line_size,
        "max_field_size": config.server.max_header_size,
        "keepalive_timeout": config.server.keepalive_timeout,
    }


def _protocol_options(
    config: Config, metrics: Metrics | None, refused: Counter, max_connections: int
) -> ProtocolOptions:
    """``metrics`` counts the listener's refusals (None: not proxy traffic); ``refused`` the
    connections closed past ``max_connections``."""
    server = config.server
    return ProtocolOptions(
        header_timeout=server.header_timeout,
        metrics=metrics,
        send_timeout=server.send_timeout,
        max_head_size=server.max_head_size,
        max_connections=max_connections,
        refused=refused,
    )


def admin_runner(state: GatewayState, config: Config) -> GatewayRunner:
    """The admin listener's runner: the same head timer, send timeout and keep-alive timeout as
    the proxy's (in Kubernetes it listens on the pod's address for probes and scrapes, and
    aiohttp alone would let a connection that never finishes its head stay open for ever, and
    an idle one for an hour); its refusals are not proxy traffic and not counted, but the
    connections it closes past its own cap are (``listener="admin"``)."""
    return GatewayRunner(
        build_admin_app(state),
        _admin_options(state, config),
        handle_signals=False,
        access_log=None,
        # the proxy's, not aiohttp's default of an hour: the head timer does not cover an
        # idle keep-alive connection
        keepalive_timeout=config.server.keepalive_timeout,
        lingering_time=LINGERING_SECONDS,
    )


def _admin_options(state: GatewayState, config: Config) -> ProtocolOptions:
    refused = refused_counter(state.metrics, "admin")
    return _protocol_options(config, None, refused, ADMIN_CONNECTIONS)


def _rebuild_worker(
    state: GatewayState, proxy: GatewayRunner, admin: GatewayRunner, config: Config, source: str
) -> None:
    """Everything a reload rebuilds in a worker: the state's parts (``GatewayState.rebuild``),
    then both listeners' settings for the connections they accept from now on."""
    state.rebuild(config, source)
    raise_descriptor_limit(config)  # a larger max_connections or pool_size needs descriptors
    proxy.retune(_proxy_options(state, config), **_proxy_settings(config))
    admin.retune(_admin_options(state, config), keepalive_timeout=config.server.keepalive_timeout)


async def serve_worker(config_path: str, config: Config, ready: Any = None) -> None:
    """One worker: the proxy and admin listeners, until SIGTERM/SIGINT.

    ``ready`` (a multiprocessing Event) is set once both listeners are bound and the signal
    handlers are installed, so the supervisor can tell a worker that cannot start from one
    that crashed later.
    """
    raise_descriptor_limit(config)
    state = build_state(config)
    runner = proxy_runner(state, config)
    admin_app_runner = admin_runner(state, config)
    await runner.setup()
    await admin_app_runner.setup()
    listen, admin = config.listen, config.admin_listen
    state.tls = ServerTls(config) if config.server.tls_cert_file else None
    await ListenerSite(
        runner,
        listen.host,
        listen.port,
        reuse_port=True,
        backlog=1024,
        ssl_context=state.tls.listener if state.tls is not None else None,
        handshake_timeout=config.server.header_timeout,
    ).start()
    await web.TCPSite(admin_app_runner, admin.host, admin.port, reuse_port=True).start()
    LOGGER.info("listening on %s (admin %s), pid %d", listen, admin, os.getpid())
    rebuild = functools.partial(_rebuild_worker, state, runner, admin_app_runner)
    watcher = ConfigWatcher(config_path, state.config, state.metrics, rebuild)
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
    setup_logging(config.log_level)
    return supervise(config_path, workers, config.server.shutdown_grace, run_worker)


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
