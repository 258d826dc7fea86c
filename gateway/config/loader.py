"""YAML -> the frozen, validated :class:`Config` (SPEC §2, §4), every error tied to its YAML line.

Why the node API instead of ``yaml.safe_load``: an operator fixing a long policies file needs
``policies.yaml:57: channels.whatsapp.agents.max_file_size: ...`` for *every* mistake at once,
not just the first, and plain dicts have lost the lines. So the text is composed into nodes, each
section is read by a small function that records issues and carries on, and a Config is only
returned when no issue was recorded. ``auth`` lives in ``signing``, ``uploads``/``channels`` in
``policies``; the node-reading primitives in ``reader``.

Relative paths (``spool.dir``, ``auth.keys.*.public_key_file``, ``backend.ca_file``,
``server.tls_*``) are kept as written and resolve against the current working directory of the
process, as a shell would; deployments should use absolute paths.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import yaml
from yaml.nodes import Node

from gateway.config.model import (
    BackendConfig,
    Config,
    CorsConfig,
    HostPort,
    LimitsConfig,
    MiB,
    RedisConfig,
    ServerConfig,
    SpoolConfig,
)
from gateway.config.policies import MODES, TYPE_GROUP_NAMES, read_channels, read_uploads
from gateway.config.reader import ConfigError, ConfigIssue, Reader
from gateway.config.signing import ALGORITHMS, apply_signing_key_override, read_auth
from gateway.config.units import format_size

__all__ = [
    "ALGORITHMS",
    "SYSTEM_MAX_FILE_SIZE",
    "TYPE_GROUP_NAMES",
    "ConfigError",
    "ConfigIssue",
    "load_config",
    "load_config_text",
]

SYSTEM_MAX_FILE_SIZE = 20 * MiB
"""SPEC §1: no configuration may let a bigger file through."""
_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::"})
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

_ORIGIN = re.compile(r"^https?://[^/\s?#]+$")
_TOP_KEYS = (
    "listen",
    "admin_listen",
    "backend",
    "redis",
    "auth",
    "spool",
    "mode",
    "cors",
    "limits",
    "uploads",
    "channels",
    "server",
    "log_level",
)


def load_config(
    path: str, env: Mapping[str, str] | None = None, *, require_secrets: bool = True
) -> Config:
    """Load and validate ``path``; raises :class:`ConfigError` listing every problem.

    ``require_secrets=False`` is for commands that never verify a Secret (``check-config``,
    ``keys``, ``explain``): a ``secret_env`` variable that is not set is then not an error and the
    key's ``secret`` is ``None``. Everything else, public key files included, is still checked.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigIssue(None, "", f"cannot read: {exc}")], path) from exc
    config = load_config_text(text, path, env, require_secrets=require_secrets)
    return replace(config, source=path)


def load_config_text(
    text: str,
    source: str = "<string>",
    env: Mapping[str, str] | None = None,
    *,
    require_secrets: bool = True,
) -> Config:
    """Like :func:`load_config` for text already in memory; ``source`` only names it in errors.

    The text is composed, never constructed: an alias is one shared node, never a copy, and
    PyYAML merges each key once, so aliases cannot multiply it ("billion laughs"). Nesting is
    what can run out: PyYAML composes, and merges ``<<`` chains, recursively, and Python's
    RecursionError past ~300 levels would be a traceback from ``check-config`` and ``serve``.
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        reader = Reader(os.environ if env is None else env)
        config = _build_config(reader, root, require_secrets)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([ConfigIssue(line, "", f"invalid YAML: {problem}")], source) from exc
    except RecursionError:
        issue = ConfigIssue(None, "", "invalid YAML: nested too deeply (lists, mappings, merges)")
        raise ConfigError([issue], source) from None
    if reader.issues or config is None:
        in_file_order = sorted(reader.issues, key=lambda i: (i.line is None, i.line or 0))
        raise ConfigError(in_file_order, source)
    return config


# -- sections, in the order of the file ---------------------------------------------------------


def _build_config(reader: Reader, root: Node | None, require_secrets: bool) -> Config | None:
    """Every top-level section, then the cross-section rules, then the environment overrides."""
    top = reader.mapping(root, "", _TOP_KEYS) if root is not None else {}
    if top is None:
        return None
    simple: dict[str, Callable[[Reader, Node, str], object]] = {
        "listen": lambda r, n, k: r.host_port(n, k),
        "admin_listen": lambda r, n, k: r.host_port(n, k),
        "backend": _backend,
        "redis": _redis,
        "spool": _spool,
        "cors": _cors,
        "limits": _limits,
        "uploads": read_uploads,
        "server": _server,
        "mode": lambda r, n, k: r.choice(n, k, MODES),
        "log_level": _log_level,
    }
    values: dict[str, Any] = {}
    for name, node in top.items():
        if name in simple:
            values[name] = simple[name](reader, node, name)
    if "auth" in top:
        values["auth"] = read_auth(reader, top["auth"], "auth", require_secrets)
    cap = values["limits"].max_file_size if values.get("limits") else SYSTEM_MAX_FILE_SIZE
    if "channels" in top:
        values["channels"] = read_channels(reader, top["channels"], "channels", cap)
    else:
        reader.error(root, "channels", "required, with at least a `default` channel")
    values = {name: value for name, value in values.items() if value is not None}
    config = replace(Config(), **values)
    config = _apply_env(reader, config)
    _check_listeners_apart(reader, config)
    auth_failed = any(i.key.startswith(("auth", "GATEWAY_SIGNING_KEY")) for i in reader.issues)
    if require_secrets and not config.auth.keys and not auth_failed:
        reader.error(None, "auth.keys", "no verification key: add one or set GATEWAY_SIGNING_KEY")
    return config


def _check_listeners_apart(reader: Reader, config: Config) -> None:
    """Both listeners bind with SO_REUSEPORT (``--workers`` share a port), which the kernel
    also lets the admin listener use to join the proxy's port: clients would then reach
    ``/metrics`` and scrapes the proxy, each about half the time. Checked after the
    environment overrides, which can cause it; a host name is not resolved here."""
    proxy, admin = config.listen, config.admin_listen
    if proxy.port == admin.port and _hosts_overlap(proxy.host, admin.host):
        reader.error(None, "admin_listen", f"{admin} overlaps listen {proxy}: use another port")


def _hosts_overlap(one: str, other: str) -> bool:
    """Whether listeners on the two hosts (same port) would take each other's connections.

    A wildcard takes every address of its own family only: asyncio binds IPv6 sockets
    ``IPV6_V6ONLY``, so ``0.0.0.0`` and ``::1`` (or ``::``) are apart, as in nginx. A host
    name is not resolved: it overlaps the same name and either wildcard.
    """
    try:
        first, second = ipaddress.ip_address(one), ipaddress.ip_address(other)
    except ValueError:
        return one == other or bool({one, other} & _WILDCARD_HOSTS)
    if first.version != second.version:
        return False
    return first == second or first.is_unspecified or second.is_unspecified


def _backend(reader: Reader, node: Node, key: str) -> BackendConfig | None:
    fields = reader.fields(
        node,
        key,
        {
            "url": lambda n, k: reader.url(n, k, reader.string(n, k), ("http", "https")),
            "connect_timeout": reader.positive_duration,
            "read_timeout": reader.positive_duration,
            "pool_size": reader.integer,
            "ca_file": lambda n, k: _ca_file(reader, n, k),
            "verify_tls": reader.boolean,
        },
    )
    return None if fields is None else replace(BackendConfig(), **fields)


def _ca_file(reader: Reader, node: Node, key: str) -> str | None:
    """A CA bundle that loads now, so a wrong path fails ``check-config`` and a reload, not
    every request to the backend."""
    path = reader.string(node, key)
    if path is None:
        return None
    try:
        ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError, ValueError) as exc:
        reader.error(node, key, f"cannot load a PEM CA bundle from {path!r}: {exc}")
        return None
    return path


def _redis(reader: Reader, node: Node, key: str) -> RedisConfig | None:
    fields = reader.fields(
        node,
        key,
        {
            "url": lambda n, k: reader.url(n, k, reader.string(n, k), ("redis", "rediss", "unix")),
            "key_prefix": reader.string,
            "sentinels": lambda n, k: _host_ports(reader, n, k),
            "sentinel_service": reader.string,
            "cluster": reader.boolean,
            "timeout": reader.positive_duration,
            "pool_size": reader.integer,
        },
    )
    if fields is None:
        return None
    if fields.get("sentinels") and fields.get("cluster"):
        reader.error(reader.owner(node), key, "use either sentinels or cluster, not both")
    return replace(RedisConfig(), **fields)


def _host_ports(reader: Reader, node: Node, key: str) -> tuple[HostPort, ...] | None:
    entries = reader.strings(node, key) or []
    parsed = [
        reader.parse_host_port(text, item, f"{key}[{i}]") for i, (text, item) in enumerate(entries)
    ]
    return tuple(p for p in parsed if p is not None)


def _spool(reader: Reader, node: Node, key: str) -> SpoolConfig | None:
    fields = reader.fields(
        node,
        key,
        {
            "dir": reader.string,
            "memory_threshold": lambda n, k: reader.size(n, k, minimum=0),
            "memory_budget": lambda n, k: reader.size(n, k, minimum=0),
            "max_bytes": reader.size,
        },
    )
    return None if fields is None else replace(SpoolConfig(), **fields)


def _cors(reader: Reader, node: Node, key: str) -> CorsConfig | None:
    fields = reader.fields(
        node,
        key,
        {
            "allowed_origins": lambda n, k: _origins(reader, n, k),
            "max_age": lambda n, k: _whole_seconds(reader.duration(n, k)),
        },
    )
    return None if fields is None else replace(CorsConfig(), **fields)


def _whole_seconds(seconds: float | None) -> int | None:
    return None if seconds is None else int(seconds)


def _origins(reader: Reader, node: Node, key: str) -> tuple[str, ...] | None:
    """``*`` or ``scheme://host[:port]``: a browser's Origin never has a path or trailing slash."""
    origins: list[str] = []
    for i, (text, item) in enumerate(reader.strings(node, key) or []):
        if text == "*" or _ORIGIN.match(text):
            origins.append(text.lower())
        else:
            reader.error(item, f"{key}[{i}]", f"expected * or https://host[:port], got {text!r}")
    return tuple(origins)


def _limits(reader: Reader, node: Node, key: str) -> LimitsConfig | None:
    found = reader.mapping(
        node, key, ("max_file_size", "max_request_size", "max_files", "max_passthrough_size")
    )
    if found is None:
        return None
    fields = reader.read_fields(
        found,
        key,
        {
            "max_file_size": reader.size,
            "max_request_size": reader.size,
            "max_files": reader.integer,
            "max_passthrough_size": lambda n, k: reader.size(n, k, minimum=0),
        },
    )
    size = fields.get("max_file_size")
    if size is not None and size > SYSTEM_MAX_FILE_SIZE:
        reader.error(
            found["max_file_size"],
            f"{key}.max_file_size",
            f"{format_size(size)} is above the system cap of {format_size(SYSTEM_MAX_FILE_SIZE)}",
        )
        del fields["max_file_size"]
    return replace(LimitsConfig(), **fields)


def _server(reader: Reader, node: Node, key: str) -> ServerConfig | None:
    fields = reader.fields(
        node,
        key,
        {
            "header_timeout": reader.positive_duration,
            "body_timeout": reader.positive_duration,
            "send_timeout": reader.positive_duration,
            "keepalive_timeout": reader.positive_duration,
            "shutdown_grace": reader.duration,
            "max_header_size": reader.size,
            "max_line_size": reader.size,
            "max_head_size": reader.size,
            "max_connections": lambda n, k: reader.integer(n, k, minimum=0),
            "tls_cert_file": reader.string,
            "tls_key_file": reader.string,
            "trusted_proxies": lambda n, k: _networks(reader, n, k),
        },
    )
    if fields is None:
        return None
    if ("tls_cert_file" in fields) != ("tls_key_file" in fields):
        reader.error(reader.owner(node), key, "tls_cert_file and tls_key_file go together")
    return replace(ServerConfig(), **fields)


def _networks(reader: Reader, node: Node, key: str) -> tuple[str, ...] | None:
    """Addresses or CIDR blocks (``10.0.0.0/8``, ``fd00::/8``, ``192.0.2.7``)."""
    found: list[str] = []
    for i, (text, item) in enumerate(reader.strings(node, key) or []):
        try:
            found.append(str(ipaddress.ip_network(text.strip(), strict=False)))
        except ValueError:
            reader.error(item, f"{key}[{i}]", f"expected an address or CIDR block, got {text!r}")
    return tuple(found)


def _log_level(reader: Reader, node: Node, key: str) -> str | None:
    level = reader.string(node, key)
    if level is not None and level.upper() not in LOG_LEVELS:
        reader.error(node, key, f"expected one of {', '.join(LOG_LEVELS)}, got {level!r}")
        return None
    return None if level is None else level.upper()


def _apply_env(reader: Reader, config: Config) -> Config:
    """SPEC §2 overrides; a bad value is an error naming the variable (no YAML line)."""
    env = reader.env
    for var, name in (("GATEWAY_LISTEN", "listen"), ("GATEWAY_ADMIN_LISTEN", "admin_listen")):
        if env.get(var):
            address = reader.parse_host_port(env[var], None, var)
            if address is not None and name == "listen":
                config = replace(config, listen=address)
            elif address is not None:
                config = replace(config, admin_listen=address)
    if env.get("GATEWAY_REDIS_URL"):
        url = reader.url(
            None, "GATEWAY_REDIS_URL", env["GATEWAY_REDIS_URL"], ("redis", "rediss", "unix")
        )
        config = replace(config, redis=replace(config.redis, url=url)) if url else config
    if env.get("GATEWAY_BACKEND_URL"):
        url = reader.url(None, "GATEWAY_BACKEND_URL", env["GATEWAY_BACKEND_URL"], ("http", "https"))
        config = replace(config, backend=replace(config.backend, url=url)) if url else config
    return replace(config, auth=apply_signing_key_override(reader, config.auth))
