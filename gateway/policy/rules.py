"""The effective rules for one channel and role, where each comes from, and the verdict for a file.

One place decides, for the request path, ``explain`` and ``GET /_gateway/policy/{channel}`` alike,
so what support staff are told is exactly what the proxy does. Every refusal names the setting
that caused it (``limit_source``), because "why was my file blocked?" is answered by a YAML key.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, replace
from typing import Any

from gateway.config.model import ChannelPolicy, Config, MiB, Mode, Role, RolePolicy
from gateway.config.units import format_size
from gateway.errors import GatewayError
from gateway.policy import types

ROLE_KEYS: dict[Role, str] = {"agent": "agents", "customer": "customers"}
SYSTEM_REASONS = frozenset(
    {"request_too_large", "too_many_files", "malformed_request", "spool_full"}
)
"""Refusals that ``mode: report`` never waives (see :func:`enforced`)."""


@dataclass(frozen=True)
class EffectivePolicy:
    """What one channel key and role may upload, each value with the setting that set it."""

    channel: str  # the configured channel key ("default" for unlisted channels)
    role: Role
    enabled: bool
    enabled_source: str
    max_file_size: int
    max_file_size_source: str
    max_request_size: int
    max_files: int
    allowed_types: tuple[str, ...]
    allowed_types_source: str
    mode: Mode
    mode_source: str
    system_cap: int
    sniff_bytes: int

    @property
    def role_key(self) -> str:
        return ROLE_KEYS[self.role]

    @property
    def size_first(self) -> bool:
        """Whether a file over ``max_file_size`` is refused for its size rather than its type.

        The proxy refuses a file for the first rule it breaks as its bytes arrive: the type
        rules are known once the first ``sniff_bytes`` are in, the size rule at
        ``max_file_size + 1`` bytes. Deciding by the limits (not by where a chunk happens to
        end) gives one answer for every chunking, wherever the role came from, and in
        ``explain``.
        """
        return self.max_file_size < self.sniff_bytes

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape of ``GET /_gateway/policy/{channel}`` and ``explain --json``."""
        return {
            "channel": self.channel,
            "role": self.role,
            "mode": {"value": self.mode, "source": self.mode_source},
            "enabled": {"value": self.enabled, "source": self.enabled_source},
            "max_file_size": {"bytes": self.max_file_size, "source": self.max_file_size_source},
            "max_request_size": {
                "bytes": self.max_request_size,
                "source": "limits.max_request_size",
            },
            "max_files": {"value": self.max_files, "source": "limits.max_files"},
            "allowed_types": {
                "value": list(self.allowed_types),
                "source": self.allowed_types_source,
            },
        }


def _role_source(config: Config, key: str, channel: ChannelPolicy, role: Role) -> str:
    """``channels.<key>.<role>``, or the default channel's when the role was inherited from it."""
    role_key = ROLE_KEYS[role]
    default = config.channels.get("default")
    inherited = default is not None and channel.for_role(role) is default.for_role(role)
    if key != "default" and inherited:
        key = "default"
    return f"channels.{key}.{role_key}"


def effective_policy(config: Config, channel_id: str, role: Role) -> EffectivePolicy:
    """The rules for ``channel_id`` (a URL id or a channel key) and ``role``.

    A role limit at or above ``limits.max_file_size`` is attributed to the system cap: that is
    the setting that binds, and the loader fills an omitted role limit with the cap anyway.
    Computed once per configuration, channel key and role (a config never changes; a reload
    makes a new one), and remembered by the channel *key*, so URL ids cannot grow the memo.
    """
    key, channel = config.channel(channel_id)
    known = _memo(config)
    found = known.get((key, role))
    if found is None:
        found = known[(key, role)] = _effective_policy(config, key, channel, role)
    return found


_MEMOS: dict[int, dict[tuple[str, Role], EffectivePolicy]] = {}


def _memo(config: Config) -> dict[tuple[str, Role], EffectivePolicy]:
    """This config's memo, dropped when the config is (keyed by id: hashing a config is slow)."""
    known = _MEMOS.get(id(config))
    if known is None:
        known = _MEMOS[id(config)] = {}
        weakref.finalize(config, _MEMOS.pop, id(config), None)
    return known


def _effective_policy(
    config: Config, key: str, channel: ChannelPolicy, role: Role
) -> EffectivePolicy:
    policy: RolePolicy = channel.for_role(role)
    source = _role_source(config, key, channel, role)
    cap = config.limits.max_file_size
    if policy.max_file_size < cap:
        size, size_source = policy.max_file_size, f"{source}.max_file_size"
    else:
        size, size_source = cap, "limits.max_file_size"
    mode: Mode = channel.mode or config.mode
    mode_source = f"channels.{key}.mode" if channel.mode else "mode"
    return EffectivePolicy(
        channel=key,
        role=role,
        enabled=policy.enabled,
        enabled_source=f"{source}.enabled",
        max_file_size=size,
        max_file_size_source=size_source,
        max_request_size=config.limits.max_request_size,
        max_files=config.limits.max_files,
        allowed_types=policy.allowed_types,
        allowed_types_source=f"{source}.allowed_types",
        mode=mode,
        mode_source=mode_source,
        system_cap=cap,
        sniff_bytes=config.uploads.sniff_bytes,
    )


def capped(policy: EffectivePolicy) -> EffectivePolicy:
    """The same policy with the system cap as its file limit, for refusals that cite the cap."""
    return replace(
        policy, max_file_size=policy.system_cap, max_file_size_source="limits.max_file_size"
    )


def enforced(error: GatewayError, mode: Mode) -> bool:
    """Whether ``error`` refuses the request under ``mode``.

    ``mode: report`` exists to try a *channel's* media settings on live traffic, so it waives
    only those (uploads_disabled, file_too_large below the cap, type_*). The system's own limits
    (the 20 MB cap, ``max_request_size``, ``max_files``), malformed bodies, unsupported encodings
    and a full spool protect the gateway and the backend and always hold.
    """
    if mode == "enforce" or error.code in SYSTEM_REASONS or "content_encoding" in error.fields:
        return True
    return bool(error.fields.get("limit_source", "").startswith("limits."))


@dataclass(frozen=True)
class FileFacts:
    """What was learned about one file part, before any rule is applied."""

    filename: str | None
    declared_type: str | None
    sniffed_type: str
    size: int
    field: str | None = None

    @property
    def extension(self) -> str:
        return types.extension_of(self.filename)


@dataclass(frozen=True)
class FileVerdict:
    """One file's facts and outcome, for the access log, metrics and ``explain``."""

    name: str | None
    field: str | None
    declared_type: str | None
    sniffed_type: str
    size: int
    reason: str | None = None  # an error code; None when the file passed

    @property
    def accepted(self) -> bool:
        return self.reason is None

    @classmethod
    def of(cls, facts: FileFacts, reason: str | None) -> FileVerdict:
        return cls(
            facts.filename, facts.field, facts.declared_type, facts.sniffed_type, facts.size, reason
        )


def megabytes(num_bytes: int) -> int | float:
    """``maxFileSizeAllow`` as the platform sends it: whole MB when exact, else two decimals,
    or two significant digits under 0.01 MB (a 2,000-byte limit is 0.0019, never 0.0)."""
    if num_bytes % MiB == 0:
        return num_bytes // MiB
    value = round(num_bytes / MiB, 2)
    return value if value else float(f"{num_bytes / MiB:.2g}")


def file_fields(policy: EffectivePolicy, filename: str | None) -> dict[str, Any]:
    return {
        "channel": policy.channel,
        "role": policy.role,
        "fileName": filename or "",
        "fileExtension": types.extension_of(filename).lstrip("."),
    }


def disabled_error(policy: EffectivePolicy) -> GatewayError:
    return GatewayError(
        "uploads_disabled",
        f"uploads are not enabled for {policy.role}s on channel {policy.channel!r}",
        channel=policy.channel,
        role=policy.role,
        limit_source=policy.enabled_source,
    )


def file_too_large(policy: EffectivePolicy, filename: str | None) -> GatewayError:
    limit = policy.max_file_size
    return GatewayError(
        "file_too_large",
        f"the file is larger than {format_size(limit)}, the most {policy.role}s may upload "
        f"on channel {policy.channel!r} (set by {policy.max_file_size_source})",
        limit_bytes=limit,
        limit_source=policy.max_file_size_source,
        maxFileSizeAllow=megabytes(limit),
        **file_fields(policy, filename),
    )


def check_size(policy: EffectivePolicy, size: int, filename: str | None) -> GatewayError | None:
    """Exactly the limit passes; one byte more does not (SPEC §4)."""
    return file_too_large(policy, filename) if size > policy.max_file_size else None


def check_spoofing(facts: FileFacts) -> GatewayError | None:
    """Refuse content whose declared type or file extension claims another kind of file.

    Independent of role and channel, so it can refuse a file before the role is known.
    """
    sniffed = facts.sniffed_type
    claims = []
    if facts.declared_type and not types.compatible(facts.declared_type, sniffed):
        claims.append(f"declared as {types.normalise(facts.declared_type)}")
    if facts.extension and not types.extension_compatible(facts.extension, sniffed):
        claims.append(f"named {facts.extension}")
    if not claims:
        return None
    return GatewayError(
        "type_mismatch",
        f"the file is {' and '.join(claims)} but its content is {sniffed}",
        sniffed_type=sniffed,
        declared_type=facts.declared_type or "",
        fileName=facts.filename or "",
        fileExtension=facts.extension.lstrip("."),
    )


def type_allowed(policy: EffectivePolicy, sniffed: str, extension: str) -> bool:
    if len(extension) > 16:  # client-chosen: kept out of the cache below
        return _matches(policy.allowed_types, sniffed, extension)
    return _admitted(policy.allowed_types, sniffed, extension)


def _matches(allowed_types: tuple[str, ...], sniffed: str, extension: str) -> bool:
    return any(types.matches_entry(entry, sniffed, extension) for entry in allowed_types)


# The same few (rules, type, extension) triples arrive with every upload, and a group such as
# "documents" expands to dozens of comparisons: remember the answers, a bounded number of them.
_admitted = functools.lru_cache(maxsize=4096)(_matches)


def check_allowed(policy: EffectivePolicy, facts: FileFacts) -> GatewayError | None:
    """The channel's ``allowed_types`` for this role; executables only when named there."""
    if type_allowed(policy, facts.sniffed_type, facts.extension):
        return None
    what = (
        "executables are" if types.is_executable(facts.sniffed_type) else f"{facts.sniffed_type} is"
    )
    why = (
        " (it can carry scripts: images and image/* do not admit it, image/svg+xml or .svg do)"
        if types.is_scriptable(facts.sniffed_type)
        else ""
    )
    return GatewayError(
        "type_not_allowed",
        f"{what} not allowed for {policy.role}s on channel {policy.channel!r}{why} "
        f"(allowed: {', '.join(policy.allowed_types) or 'nothing'}; "
        f"set by {policy.allowed_types_source})",
        sniffed_type=facts.sniffed_type,
        allowed_types=list(policy.allowed_types),
        limit_source=policy.allowed_types_source,
        **file_fields(policy, facts.filename),
    )


def mismatch_fields(mismatch: GatewayError, policy: EffectivePolicy, role: Role | None) -> None:
    """What a 415 carries besides the sniffed type (SPEC §5): the allowed list, and for whom."""
    mismatch.fields.update(
        channel=policy.channel, role=role, allowed_types=list(policy.allowed_types)
    )


def check_type(policy: EffectivePolicy, facts: FileFacts) -> GatewayError | None:
    """Spoofing first (a renamed executable is a mismatch), then the allowed types."""
    mismatch = check_spoofing(facts)
    if mismatch is not None:
        mismatch_fields(mismatch, policy, policy.role)
        return mismatch
    return check_allowed(policy, facts)


def judge_file(policy: EffectivePolicy, facts: FileFacts) -> GatewayError | None:
    """The complete verdict for one whole file: enabled, then size and type in the order the
    proxy meets them (:attr:`EffectivePolicy.size_first`)."""
    if not policy.enabled:
        return disabled_error(policy)
    if policy.size_first:
        return check_size(policy, facts.size, facts.filename) or check_type(policy, facts)
    return check_type(policy, facts) or check_size(policy, facts.size, facts.filename)
