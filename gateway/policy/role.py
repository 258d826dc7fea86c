"""Who is uploading, agent or customer (SPEC §4 ``uploads.role``): the first source that answers.

1. ``from_claim``: a claim of the verified Secret (``"agent"``/``"customer"``, any case);
2. ``from_form``: the platform's own marker, ``IsManager`` in the JSON of the multipart ``data``
   field — which may come before or after the files, so the inspection may have to wait for it;
3. ``default``.

A source that is present but says something else (``role: admin``, invalid JSON) does not answer;
the next one is asked. A ``data`` field nested deeper than Python's JSON reader goes (~1000
levels) is refused instead (400): a backend whose reader goes deeper could find an
``IsManager`` in it that the gateway cannot, and judge the files for another role. The JSON key
is matched case-insensitively when no exact match exists, because the platform's backend (like
most JSON binders) reads ``isManager`` as ``IsManager``, and the gateway must apply the same
role the backend will.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from gateway.config.model import Config, FormRoleSource, Role
from gateway.errors import GatewayError

ROLES: tuple[Role, ...] = ("agent", "customer")


def role_from_claims(config: Config, claims: Mapping[str, Any]) -> Role | None:
    claim = config.uploads.role.from_claim
    value = claims.get(claim) if claim else None
    if isinstance(value, str):
        lowered = value.strip().lower()
        for role in ROLES:
            if lowered == role:
                return role
    return None


def _lookup(document: Mapping[str, Any], key: str) -> tuple[bool, Any]:
    if key in document:
        return True, document[key]
    folded = key.casefold()
    for name, value in document.items():
        if isinstance(name, str) and name.casefold() == folded:
            return True, value
    return False, None


def _same(value: Any, expected: object) -> bool:
    if value == expected and type(value) is type(expected):
        return True
    return isinstance(value, str) and value.strip().lower() == str(expected).lower()


def role_from_form(source: FormRoleSource | None, raw: bytes | None) -> Role | None:
    """``agent`` when the marker equals ``agent_when``, ``customer`` when it is present but not."""
    if source is None or raw is None:
        return None
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    except RecursionError:  # valid, maybe, but not readable here: one reading or none
        raise GatewayError(
            "malformed_request", f"the form field {source.field!r} nests too deeply to be read"
        ) from None
    if not isinstance(document, dict):
        return None
    found, value = _lookup(document, source.json_key)
    if not found:
        return None
    return "agent" if _same(value, source.agent_when) else "customer"


def waits_for_form(config: Config, claims: Mapping[str, Any], multipart: bool) -> bool:
    """Whether the role can only be known once the body's ``data`` field was read."""
    return (
        role_from_claims(config, claims) is None
        and multipart
        and config.uploads.role.from_form is not None
    )
