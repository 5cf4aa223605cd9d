"""Who is calling: the client address behind trusted proxies, and the allowlist."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from functools import lru_cache

from .settings import IPNetwork


@lru_cache(maxsize=4096)
def _parse(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        parsed = ipaddress.ip_address(address.strip().strip("[]"))
    except ValueError:
        return None
    # An IPv4 peer on a dual-stack socket shows up as ::ffff:a.b.c.d.
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return parsed.ipv4_mapped
    return parsed


def in_networks(address: str, networks: Sequence[IPNetwork]) -> bool:
    """True when `address` falls in one of `networks`."""
    parsed = _parse(address)
    return parsed is not None and any(parsed in network for network in networks)


# The client of a request whose forwarding chain cannot be read: it matches no address range,
# so no allowlist (the callback's or the operator page's) lets it through.
UNKNOWN_CLIENT = "desconocido"


def _hop_address(hop: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address of one X-Forwarded-For hop, also when a proxy wrote it with its port."""
    hop = hop.strip()
    if hop.startswith("["):  # [2001:db8::1]:1234 (IIS ARR, Azure Application Gateway)
        hop = hop[1 : hop.find("]")] if "]" in hop else hop
    elif hop.count(":") == 1:  # 192.0.2.1:5678; a bare IPv6 address has at least two colons
        hop = hop.partition(":")[0]
    return _parse(hop)


class ClientAddressResolver:
    """Applies CALLBACK_TRUSTED_PROXIES and CALLBACK_ALLOWED_IPS."""

    def __init__(self, *, allowed: Sequence[IPNetwork], trusted_proxies: Sequence[IPNetwork]) -> None:
        self.allowed = list(allowed)
        self.trusted = list(trusted_proxies)

    def client_address(self, peer: str, forwarded_for: str | None) -> str:
        """The peer, or the right-most X-Forwarded-For hop that is not a trusted proxy.

        Behind a trusted proxy, a chain with a hop that is not an address (with or without its
        port) gives `UNKNOWN_CLIENT`, which no allowlist admits.
        """
        if forwarded_for is None or not self.trusted or not in_networks(peer, self.trusted):
            return peer
        hops = [hop for hop in forwarded_for.split(",") if hop.strip()]
        if not hops:
            return UNKNOWN_CLIENT
        address = None
        for hop in reversed(hops):
            address = _hop_address(hop)
            if address is None:
                # A garbled hop ends what can be believed. Falling back to the proxy's own
                # address would let anyone through an allowlist that holds the proxy (the
                # operator page's default, loopback, behind a local proxy).
                return UNKNOWN_CLIENT
            if not any(address in network for network in self.trusted):
                return str(address)
        return str(address)

    def allowed_address(self, address: str) -> bool:
        """True when the allowlist is empty or contains `address`."""
        return not self.allowed or in_networks(address, self.allowed)
