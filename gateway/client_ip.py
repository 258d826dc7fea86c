"""Who the client is when the gateway sits behind a load balancer or an ingress.

Behind an L7 balancer every connection comes from the balancer, so a key's IP allow-list (SPEC
§3) would see only the balancer's address: it would refuse every client, or, once the balancer
is allowed, every address. ``server.trusted_proxies`` names the balancers, and the client is then
read from ``X-Forwarded-For`` the way nginx's realip module does with ``real_ip_recursive on``:
from the right, past every address that is a trusted proxy, to the first that is not. Only a
trusted proxy's word is taken: a client connecting directly cannot name itself by sending the
header, and what a client wrote to the left of the first untrusted address is never read.

An entry that is not an address (a proxy that passed the client's garbage on without appending)
stops the walk at the last trusted hop, so the allow-list sees a proxy, not a forged client.
"""

from __future__ import annotations

import functools
import ipaddress

from multidict import CIMultiDictProxy

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@functools.lru_cache(maxsize=1024)
def networks(cidrs: tuple[str, ...]) -> tuple[Network, ...]:
    """Address blocks parsed once: the trusted proxies of a config, a key's allow-list."""
    return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)


def client_address(peer: str, headers: CIMultiDictProxy[str], trusted: tuple[str, ...]) -> str:
    """The client's address: ``peer`` unless it is a trusted proxy, else read from the proxies'
    ``X-Forwarded-For`` lines (every line, in order, as one list)."""
    if not trusted:
        return peer  # the default: one attribute test per request
    nets = networks(trusted)
    peer_ip = parse_address(peer)
    if peer_ip is None or not within(peer_ip, nets):
        return peer
    lines = headers.getall("X-Forwarded-For", [])
    address = peer
    for hop in reversed([h for line in lines for h in line.split(",")]):
        hop_ip = parse_address(hop.strip())
        if hop_ip is None:
            break
        address = str(hop_ip)
        if not within(hop_ip, nets):
            break
    return address


def parse_address(text: str) -> Address | None:
    """An address, IPv4-mapped IPv6 read as the IPv4 it carries; None if ``text`` is none."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1
    return address


def within(address: Address, nets: tuple[Network, ...]) -> bool:
    return any(address in net for net in nets)
