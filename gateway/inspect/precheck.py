"""The upload stage before the body: refuse what the request's headers already prove.

Runs after authentication and before ``100 Continue`` is sent (SPEC §4 early rejection), so a
refused client sends no body at all: a ``Content-Encoding`` (415), a ``Content-Length`` over
``limits.max_request_size`` (413), uploads disabled for the channel and role (403), a raw body
announced over its file limit (413), a form without one clear boundary and a raw body named
two ways (400). The helpers here also serve the streaming stage
(``upload.py``), which must read the same headers the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from multidict import CIMultiDictProxy
from python_multipart.multipart import parse_options_header

from gateway.config.model import Config, Mode, Role
from gateway.errors import GatewayError
from gateway.inspect.multipart import boundary_from, filename_of, malformed, parameters
from gateway.policy import rules, types
from gateway.policy.role import ROLES, role_from_claims, waits_for_form
from gateway.policy.routes import UploadTarget


def encoding_error(headers: Mapping[str, str]) -> GatewayError | None:
    coding = headers.get("Content-Encoding", "").strip().lower()
    if coding in ("", "identity"):
        return None
    return GatewayError(
        "type_not_allowed",
        f"uploads must not be sent with Content-Encoding {coding}: send the file as it is",
        headers={"Accept-Encoding": "identity"},
        content_encoding=coding,
    )


def announced_length(headers: Mapping[str, str]) -> int | None:
    value = headers.get("Content-Length")
    if value is None:
        return None
    if not value.strip().isdigit():
        raise malformed(f"Content-Length {value!r} is not a number")
    return int(value)


def is_multipart(headers: Mapping[str, str]) -> bool:
    """Whether the body is a form; one without one clear boundary is refused (400) here, by
    its header, before ``100 Continue`` invites a body that could only be refused."""
    content_type = headers.get("Content-Type", "")
    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data":
        return False
    boundary_from(content_type, options)
    return True


def mode_of(config: Config, target: UploadTarget) -> Mode:
    return config.channels.get(target.channel, config.channels["default"]).mode or config.mode


def request_too_large(config: Config, target: UploadTarget, role: Role | None) -> GatewayError:
    limit = config.limits.max_request_size
    return GatewayError(
        "request_too_large",
        f"the request is larger than {limit} bytes, the most the gateway accepts in one upload "
        "(set by limits.max_request_size)",
        limit_bytes=limit,
        limit_source="limits.max_request_size",
        channel=target.channel,
        role=role,
        maxFileSizeAllow=rules.megabytes(limit),
    )


def precheck_upload(
    headers: Mapping[str, str], target: UploadTarget, claims: Mapping[str, Any], config: Config
) -> None:
    """Refuse before reading the body what the headers already prove (and only enforced rules:
    what ``mode: report`` waives is left for ``inspect_upload`` to count, exactly once)."""
    mode = mode_of(config, target)
    error = encoding_error(headers)
    if error is not None:
        raise error
    length = announced_length(headers)
    role = role_from_claims(config, claims)
    if length is not None and length > config.limits.max_request_size:
        raise request_too_large(config, target, role)
    multipart = is_multipart(headers)
    if waits_for_form(config, claims, multipart):
        policies = [rules.effective_policy(config, target.channel, r) for r in ROLES]
        if not any(p.enabled for p in policies) and mode == "enforce":
            default = config.uploads.role.default
            raise rules.disabled_error(policies[ROLES.index(default)])
        return
    policy = rules.effective_policy(config, target.channel, role or config.uploads.role.default)
    if not policy.enabled and mode == "enforce":
        raise rules.disabled_error(policy)
    if multipart:
        return
    filename = raw_filename(headers, target)  # a name given two ways is refused here, too
    if length is not None:
        limit = policy.max_file_size if mode == "enforce" else policy.system_cap
        if length > limit:
            raise rules.file_too_large(
                policy if mode == "enforce" else rules.capped(policy), filename
            )


def raw_filename(headers: Mapping[str, str], target: UploadTarget) -> str | None:
    """A raw body's name: Content-Disposition ``filename`` or ``filename*`` (read as a form
    part's is, :func:`~gateway.inspect.multipart.filename_of`), else a trailing URL
    placeholder.

    Both names count where both are given: the backend stores the resource the URL names and
    may serve it back under the header's, so two extensions that differ (``PUT .../run.vbs``
    declared ``notes.txt``) are a body read two ways, refused (400) instead of judged by one
    name only; where only the URL's has an extension, the URL's is the name judged. A URL
    extension the gateway does not know (an id's ``.123``) claims nothing and runs nothing.
    """
    disposition = headers.get("Content-Disposition", "")
    if not disposition:
        return target.url_filename
    if isinstance(headers, CIMultiDictProxy) and len(headers.getall("Content-Disposition")) > 1:
        # aiohttp's and Go's backends take the first, Node and gunicorn join them with a comma:
        # refused as a form part's header given twice is (multipart.py)
        raise malformed("a Content-Disposition header given twice")
    named = filename_of(disposition, parameters(disposition)[1])
    url_name = target.url_filename
    if not named or not url_name:
        return named or url_name
    named_ext, url_ext = types.extension_of(named), types.extension_of(url_name)
    if named_ext == url_ext or not _claims(url_ext):
        return named
    if not named_ext:
        return url_name
    raise malformed("the URL and the Content-Disposition name files of different kinds")


def _claims(extension: str) -> bool:
    """Whether an extension says what a file is or that it runs (``.123`` of an id does not)."""
    return extension in types.EXTENSIONS or extension in types.EXECUTABLE_EXTENSIONS
