"""eecp.forwarded: X-Forwarded-* are believed only from trusted proxies (pure functions)."""

from __future__ import annotations

import pytest

from eecp.core.config import DEFAULT_TRUSTED, Config, from_env, parse_trusted
from eecp.core.errors import ConfigError
from eecp.dataplane.forwarded import (
    Forwarding,
    TrustedProxies,
    forwarded_headers,
    forwarding_of,
    inbound_forwarding,
)

LOOPBACK = TrustedProxies(parse_trusted("127.0.0.0/8,::1"))
SPOOF = {"x-forwarded-for": "6.6.6.6, 7.7.7.7", "x-forwarded-proto": "https",
         "x-forwarded-host": "bank.example"}


def test_parse_trusted() -> None:
    assert [str(n) for n in parse_trusted(" 10.0.0.1 , 192.168.0.0/16,::1")] == [
        "10.0.0.1/32", "192.168.0.0/16", "::1/128"]
    assert parse_trusted("none") == () and parse_trusted("NONE") == ()
    assert [str(n) for n in parse_trusted("10.1.2.3/8")] == ["10.0.0.0/8"]  # host bits allowed
    assert parse_trusted(DEFAULT_TRUSTED) == Config().trusted_proxies  # one default
    # peers are compared unmapped, so a mapped network also trusts its IPv4 form
    mapped = TrustedProxies(parse_trusted("::ffff:10.0.0.0/104"))
    assert "10.1.2.3" in mapped and "::ffff:10.1.2.3" in mapped and "11.0.0.1" not in mapped
    for bad in ("10.0.0.300", "proxy.local", "10.0.0.0/33", ",", "", "fe80::1%eth0"):
        with pytest.raises(ValueError):
            parse_trusted(bad)


def test_config_reads_ee_trusted_proxies() -> None:
    assert [str(n) for n in from_env({}).trusted_proxies] == ["127.0.0.0/8", "::1/128"]
    assert from_env({"EE_TRUSTED_PROXIES": "none"}).trusted_proxies == ()
    with pytest.raises(ConfigError) as caught:
        from_env({"EE_TRUSTED_PROXIES": "127.0.0.1,caddy"})
    assert caught.value.variable == "EE_TRUSTED_PROXIES" and "'caddy'" in caught.value.detail


@pytest.mark.parametrize(("peer", "trusted"), [
    ("127.0.0.1", True), ("127.9.9.9", True), ("::1", True),
    ("::ffff:127.0.0.1", True),  # a dual-stack socket's view of an IPv4 loopback peer
    ("10.0.0.1", False), ("::2", False), ("::ffff:10.0.0.1", False),
    ("", False), ("not-an-ip", False), ("fe80::1%eth0", False),
])
def test_trusted_peers(peer: str, trusted: bool) -> None:
    assert (peer in LOOPBACK) is trusted
    assert peer not in TrustedProxies(())


def test_a_trusted_proxy_s_claims_carry_on_with_the_proxy_appended() -> None:
    got = forwarding_of(SPOOF, "127.0.0.1", "http", "shop.app.example.com", LOOPBACK)
    assert got == Forwarding(("6.6.6.6", "7.7.7.7", "127.0.0.1"), "https", "bank.example",
                             trusted=True)


def test_an_untrusted_peer_s_claims_are_ignored() -> None:
    got = forwarding_of(SPOOF, "203.0.113.9", "http", "shop.app.example.com", LOOPBACK)
    assert got == Forwarding(("203.0.113.9",), "http", "shop.app.example.com")


def test_odd_claims_from_a_trusted_proxy() -> None:
    odd = {"x-forwarded-for": " , ", "x-forwarded-proto": "gopher", "x-forwarded-host": " "}
    got = forwarding_of(odd, "127.0.0.1", "http", "shop", LOOPBACK)
    assert got == Forwarding(("127.0.0.1",), "http", "shop", trusted=True)  # http/https only
    upper = forwarding_of({"x-forwarded-proto": "HTTPS"}, "::1", "http", None, LOOPBACK)
    assert upper == Forwarding(("::1",), "https", None, trusted=True)


def test_the_control_port_keeps_the_requested_host() -> None:
    # Caddy's X-Forwarded-Host in front of the control port names eecp, not the app
    got = forwarding_of(SPOOF, "127.0.0.1", "https", "shop.internal", LOOPBACK,
                        proxied_host=False)
    assert got.host == "shop.internal" and got.proto == "https"


def test_forwarded_headers_replace_inbound_ones_and_drop_hop_by_hop() -> None:
    inbound = [("Host", "shop"), ("X-Forwarded-For", "6.6.6.6"), ("x-forwarded-proto", "https"),
               ("X-Forwarded-Host", "bank"), ("Connection", "close"), ("Set-Cookie", "a=1"),
               ("Set-Cookie", "b=2")]
    out = forwarded_headers(inbound, Forwarding(("203.0.113.9",), "http", "shop"))
    assert out == [("Host", "shop"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"),
                   ("X-Forwarded-For", "203.0.113.9"), ("X-Forwarded-Proto", "http"),
                   ("X-Forwarded-Host", "shop")]
    bare = forwarded_headers([], Forwarding((), "http", None))
    assert bare == [("X-Forwarded-Proto", "http")]


def test_inbound_forwarding_joins_repeated_lines() -> None:
    got = inbound_forwarding([("x-forwarded-for", "1.1.1.1"), ("host", "shop"),
                              ("X-Forwarded-For", "2.2.2.2"), ("x-forwarded-proto", "https")])
    assert got == {"x-forwarded-for": "1.1.1.1, 2.2.2.2", "x-forwarded-proto": "https"}
    chain = forwarding_of(got, "127.0.0.1", "http", None, LOOPBACK).chain
    assert chain == ("1.1.1.1", "2.2.2.2", "127.0.0.1")


PROXY_SAID = [("Host", "shop"), ("Forwarded", "for=6.6.6.6;proto=https"),
              ("X-Real-IP", "6.6.6.6"), ("X-Forwarded-Port", "443"),
              ("X_Forwarded_Proto", "https"), ("X-EE-Release-Tag", "v9"), ("X-Other", "1")]


def test_proxy_headers_carry_on_only_from_a_trusted_proxy() -> None:
    trusted = forwarding_of({}, "127.0.0.1", "http", "shop", LOOPBACK)
    kept = forwarded_headers(PROXY_SAID, trusted)
    # the underscore spelling never: no proxy sends it, and CGI would read it as the real one
    assert [n for n, _ in kept] == ["Host", "Forwarded", "X-Real-IP", "X-Forwarded-Port",
                                    "X-EE-Release-Tag", "X-Other", "X-Forwarded-For",
                                    "X-Forwarded-Proto", "X-Forwarded-Host"]
    untrusted = forwarding_of({}, "203.0.113.9", "http", "shop", LOOPBACK)
    for forwarding, from_proxy in ((untrusted, None), (trusted, False)):
        dropped = forwarded_headers(PROXY_SAID, forwarding, from_proxy=from_proxy)
        assert [n for n, _ in dropped] == ["Host", "X-Other", "X-Forwarded-For",
                                           "X-Forwarded-Proto", "X-Forwarded-Host"]
