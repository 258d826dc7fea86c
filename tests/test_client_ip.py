"""``server.trusted_proxies``: the client behind a load balancer, for the IP allow-list and the log.

The unit cases pin the reading (nginx's realip with ``real_ip_recursive on``); the end-to-end
ones run a gateway that trusts 127.0.0.1 (the test client plays the balancer) next to the
session's gateway, which trusts nobody, with keys whose allow-list admits one documentation
address.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.client_ip import client_address
from gateway.config.loader import ConfigError, load_config_text
from tests.conftest import mint
from tests.support.gateway_proc import (
    BackendProc,
    GatewayProc,
    base_config,
    cli,
    spool_files,
    start_gateway,
)
from tests.support.procs import RedisServer
from tests.test_config import BASE, ENV

BALANCERS = ("10.0.0.0/8", "fd00::/8")


def headers(*forwarded: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict([("X-Forwarded-For", line) for line in forwarded]))


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        # no proxy trusted, or the peer is not one: the header is the client's own word, unread
        ("203.0.113.7", ("198.51.100.1",), "203.0.113.7"),
        # one balancer in front
        ("10.1.2.3", ("203.0.113.7",), "203.0.113.7"),
        # two balancers; the client's own (forged) entries left of its real address are not read
        ("10.1.2.3", ("1.1.1.1, 203.0.113.7, 10.9.9.9",), "203.0.113.7"),
        # the header in several lines is one list, in order
        ("10.1.2.3", ("1.1.1.1", "203.0.113.7", "10.9.9.9"), "203.0.113.7"),
        # a trusted peer that sent no header is the client itself
        ("10.1.2.3", (), "10.1.2.3"),
        # every entry trusted: the leftmost
        ("10.1.2.3", ("10.4.4.4, 10.5.5.5",), "10.4.4.4"),
        # garbage a proxy passed on stops the walk at the last trusted hop, never past it
        ("10.1.2.3", ("203.0.113.7, not-an-ip",), "10.1.2.3"),
        ("10.1.2.3", ("203.0.113.7, 10.9.9.9, ",), "10.1.2.3"),
        ("10.1.2.3", ("203.0.113.7, 10.9.9.9:443",), "10.1.2.3"),
        # IPv6 balancers, and IPv4-mapped addresses read as IPv4
        ("fd00::1", ("2001:db8::5",), "2001:db8::5"),
        ("::ffff:10.1.2.3", ("::ffff:203.0.113.7",), "203.0.113.7"),
    ],
)
def test_the_client_is_the_first_untrusted_address_from_the_right(
    peer: str, forwarded: tuple[str, ...], client: str
) -> None:
    assert client_address(peer, headers(*forwarded), BALANCERS) == client


def test_with_no_trusted_proxies_the_header_is_never_read() -> None:
    assert client_address("10.1.2.3", headers("203.0.113.7"), ()) == "10.1.2.3"


def test_the_setting_takes_addresses_and_blocks_and_refuses_anything_else() -> None:
    text = BASE.replace(
        "mode: enforce", "server: {trusted_proxies: [10.0.0.0/8, 192.0.2.7]}\nmode: enforce"
    )
    config = load_config_text(text, env=ENV)
    assert config.server.trusted_proxies == ("10.0.0.0/8", "192.0.2.7/32")
    bad = text.replace("192.0.2.7", "lb.internal")
    with pytest.raises(ConfigError, match=r"server\.trusted_proxies\[1\].*lb\.internal"):
        load_config_text(bad, env=ENV)


# -- end to end: the allow-list sees the client, not the balancer ---------------------------------


@pytest.fixture(scope="module")
def behind_balancer(
    redis_server: RedisServer,
    backend_proc: BackendProc,
    gateway: GatewayProc,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GatewayProc]:
    work = tmp_path_factory.mktemp("behind-balancer")
    config = base_config(redis_server.url, backend_proc.url, work / "spool")
    config["server"] = {"trusted_proxies": ["127.0.0.1"]}
    config["log_level"] = "INFO"  # the access lines say who the client was
    gw = start_gateway(config, work)
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def fenced_secret(gateway: GatewayProc) -> str:
    out = cli(
        gateway.config_path,
        "keys",
        "add",
        "--client",
        "balanced-client",
        "--json",
        "--allow-ip",
        "203.0.113.0/24",
    )
    return mint(gateway, json.loads(out.stdout)["api_key"])


async def get(gw: GatewayProc, secret: str, forwarded: str | None) -> tuple[int, dict[str, object]]:
    sent = {"Authorization": f"Bearer {secret}", "X-Request-Id": f"ip-{time.monotonic_ns()}"}
    if forwarded is not None:
        sent["X-Forwarded-For"] = forwarded
    async with aiohttp.ClientSession() as s, s.get(gw.url + "/t/status/200", headers=sent) as r:
        raw = await r.read()
        return r.status, json.loads(raw) if r.content_type == "application/problem+json" else {}


def access_line(gw: GatewayProc, status: int) -> dict[str, object]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [json.loads(x) for x in gw.log().splitlines() if x.startswith('{"request_id"')]
        found = [line for line in lines if line.get("status") == status]
        if found:
            return found[-1]
        time.sleep(0.05)
    raise AssertionError(f"no access line with status {status}:\n{gw.log()[-2000:]}")


async def test_a_client_behind_a_trusted_balancer_is_allowed_by_its_own_address(
    behind_balancer: GatewayProc, backend: BackendProc, fenced_secret: str
) -> None:
    status, doc = await get(behind_balancer, fenced_secret, "203.0.113.7")
    assert status == 200, doc
    assert access_line(behind_balancer, 200)["remote"] == "203.0.113.7"
    [record] = backend.records()
    # the chain goes on as it came, with the balancer's own address appended (nginx does too)
    seen = {k.lower(): v for k, v in record["headers"]}
    assert seen["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"


@pytest.mark.parametrize(
    "forwarded",
    [
        "198.51.100.1",  # a client outside the allow-list
        "203.0.113.7, 198.51.100.1",  # the same client forging an allowed address on the left
        None,  # no header: the balancer itself is the client
    ],
)
async def test_a_client_outside_the_allow_list_is_refused_whatever_it_forwards(
    behind_balancer: GatewayProc, backend: BackendProc, fenced_secret: str, forwarded: str | None
) -> None:
    status, doc = await get(behind_balancer, fenced_secret, forwarded)
    assert status == 403 and doc["code"] == "ip_not_allowed" and doc["status"] == 403
    assert backend.records() == []
    assert spool_files(Path(behind_balancer.config["spool"]["dir"])) == []


async def test_a_gateway_trusting_no_proxy_ignores_the_header(
    gateway: GatewayProc, backend: BackendProc, fenced_secret: str
) -> None:
    """The default: a client connecting directly cannot name itself an allowed address."""
    status, doc = await get(gateway, fenced_secret, "203.0.113.7")
    assert status == 403 and doc["code"] == "ip_not_allowed"
    assert backend.records() == []
