"""Prometheus metrics (issue 5, SPEC §6): a known mix of requests, then exact counts on /metrics.

One dedicated gateway (its own ports and key prefix) serves a fixed script of accepted uploads,
refusals of every kind and plain pass-through requests; the test then scrapes ``/metrics`` once and
checks each counter against what the script sent — and that the exposition is valid for
Prometheus itself (``promtool check metrics``) and carries no unbounded label values.

The small helpers here (``send``, ``scrape``, ``Samples``) are shared with the other
observability tests.
"""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway import __version__
from tests.support import files
from tests.support.gateway_proc import BackendProc, GatewayProc, base_config, cli, start_gateway
from tests.support.procs import RedisServer

P = "upload_gateway_"
OBJECTS = "/streams/{channel}/objects"
CHILD = "/streams/{channel}/objects/{object}/child"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def send(
    port: int, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> Reply:
    """One request on its own connection (so ``--workers`` tests spread over processes)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request(method, path, body=body or None, headers=headers or {})
        response = conn.getresponse()
        return Reply(
            response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        )
    finally:
        conn.close()


def scrape(gw: GatewayProc) -> str:
    reply = send(gw.admin_port, "GET", "/metrics")
    assert reply.status == 200
    return reply.body.decode()


class Samples:
    """Parsed exposition: ``get(name, **labels)`` is the exact sample, 0.0 when it is absent."""

    def __init__(self, text: str) -> None:
        self.values: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.values[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def get(self, name: str, **labels: str) -> float:
        return self.values.get((P + name, frozenset(labels.items())), 0.0)

    def by(self, name: str, label: str) -> dict[str, float]:
        """Sum of ``name`` per value of ``label`` (over every other label), zeros left out."""
        out: dict[str, float] = {}
        for (sample, labels), value in self.values.items():
            if sample == P + name and value:
                key = dict(labels).get(label, "")
                out[key] = out.get(key, 0.0) + value
        return out

    def series(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        return {k[1]: v for k, v in self.values.items() if k[0] == P + name and v}

    def label_values(self) -> set[str]:
        """Every label value except histogram bucket bounds."""
        return {value for _, labels in self.values for name, value in labels if name != "le"}


def promtool_check(text: str) -> None:
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool is missing (make test installs the prometheus package)"
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def new_key(gw: GatewayProc, client: str) -> str:
    out = cli(gw.config_path, "keys", "add", "--client", client, "--json")
    return str(json.loads(out.stdout)["api_key"])


def mint(gw: GatewayProc, api_key: str, *claims: str) -> str:
    args = ["secret", "mint", "--api-key", api_key, "--ttl", "1h"]
    for claim in claims:
        args += ["--claim", claim]
    return cli(gw.config_path, *args).stdout.strip()


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def upload(name: str, content_type: str, data: bytes) -> tuple[bytes, dict[str, str]]:
    body, ctype = files.multipart([("file", name, content_type, data)])
    return body, {"Content-Type": ctype}


def observed_config(
    redis: RedisServer, backend: BackendProc, tmp: Path, prefix: str
) -> dict[str, Any]:
    """base_config plus a ``tiny`` channel (2000-byte agent limit) so a 413 needs a 3 KB body."""
    config = base_config(redis.url, backend.url, tmp / "spool")
    config["redis"]["key_prefix"] = prefix
    config["auth"]["cache_ttl"] = "60s"
    config["channels"]["tiny"] = {
        "agents": {"enabled": True, "max_file_size": 2000, "allowed_types": ["images"]},
        "customers": {"enabled": False},
    }
    return config


@dataclass
class Step:
    """One scripted request and what it should count as."""

    method: str
    path: str
    body: bytes
    headers: dict[str, str]
    status: int
    route: str
    channel: str | None = None
    role: str | None = None
    reason: str | None = None
    file_size: int = 0  # the inspected file of an accepted upload
    reads_body: bool = True  # False when the gateway refuses before reading any of it
    forwards: bool = False


def script(agent: str, customer: str, unknown_key: str) -> list[Step]:
    """The known mix: 4 accepted uploads, 7 refusals of 7 kinds, 3 pass-through requests."""
    png, pdf, zipped, elf = files.png(), files.pdf(), files.zip_archive(), files.elf()
    a, c = bearer(agent), bearer(customer)
    # path, auth, (filename, declared type, data), status, route, channel, role, reason
    uploads: list[tuple[str, dict[str, str], tuple[str, str, bytes], int, str, Any, Any, Any]] = [
        ("/streams/101/objects", a, ("photo.png", "image/png", png), 200, OBJECTS,
         "default", "agent", None),
        ("/streams/101/objects", a, ("invoice.pdf", "application/pdf", pdf), 200, OBJECTS,
         "default", "agent", None),
        ("/streams/102/objects/7/child", a, ("invoice.pdf", "application/pdf", pdf), 200, CHILD,
         "default", "agent", None),
        ("/streams/103/objects", c, ("photo.png", "image/png", png), 200, OBJECTS,
         "default", "customer", None),
        ("/streams/tiny/objects", a, ("photo.png", "image/png", files.make("png", 3000)), 413,
         OBJECTS, "tiny", "agent", "file_too_large"),
        ("/streams/104/objects", c, ("bundle.zip", "application/zip", zipped), 415, OBJECTS,
         "default", "customer", "type_not_allowed"),
        ("/streams/105/objects", a, ("invoice.pdf", "application/pdf", elf), 415, OBJECTS,
         "default", "agent", "type_mismatch"),
        # No role claim: the role could still come from the form, so the body is read first.
        ("/streams/whatsapp/objects", c, ("photo.png", "image/png", png), 403, OBJECTS,
         "whatsapp", "customer", "uploads_disabled"),
        # Authentication comes first: these never get as far as matching the upload route.
        ("/streams/106/objects", {}, ("photo.png", "image/png", png), 401, "proxy",
         None, None, "missing_secret"),
        ("/streams/106/objects", bearer("not.a.jwt"), ("photo.png", "image/png", png), 401,
         "proxy", None, None, "invalid_secret"),
        ("/streams/106/objects", bearer(unknown_key), ("photo.png", "image/png", png), 403,
         "proxy", None, None, "key_not_active"),
    ]  # fmt: skip
    steps = []
    for path, auth, part, status, route, channel, role, reason in uploads:
        body, headers = upload(*part)
        accepted = status == 200
        steps.append(Step(
            "POST", path, body, {**headers, **auth}, status, route, channel, role, reason,
            file_size=len(part[2]) if accepted else 0, reads_body=channel is not None,
            forwards=accepted,
        ))  # fmt: skip
    steps.append(Step("GET", "/random/abc123", b"", a, 200, "proxy", forwards=True))
    steps.append(Step("POST", "/t/echo", b"e" * 1000, a, 200, "proxy", forwards=True))
    steps.append(Step("GET", "/t/status/404", b"", a, 404, "proxy", forwards=True))
    # answered by the gateway itself: not proxied traffic
    steps.append(Step("GET", "/_gateway/policy/tiny", b"", a, 200, "policy"))
    return steps


@pytest.fixture(scope="module")
def observed(
    redis_server: RedisServer, backend_proc: BackendProc, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GatewayProc, list[Step], list[Reply], str]]:
    """The gateway after the script ran, the script, the replies, and one /metrics scrape."""
    tmp = tmp_path_factory.mktemp("metrics")
    gw = start_gateway(observed_config(redis_server, backend_proc, tmp, "ugw-metrics"), tmp)
    try:
        key = new_key(gw, "metrics-client")
        steps = script(
            mint(gw, key, "role=agent"), mint(gw, key), mint(gw, "unknown-" + uuid.uuid4().hex)
        )
        replies = [send(gw.port, s.method, s.path, s.body, s.headers) for s in steps]
        yield gw, steps, replies, scrape(gw)
    finally:
        gw.stop()


def test_the_script_got_the_answers_it_expects(
    observed: tuple[Any, list[Step], list[Reply], str],
) -> None:
    _, steps, replies, _ = observed
    got = [
        (s.path, r.status, r.json().get("code") if r.status >= 400 and s.reason else None)
        for s, r in zip(steps, replies, strict=True)
    ]
    assert got == [(s.path, s.status, s.reason) for s in steps]


def test_requests_are_counted_by_route_method_and_status(observed: Any) -> None:
    _, steps, _, text = observed
    expected: dict[frozenset[tuple[str, str]], float] = {}
    for s in steps:
        key = frozenset({"route": s.route, "method": s.method, "status": str(s.status)}.items())
        expected[key] = expected.get(key, 0) + 1
    samples = Samples(text)
    assert samples.series("requests_total") == expected
    for route in (OBJECTS, CHILD, "proxy", "policy"):
        count = sum(1 for s in steps if s.route == route)
        assert samples.get("request_duration_seconds_count", route=route) == count, route


def test_uploads_are_counted_by_channel_role_and_outcome(observed: Any) -> None:
    _, steps, _, text = observed
    expected: dict[frozenset[tuple[str, str]], float] = {}
    for s in steps:
        if s.channel is not None:
            outcome = "accepted" if s.status < 400 else "rejected"
            key = frozenset({"channel": s.channel, "role": str(s.role), "outcome": outcome}.items())
            expected[key] = expected.get(key, 0) + 1
    assert Samples(text).series("uploads_total") == expected


def test_rejections_and_auth_failures_are_counted_by_reason(observed: Any) -> None:
    samples = Samples(observed[3])
    assert samples.by("rejections_total", "reason") == {
        "file_too_large": 1,
        "type_not_allowed": 1,
        "type_mismatch": 1,
        "uploads_disabled": 1,
        "missing_secret": 1,
        "invalid_secret": 1,
        "key_not_active": 1,
    }
    assert samples.by("rejections_total", "channel") == {
        "tiny": 1,
        "default": 2,
        "whatsapp": 1,
        "": 3,
    }
    assert samples.by("auth_failures_total", "reason") == {
        "missing_secret": 1,
        "invalid_secret": 1,
        "key_not_active": 1,
    }
    assert samples.by("report_mode_would_reject_total", "reason") == {}


def test_auth_cache_lookups_add_up(observed: Any) -> None:
    """Every request with a verifiable Secret looks its key up once; the unknown key always
    misses (negative verdicts are never cached) and the first use of the real key misses too.

    Hits are not asserted exactly: the verdict cache is emptied whenever the revocation
    subscription is re-made, which the gateway may do at any moment.
    """
    _, steps, _, text = observed
    verifiable = [s for s in steps if s.reason not in ("missing_secret", "invalid_secret")]
    samples = Samples(text)
    hits = samples.get("auth_cache_lookups_total", result="hit")
    misses = samples.get("auth_cache_lookups_total", result="miss")
    assert hits + misses == len(verifiable)
    assert misses >= 2
    assert hits >= 1


def test_bytes_received_and_forwarded_match_what_was_sent(observed: Any) -> None:
    gw, steps, _, text = observed
    samples = Samples(text)
    for route in (OBJECTS, CHILD, "proxy", "policy"):
        sent = sum(len(s.body) for s in steps if s.route == route and s.reads_body)
        forwarded = sum(len(s.body) for s in steps if s.route == route and s.forwards)
        assert samples.get("received_bytes_total", route=route) == sent, route
        assert samples.get("forwarded_bytes_total", route=route) == forwarded, route
    refused = sum(len(s.body) for s in steps if s.reason and s.reads_body)
    assert samples.get("rejected_received_bytes_total") == refused
    access = [
        json.loads(line) for line in gw.log().splitlines() if line.startswith('{"request_id"')
    ]
    assert sum(e["bytes_in"] for e in access if e.get("reason")) == refused


def test_upload_sizes_are_observed_per_accepted_file(observed: Any) -> None:
    _, steps, _, text = observed
    samples = Samples(text)
    for role in ("agent", "customer"):
        sizes = [s.file_size for s in steps if s.role == role and s.status == 200]
        labels = {"channel": "default", "role": role}
        assert samples.get("upload_file_size_bytes_count", **labels) == len(sizes)
        assert samples.get("upload_file_size_bytes_sum", **labels) == sum(sizes)
        assert samples.get("upload_file_size_bytes_bucket", le="1024.0", **labels) == len(sizes)


def test_gauges_are_back_to_zero_and_build_info_is_set(observed: Any) -> None:
    samples = Samples(observed[3])
    assert samples.get("inflight_uploads") == 0
    assert samples.get("spool_bytes") == 0
    assert samples.get("build_info", version=__version__) == 1
    assert samples.get("backend_duration_seconds_count", route=OBJECTS) == 3
    assert samples.get("backend_duration_seconds_count", route="proxy") == 3


def test_exposition_passes_promtool(observed: Any) -> None:
    promtool_check(observed[3])


def test_label_values_are_bounded(observed: Any) -> None:
    """No raw path, stream id or client-supplied string may become a label value."""
    samples = Samples(observed[3])
    for value in samples.label_values():
        assert "abc123" not in value and "random" not in value and "/t/" not in value, value
        assert not any(sid in value for sid in ("101", "102", "104", "105", "106")), value
    routes = set(samples.by("requests_total", "route"))
    assert routes == {OBJECTS, CHILD, "proxy", "policy"}


def test_policy_queries_refused_or_preflighted_are_counted_as_policy_not_proxy(
    gateway: GatewayProc,
) -> None:
    """The gateway answers GET /_gateway/policy/{channel} and its preflight itself, and refuses
    a query without a Secret itself: none of it is proxied traffic. Only an answered query was
    labelled ``policy``; its 401s and its preflights were counted and logged as ``proxy``."""
    before = Samples(scrape(gateway))
    assert send(gateway.port, "GET", "/_gateway/policy/default").status == 401
    preflight = {"Origin": "https://chat.example.com", "Access-Control-Request-Method": "GET"}
    assert (
        send(gateway.port, "OPTIONS", "/_gateway/policy/default", headers=preflight).status == 204
    )
    after = Samples(scrape(gateway))

    def grew(route: str, method: str, status: str) -> float:
        labels = {"route": route, "method": method, "status": status}
        return after.get("requests_total", **labels) - before.get("requests_total", **labels)

    assert grew("policy", "GET", "401") == 1 and grew("proxy", "GET", "401") == 0
    assert grew("policy", "OPTIONS", "204") == 1 and grew("proxy", "OPTIONS", "204") == 0
