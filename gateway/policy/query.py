"""``GET /_gateway/policy/{channel}``: a client learns its limits before it uploads (SPEC §5).

The answer is computed by the same :func:`effective_policy` the request path enforces, so the chat
widget can disable the send button for a 30 MB video instead of uploading it to be refused.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from gateway.config.model import Config, Role
from gateway.policy.role import ROLES, role_from_claims
from gateway.policy.routes import channel_key, path_segments
from gateway.policy.rules import effective_policy
from gateway.policy.types import GROUPS, wildcard_exceptions

POLICY_PREFIX = "/_gateway/policy/"


def caller_role(config: Config, claims: Mapping[str, Any], asked: str | None) -> Role:
    """The role the Secret states; when it states none, the one asked for (``?role=``: the
    platform marks agents in the upload itself, which a GET cannot carry), else the default."""
    stated = role_from_claims(config, claims)
    if stated is not None:
        return stated
    for role in ROLES:
        if asked == role:
            return role
    return config.uploads.role.default


def policy_response(
    request: web.Request, config: Config, claims: Mapping[str, Any], request_id: str
) -> web.Response:
    # The id as sent (request.path is already decoded: ``enc%2Fid`` would read ``enc/id``), in
    # segments read as an upload's path is (a trailing slash, ``//``, ``.``), and mapped to its
    # channel key exactly as an upload to that id is (routes.channel_key).
    channel_id = "/".join(path_segments(request.raw_path)[2:])  # after _gateway/policy
    role = caller_role(config, claims, request.query.get("role"))
    policy = effective_policy(config, channel_key(config, channel_id), role)
    body = policy.as_dict()
    # Named groups spelled out, so a client needs no copy of our group table; and what its
    # wildcards do not admit (an accept="image/*" would let an SVG through to a 415).
    expanded = sorted(
        {member for entry in policy.allowed_types for member in GROUPS.get(entry, (entry,))}
    )
    body["allowed_types"]["expanded"] = expanded
    body["allowed_types"]["not_matched_by_wildcards"] = wildcard_exceptions(expanded)
    return web.Response(
        body=json.dumps(body).encode(),
        content_type="application/json",
        headers={"X-Request-Id": request_id, "Cache-Control": "private, max-age=60"},
    )
