"""The HTTP message rules eecp and the agent share: what a head is, which headers describe one
hop and which a client may not send, how a body's length and a request's target are read.

Both ends of the tunnel apply them, so they live in one place: a second copy of the hop-by-hop
list is how two lists come to drift (the agent's once lacked ``Proxy-Authenticate``). Each side
adds only its own rules on top (the agent also drops ``Host`` and ``Expect``; eecp replaces
``X-Forwarded-*`` with what it established, :mod:`eecp.dataplane.forwarded`).

Pure functions on ``(name, value)`` pairs in their order, repeats kept: nothing here does I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from eecp.core.errors import EecpError

#: headers that describe one hop, not the message (RFC 9110 §7.6.1), never forwarded either
#: way; ``Proxy-*`` are dropped by prefix, and so is every header a ``Connection`` names
HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "upgrade", "te",
                        "trailer", "trailers", "proxy-connection", "proxy-authenticate",
                        "proxy-authorization"})

#: The one list of the headers an app may read as a proxy's word (:func:`is_proxy_header`):
#: only a trusted proxy may send them. Apps and frameworks read the client's address from
#: any of these, and some take the URL or host a request is for from the rewrite ones (IIS,
#: older Symfony and Zend: ``X-Original-URL``, ``X-Rewrite-URL``), which would let a client
#: reach a path a front proxy filters out.
PROXY_NAMES = frozenset({
    # the client's address (or scheme), as some proxy or CDN reports it
    "forwarded", "x-real-ip", "x-client-ip", "true-client-ip", "client-ip",
    "cf-connecting-ip", "cf-connecting-ipv6", "cf-visitor", "fastly-client-ip",
    "akamai-client-ip", "x-cluster-client-ip", "x-proxyuser-ip", "x-originating-ip",
    "x-remote-ip", "x-remote-addr", "wl-proxy-client-ip", "x-envoy-external-address",
    "x-azure-clientip", "x-azure-socketip", "x-url-scheme", "x-scheme", "front-end-https",
    # the URL or host asked for, as a rewriting proxy reports it
    "x-rewrite-url", "x-host", "x-http-host-override", "x-envoy-original-path",
})
#: and whole families: X-Forwarded-For/-Proto/-Host/-Port/-Prefix/-Uri/-Ssl/-Server...,
#: X-Original-URL/-URI/-Host/-Forwarded-For/-Method..., and eecp's own X-EE-* (the app's
#: name, the allow decision)
PROXY_PREFIXES = ("x-forwarded-", "x-original-", "x-ee-")

_DIGITS = re.compile(r"[0-9]{1,18}")


@dataclass(frozen=True)
class RequestHead:
    """An HTTP request's head as eecp forwards it (headers in order, repeats kept).

    ``upgrade``: the protocol the client asks to switch to (only ``"websocket"`` is carried,
    lower-case): the agent then asks its backend for the upgrade and, on a 101, the stream
    carries the upgraded connection's bytes both ways (docs/tunnel-data-protocol.md, section
    9). ``None``: an ordinary request."""

    method: str
    path: str
    headers: list[tuple[str, str]] = field(hash=False)
    upgrade: str | None = None


@dataclass(frozen=True)
class ResponseHead:
    """An HTTP response's head as the agent returns it (headers in order, repeats kept)."""

    status: int
    headers: list[tuple[str, str]] = field(hash=False)


class AmbiguousHost(EecpError):
    """A header naming the app names more than one host (two lines, or a comma list)."""

    http_status = 400

    def __init__(self, detail: str = "") -> None:
        super().__init__("ambiguous_host", detail)


#: the one upgrade eecp carries through the tunnel
WEBSOCKET = "websocket"


def websocket_upgrade(method: str, headers: list[tuple[str, str]]) -> bool:
    """Whether a request asks to become a WebSocket (RFC 6455 4.1): a GET whose ``Upgrade``
    names ``websocket`` and whose ``Connection`` names ``upgrade`` (any case). Other upgrades
    (``h2c``, ...) are ordinary requests: their hop-by-hop headers are dropped."""
    if method != "GET":
        return False
    upgrade = {t.strip().lower() for n, v in headers if n.lower() == "upgrade"
               for t in v.split(",")}
    connection = {t.strip().lower() for n, v in headers if n.lower() == "connection"
                  for t in v.split(",")}
    return WEBSOCKET in upgrade and "upgrade" in connection


def strip_hop_by_hop(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop hop-by-hop headers (:data:`HOP_BY_HOP`, ``Proxy-*`` and those a Connection header
    names); keep order and repeats."""
    named = {token.strip().lower() for name, value in headers if name.lower() == "connection"
             for token in value.split(",")}
    return [(n, v) for n, v in headers
            if n.lower() not in HOP_BY_HOP and n.lower() not in named
            and not n.lower().startswith("proxy-")]


def is_proxy_header(name: str) -> bool:
    """A name an app may read as a proxy's word about the client's address or the URL it
    asked for (``Forwarded``, ``X-Real-IP``, ``CF-Connecting-IP``, ``X-Forwarded-*``,
    ``X-Original-*``, ``X-Rewrite-URL``..., eecp's ``X-EE-*``: :data:`PROXY_NAMES`,
    :data:`PROXY_PREFIXES`), in any case and with ``_`` for ``-`` (CGI and WSGI servers map
    both spellings to one variable)."""
    key = name.lower().replace("_", "-")
    return key in PROXY_NAMES or key.startswith(PROXY_PREFIXES)


def content_length(headers: list[tuple[str, str]]) -> int | None:
    """The body length a head's ``Content-Length`` declares, ``None`` without one;
    ``ValueError`` for conflicting values or one that is not plain ASCII digits (both sides
    read a length the same way: eecp to mark the last chunk, the agent to frame the body)."""
    values = {value.strip() for name, value in headers if name.lower() == "content-length"}
    if not values:
        return None
    if len(values) > 1:
        raise ValueError(f"conflicting Content-Length values {sorted(values)!r}")
    (value,) = values
    if not _DIGITS.fullmatch(value):
        raise ValueError(f"invalid Content-Length {value[:40]!r}")
    return int(value)


def is_origin_form(target: str) -> bool:
    """Whether a request target names a path on the backend: it begins with one ``/``.

    ``//host/…`` (and ``/\\host``, which some servers read the same way) could point a
    redirect or a URL join elsewhere, and an absolute URL or ``*`` is no path on the backend
    at all: eecp refuses to forward them and the agent refuses to send them on (no SSRF).
    """
    return target.startswith("/") and not target.startswith(("//", "/\\"))


def host_label(value: str, header: str = "host") -> str:
    """The first DNS label of a Host-like header's value (port dropped); a list of hosts is
    :class:`AmbiguousHost` (``header`` names it in the detail)."""
    if "," in value:
        raise AmbiguousHost(f"{header} names more than one host")
    host = value.strip().lower()
    host = host.rsplit(":", 1)[0] if not host.startswith("[") else host
    return host.split(".", 1)[0]
