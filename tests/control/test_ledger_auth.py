"""The ledger's auth (spec §5), through real sockets: every ledger route against every kind of
caller, the existing admin routes failing closed with the ledger on, and the routes absent
with it off (nothing written either)."""

from __future__ import annotations

import hmac
import sqlite3
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from trio.testing import MockClock

from eecp.control import auth
from eecp.control.auth import Guard, Presented, Role, Tokens
from eecp.dev import pki as devpki
from tests.databases import Backend
from tests.harness import (
    control_plane_env,
    open_control_plane,
    open_upstreams,
    running_agent,
)
from tests.ledgerkit import ADMIN, LAUNCHER, UPTIME, LedgerPlane, bearer, key, open_ledger_plane

PPID = "ab" * 16


@pytest.fixture(scope="module")
def pki() -> devpki.DevPki:
    return devpki.make_pki(seed=31)


@dataclass(frozen=True)
class Route:
    """One ledger route, called as the matrix calls it."""

    method: str
    path: str
    admits: frozenset[str]  # besides the admin: "launcher", "uptime", "node"
    body: dict[str, object] | None = None

    def sent(self, node: str) -> tuple[str, dict[str, object] | None]:
        """The path and body naming ``node`` (the node the caller's token may or may not be)."""
        body = None
        if self.body is not None:
            body = {k: (node if v == "{node}" else f"node:{node}" if v == "{account}" else v)
                    for k, v in self.body.items()}
        return self.path.replace("{node}", node), body


NONE: frozenset[str] = frozenset()
ROUTES = [
    Route("POST", "/v1/credits/purchase", NONE, {"account_id": "alice", "amount_usd": "1"}),
    Route("POST", "/v1/credits/transfer", NONE,
          {"from_account": "alice", "to_account": "bob", "amount_usd": "0.5"}),
    Route("POST", "/v1/credits/redeem", NONE, {"account_id": "alice", "amount_usd": "0.1"}),
    Route("GET", "/v1/balances/node:{node}", frozenset({"launcher", "node"})),
    Route("POST", "/v1/usage/report", frozenset({"uptime"}),
          {"account_id": "alice", "node_id": "{node}", "period": "PERIOD", "vcpu_hours": "0.01"}),
    Route("POST", "/v1/settlements/PERIOD/finalize", NONE, {"node_id": "{node}"}),
    Route("GET", "/v1/settlements/PERIOD", NONE),
    Route("POST", "/v1/abuse/reports", frozenset({"launcher"}), {"node_id": "{node}"}),
    Route("POST", "/v1/abuse/reports/REPORT/authorize", NONE, {"action": "deny"}),
    Route("POST", "/v1/nodes/register", frozenset({"node"}), {"node_id": "{node}"}),
    Route("GET", "/v1/nodes/{node}", frozenset({"launcher", "node"})),
    Route("POST", "/v1/nodes/{node}/platforms", frozenset({"node"}), {"ppid": PPID}),
    Route("DELETE", f"/v1/nodes/{{node}}/platforms/{PPID}", NONE),
    Route("POST", f"/v1/nodes/{{node}}/agents/{uuid.uuid4()}/release", frozenset({"launcher"})),
    Route("GET", "/v1/ledger/check", NONE),
    Route("GET", "/v1/nodes", frozenset({"launcher"})),
    Route("POST", "/v1/nodes/{node}/unstake", frozenset({"node"}), {"amount_usd": "0.01"}),
    Route("POST", "/v1/nodes/{node}/status", NONE, {"status": "active"}),
    Route("POST", "/v1/nodes/{node}/fraud", NONE, {"audit_ids": []}),
]
CALLERS = ["no header", "malformed", "wrong token", "wrong node token", "launcher", "uptime",
           "own node", "other node", "admin"]


def expected(route: Route, caller: str) -> tuple[int, str] | None:
    """What §5 answers ``caller`` on ``route``: (status, reason) of a refusal, or None when
    the request reaches the service."""
    if caller == "no header":
        return 401, "token_required"
    if caller in ("malformed", "wrong token", "wrong node token"):
        return 401, "token_invalid"
    if caller == "admin":
        return None
    role = "node" if caller.endswith("node") else caller
    if role not in route.admits:
        return 403, "role_not_allowed"
    if caller == "other node":
        return 403, "not_your_node"
    return None


def headers_of(caller: str, plane: LedgerPlane) -> dict[str, str]:
    tokens = {"launcher": LAUNCHER, "uptime": UPTIME, "admin": ADMIN,
              "own node": plane.node_tokens["acme-1"], "other node": plane.node_tokens["acme-2"],
              "wrong token": "x" * 40, "wrong node token": "eecpn_" + "A" * 43}
    if caller == "no header":
        return {}
    if caller == "malformed":
        return {"Authorization": f"Basic {ADMIN}"}
    return bearer(tokens[caller])


@pytest.fixture
async def plane(tmp_path: Path, pki: devpki.DevPki, mock_clock: MockClock, backend: Backend
                ) -> AsyncIterator[LedgerPlane]:
    """On SQLite and PostgreSQL."""
    async with open_ledger_plane(tmp_path, pki, mock_clock, backend) as plane:
        await plane.create_node("acme-1")
        await plane.create_node("acme-2")
        await plane.fund("alice", "5")
        yield plane


async def test_every_ledger_route_admits_exactly_the_callers_of_the_spec_table(
        mock_clock: MockClock, plane: LedgerPlane) -> None:
    _, period = plane.period(-1)
    report = await plane.ok("POST", "/v1/abuse/reports", headers=key(),
                            json={"node_id": "acme-1"})
    failures = []
    for route in ROUTES:
        for caller in CALLERS:
            path, body = route.sent("acme-1")
            path = path.replace("PERIOD", period).replace("REPORT", str(report["report_id"]))
            if body is not None and body.get("period") == "PERIOD":
                body = {**body, "period": period}
            response = await plane.call(route.method, path, None, json=body,
                                        headers={**headers_of(caller, plane), **key()})
            want = expected(route, caller)
            got = (response.status_code, response.json().get("reason"))
            if want is None:
                ok = response.status_code not in (401, 403)
            else:
                ok = got == want and response.json()["error"] == (
                    "unauthorized" if want[0] == 401 else "forbidden")
                if want[0] == 401:
                    ok = ok and response.headers["www-authenticate"] == 'Bearer realm="eecp"'
            if not ok:
                failures.append((route.method, route.path, caller, want, response.status_code,
                                 response.text))
    assert not failures, "\n".join(map(str, failures))


async def test_a_refusal_of_auth_is_never_stored_under_its_key(
        mock_clock: MockClock, plane: LedgerPlane) -> None:
    idem = key()
    body = {"account_id": "carol", "amount_usd": "2"}
    refused = await plane.call("POST", "/v1/credits/purchase", LAUNCHER, json=body,
                               headers=idem)
    assert refused.status_code == 403
    done = await plane.call("POST", "/v1/credits/purchase", ADMIN, json=body, headers=idem)
    assert done.status_code == 200 and "idempotent-replayed" not in done.headers
    again = await plane.call("POST", "/v1/credits/purchase", ADMIN, json=body, headers=idem)
    assert again.headers["idempotent-replayed"] == "true" and again.content == done.content


async def test_the_admin_views_fail_closed_and_admit_the_admin_only(
        mock_clock: MockClock, plane: LedgerPlane) -> None:
    for token in (None, LAUNCHER, UPTIME, plane.node_tokens["acme-1"]):
        response = await plane.call("GET", "/v1/apps", token)
        assert response.status_code == 401, (token, response.text)
    assert (await plane.call("GET", "/v1/apps", ADMIN)).status_code == 200


async def test_an_unset_role_token_admits_only_the_admin(
        tmp_path: Path, pki: devpki.DevPki, mock_clock: MockClock) -> None:
    async with open_ledger_plane(tmp_path, pki, mock_clock, EE_UPTIME_TOKEN="",
                                 EE_LAUNCHER_TOKEN="") as plane:
        await plane.create_node("acme-1")
        _, period = plane.period()
        usage = {"account_id": "alice", "node_id": "acme-1", "period": period,
                 "vcpu_hours": "0.01"}
        for token in (UPTIME, LAUNCHER):
            refused = await plane.call("POST", "/v1/usage/report", token, json=usage)
            assert refused.status_code == 401, refused.text
        by_admin = await plane.call("POST", "/v1/usage/report", ADMIN, json=usage)
        assert by_admin.status_code == 404 and by_admin.json()["error"] == "account_not_found"


def test_every_role_token_is_compared_whichever_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[bytes] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append(b)
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    guard = Guard(Tokens(ADMIN, LAUNCHER, UPTIME), fail_closed=True)
    assert guard.presented([f"Bearer {ADMIN}"]) == Presented(role=Role.ADMIN)
    assert sorted(compared) == sorted(t.encode() for t in (ADMIN, LAUNCHER, UPTIME))
    compared.clear()
    token = "eecpn_" + "b" * 43
    assert guard.presented([f"Bearer {token}"]) == Presented(node_token=token)
    assert len(compared) == 3
    assert guard.presented([]) == Presented(refusal="token_required")
    assert guard.presented(["Bearer"]) == Presented(refusal="token_invalid")
    assert guard.presented([f"Bearer {ADMIN}"] * 2) == Presented(refusal="token_invalid")
    # failing closed: a route none of whose tokens is set admits no one
    assert not Guard(Tokens(), fail_closed=True).admits([], [Role.UPTIME])
    assert Guard(Tokens()).admits([], [Role.UPTIME])  # the seed's open admin views


async def test_with_the_ledger_off_its_routes_are_absent_and_nothing_is_written(
        tmp_path: Path, pki: devpki.DevPki, mock_clock: MockClock) -> None:
    async with open_upstreams(pki) as (pccs, github):
        env = control_plane_env(tmp_path, pki, pccs.url, github.url)
        async with open_control_plane(env, pki, pccs, github) as cp:
            from tests.harness import FakeAgent

            async with running_agent(FakeAgent(cp.ws_url, pki, register_extra={
                    "node_id": "acme-1"})) as agent:
                await agent.wait_status("attested")
                async with httpx.AsyncClient() as client:
                    for route in ROUTES:
                        path, body = route.sent("acme-1")
                        response = await client.request(route.method, cp.url + path,
                                                         json=body, headers=cp.admin_headers)
                        assert response.status_code == 404, (route.path, response.text)
                    metrics = (await client.get(cp.url + "/metrics")).text
                assert "eecp_ledger" not in metrics and "availability" not in metrics
                detail = await cp.app("shop")
                assert detail["agents"][0]["node_id"] is None
    with sqlite3.connect(tmp_path / "eecp.db") as conn:
        for table in ("ledger_transfer", "idempotency", "node", "platform_claim",
                      "availability_event", "observer", "usage", "node_period"):
            assert conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone() == (0,), table
        accounts = {r[0] for r in conn.execute("SELECT id FROM ledger_account")}
        assert accounts == {"mint:usd", "fee:platform", "slash:platform"}  # migration 4's
