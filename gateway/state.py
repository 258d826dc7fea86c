"""Typed app state: the one object every stage of the request path is handed (``STATE``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from aiohttp import web

from gateway.auth.authenticator import Authenticator
from gateway.config.model import Config
from gateway.forward import Forwarder
from gateway.metrics import Metrics
from gateway.redis_client import RedisClient, display_url
from gateway.spool import SpoolBudget
from gateway.tls import ServerTls

LOGGER = logging.getLogger("upload_gateway.reload")


@dataclass
class ConfigHolder:
    """The live config. Reloads swap ``current``; a request reads it once, at its start, so an
    in-flight upload finishes under the policy it started with (SPEC §4 hot reload)."""

    current: Config
    generation: int = 0
    last_error: str | None = None
    # What the settings fixed at start (listeners, Redis, backend, auth, ...) were built from:
    # a reload is told apart from this, not from the last reload (reload.fixed_at_start).
    started: Config = field(init=False)

    def __post_init__(self) -> None:
        self.started = self.current

    def swap(self, config: Config) -> None:
        self.current = config
        self.generation += 1
        self.last_error = None


@dataclass
class GatewayState:
    config: ConfigHolder
    metrics: Metrics
    forwarder: Forwarder
    auth: Authenticator
    redis: RedisClient
    spool_budget: SpoolBudget
    draining: bool = False
    tls: ServerTls | None = None  # set by the worker when it terminates TLS

    def rebuild(self, config: Config, source: str) -> None:
        """Rebuild what the worker built from the config at start, where a reloaded ``config``
        changes it: the TLS certificate (read again whether or not its paths changed: a renewal
        replaces the files), the backend pool (``backend``), the Secret verifier (``auth``) and
        the spool's budget (``spool.max_bytes``, ``spool.memory_budget``).

        Raises ``ConfigError`` when the certificate or the backend's CA bundle cannot be loaded.
        Both are loaded before anything is applied, so a failed reload has changed nothing: not
        the certificate served, not the signing keys."""
        tls = self.tls.load(config, source) if self.tls is not None else None
        if self.forwarder.apply(config.backend, source):  # the last step that may fail
            LOGGER.info("backend applied: %s", display_url(config.backend.url))
        if self.tls is not None:
            self.tls.serve(tls)
        if self.auth.apply(config.auth):
            LOGGER.info("auth applied; signing keys (kid): %s", ", ".join(config.auth.keys))
        if self.spool_budget.resize(config.spool.max_bytes, config.spool.memory_budget):
            LOGGER.info(
                "spool budget applied: max_bytes %d, memory_budget %d",
                config.spool.max_bytes,
                config.spool.memory_budget,
            )


STATE = web.AppKey("gateway_state", GatewayState)
