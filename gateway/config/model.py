"""The validated configuration: frozen dataclasses, one per YAML section (SPEC §2, §4).

Everything downstream takes these objects, never raw YAML, so a value that reached the request path
has already been checked. Secrets (signing keys) are wrapped in :class:`SecretValue` so that a
``repr`` of the config, a log line or a traceback never shows them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Literal
from urllib.parse import unquote

Mode = Literal["enforce", "report"]
Role = Literal["agent", "customer"]
MiB = 1024 * 1024


class SecretValue:
    """A value that must never be printed: ``repr`` and ``str`` give asterisks."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = value

    def reveal(self) -> bytes:
        return self._value

    def __repr__(self) -> str:
        return "SecretValue('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SecretValue) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class BackendConfig:
    url: str = "http://127.0.0.1:8081"
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    pool_size: int = 256
    ca_file: str | None = None  # TLS to the backend: verify against this CA bundle
    verify_tls: bool = True


@dataclass(frozen=True)
class RedisConfig:
    url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "upload-gateway"
    sentinels: tuple[HostPort, ...] = ()
    sentinel_service: str = "mymaster"
    cluster: bool = False
    timeout: float = 0.5
    pool_size: int = 50


@dataclass(frozen=True)
class SigningKey:
    """One verification key, selected by the token's ``kid``."""

    kid: str
    secret: SecretValue | None = None  # HS* shared secret (from ``secret_env``)
    public_key_pem: bytes | None = None  # RS*/ES* public key (from ``public_key_file``)
    secret_env: str | None = None
    public_key_file: str | None = None


@dataclass(frozen=True)
class AuthConfig:
    header: str = "Authorization"
    algorithms: tuple[str, ...] = ("HS256",)
    keys: Mapping[str, SigningKey] = field(default_factory=lambda: MappingProxyType({}))
    leeway: float = 30.0
    cache_ttl: float = 5.0
    retry_after: int = 1


@dataclass(frozen=True)
class SpoolConfig:
    dir: str = "/var/tmp/upload-gateway"  # noqa: S108 - the documented default (SPEC §2)
    memory_threshold: int = 2 * MiB  # a 1 MB attachment with its form framing stays in memory
    memory_budget: int = 32 * MiB  # all in-memory bodies of a process; beyond, uploads spill
    max_bytes: int = 2 * 1024 * MiB


@dataclass(frozen=True)
class CorsConfig:
    allowed_origins: tuple[str, ...] = ()
    max_age: int = 600


@dataclass(frozen=True)
class LimitsConfig:
    max_file_size: int = 20 * MiB
    max_request_size: int = 50 * MiB
    max_files: int = 10
    # every other request's body (nginx's client_max_body_size); 0: no limit
    max_passthrough_size: int = 50 * MiB


@dataclass(frozen=True)
class RouteConfig:
    path: str
    methods: tuple[str, ...] = ("POST", "PUT")


@dataclass(frozen=True)
class FormRoleSource:
    field: str = "data"
    json_key: str = "IsManager"
    agent_when: object = True


@dataclass(frozen=True)
class RoleSourceConfig:
    from_claim: str | None = "role"
    from_form: FormRoleSource | None = None
    default: Role = "customer"


@dataclass(frozen=True)
class UploadsConfig:
    routes: tuple[RouteConfig, ...] = ()
    role: RoleSourceConfig = field(default_factory=RoleSourceConfig)
    sniff_bytes: int = 8 * 1024


@dataclass(frozen=True)
class RolePolicy:
    enabled: bool = True
    max_file_size: int = 20 * MiB
    allowed_types: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChannelPolicy:
    agents: RolePolicy = field(default_factory=RolePolicy)
    customers: RolePolicy = field(default_factory=RolePolicy)
    mode: Mode | None = None  # None: the global ``mode``

    def for_role(self, role: Role) -> RolePolicy:
        return self.agents if role == "agent" else self.customers


@dataclass(frozen=True)
class ServerConfig:
    """Client-facing limits and timeouts, the ones nginx calls ``client_*``."""

    header_timeout: float = 10.0
    body_timeout: float = 30.0  # longest pause between two body chunks
    send_timeout: float = 60.0  # longest a client may take nothing of a response (nginx's)
    keepalive_timeout: float = 75.0
    max_header_size: int = 8 * 1024
    max_line_size: int = 8 * 1024
    max_head_size: int = 64 * 1024  # the request line and every header together
    max_connections: int = 4096  # per worker and listener; 0: no cap (gateway/connections.py)
    shutdown_grace: float = 30.0
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    # load balancers / ingresses whose X-Forwarded-For names the client (gateway/client_ip.py)
    trusted_proxies: tuple[str, ...] = ()


@dataclass(frozen=True)
class Config:
    listen: HostPort = HostPort("0.0.0.0", 8080)
    admin_listen: HostPort = HostPort("127.0.0.1", 9102)
    backend: BackendConfig = field(default_factory=BackendConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    mode: Mode = "enforce"
    cors: CorsConfig = field(default_factory=CorsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    uploads: UploadsConfig = field(default_factory=UploadsConfig)
    channels: Mapping[str, ChannelPolicy] = field(
        default_factory=lambda: MappingProxyType({"default": ChannelPolicy()})
    )
    server: ServerConfig = field(default_factory=ServerConfig)
    log_level: str = "INFO"
    source: str | None = None  # the file it was loaded from, for reloads

    @cached_property
    def decoded_channels(self) -> Mapping[str, str]:
        """Channel keys by the stream id they name once percent-decoded (``AbC%3D%3D`` ->
        ``AbC==``); the loader refuses two keys naming the same id. Built on first use, and
        gone with the config (a reload makes a new one)."""
        return MappingProxyType({unquote(key): key for key in self.channels})

    def channel(self, name: str) -> tuple[str, ChannelPolicy]:
        """The policy for a channel id, falling back to ``default`` (SPEC §4)."""
        if name in self.channels:
            return name, self.channels[name]
        return "default", self.channels["default"]
