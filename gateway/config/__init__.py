"""The gateway's configuration: frozen dataclasses (``model``) loaded and validated from YAML.

Import from here, not from the submodules: ``load_config(path)`` gives a :class:`Config` or raises
:class:`ConfigError` listing every problem with its YAML line.
"""

from gateway.config.loader import (
    ALGORITHMS,
    SYSTEM_MAX_FILE_SIZE,
    TYPE_GROUP_NAMES,
    load_config,
    load_config_text,
)
from gateway.config.model import (
    AuthConfig,
    BackendConfig,
    ChannelPolicy,
    Config,
    CorsConfig,
    FormRoleSource,
    HostPort,
    LimitsConfig,
    Mode,
    RedisConfig,
    Role,
    RolePolicy,
    RoleSourceConfig,
    RouteConfig,
    SecretValue,
    ServerConfig,
    SigningKey,
    SpoolConfig,
    UploadsConfig,
)
from gateway.config.reader import ConfigError, ConfigIssue
from gateway.config.units import format_size, parse_duration, parse_size

__all__ = [
    "ALGORITHMS",
    "SYSTEM_MAX_FILE_SIZE",
    "TYPE_GROUP_NAMES",
    "AuthConfig",
    "BackendConfig",
    "ChannelPolicy",
    "Config",
    "ConfigError",
    "ConfigIssue",
    "CorsConfig",
    "FormRoleSource",
    "HostPort",
    "LimitsConfig",
    "Mode",
    "RedisConfig",
    "Role",
    "RolePolicy",
    "RoleSourceConfig",
    "RouteConfig",
    "SecretValue",
    "ServerConfig",
    "SigningKey",
    "SpoolConfig",
    "UploadsConfig",
    "format_size",
    "load_config",
    "load_config_text",
    "parse_duration",
    "parse_size",
]
