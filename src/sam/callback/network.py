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


class ClientAddressResolver:
    """Applies CALLBACK_TRUSTED_PROXIES and CALLBACK_ALLOWED_IPS."""

    def __init__(self, *, allowed: Sequence[IPNetwork], trusted_proxies: Sequence[IPNetwork]) -> None:
        self.allowed = list(allowed)
        self.trusted = list(trusted_proxies)

    def client_address(self, peer: str, forwarded_for: str | None) -> str:
        """The peer, or the right-most X-Forwarded-For hop that is not a trusted proxy."""
        if not forwarded_for or not self.trusted or not in_networks(peer, self.trusted):
            return peer
        hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
        for hop in reversed(hops):
            if _parse(hop) is None:
                # A garbled hop ends what can be believed: the proxy that appended it is the
                # last trustworthy witness.
                return peer
            if not in_networks(hop, self.trusted):
                return str(_parse(hop))
        return str(_parse(hops[0])) if hops else peer

    def allowed_address(self, address: str) -> bool:
        """True when the allowlist is empty or contains `address`."""
        return not self.allowed or in_networks(address, self.allowed)
