"""Upstream clients (spec §1's table): each request shape posix4e/easy-enclave's control plane
took is answered with upstream's response keys, through real sockets; and the HTTP surface of
idempotency (§4, §17.6): byte-identical replays marked ``Idempotent-Replayed``, a reused key
409, a malformed request not stored, oversized bodies 413, a failing store 503."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from trio.testing import MockClock

from eecp.core.errors import StoreError
from eecp.dev import pki as devpki
from eecp.ledger.service import Ledger
from tests.databases import Backend
from tests.ledgerkit import ADMIN, LAUNCHER, UPTIME, LedgerPlane, key, open_ledger_plane

NODE = "acme-1"


@pytest.fixture(scope="module")
def pki() -> devpki.DevPki:
    return devpki.make_pki(seed=37)


@pytest.fixture
async def plane(tmp_path: Path, pki: devpki.DevPki, mock_clock: MockClock, backend: Backend
                ) -> AsyncIterator[LedgerPlane]:
    """On SQLite and PostgreSQL."""
    async with open_ledger_plane(tmp_path, pki, mock_clock, backend) as plane:
        yield plane


def has(doc: dict[str, object], *keys: str) -> bool:
    return all(k in doc for k in keys)


async def test_upstream_request_shapes_get_upstream_response_keys(
        mock_clock: MockClock, plane: LedgerPlane) -> None:
    # register: upstream's body (price_usd, stake_amount_usd, stake_tier, flags) -> node, token
    created = await plane.ok("POST", "/v1/nodes/register", json={
        "node_id": NODE, "price_usd": "0.5", "capacity_vcpus": 2, "stake_tier": "economy",
        "allow_update": False, "rotate_token": False})
    assert has(created, "node", "node_token") and created["node_token"].startswith("eecpn_")
    assert created["node"]["node_id"] == NODE and "token_sha256" not in str(created)
    token = created["node_token"]
    # purchase with upstream's "amount" -> {account_id, balance_cents}
    bought = await plane.ok("POST", "/v1/credits/purchase", headers=key(),
                            json={"account_id": "alice", "amount": 5})
    assert has(bought, "account_id", "balance_cents") and bought["balance_cents"] == 500
    await plane.ok("POST", "/v1/credits/purchase", headers=key(),
                   json={"account_id": f"node:{NODE}", "amount_usd": "1"})
    staked = await plane.ok("POST", "/v1/nodes/register", token, json={
        "node_id": NODE, "stake_amount_usd": "1"})
    assert staked["node"]["stake"]["posted_micros"] == 1_000_000
    assert staked["node_token"] is None  # not rotated: no token again
    # transfer -> {transfer_id}
    moved = await plane.ok("POST", "/v1/credits/transfer", headers=key(), json={
        "from_account": "alice", "to_account": "bob", "amount_usd": "1"})
    assert has(moved, "transfer_id") and moved["transfer_id"].startswith("tr_")
    # balances -> {account_id, balance_cents}; unknown account: 200 with 0
    balance = await plane.ok("GET", "/v1/balances/bob")
    assert (balance["account_id"], balance["balance_cents"]) == ("bob", 100)
    nobody = await plane.ok("GET", "/v1/balances/nobody")
    assert (nobody["balance_cents"], nobody["exists"]) == (0, False)
    # usage with upstream's period_start/period_end -> {usage_id, lock_id, amount_cents}
    start, period = plane.period()
    bounds = {"period_start": _iso(start), "period_end": _iso(start + 60)}
    usage = await plane.ok("POST", "/v1/usage/report", UPTIME, json={
        "account_id": "alice", "node_id": NODE, **bounds, "vcpu_hours": "0.02"})
    assert has(usage, "usage_id", "lock_id", "amount_cents")
    assert usage["period"] == period
    # the natural key: the same report again is a replay, another amount a conflict
    again = await plane.call("POST", "/v1/usage/report", UPTIME, json={
        "account_id": "alice", "node_id": NODE, **bounds, "vcpu_hours": "0.02"})
    assert again.headers["idempotent-replayed"] == "true" and again.json() == usage
    other = await plane.call("POST", "/v1/usage/report", UPTIME, json={
        "account_id": "alice", "node_id": NODE, **bounds, "vcpu_hours": "0.01"})
    assert (other.status_code, other.json()["error"]) == (409, "usage_conflict")
    # abuse -> {report_id, status: pending}; authorize -> {report_id, status}
    filed = await plane.ok("POST", "/v1/abuse/reports", LAUNCHER, headers=key(), json={
        "node_id": NODE, "reason": "spam", "reported_by": "ops"})
    assert has(filed, "report_id", "status") and filed["status"] == "pending"
    decided = await plane.ok("POST", f"/v1/abuse/reports/{filed['report_id']}/authorize",
                             json={"action": "deny"})
    assert (decided["report_id"], decided["status"]) == (filed["report_id"], "denied")
    flip = await plane.call("POST", f"/v1/abuse/reports/{filed['report_id']}/authorize",
                            json={"action": "authorize"})
    assert (flip.status_code, flip.json()["error"]) == (409, "report_already_decided")
    # node view, by the node itself: no token hash
    node = await plane.ok("GET", f"/v1/nodes/{NODE}", token)
    assert node["node_id"] == NODE and "token" not in str(node)
    # finalize with node_id and upstream's bounds -> upstream's keys
    await plane.advance(start + 60 + 10 - plane.now)
    result = await plane.ok("POST", f"/v1/settlements/{period}/finalize",
                            json={"node_id": NODE, **bounds})
    assert has(result, "node_id", "period_start", "period_end", "eligible", "reasons",
               "settled", "failed")
    assert (result["period_start"], result["period_end"]) == (bounds["period_start"],
                                                              bounds["period_end"])
    listed = await plane.ok("GET", f"/v1/settlements/{period}")
    assert [r["node_id"] for r in listed["results"]] == [NODE]


def _iso(t: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


async def test_replays_are_byte_identical_and_reused_keys_refused(
        mock_clock: MockClock, plane: LedgerPlane) -> None:
    idem = key()
    body = {"account_id": "alice", "amount_usd": "12.50"}
    first = await plane.call("POST", "/v1/credits/purchase", json=body, headers=idem)
    assert first.status_code == 200 and "idempotent-replayed" not in first.headers
    # the same request spelled otherwise (a number, not a string) is the same request
    same = await plane.call("POST", "/v1/credits/purchase", headers={
        **idem, "Content-Type": "application/json"},
        content=b'{"amount_usd": 12.5, "account_id": "alice"}')
    assert same.status_code == 200 and same.content == first.content
    assert same.headers["idempotent-replayed"] == "true"
    assert same.headers["content-type"] == "application/json"
    reused = await plane.call("POST", "/v1/credits/purchase", headers=idem,
                              json={"account_id": "alice", "amount_usd": "13"})
    assert (reused.status_code, reused.json()["error"]) == (409, "idempotency_key_reused")
    # a malformed request is not stored: the fixed one then succeeds under the same key
    fresh = key()
    bad = await plane.call("POST", "/v1/credits/purchase", headers=fresh,
                           json={"account_id": "alice", "amount_usd": "1e3"})
    assert (bad.status_code, bad.json()["detail"]) == (400, "exponent")
    fixed = await plane.call("POST", "/v1/credits/purchase", headers=fresh,
                             json={"account_id": "alice", "amount_usd": "1000"})
    assert fixed.status_code == 200 and "idempotent-replayed" not in fixed.headers
    missing = await plane.call("POST", "/v1/credits/purchase", json=body)
    assert (missing.status_code, missing.json()["error"]) == (400, "missing_idempotency_key")
    metrics = (await plane.call("GET", "/metrics", None)).text
    assert "eecp_ledger_idempotent_replays_total 1.0" in metrics


async def test_a_body_over_16_kib_is_413_and_a_failing_store_503(
        mock_clock: MockClock, plane: LedgerPlane, monkeypatch: pytest.MonkeyPatch) -> None:
    big = b'{"account_id": "alice", "note": "' + b"x" * 17_000 + b'"}'
    response = await plane.call("POST", "/v1/credits/purchase", content=big, headers={
        "Content-Type": "application/json", **key()})
    assert (response.status_code, response.json()["error"]) == (413, "body_too_large")

    async def down(self: Ledger, token: str) -> str | None:
        raise StoreError("store_unavailable", "test")

    monkeypatch.setattr(Ledger, "node_for_token", down)
    broken = await plane.call("GET", f"/v1/nodes/{NODE}", "eecpn_" + "A" * 43)
    assert (broken.status_code, broken.json()) == (503, {"error": "store_unavailable"})
    # (a role token needs no lookup: the admin is still answered)
    assert (await plane.call("GET", "/v1/ledger/check", ADMIN)).status_code == 200
