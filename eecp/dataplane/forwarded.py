"""``X-Forwarded-*``: what eecp tells an app about its client, and which inbound claims it believes.

An app behind eecp sees its client only through ``X-Forwarded-For`` (the address chain),
``X-Forwarded-Proto`` (http or https at the edge) and ``X-Forwarded-Host``. The front proxy
(nginx, Caddy) sets them; so can any client that reaches the proxy listener directly, which
listens on every interface by default. So eecp believes those headers only from a peer in
``EE_TRUSTED_PROXIES`` (default: loopback, where the front proxy runs). From anybody else they
are dropped and replaced by what eecp saw itself: the peer's address, its own scheme, the Host.
That is the rule nginx's ``set_real_ip_from`` and most servers' "forwarded-allow-ips" follow.
The same holds for the whole family apps read as a proxy's word (client-address headers such
as ``X-Real-IP`` or ``CF-Connecting-IP``, URL rewrites such as ``X-Original-URL``, eecp's own
``X-EE-*``, which name the app on the proxy listener): one list,
:func:`eecp.wire.httpmsg.is_proxy_header`, beside the other HTTP message rules.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

from eecp.core.config import IPNetwork
from eecp.wire.httpmsg import is_proxy_header, strip_hop_by_hop

#: replaced on every request by what eecp establishes (inbound ones only inform it)
FORWARDED_HEADERS = ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host")
_PROTOS = ("http", "https")


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
    trusted: bool = False  #: the peer is a trusted proxy: its other proxy headers carry on


def forwarding_of(headers: Mapping[str, str], peer: str, scheme: str, host: str | None,
                  trusted: TrustedProxies, *, proxied_host: bool = True) -> Forwarding:
    """What to forward for a request from ``peer`` on a ``scheme`` listener.

    ``headers``: the inbound request's (lower-case names). From a trusted peer its
    ``X-Forwarded-*`` carry on, ``peer`` appended to the chain; from anybody else they are
    ignored. ``host``: the Host the app is asked for, unless a trusted proxy named one and
    ``proxied_host`` (False on the control port, where the proxy's host is eecp's own)."""
    chain: tuple[str, ...] = (peer,) if peer else ()
    if peer not in trusted:
        return Forwarding(chain, scheme, host, trusted=False)
    previous = tuple(part.strip() for part in headers.get("x-forwarded-for", "").split(",")
                     if part.strip())
    proto = headers.get("x-forwarded-proto", "").strip().lower()
    named = headers.get("x-forwarded-host", "").strip() if proxied_host else ""
    return Forwarding(previous + chain, proto if proto in _PROTOS else scheme, named or host,
                      trusted=True)


def inbound_forwarding(headers: Sequence[tuple[str, str]]) -> dict[str, str]:
    """The request's ``X-Forwarded-*`` by lower-case name, repeated lines joined with ", "
    (as RFC 9110 combines a list field) so that no line is lost to the last one."""
    found: dict[str, list[str]] = {}
    for name, value in headers:
        key = name.lower()
        if key in FORWARDED_HEADERS:
            found.setdefault(key, []).append(value)
    return {key: ", ".join(values) for key, values in found.items()}


def forwarded_headers(headers: list[tuple[str, str]], forwarding: Forwarding, *,
                      from_proxy: bool | None = None) -> list[tuple[str, str]]:
    """The request headers to send upstream: hop-by-hop dropped, ``X-Forwarded-For/-Proto/
    -Host`` replaced by ``forwarding``'s.

    Other proxy headers (:func:`is_proxy_header`: ``Forwarded``, ``X-Real-IP``,
    ``X-Forwarded-Port``, ``X-Original-URL``, ``X-EE-Release-Tag``…) carry on only when
    ``headers`` came from a trusted proxy (``from_proxy``, by default ``forwarding.trusted``),
    and never in an underscore spelling, which no proxy sends and nginx drops."""
    keep_proxy = forwarding.trusted if from_proxy is None else from_proxy
    out = [(n, v) for n, v in strip_hop_by_hop(headers)
           if not (is_proxy_header(n) and (not keep_proxy or "_" in n
                                          or n.lower() in FORWARDED_HEADERS))]
    if forwarding.chain:
        out.append(("X-Forwarded-For", ", ".join(forwarding.chain)))
    out.append(("X-Forwarded-Proto", forwarding.proto))
    if forwarding.host:
        out.append(("X-Forwarded-Host", forwarding.host))
    return out


def client_address(forwarding: Forwarding, trusted: TrustedProxies) -> str:
    """The client's address as far as eecp can vouch for it: the nearest address in the
    ``X-Forwarded-For`` chain that is not one of the trusted proxies (entries further left
    were written by whoever that is, and prove nothing). The peer itself when it is not a
    trusted proxy; ``""`` when no such address is known: every address in the chain is a
    trusted proxy's (one that names no client, or a tool on the host itself)."""
    for address in reversed(forwarding.chain):
        if address not in trusted:
            return address
    return ""
