"""All Prometheus collectors in one place (SPEC §6), created per app rather than at import.

With ``--workers N`` the parent sets ``PROMETHEUS_MULTIPROC_DIR`` before any worker starts, so
prometheus_client writes each worker's values to shared files and ``/metrics`` on any worker
aggregates all of them (gauges summed over live processes). Label values are bounded: routes are
route *names*, channels are configured channel keys, reasons are error codes — never raw paths or
client-supplied strings.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as prom_multiprocess

from gateway import __version__

PREFIX = "upload_gateway_"
SIZE_BUCKETS = (
    1024.0,
    16 * 1024.0,
    64 * 1024.0,
    256 * 1024.0,
    1024**2.0,
    2 * 1024**2.0,
    5 * 1024**2.0,
    10 * 1024**2.0,
    16 * 1024**2.0,
    20 * 1024**2.0,
    50 * 1024**2.0,
)
# Milliseconds (a cached auth verdict) to minutes (a 20 MB upload over a slow mobile link).
DURATION_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
)


def multiprocess_enabled() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class Metrics:
    """The gateway's collectors. One instance per process, passed to every stage that counts."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        # In multiprocess mode values live in files; registering is only for single-process.
        reg = None if multiprocess_enabled() else self.registry
        p = PREFIX
        self.requests = Counter(
            p + "requests_total",
            "Requests answered, by route and status.",
            ["route", "method", "status"],
            registry=reg,
        )
        self.request_duration = Histogram(
            p + "request_duration_seconds",
            "Time from request start to the end of the response.",
            ["route"],
            buckets=DURATION_BUCKETS,
            registry=reg,
        )
        self.connections_refused = Counter(
            p + "connections_refused_total",
            "Client connections closed at once: the listener held server.max_connections.",
            ["listener"],
            registry=reg,
        )
        self.uploads = Counter(
            p + "uploads_total",
            "Upload requests by channel, role and outcome.",
            ["channel", "role", "outcome"],
            registry=reg,
        )
        self.rejections = Counter(
            p + "rejections_total",
            "Requests the gateway refused, by reason (error code).",
            ["reason", "channel"],
            registry=reg,
        )
        self.would_reject = Counter(
            p + "report_mode_would_reject_total",
            "Uploads that mode: report let through but enforce would have refused.",
            ["reason", "channel"],
            registry=reg,
        )
        self.received_bytes = Counter(
            p + "received_bytes_total",
            "Request body bytes read from clients.",
            ["route"],
            registry=reg,
        )
        self.rejected_received_bytes = Counter(
            p + "rejected_received_bytes_total",
            "Body bytes read from clients for requests that were then refused.",
            registry=reg,
        )
        self.forwarded_bytes = Counter(
            p + "forwarded_bytes_total",
            "Request body bytes sent to the backend.",
            ["route"],
            registry=reg,
        )
        self.upload_size = Histogram(
            p + "upload_file_size_bytes",
            "Size of each inspected file part.",
            ["channel", "role"],
            buckets=SIZE_BUCKETS,
            registry=reg,
        )
        self.backend_duration = Histogram(
            p + "backend_duration_seconds",
            "Time until the backend's response headers arrive.",
            ["route"],
            buckets=DURATION_BUCKETS,
            registry=reg,
        )
        self.backend_errors = Counter(
            p + "backend_errors_total",
            "Backend failures by kind.",
            ["kind"],
            registry=reg,
        )
        self.auth_failures = Counter(
            p + "auth_failures_total",
            "Authentication failures by reason.",
            ["reason"],
            registry=reg,
        )
        self.auth_cache = Counter(
            p + "auth_cache_lookups_total",
            "Active-key verdict cache lookups.",
            ["result"],
            registry=reg,
        )
        self.redis_errors = Counter(
            p + "redis_errors_total",
            "Redis commands that failed or timed out.",
            ["operation"],
            registry=reg,
        )
        self.inflight_uploads = Gauge(
            p + "inflight_uploads",
            "Uploads being received or forwarded now.",
            multiprocess_mode="livesum",
            registry=reg,
        )
        self.spool_bytes = Gauge(
            p + "spool_bytes",
            "Bytes held in spools (memory and disk) now.",
            multiprocess_mode="livesum",
            registry=reg,
        )
        self.spool_spills = Counter(
            p + "spool_spills_total",
            "Uploads that went to an encrypted spool file, by why: announced (Content-Length "
            "past memory_threshold), threshold (grew past it), budget (spool.memory_budget full).",
            ["reason"],
            registry=reg,
        )
        self.config_reloads = Counter(
            p + "config_reloads_total",
            "Configuration reloads by result.",
            ["result"],
            registry=reg,
        )
        # Exported at 0 from the start: the UploadGatewayConfigReloadFailed alert is an
        # increase(), and Prometheus sees no increase in a series that is born at 1, so the
        # first failed reload of a process would never alert.
        for result in ("success", "failure"):
            self.config_reloads.labels(result=result)
        self.build_info = Gauge(
            p + "build_info",
            "Always 1; labels carry the version.",
            ["version"],
            multiprocess_mode="max",
            registry=reg,
        )
        self.build_info.labels(version=__version__).set(1)

    def exposition(self) -> bytes:
        """The text format; in multiprocess mode, aggregated over every worker's files."""
        if multiprocess_enabled():
            registry = CollectorRegistry()
            prom_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)
