"""CORS (SPEC §5): the browser chat widget must be able to read the gateway's own answers, and
the preflight's exemption from the Secret must not become a way to reach the backend."""

from __future__ import annotations

import json

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from gateway.config.model import CorsConfig
from gateway.cors import add_cors_headers
from tests.support.gateway_proc import BackendProc, GatewayProc
from tests.test_uploads import UPLOAD, assert_refused

ORIGIN = "https://chat.example.com"
POLICY = "/_gateway/policy/whatsapp"


async def test_the_policy_answer_carries_cors_headers_for_an_allowed_origin(
    gateway: GatewayProc, backend: BackendProc, secret: str
) -> None:
    headers = {"Authorization": f"Bearer {secret}", "Origin": ORIGIN}
    async with aiohttp.ClientSession() as s, s.get(gateway.url + POLICY, headers=headers) as r:
        assert r.status == 200
        assert r.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert "Origin" in r.headers["Vary"]
    headers["Origin"] = "https://evil.test"
    async with aiohttp.ClientSession() as s, s.get(gateway.url + POLICY, headers=headers) as r:
        assert "Access-Control-Allow-Origin" not in r.headers
    assert backend.records() == []


async def test_the_policy_endpoints_preflight_is_answered_by_the_gateway(
    gateway: GatewayProc, backend: BackendProc
) -> None:
    """A GET with an Authorization header is preflighted, and only the gateway knows the path."""
    headers = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization",
    }
    async with aiohttp.ClientSession() as s, s.options(gateway.url + POLICY, headers=headers) as r:
        assert r.status == 204
        assert r.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert r.headers["Access-Control-Allow-Methods"] == "GET"
        assert r.headers["Access-Control-Allow-Headers"].lower() == "authorization"
        assert int(r.headers["Access-Control-Max-Age"]) > 0
    assert backend.records() == []


async def test_a_preflight_with_a_body_is_refused_and_reaches_nothing(
    gateway: GatewayProc, backend: BackendProc
) -> None:
    """Preflights carry no body (Fetch): one that does is not a browser's, and must not pass
    bytes to the backend without a Secret (here an executable, to an upload route)."""
    headers = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    body = b"\x7fELF" + b"A" * 100_000
    async with (
        aiohttp.ClientSession() as s,
        s.options(gateway.url + UPLOAD, data=body, headers=headers) as r,
    ):
        status, doc, got = r.status, json.loads(await r.read()), r.headers
    assert_refused(gateway, backend, status, doc, got, 400, "malformed_request")


async def test_a_forwarded_preflight_carries_no_unverified_credential(
    gateway: GatewayProc, backend: BackendProc, secret: str
) -> None:
    headers = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Authorization": f"Bearer {secret}",  # no browser sends one; nobody verified it
    }
    async with aiohttp.ClientSession() as s, s.options(gateway.url + UPLOAD, headers=headers) as r:
        assert r.status == 200
    [rec] = backend.records()
    assert rec["method"] == "OPTIONS"
    assert "authorization" not in {name.lower() for name, _ in rec["headers"]}


@pytest.mark.parametrize(
    ("origin", "allow", "credentials"),
    [
        (ORIGIN, ORIGIN, "true"),  # listed: echoed, with credentials
        ("https://elsewhere.test", "*", None),  # only the wildcard admits it: no credentials
        ("null", "*", None),  # a sandboxed frame or a local file
    ],
)
def test_a_wildcard_never_admits_credentials(
    origin: str, allow: str, credentials: str | None
) -> None:
    response = web.Response()
    request = make_mocked_request("GET", "/", headers={"Origin": origin})
    add_cors_headers(response, request, CorsConfig(allowed_origins=(ORIGIN, "*")))
    assert response.headers["Access-Control-Allow-Origin"] == allow
    assert response.headers.get("Access-Control-Allow-Credentials") == credentials
