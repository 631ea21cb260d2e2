"""``X-Forwarded-*``: what eecp tells an app about its client, and which inbound claims it believes.

An app behind eecp sees its client only through ``X-Forwarded-For`` (the address chain),
``X-Forwarded-Proto`` (http or https at the edge) and ``X-Forwarded-Host``. The front proxy
(nginx, Caddy) sets them; so can any client that reaches the proxy listener directly, which
listens on every interface by default. So eecp believes those headers only from a peer in
``EE_TRUSTED_PROXIES`` (default: loopback, where the front proxy runs). From anybody else they
are dropped and replaced by what eecp saw itself: the peer's address, its own scheme, the Host.
That is the rule nginx's ``set_real_ip_from`` and most servers' "forwarded-allow-ips" follow.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache

from eecp.proxy import strip_hop_by_hop

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: EE_TRUSTED_PROXIES' default: the front proxy on the same host
DEFAULT_TRUSTED = "127.0.0.0/8,::1/128"

FORWARDED_HEADERS = ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host")
_PROTOS = ("http", "https")


def parse_trusted(raw: str) -> tuple[IPNetwork, ...]:
    """``EE_TRUSTED_PROXIES``: comma-separated addresses or CIDR networks, or ``none``.

    Raises ValueError naming the item that is neither."""
    if raw.strip().lower() == "none":
        return ()
    networks: list[IPNetwork] = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is neither an IP address nor a CIDR network") from None
    if not networks:
        raise ValueError("no address given (use 'none' to trust no proxy)")
    return tuple(networks)


class TrustedProxies:
    """The peers whose ``X-Forwarded-*`` headers are believed."""

    def __init__(self, networks: Iterable[IPNetwork]) -> None:
        self.networks = tuple(networks)
        # a data plane sees a handful of peers (its front proxies) over and over
        self._trusts = lru_cache(maxsize=1024)(self._lookup)

    def __contains__(self, peer: str) -> bool:
        return self._trusts(peer)

    def _lookup(self, peer: str) -> bool:
        try:
            address = ipaddress.ip_address(peer.partition("%")[0])  # fe80::1%eth0
        except ValueError:
            return False  # no address (a Unix socket, a test transport): nothing to vouch
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)


@dataclass(frozen=True)
class Forwarding:
    """The client as the app will be told of it."""

    chain: tuple[str, ...]  #: X-Forwarded-For, the client first and the nearest hop last
    proto: str  #: X-Forwarded-Proto
    host: str | None  #: X-Forwarded-Host


def forwarding_of(headers: Mapping[str, str], peer: str, scheme: str, host: str | None,
                  trusted: TrustedProxies, *, proxied_host: bool = True) -> Forwarding:
    """What to forward for a request from ``peer`` on a ``scheme`` listener.

    ``headers``: the inbound request's (lower-case names). From a trusted peer its
    ``X-Forwarded-*`` carry on, ``peer`` appended to the chain; from anybody else they are
    ignored. ``host``: the Host the app is asked for, unless a trusted proxy named one and
    ``proxied_host`` (False on the control port, where the proxy's host is eecp's own)."""
    chain: tuple[str, ...] = (peer,) if peer else ()
    if peer not in trusted:
        return Forwarding(chain, scheme, host)
    previous = tuple(part.strip() for part in headers.get("x-forwarded-for", "").split(",")
                     if part.strip())
    proto = headers.get("x-forwarded-proto", "").strip().lower()
    named = headers.get("x-forwarded-host", "").strip() if proxied_host else ""
    return Forwarding(previous + chain, proto if proto in _PROTOS else scheme, named or host)


def forwarded_headers(headers: list[tuple[str, str]], forwarding: Forwarding
                      ) -> list[tuple[str, str]]:
    """The request headers to send upstream: hop-by-hop and inbound ``X-Forwarded-*`` dropped,
    ``forwarding`` added."""
    out = [(n, v) for n, v in strip_hop_by_hop(headers) if n.lower() not in FORWARDED_HEADERS]
    if forwarding.chain:
        out.append(("X-Forwarded-For", ", ".join(forwarding.chain)))
    out.append(("X-Forwarded-Proto", forwarding.proto))
    if forwarding.host:
        out.append(("X-Forwarded-Host", forwarding.host))
    return out
