"""The admin dashboard (eecp.control.dashboard) through a real eecp and real sockets: the login
and its cookie, the session's end, CSRF and brute-force refusals, the security headers, and
every hostile string rendered as text. The same in a real browser: test_dashboard_browser.py.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from trio.testing import MockClock

from eecp.control.dashboard import LOGINS_PER_CLIENT_PER_MIN, SECURITY_HEADERS, SESSION_TTL_SEC
from eecp.dev import pki as devpki
from tests.harness import (
    START,
    ControlPlane,
    FakeAgent,
    control_plane_env,
    open_control_plane,
    open_upstreams,
    running_agent,
)
from tests.ledgerkit import ADMIN, key, open_ledger_plane

TOKEN = "admin-secret"  # the harness's EE_ADMIN_TOKEN
XSS = '<script>window.__xss=1</script><img src=x onerror="window.__xss=2">'
CSP = ("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")


@pytest.fixture(scope="module")
def pki() -> devpki.DevPki:
    return devpki.make_pki(seed=20)


@pytest.fixture
async def cp(tmp_path: Path, pki: devpki.DevPki, mock_clock: MockClock,
             request: pytest.FixtureRequest) -> AsyncIterator[ControlPlane]:
    extra: dict[str, str] = getattr(request, "param", {})
    async with open_upstreams(pki) as (pccs, github):
        env = control_plane_env(tmp_path, pki, pccs.url, github.url, **extra)
        async with open_control_plane(env, pki, pccs, github) as plane:
            yield plane


def browser(cp: ControlPlane) -> httpx.AsyncClient:
    """A client that sends what a browser's same-origin form sends (its Origin)."""
    return httpx.AsyncClient(base_url=cp.url, headers={"Origin": cp.url})


async def log_in(client: httpx.AsyncClient, token: str = TOKEN) -> httpx.Response:
    return await client.post("/admin/login", data={"token": token})


def assert_secure_headers(response: httpx.Response) -> None:
    assert response.headers["content-security-policy"] == CSP
    for name, value in SECURITY_HEADERS.items():
        assert response.headers[name] == value, name


async def test_without_a_session_every_page_goes_to_the_login(cp: ControlPlane) -> None:
    async with browser(cp) as client:
        for path in ("/admin", "/admin/apps/shop", "/admin/ledger"):
            response = await client.get(path)
            assert (response.status_code, response.headers["location"]) == (303,
                                                                             "/admin/login")
            assert_secure_headers(response)
        form = await client.get("/admin/login")
        assert form.status_code == 200 and 'name="token"' in form.text
        assert form.headers["content-type"] == "text/html; charset=utf-8"
        assert_secure_headers(form)
        assert "<script" not in form.text  # no script at all, not even our own
        css = await client.get("/admin/dashboard.css")
        assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")


async def test_login_sets_a_session_cookie_that_is_not_the_token(cp: ControlPlane) -> None:
    async with browser(cp) as client:
        response = await log_in(client)
        assert (response.status_code, response.headers["location"]) == (303, "/admin")
        cookie = response.headers["set-cookie"]
        value = cookie.split(";")[0].split("=", 1)[1]
        assert TOKEN not in cookie and len(value) >= 40
        attributes = {a.strip().lower() for a in cookie.split(";")[1:]}
        assert {"httponly", "samesite=strict", "path=/admin"} <= attributes
        assert "secure" not in attributes  # plain http, no proxy said https
        async with running_agent(FakeAgent(cp.ws_url, cp.pki)) as agent:
            await agent.wait_status("attested")
            page = await client.get("/admin")
            assert page.status_code == 200, page.text
            assert_secure_headers(page)
            assert '<a href="/admin/apps/shop">shop</a>' in page.text
            assert '<meta http-equiv="refresh"' in page.text
            detail = await client.get("/admin/apps/shop")
            assert detail.status_code == 200
            assert agent.agent_id in detail.text
            assert "UpToDate" in detail.text and "attested" in detail.text
        assert (await client.get("/admin/apps/nope")).status_code == 404
        # with the ledger off the ledger page is absent
        assert (await client.get("/admin/ledger")).status_code == 404
        assert "/admin/ledger" not in page.text


async def test_a_wrong_token_is_401_with_the_form_and_attempts_are_limited(
        cp: ControlPlane) -> None:
    async with browser(cp) as client:
        for token in ["nope"] * (LOGINS_PER_CLIENT_PER_MIN - 1) + [TOKEN[:-1]]:
            response = await log_in(client, token)
            assert response.status_code == 401 and 'name="token"' in response.text
            assert "set-cookie" not in response.headers
        refused = await log_in(client)  # the right token, but too many attempts
        assert refused.status_code == 429 and "set-cookie" not in refused.headers
        assert refused.headers["retry-after"] == "60"


async def test_a_post_from_another_origin_is_refused(cp: ControlPlane) -> None:
    async with httpx.AsyncClient(base_url=cp.url) as client:
        for headers in ({}, {"Origin": "http://evil.example"}, {"Origin": "null"},
                        {"Origin": "null", "Sec-Fetch-Site": "cross-site"},
                        {"Origin": "http://evil.example", "Sec-Fetch-Site": "same-origin"},
                        {"Referer": "http://evil.example/admin/login"},
                        {"Origin": cp.url.replace("http:", "ftp:")}):
            response = await client.post("/admin/login", data={"token": TOKEN},
                                         headers=headers)
            assert response.status_code == 403, headers
            assert "set-cookie" not in response.headers
        # a Referer naming this host will do when there is no Origin
        response = await client.post("/admin/login", data={"token": TOKEN},
                                     headers={"Referer": cp.url + "/admin/login"})
        assert response.status_code == 303
        # what a browser sends under Referrer-Policy: no-referrer
        response = await client.post("/admin/login", data={"token": TOKEN}, headers={
            "Origin": "null", "Sec-Fetch-Site": "same-origin"})
        assert response.status_code == 303
        cross = await client.post("/admin/logout", headers={"Origin": "http://evil.example"})
        assert cross.status_code == 403
        assert (await client.get("/admin")).status_code == 200  # still logged in


async def test_logout_ends_the_session_on_the_server(cp: ControlPlane) -> None:
    async with browser(cp) as client:
        await log_in(client)
        session = dict(client.cookies)
        assert (await client.get("/admin")).status_code == 200
        out = await client.post("/admin/logout")
        assert (out.status_code, out.headers["location"]) == (303, "/admin/login")
        assert "max-age=0" in out.headers["set-cookie"].lower()
    # the old cookie, sent again, is no session any more
    async with httpx.AsyncClient(base_url=cp.url, cookies=session) as client:
        again = await client.get("/admin")
        assert (again.status_code, again.headers["location"]) == (303, "/admin/login")


async def test_a_session_expires(cp: ControlPlane, mock_clock: MockClock) -> None:
    async with browser(cp) as client:
        await log_in(client)
        session = dict(client.cookies)

    async def status() -> int:
        # a fresh client per call: the clock's jump outlives pooled connections
        async with httpx.AsyncClient(base_url=cp.url, cookies=session) as client:
            return (await client.get("/admin")).status_code

    assert await status() == 200
    mock_clock.jump(SESSION_TTL_SEC - 60)
    assert await status() == 200
    mock_clock.jump(120)
    assert await status() == 303


@pytest.mark.parametrize("cp", [{"EE_TRUSTED_PROXIES": "192.0.2.1/32"}], indirect=True)
async def test_the_cookie_is_secure_only_when_a_trusted_proxy_says_https(
        cp: ControlPlane) -> None:
    async with browser(cp) as client:
        response = await client.post("/admin/login", data={"token": TOKEN},
                                     headers={"X-Forwarded-Proto": "https"})
        assert response.status_code == 303
        assert "secure" not in response.headers["set-cookie"].lower()


async def test_behind_a_trusted_proxy_over_https_the_cookie_is_secure(cp: ControlPlane) -> None:
    async with browser(cp) as client:  # 127.0.0.1 is trusted by default
        response = await client.post("/admin/login", data={"token": TOKEN},
                                     headers={"X-Forwarded-Proto": "https"})
        assert response.status_code == 303
        assert "; secure" in response.headers["set-cookie"].lower()


@pytest.mark.parametrize("cp", [{"EE_ADMIN_TOKEN": ""}], indirect=True)
async def test_without_an_admin_token_the_dashboard_is_open_as_the_json_views(
        cp: ControlPlane) -> None:
    async with browser(cp) as client:
        assert (await client.get("/admin")).status_code == 200
        login = await client.get("/admin/login")
        assert (login.status_code, login.headers["location"]) == (303, "/admin")


def hostile_audit_row(db: Path, agent_id: str) -> None:
    """An audit row whose every free field is markup (as another instance or an older version
    might have written: the store is not trusted to hold only what today's parser admits)."""
    with sqlite3.connect(db) as conn:
        conn.execute(
            "INSERT INTO audit_log (at, app_name, agent_id, repo, release_tag, network, "
            "trigger, verdict, reason, tcb_status, advisory_ids, platform_id) "
            "VALUES (?, 'shop', ?, ?, ?, 'forge-1', 'register', 'refused', ?, ?, ?, ?)",
            (START, agent_id, XSS, XSS, XSS, XSS, json.dumps([XSS]), XSS))


async def test_every_string_shown_is_escaped(cp: ControlPlane) -> None:
    async with running_agent(FakeAgent(cp.ws_url, cp.pki)) as agent:
        await agent.wait_status("attested")
        hostile_audit_row(Path(cp.config.db_path), agent.agent_id)
        async with browser(cp) as client:
            await log_in(client)
            page = await client.get("/admin/apps/shop")
    assert page.status_code == 200
    assert "<script" not in page.text and "<img" not in page.text
    assert "&lt;script&gt;window.__xss=1&lt;/script&gt;" in page.text
    assert page.text.count("&lt;img src=x onerror=") >= 6  # repo, tag, reason, TCB, …


async def test_the_ledger_page_shows_nodes_balances_and_settlements_escaped(
        tmp_path: Path, pki: devpki.DevPki, mock_clock: MockClock) -> None:
    async with open_ledger_plane(tmp_path, pki, mock_clock) as plane:
        await plane.create_node("acme-1")
        await plane.ok("POST", "/v1/nodes/acme-1/status", headers=key(),
                       json={"status": "suspended", "reason": XSS})
        async with httpx.AsyncClient(base_url=plane.cp.url,
                                     headers={"Origin": plane.cp.url}) as client:
            assert (await log_in(client, ADMIN)).status_code == 303
            apps = await client.get("/admin")
            assert '<a href="/admin/ledger">Ledger</a>' in apps.text
            page = await client.get("/admin/ledger")
            bad_period = await client.get("/admin/ledger", params={"period": "<b>x"})
    assert page.status_code == 200, page.text
    assert "acme-1" in page.text and "suspended" in page.text
    assert "fee:platform" in page.text and "slash:platform" in page.text
    assert "<script" not in page.text and "<img" not in page.text
    assert "&lt;script&gt;window.__xss=1&lt;/script&gt;" in page.text
    _, period = plane.period(-1)
    assert f"Settlements of period {period}" in page.text
    assert bad_period.status_code == 200 and "invalid_period" in bad_period.text
    assert "<b>x" not in bad_period.text and "&lt;b&gt;x" in bad_period.text
