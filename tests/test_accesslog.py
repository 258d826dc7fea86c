"""The JSON access log (issue 5, SPEC §6): one line per request, never a Secret or an API key.

Each request carries its own ``X-Request-Id`` so its line can be found; the Secrets and API keys
used (valid, forged and unknown ones) are then searched for in the gateway's *whole* output,
not only the access lines: a key leaked by an error message is as bad as one in the access log.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from gateway.accesslog import JsonFormatter
from gateway.inspect.sniffer import default_sniffer
from tests.support import files
from tests.support.gateway_proc import BackendProc, GatewayProc, start_gateway
from tests.support.procs import RedisServer
from tests.test_metrics import (
    OBJECTS,
    bearer,
    mint,
    new_key,
    observed_config,
    send,
    upload,
)


@dataclass
class Logged:
    gw: GatewayProc
    sensitive: list[str]
    ids: dict[str, str] = field(default_factory=dict)  # name of the request -> its request id

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.gw.log().splitlines() if '"request_id"' in line]

    def line(self, name: str) -> dict[str, Any]:
        [entry] = [e for e in self.lines() if e["request_id"] == self.ids[name]]
        return entry


def run_requests(gw: GatewayProc, agent: str, unknown: str, logged: Logged) -> None:
    png, elf = files.png(), files.elf()
    plan: list[tuple[str, str, str, bytes, dict[str, str]]] = []
    body, headers = upload("photo.png", "image/png", png)
    plan.append(("accepted", "POST", "/streams/401/objects", body, {**headers, **bearer(agent)}))
    body, headers = upload("invoice.pdf", "application/pdf", elf)
    plan.append(("spoofed", "POST", "/streams/402/objects", body, {**headers, **bearer(agent)}))
    plan.append(("forged", "GET", "/inbox", b"", bearer(logged.sensitive[-1])))
    plan.append(("unknown", "GET", "/inbox", b"", bearer(unknown)))
    plan.append(("plain", "POST", "/t/echo", b"x" * 700, bearer(agent)))
    for name, method, path, data, hdrs in plan:
        rid = uuid.uuid4().hex
        logged.ids[name] = rid
        send(gw.port, method, path, data, {**hdrs, "X-Request-Id": rid})


def wait_for_lines(logged: Logged, timeout: float = 5.0) -> None:
    """A line is written once the response is sent, so the client may read it first."""
    deadline = time.monotonic() + timeout
    while {e["request_id"] for e in logged.lines()} < set(logged.ids.values()):
        assert time.monotonic() < deadline, "access lines missing"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def logged(
    redis_server: RedisServer, backend_proc: BackendProc, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Logged]:
    tmp = tmp_path_factory.mktemp("accesslog")
    gw = start_gateway(observed_config(redis_server, backend_proc, tmp, "ugw-accesslog"), tmp)
    try:
        api_key = new_key(gw, "log-client")
        unknown_key = "unknown-" + uuid.uuid4().hex
        agent, unknown = mint(gw, api_key, "role=agent"), mint(gw, unknown_key)
        forged = agent.rsplit(".", 1)[0] + ".c2lnbmF0dXJlLW9mLWEtZm9yZ2Vy"
        result = Logged(gw, [api_key, unknown_key, agent, unknown, forged])
        run_requests(gw, agent, unknown, result)
        wait_for_lines(result)
        yield result
    finally:
        gw.stop()


def test_every_request_gives_exactly_one_json_line(logged: Logged) -> None:
    entries = logged.lines()
    for name, rid in logged.ids.items():
        assert [e["request_id"] for e in entries].count(rid) == 1, name
    assert len(entries) == len(logged.ids)


def test_an_accepted_upload_says_who_what_how_big_and_how_long(logged: Logged) -> None:
    entry = logged.line("accepted")
    body_size = len(upload("photo.png", "image/png", files.png())[0])
    assert entry["client_id"] == "log-client"
    assert (entry["channel"], entry["role"], entry["route"]) == ("default", "agent", OBJECTS)
    assert entry["sniffed_types"] == ["image/png"]
    assert (entry["bytes_in"], entry["bytes_out"], entry["status"]) == (body_size, body_size, 200)
    assert "reason" not in entry
    assert entry["duration_ms"] > 0 and 0 < entry["backend_ms"] <= entry["duration_ms"]
    assert entry["path"] == "/streams/401/objects" and entry["method"] == "POST"


def test_a_refusal_gives_its_reason_and_sends_nothing_on(logged: Logged) -> None:
    entry = logged.line("spoofed")
    assert (entry["status"], entry["reason"], entry["channel"]) == (415, "type_mismatch", "default")
    assert entry["role"] == "agent"
    assert entry["bytes_in"] > 0 and entry["bytes_out"] == 0
    assert "backend_ms" not in entry


def test_a_refused_file_names_the_type_it_was_sniffed_as(logged: Logged) -> None:
    """SPEC §6 lists the sniffed types on the line; on a 415 they are the reason itself."""
    elf = default_sniffer().sniff(files.elf(), "invoice.pdf")
    assert logged.line("spoofed")["sniffed_types"] == [elf]


def test_a_path_with_an_encoded_line_feed_is_proxied_and_logged_on_one_line(
    logged: Logged,
) -> None:
    """``/…%0A`` decodes to a path with a line feed: it must still reach the handler (auth,
    the backend, its access line and the metrics), not get aiohttp's own unlogged 404."""
    rid = logged.ids["line_feed"] = uuid.uuid4().hex  # one line per request, this one's too
    reply = send(logged.gw.port, "GET", "/t/status/200%0A", headers={"X-Request-Id": rid})
    assert reply.status == 401 and reply.json()["code"] == "missing_secret"
    deadline = time.monotonic() + 5
    while not (mine := [line for line in logged.gw.log().splitlines() if rid in line]):
        assert time.monotonic() < deadline, "no access line"
        time.sleep(0.05)
    [line] = mine
    entry = json.loads(line)
    assert (entry["path"], entry["status"], entry["reason"]) == (
        "/t/status/200\n",
        401,
        "missing_secret",
    )


def test_auth_failures_are_logged_without_a_client(logged: Logged) -> None:
    assert (logged.line("forged")["status"], logged.line("forged")["reason"]) == (
        401,
        "invalid_secret",
    )
    assert (logged.line("unknown")["status"], logged.line("unknown")["reason"]) == (
        403,
        "key_not_active",
    )
    assert "client_id" not in logged.line("forged")


def test_a_pass_through_request_counts_its_bytes(logged: Logged) -> None:
    entry = logged.line("plain")
    assert (entry["route"], entry["status"], entry["bytes_in"], entry["bytes_out"]) == (
        "proxy",
        200,
        700,
        700,
    )
    assert "channel" not in entry


def test_no_secret_or_api_key_appears_anywhere_in_the_log(logged: Logged) -> None:
    log = logged.gw.log()
    for value in logged.sensitive:
        assert value not in log
        # nor its signature or payload on their own (a JWT split at the dots)
        for piece in value.split(".")[1:]:
            assert len(piece) < 16 or piece not in log


def test_log_level_warning_turns_access_lines_off(
    redis_server: RedisServer, backend_proc: BackendProc, tmp_path_factory: pytest.TempPathFactory
) -> None:
    tmp = tmp_path_factory.mktemp("quiet")
    config = observed_config(redis_server, backend_proc, tmp, "ugw-accesslog")
    config["log_level"] = "WARNING"
    gw = start_gateway(config, tmp)
    try:
        assert send(gw.port, "GET", "/inbox").status == 401
        assert send(gw.port, "GET", "/inbox", headers={"X-Request-Id": "quiet-1"}).status == 401
    finally:
        gw.stop()
    log = gw.log()
    assert "quiet-1" not in log and '"request_id"' not in log
    assert "listening on" not in log  # INFO records are off too


def test_other_log_records_can_be_json_too() -> None:
    """``JsonFormatter`` (for the non-access records) keeps a multi-line, quoted message whole,
    as a failed reload's ``FILE:LINE: key: message`` list is."""
    message = "config reload failed:\n/etc/p.yaml:4: channels.default: 'x' is \"bad\""
    record = logging.LogRecord(
        "upload_gateway.reload", logging.ERROR, __file__, 1, message, (), None
    )
    entry = json.loads(JsonFormatter().format(record))
    assert (entry["level"], entry["logger"], entry["msg"]) == (
        "ERROR",
        "upload_gateway.reload",
        message,
    )
