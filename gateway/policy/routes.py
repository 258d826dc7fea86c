"""Which requests are uploads (SPEC §4 ``uploads.routes``) and which channel they go to.

Matching is deliberately forgiving in the direction of *more* inspection: a request the backend
would route to an upload endpoint must never slip past as an ordinary request. So the path is
compared the way a lenient backend router might read it: empty segments collapsed, ``.``/``..``
resolved, literal segments percent-decoded and compared case-insensitively, a trailing slash
ignored. The channel segment is split off *before* percent-decoding, so an encrypted stream id
with ``%2F`` in it stays one segment.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from urllib.parse import unquote

from gateway.config.model import Config

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


@dataclass(frozen=True)
class _Template:
    """A route's path read once: every request is matched against it, so it is not re-split
    and re-parsed per request (that cost ~10 us a request, 3-5 % of a small one)."""

    literals: tuple[str | None, ...]  # case-folded literal segments; None where a placeholder is
    placeholders: tuple[tuple[int, str], ...]  # (segment index, placeholder name)
    filename: str | None  # a trailing placeholder other than {channel} names the file


@functools.lru_cache(maxsize=256)
def _template(path: str) -> _Template:
    literals: list[str | None] = []
    placeholders: list[tuple[int, str]] = []
    for index, segment in enumerate(s for s in path.split("/") if s):
        placeholder = _PLACEHOLDER.match(segment)
        if placeholder is None:
            literals.append(segment.casefold())
        else:
            literals.append(None)
            placeholders.append((index, placeholder.group(1)))
    last = placeholders[-1] if placeholders else None
    trailing = last is not None and last[0] == len(literals) - 1 and last[1] != "channel"
    return _Template(tuple(literals), tuple(placeholders), last[1] if trailing and last else None)


def _match(template: _Template, segments: list[str]) -> dict[str, str] | None:
    literals = template.literals
    if len(literals) != len(segments):
        return None
    for expected, raw in zip(literals, segments, strict=True):
        if expected is not None and unquote(raw).casefold() != expected:
            return None
    return {name: segments[index] for index, name in template.placeholders}


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
        template = _template(route.path)
        values = _match(template, segments)
        if values is None:
            continue
        raw_channel = values["channel"]
        filename = template.filename
        return UploadTarget(
            route=route.path,
            channel_id=unquote(raw_channel),
            channel=channel_key(config, raw_channel),
            url_filename=unquote(values[filename]) if filename is not None else None,
        )
    return None
