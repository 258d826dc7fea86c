"""The ``uploads`` and ``channels`` sections (SPEC §4): which requests are uploads, and the rules.

``channels.default`` is read first because listed channels inherit the roles they leave out.
Every role's ``max_file_size`` is checked against ``limits.max_file_size`` (the cap passed in).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import cast
from urllib.parse import unquote

from yaml.nodes import Node, ScalarNode

from gateway.config.model import (
    ChannelPolicy,
    FormRoleSource,
    Mode,
    Role,
    RolePolicy,
    RoleSourceConfig,
    RouteConfig,
    UploadsConfig,
)
from gateway.config.reader import NULL_TAG, Reader, join
from gateway.config.units import format_size

TYPE_GROUP_NAMES = frozenset({"images", "documents", "audio", "video", "archives", "executables"})
"""Names usable in ``allowed_types``; their contents are defined in ``gateway/policy/``."""
MODES = ("enforce", "report")
UPLOAD_METHODS = ("POST", "PUT", "PATCH")
MIN_SNIFF_BYTES, MAX_SNIFF_BYTES = 512, 64 * 1024

_MIME = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]*/([a-z0-9][a-z0-9!#$&^_.+-]*|\*)$")
_EXTENSION = re.compile(r"^\.[a-z0-9][a-z0-9_+-]*(\.[a-z0-9_+-]+)*$")
_PLACEHOLDER = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")


def read_uploads(reader: Reader, node: Node, key: str) -> UploadsConfig | None:
    fields = reader.fields(
        node,
        key,
        {
            "routes": lambda n, k: _routes(reader, n, k),
            "role": lambda n, k: _role_source(reader, n, k),
            "sniff_bytes": lambda n, k: _sniff_bytes(reader, n, k),
        },
    )
    return None if fields is None else replace(UploadsConfig(), **fields)


def _sniff_bytes(reader: Reader, node: Node, key: str) -> int | None:
    size = reader.size(node, key)
    if size is not None and not MIN_SNIFF_BYTES <= size <= MAX_SNIFF_BYTES:
        reader.error(node, key, f"must be between 512 bytes and 64KiB, got {format_size(size)}")
        return None
    return size


def _routes(reader: Reader, node: Node, key: str) -> tuple[RouteConfig, ...] | None:
    items = reader.sequence(node, key) or []
    routes = [_route(reader, item, f"{key}[{i}]") for i, item in enumerate(items)]
    seen: dict[tuple[str | None, ...], tuple[int, RouteConfig]] = {}
    for i, (route, item) in enumerate(zip(routes, items, strict=True)):
        if route is None:
            continue
        shape = _route_shape(route)
        if shape in seen and set(seen[shape][1].methods) & set(route.methods):
            first, earlier = seen[shape]
            what = (
                "is listed twice"
                if earlier.path == route.path
                else f"matches the same requests as {key}[{first}] ({earlier.path})"
            )
            reader.error(item, f"{key}[{i}].path", f"route {route.path} {what}")
        else:
            seen.setdefault(shape, (i, route))
    return tuple(route for route in routes if route is not None)


def _route(reader: Reader, node: Node, key: str) -> RouteConfig | None:
    """``path`` starts with ``/`` and names ``{channel}`` once; ``methods`` default POST, PUT."""
    found = reader.mapping(node, key, ("path", "methods"))
    if found is None:
        return None
    if "path" not in found:
        reader.error(node, join(key, "path"), "required")
        return None
    path_node, path_key = found["path"], join(key, "path")
    path = reader.string(path_node, path_key)
    if path is None:
        return None
    bare = _PLACEHOLDER.sub("", path)
    if not path.startswith("/") or path.count("{channel}") != 1 or "{" in bare or "}" in bare:
        reader.error(
            path_node,
            path_key,
            f"must start with / and contain {{channel}} exactly once, got {path!r}",
        )
        return None
    problem = _segment_problem(path)
    if problem is not None:
        # The request path is matched segment by segment (gateway/policy/routes.py): a template
        # such as /media/x{channel} or /media/{channel}?v=2 would never match, and every upload
        # to it would be forwarded uninspected.
        reader.error(path_node, path_key, f"{problem}, got {path!r}")
        return None
    route = RouteConfig(path=path)
    if "methods" in found:
        methods = _methods(reader, found["methods"], join(key, "methods"))
        route = replace(route, methods=methods or route.methods)
    return route


def _segment_problem(path: str) -> str | None:
    """Why a template cannot be matched the way request paths are, or None."""
    names: set[str] = set()
    for segment in path.split("/"):
        if any(c in segment for c in "?#%"):
            return "write the path without a query, fragment or %-escapes"
        if _PLACEHOLDER.fullmatch(segment):
            if segment in names:
                return f"placeholder {segment} is used twice"
            names.add(segment)
        elif "{" in segment or "}" in segment:
            return "a {placeholder} must be a whole path segment"
        elif segment in (".", ".."):
            return "'.' and '..' segments never match (request paths are resolved first)"
    return None


def _route_shape(route: RouteConfig) -> tuple[str | None, ...]:
    """The requests a template matches: literal segments compare case-insensitively, a
    trailing or doubled slash is ignored, any placeholder matches any segment."""
    return tuple(
        None if _PLACEHOLDER.fullmatch(s) else s.casefold() for s in route.path.split("/") if s
    )


def _methods(reader: Reader, node: Node, key: str) -> tuple[str, ...] | None:
    methods: list[str] = []
    for i, (text, item) in enumerate(reader.strings(node, key) or []):
        if text.upper() in UPLOAD_METHODS:
            methods.append(text.upper())
        else:
            reader.error(item, f"{key}[{i}]", f"expected one of {', '.join(UPLOAD_METHODS)}")
    return tuple(dict.fromkeys(methods)) or None


def _role_source(reader: Reader, node: Node, key: str) -> RoleSourceConfig | None:
    """First source that answers wins; ``from_claim: null`` / ``from_form: null`` turn one off."""
    found = reader.mapping(node, key, ("from_claim", "from_form", "default"))
    if found is None:
        return None
    source = RoleSourceConfig()
    if "from_claim" in found:
        claim_node = found["from_claim"]
        claim = reader.optional_string(claim_node, join(key, "from_claim"))
        if claim is not None or _is_null(claim_node):
            source = replace(source, from_claim=claim)
    if "from_form" in found and not _is_null(found["from_form"]):
        form = reader.fields(
            found["from_form"],
            join(key, "from_form"),
            {
                "field": reader.string,
                "json_key": reader.string,
                "agent_when": lambda n, k: reader.scalar(n, k, "a scalar such as true"),
            },
        )
        source = replace(source, from_form=replace(FormRoleSource(), **(form or {})))
    if "default" in found:
        role = reader.choice(found["default"], join(key, "default"), ("agent", "customer"))
        source = replace(source, default=cast(Role, role or source.default))
    return source


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == NULL_TAG


def read_channels(
    reader: Reader, node: Node, key: str, cap: int
) -> Mapping[str, ChannelPolicy] | None:
    """``default`` is required and read first: other channels inherit the roles they leave out."""
    found = reader.mapping(node, key, None)
    if found is None:
        return None
    if "default" not in found:
        reader.error(
            reader.owner(node),
            join(key, "default"),
            "required: the policy of every unlisted channel",
        )
    default = None
    if "default" in found:
        default = _channel_policy(reader, found["default"], join(key, "default"), cap, None)
    channels = {"default": default} if default is not None else {}
    decoded: dict[str, str] = {}
    for name in found:
        # ``a%2Fb`` and ``a/b`` are the same stream id to the backend: which rules would apply?
        same = decoded.setdefault(unquote(name), name)
        if same != name:
            reader.error(
                reader.owner(found[name]),
                join(key, name),
                f"names the same stream id as channels.{same} once URL-decoded",
            )
    for name, cnode in found.items():
        if name != "default":
            policy = _channel_policy(reader, cnode, join(key, name), cap, default)
            if policy is not None:
                channels[name] = policy
    return MappingProxyType(channels)


def _channel_policy(
    reader: Reader, node: Node, key: str, cap: int, fallback: ChannelPolicy | None
) -> ChannelPolicy | None:
    """A channel; a role it leaves out is the ``default`` channel's (or disabled, for ``default``).

    ``enabled: false`` at channel level disables both roles and needs nothing else.
    """
    found = reader.mapping(node, key, ("agents", "customers", "mode", "enabled"))
    if found is None:
        return None
    off = RolePolicy(enabled=False, max_file_size=cap)
    roles: dict[str, RolePolicy] = {}
    for role in ("agents", "customers"):
        inherited = getattr(fallback, role) if fallback is not None else off
        read = _role_policy(reader, found[role], join(key, role), cap) if role in found else None
        roles[role] = read or inherited
    mode = None
    if "mode" in found:
        mode = cast(Mode | None, reader.choice(found["mode"], join(key, "mode"), MODES))
    if "enabled" in found and reader.boolean(found["enabled"], join(key, "enabled")) is False:
        roles = {"agents": off, "customers": off}
    return ChannelPolicy(agents=roles["agents"], customers=roles["customers"], mode=mode)


def _role_policy(reader: Reader, node: Node, key: str, cap: int) -> RolePolicy | None:
    """One role of a channel.

    ``enabled: false`` needs nothing else. Omitting ``max_file_size`` inherits
    ``limits.max_file_size``; omitting ``allowed_types`` means *nothing* is allowed (a channel
    must name what it accepts, so a typo can never open it to every type).
    """
    found = reader.mapping(node, key, ("enabled", "max_file_size", "allowed_types"))
    if found is None:
        return None
    policy = RolePolicy(max_file_size=cap)
    if "enabled" in found:
        enabled = reader.boolean(found["enabled"], join(key, "enabled"))
        policy = replace(policy, enabled=enabled if enabled is not None else True)
    if "max_file_size" in found:
        size_node, size_key = found["max_file_size"], join(key, "max_file_size")
        size = reader.size(size_node, size_key)
        if size is not None and size > cap:
            reader.error(
                size_node,
                size_key,
                f"{format_size(size)} is above limits.max_file_size ({format_size(cap)})",
            )
        elif size is not None:
            policy = replace(policy, max_file_size=size)
    if "allowed_types" in found:
        types_key = join(key, "allowed_types")
        entries = reader.strings(found["allowed_types"], types_key) or []
        checked = [
            _allowed_type(reader, text, item, f"{types_key}[{i}]")
            for i, (text, item) in enumerate(entries)
        ]
        policy = replace(policy, allowed_types=tuple(dict.fromkeys(t for t in checked if t)))
    return policy


def _allowed_type(reader: Reader, text: str, node: Node, key: str) -> str | None:
    """Normalise one ``allowed_types`` entry: a MIME type, ``type/*``, ``.ext`` or a group name."""
    entry = text.strip().lower()
    if entry in TYPE_GROUP_NAMES or _MIME.match(entry) or _EXTENSION.match(entry):
        return entry
    groups = ", ".join(sorted(TYPE_GROUP_NAMES))
    reader.error(node, key, f"{text!r} is not a MIME type, type/*, .ext, or a group ({groups})")
    return None
