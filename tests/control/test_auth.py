"""The control port's one guard (eecp.control.auth): every admin route against every way of
presenting a token, through real sockets; and its role rules, which the ledger's routes will use.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from trio.testing import MockClock

from eecp.control.auth import Guard, Role, Tokens, bearer
from eecp.dev import pki as devpki
from tests.harness import ControlPlane, control_plane_env, open_control_plane, open_upstreams

TOKEN = "admin-secret"  # the harness's EE_ADMIN_TOKEN
#: each admin route, and what it answers once the guard lets a request through (the view ran)
ROUTES = {
    "/v1/apps": 200,
    "/v1/apps/shop": 404,  # no such app yet: unknown_app
    "/v1/apps/shop?verdict=nonsense": 400,  # the guard runs before the view reads its query
}
#: ways of presenting a token; True: the request is the admin's
PRESENTED: dict[str, tuple[list[tuple[str, str]], bool]] = {
    "no header": ([], False),
    "scheme only": ([("Authorization", "Bearer")], False),
    "no scheme": ([("Authorization", TOKEN)], False),
    "another scheme": ([("Authorization", f"Basic {TOKEN}")], False),
    "wrong token": ([("Authorization", "Bearer nope")], False),
    "a prefix of it": ([("Authorization", f"Bearer {TOKEN[:-1]}")], False),
    "it and more": ([("Authorization", f"Bearer {TOKEN} {TOKEN}")], False),
    "two headers, both right": ([("Authorization", f"Bearer {TOKEN}")] * 2, False),
    "two headers, wrong first": ([("Authorization", "Bearer nope"),
                                  ("Authorization", f"Bearer {TOKEN}")], False),
    "two headers, right first": ([("Authorization", f"Bearer {TOKEN}"),
                                  ("Authorization", "Bearer nope")], False),
    "lowercase scheme": ([("Authorization", f"bearer {TOKEN}")], True),  # RFC 9110 11.1
    "right token": ([("Authorization", f"Bearer {TOKEN}")], True),
}


@pytest.fixture(scope="module")
def pki() -> devpki.DevPki:
    return devpki.make_pki(seed=14)


@pytest.fixture
async def cp(tmp_path: Path, pki: devpki.DevPki, mock_clock: MockClock,
             request: pytest.FixtureRequest) -> AsyncIterator[ControlPlane]:
    extra: dict[str, str] = getattr(request, "param", {})
    async with open_upstreams(pki) as (pccs, github):
        env = control_plane_env(tmp_path, pki, pccs.url, github.url, **extra)
        async with open_control_plane(env, pki, pccs, github) as plane:
            yield plane


@pytest.mark.parametrize("presented", PRESENTED)
@pytest.mark.parametrize("route", ROUTES)
async def test_every_admin_route_takes_exactly_one_bearer_admin_token(
        cp: ControlPlane, route: str, presented: str) -> None:
    headers, admitted = PRESENTED[presented]
    async with httpx.AsyncClient() as client:
        response = await client.get(cp.url + route, headers=headers)
    if admitted:
        assert response.status_code == ROUTES[route], response.text
        return
    assert (response.status_code, response.json()) == (
        401, {"error": "unauthorized", "reason": "admin_token_required"})
    assert response.headers["www-authenticate"] == 'Bearer realm="eecp"'


@pytest.mark.parametrize("cp", [{"EE_ADMIN_TOKEN": ""}], indirect=True)
@pytest.mark.parametrize("route", ROUTES)
async def test_without_an_admin_token_the_admin_routes_are_open(
        cp: ControlPlane, route: str) -> None:
    """As the README has it: EE_ADMIN_TOKEN unset, open (start-up warns)."""
    async with httpx.AsyncClient() as client:
        for headers in ([], [("Authorization", "Bearer anything")]):
            response = await client.get(cp.url + route, headers=headers)
            assert response.status_code == ROUTES[route], (headers, response.text)


# ---- the rules, for routes admitting other roles (the ledger's) ------------------------------

def admits(guard: Guard, token: str | None, *roles: Role) -> bool:
    return guard.admits([] if token is None else [f"Bearer {token}"], roles)


def test_the_admin_may_call_every_route_and_a_role_only_its_own() -> None:
    guard = Guard(Tokens(admin="a", launcher="l", uptime="u"))
    for roles in ((), (Role.LAUNCHER,), (Role.UPTIME,), (Role.LAUNCHER, Role.UPTIME)):
        assert admits(guard, "a", *roles)
        assert not admits(guard, None, *roles) and not admits(guard, "x", *roles)
    assert admits(guard, "l", Role.LAUNCHER) and not admits(guard, "l", Role.UPTIME)
    assert admits(guard, "u", Role.UPTIME) and not admits(guard, "u", Role.LAUNCHER)
    assert admits(guard, "l", Role.LAUNCHER, Role.UPTIME)
    assert not admits(guard, "l") and not admits(guard, "u")  # admin-only routes


def test_a_role_whose_token_is_unset_admits_only_the_admin() -> None:
    guard = Guard(Tokens(admin="a", launcher=None))
    assert admits(guard, "a", Role.LAUNCHER)
    assert not admits(guard, None, Role.LAUNCHER) and not admits(guard, "", Role.LAUNCHER)


def test_a_route_is_open_only_when_no_token_it_admits_is_set() -> None:
    assert admits(Guard(Tokens()), None, Role.LAUNCHER)
    only_launcher = Guard(Tokens(launcher="l"))
    assert admits(only_launcher, None)  # admin-only: no admin token, open (as today)
    assert not admits(only_launcher, None, Role.LAUNCHER)
    assert admits(only_launcher, "l", Role.LAUNCHER)


def test_tokens_never_show_in_a_repr() -> None:
    assert "s3cret" not in repr(Tokens(admin="s3cret", launcher="s3cret", uptime="s3cret"))


@pytest.mark.parametrize(("values", "token"), [
    ([], None), (["Bearer"], None), (["Bearer   "], None), (["Basic abc"], None),
    (["abc"], None), (["Bearer abc", "Bearer abc"], None),
    (["Bearer abc"], "abc"), (["bearer abc"], "abc"), (["BEARER  abc "], "abc"),
])
def test_the_bearer_token_of_authorization_values(values: list[str], token: str | None) -> None:
    assert bearer(values) == token
