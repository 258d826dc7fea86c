"""One JSON line per request (SPEC §6): who, what, how big, how it ended, how long it took.

Built from a :class:`RequestRecord` that the handler fills as the request moves along, so no
stage needs to know about logging. Never holds a Secret or an API key: only the client id.
``pid`` says which ``--workers`` process served the request, so an operator can tell a worker
that misbehaves from one that is merely busy.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

LOGGER = logging.getLogger("upload_gateway.access")


@dataclass
class RequestRecord:
    request_id: str
    method: str
    path: str
    remote: str
    started: float = field(default_factory=time.monotonic)
    route: str = "proxy"
    client_id: str | None = None
    channel: str | None = None
    role: str | None = None
    sniffed_types: list[str] = field(default_factory=list)
    bytes_in: int = 0
    bytes_out: int = 0
    status: int = 0
    reason: str | None = None
    would_reject: str | None = None
    backend_ms: float | None = None
    duration_ms: float = 0.0
    pid: int = field(default_factory=os.getpid)

    def finish(self, status: int) -> None:
        self.status = status
        self.duration_ms = round((time.monotonic() - self.started) * 1000, 3)

    def as_json(self) -> str:
        # vars(), not dataclasses.asdict(): asdict deep-copies every field, and this runs for
        # every request (the access log was 9-15 % of a worker's CPU on 10 KB uploads).
        data: dict[str, Any] = {
            k: v for k, v in vars(self).items() if v is not None and v != [] and k != "started"
        }
        data["ts"] = _timestamp()
        return json.dumps(data)


_last_second = -1
_last_stamp = ""


def _timestamp() -> str:
    """The current UTC second, formatted once per second rather than once per line."""
    global _last_second, _last_stamp
    now = int(time.time())
    if now != _last_second:
        _last_second, _last_stamp = now, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    return _last_stamp


def set_log_level(level: str) -> None:
    """``log_level`` for every record and the access lines (WARNING turns those off); at start
    and on a reload, like nginx's ``error_log`` level."""
    logging.getLogger().setLevel(level.upper())
    LOGGER.setLevel(level.upper())


def log_request(record: RequestRecord) -> None:
    if LOGGER.isEnabledFor(logging.INFO):
        LOGGER.info(record.as_json())


class JsonFormatter(logging.Formatter):
    """Every other log record as one JSON object, so the whole stdout parses line by line.

    ``%(message)r`` in a format string is Python's repr, not JSON (single quotes, ``\\n`` kept
    as text only by luck); a log shipper then drops or mangles exactly the multi-line records
    that matter most, such as a rejected config reload with its YAML lines.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)
