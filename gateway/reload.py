"""Hot reload of the policies file on SIGHUP and on change (SPEC §4).

A new file is loaded and validated completely before it replaces the running config; a bad one
leaves the old policy in force, is logged with its YAML lines and counted, and shows on
``/readyz``. Requests already running keep the config object they started with (and an
exchange with the backend finishes on the pool it began on). What the worker built from the file
at start is rebuilt where it changed (``GatewayState.rebuild``): removing a leaked signing key's
``kid``, or pointing ``backend`` elsewhere, must not wait for a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable

from gateway.accesslog import set_log_level
from gateway.config import ConfigError, load_config
from gateway.config.model import Config
from gateway.metrics import Metrics
from gateway.state import ConfigHolder

LOGGER = logging.getLogger("upload_gateway.reload")
POLL_SECONDS = 1.0
SETTLE_SECONDS = 0.1


def fixed_at_start(old: Config, new: Config) -> list[str]:
    """The settings a reload does not apply (README, Configuration) that differ in ``new``:
    a successful reload must not let an operator believe a new Redis or listener is in use.
    ``old`` is the config the process started with: those settings still come from it, however
    many reloads came between, so a reload that puts one back is not warned about."""
    changed = [
        name
        for name in ("listen", "admin_listen", "redis")
        if getattr(old, name) != getattr(new, name)
    ]
    if old.server.shutdown_grace != new.server.shutdown_grace:
        changed.append("server.shutdown_grace")  # the supervisor, which never reloads, waits it
    if bool(old.server.tls_cert_file) != bool(new.server.tls_cert_file):
        changed.append("server.tls_cert_file (TLS on or off)")  # the listener was made with it
    return changed


def named_files(config: Config) -> tuple[str, ...]:
    """The files ``config`` names that a reload reads again: the signing keys' public key files,
    the TLS certificate and key, and the backend's CA bundle. Watched like the policies file, so
    a renewal written into a mounted Kubernetes Secret applies without anyone sending SIGHUP."""
    files = {key.public_key_file for key in config.auth.keys.values() if key.public_key_file}
    server, backend = config.server, config.backend
    files.update(f for f in (server.tls_cert_file, server.tls_key_file, backend.ca_file) if f)
    return tuple(sorted(files))


Stamp = tuple[int, int] | None  # a file's (mtime in ns, size), or None when it cannot be read


def _stamp(path: str) -> Stamp:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


class ConfigWatcher:
    """Reloads on SIGHUP (:meth:`request_reload`) and when the file, or a file it names
    (:func:`named_files`), changes (polled).

    The file is read and validated in a thread: composing YAML costs ~5 s per MiB in pure
    Python, and a worker whose event loop did that would answer nobody meanwhile (a policies
    file listing thousands of channels, on every reload, in every worker). Reloads run one at a
    time, in the order asked; a request keeps the config object it started with.
    """

    def __init__(
        self,
        path: str,
        holder: ConfigHolder,
        metrics: Metrics,
        rebuild: Callable[[Config, str], None] | None = None,
    ) -> None:
        self._path = path
        self._holder = holder
        self._metrics = metrics
        self._rebuild = rebuild
        self._watched = (path, *named_files(holder.current))
        self._seen = self._stamps()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._requested: set[asyncio.Task[bool]] = set()
        self._closed = False

    def _stamps(self) -> dict[str, Stamp]:
        return {path: _stamp(path) for path in self._watched}

    def _watch(self, config: Config, before: dict[str, Stamp]) -> None:
        """Watch the files ``config`` names from now on. A file watched already keeps the stamp
        it had before the load read it, so a change made meanwhile still triggers a reload."""
        self._watched = (self._path, *named_files(config))
        self._seen = {path: before.get(path, _stamp(path)) for path in self._watched}

    async def start(self) -> None:
        self._task = asyncio.create_task(self._poll(), name="config-watcher")

    async def close(self) -> None:
        """Stop watching, and end any reload (a thread already reading the file finishes on
        its own; its result is dropped)."""
        self._closed = True
        for task in [self._task, *self._requested]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def request_reload(self) -> None:
        """SIGHUP's handler: a signal handler cannot wait, so the reload runs as a task. The
        handler stays installed while the worker drains (SIGHUP's default would kill it), so
        once closed it is ignored: a reload then would be awaited by nobody, and the worker's
        exit would wait for its thread."""
        if self._closed:
            return
        task = asyncio.get_running_loop().create_task(self.reload(), name="config-reload")
        self._requested.add(task)
        task.add_done_callback(self._requested.discard)

    async def reload(self) -> bool:
        """Load and swap in the file; keep the old config if it is invalid. True on success."""
        async with self._lock:
            self._seen = before = self._stamps()
            try:
                config = await asyncio.to_thread(load_config, self._path)
            except (ConfigError, OSError) as exc:
                return self._failed(str(exc), exc)
            except Exception as exc:  # a loader bug must not end hot reload for the process's life
                return self._failed(f"the loader failed: {type(exc).__name__}: {exc}", None)
            try:
                self._apply(config)
            except ConfigError as exc:  # what the file names cannot be used (a certificate)
                return self._failed(str(exc), exc)
            except Exception as exc:  # nor may a rebuild bug: the watcher's task would end
                return self._failed(f"applying it failed: {type(exc).__name__}: {exc}", None)
            self._watch(config, before)
            return True

    def _failed(self, error: str, reported: Exception | None) -> bool:
        self._holder.last_error = error
        self._metrics.config_reloads.labels(result="failure").inc()
        if reported is not None:
            LOGGER.error("config reload failed, keeping the running policy:\n%s", reported)
        else:
            LOGGER.exception("config reload failed unexpectedly, keeping the running policy")
        return False

    def _apply(self, config: Config) -> None:
        """Swap in ``config``; what is rebuilt from it changes with the policy (nothing awaits
        in between, so no request sees one without the other). A ``ConfigError`` from the
        rebuild comes before anything changed."""
        fixed = fixed_at_start(self._holder.started, config)
        if self._rebuild is not None:
            self._rebuild(config, self._path)
        if config.log_level != self._holder.current.log_level:
            set_log_level(config.log_level)  # neither a request's setting nor fixed at start
        self._holder.swap(config)
        self._metrics.config_reloads.labels(result="success").inc()
        LOGGER.info("config reloaded from %s (generation %d)", self._path, self._holder.generation)
        if fixed:
            LOGGER.warning(
                "config reloaded, but these changed settings take effect only after a restart: %s",
                ", ".join(fixed),
            )

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_SECONDS)
            seen = self._stamps()
            if seen == self._seen:
                continue
            # A file written in place (not renamed over) may be caught half-written: wait until
            # it stops changing, so an editor's save is not logged and counted as a failure.
            await asyncio.sleep(SETTLE_SECONDS)
            if self._stamps() == seen:
                await self.reload()
