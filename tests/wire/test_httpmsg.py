"""eecp.wire.httpmsg: the HTTP message rules eecp and the agent share (pure functions)."""

from __future__ import annotations

import pytest

from agent.forward import request_headers, response_headers
from eecp.dataplane.forwarded import Forwarding, forwarded_headers
from eecp.wire.httpmsg import (
    HOP_BY_HOP,
    AmbiguousHost,
    content_length,
    host_label,
    is_origin_form,
    is_proxy_header,
    strip_hop_by_hop,
)


def test_hop_by_hop_headers_are_dropped_with_those_connection_names() -> None:
    headers = [("Host", "shop"), ("Connection", "keep-alive, X-Secret"), ("Keep-Alive", "5"),
               ("X-Secret", "1"), ("Set-Cookie", "a=1"), ("TE", "trailers"),
               ("Proxy-Authorization", "Basic eA=="), ("Proxy-Whatever", "1"),
               ("Transfer-Encoding", "chunked"), ("Set-Cookie", "b=2"), ("Upgrade", "h2c")]
    assert strip_hop_by_hop(headers) == [("Host", "shop"), ("Set-Cookie", "a=1"),
                                         ("Set-Cookie", "b=2")]


@pytest.mark.parametrize("name", sorted(HOP_BY_HOP | {"proxy-anything", "x-named"}))
def test_both_ends_drop_the_same_hop_by_hop_headers(name: str) -> None:
    """eecp's request to the agent and response to the client, the agent's request to the
    backend and response to eecp: one list (the agent's once lacked two names)."""
    headers = [("Connection", "x-named"), (name.title(), "v"), ("X-Kept", "1")]
    forwarded = forwarded_headers(headers, Forwarding((), "http", None))
    for out in (strip_hop_by_hop(headers), forwarded, request_headers(headers),
                response_headers(headers)):
        assert name not in {n.lower() for n, _ in out}
        assert ("X-Kept", "1") in out


def test_the_agent_also_drops_host_and_expect_from_requests_only() -> None:
    headers = [("Host", "eecp.example"), ("Expect", "100-continue"), ("X-A", "1")]
    assert request_headers(headers) == [("X-A", "1")]
    assert response_headers(headers) == headers


def test_content_length_is_read_one_way_for_both_sides() -> None:
    assert content_length([("Host", "x")]) is None
    assert content_length([("Content-Length", " 42 ")]) == 42
    assert content_length([("content-length", "7"), ("Content-Length", "7")]) == 7
    for bad in ([("content-length", "1"), ("content-length", "2")],
                [("content-length", "²")], [("content-length", "-1")],
                [("content-length", "1" * 19)], [("content-length", "")]):
        with pytest.raises(ValueError):
            content_length(bad)


@pytest.mark.parametrize(("target", "origin"), [
    ("/", True), ("/a/b?c=//d", True), ("/%2F%2Fhost", True),
    ("//host/a", False), ("/\\host", False), ("http://host/", False), ("*", False), ("", False),
])
def test_is_origin_form(target: str, origin: bool) -> None:
    assert is_origin_form(target) is origin


def test_host_label() -> None:
    assert host_label("Shop.Apps.Example:8443") == "shop"
    assert host_label(" shop ") == "shop"
    assert host_label("[::1]:80") == "[::1]:80"  # no label: no app by that name
    with pytest.raises(AmbiguousHost, match="x-forwarded-host names more than one host"):
        host_label("a.example, b.example", "x-forwarded-host")


@pytest.mark.parametrize(("name", "proxy"), [
    ("Forwarded", True), ("X-Real-IP", True), ("x-forwarded-port", True),
    ("X_Forwarded_For", True), ("x_forwarded_proto", True), ("X-EE-Release-Tag", True),
    ("x_ee_registration_state", True), ("True-Client-IP", True), ("X-EE-App", True),
    # the family beyond X-Forwarded-*: client addresses as CDNs and proxies report them...
    ("CF-Connecting-IP", True), ("Fastly-Client-IP", True), ("X-Cluster-Client-IP", True),
    ("X-Original-Forwarded-For", True), ("X-ProxyUser-IP", True), ("X_Client_IP", True),
    # ...and the URL or host asked for, as rewriting proxies report it
    ("X-Original-URL", True), ("X-Rewrite-URL", True), ("X-Original-Host", True),
    ("X-Forwarded-Prefix", True), ("x-forwarded-uri", True),
    ("X-Request-Id", False), ("Host", False), ("X-Forwardedfor", False), ("Cookie", False),
    ("X-Originals", False), ("Original-URL", False), ("X-URL", False),
])
def test_is_proxy_header(name: str, proxy: bool) -> None:
    assert is_proxy_header(name) is proxy
