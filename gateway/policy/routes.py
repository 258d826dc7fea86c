"""Which requests are uploads (SPEC §4 ``uploads.routes``) and which channel they go to.

Matching is deliberately forgiving in the direction of *more* inspection: a request the backend
would route to an upload endpoint must never slip past as an ordinary request. So the path is
compared the way a lenient backend router might read it: empty segments collapsed, ``.``/``..``
resolved, literal segments percent-decoded and compared case-insensitively, a trailing slash
ignored. The channel segment is split off *before* percent-decoding, so an encrypted stream id
with ``%2F`` in it stays one segment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

from gateway.config.model import Config, RouteConfig

_PLACEHOLDER = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")


@dataclass(frozen=True)
class UploadTarget:
    """An upload request's route and channel; ``route`` is a bounded label for metrics."""

    route: str  # the route's path template
    channel_id: str  # as in the URL, percent-decoded
    channel: str  # the configured channel key it maps to ("default" if unlisted)
    url_filename: str | None = None  # a file name the URL carries (a trailing {placeholder})


def path_segments(raw_path: str) -> list[str]:
    """Raw (still percent-encoded) segments with ``//``, ``.`` and ``..`` resolved."""
    path = raw_path.split("?", 1)[0].split("#", 1)[0]
    out: list[str] = []
    for segment in path.split("/"):
        decoded = unquote(segment)
        if decoded in ("", "."):
            continue
        if decoded == "..":
            if out:
                out.pop()
            continue
        out.append(segment)
    return out


def _match(route: RouteConfig, segments: list[str]) -> dict[str, str] | None:
    template = [s for s in route.path.split("/") if s]
    if len(template) != len(segments):
        return None
    values: dict[str, str] = {}
    for expected, raw in zip(template, segments, strict=True):
        placeholder = _PLACEHOLDER.match(expected)
        if placeholder is not None:
            values[placeholder.group(1)] = raw
        elif unquote(raw).casefold() != expected.casefold():
            return None
    return values


def channel_key(config: Config, raw_id: str) -> str:
    """The configured key for a stream id given raw or decoded (SPEC §4: either matches).

    A key and an id match when they name the same stream id once percent-decoded, however
    either is encoded: ``abc%3D%3D`` in the config matches ``abc==``, ``abc%3d%3d`` and
    ``abc%3D%3D`` in the URL alike, as the backend decodes them all to ``abc==``.
    """
    for candidate in (unquote(raw_id), raw_id):
        if candidate in config.channels:
            return candidate
    return config.decoded_channels.get(unquote(raw_id), "default")


def match_upload(config: Config, method: str, raw_path: str) -> UploadTarget | None:
    """The upload target of ``method raw_path``, or None for an ordinary request."""
    method = method.upper()
    segments = path_segments(raw_path)
    for route in config.uploads.routes:
        if method not in route.methods:
            continue
        values = _match(route, segments)
        if values is None:
            continue
        raw_channel = values["channel"]
        template_last = [s for s in route.path.split("/") if s][-1]
        last = _PLACEHOLDER.match(template_last)
        url_filename = None
        if last is not None and last.group(1) != "channel":
            url_filename = unquote(values[last.group(1)])
        return UploadTarget(
            route=route.path,
            channel_id=unquote(raw_channel),
            channel=channel_key(config, raw_channel),
            url_filename=url_filename,
        )
    return None
