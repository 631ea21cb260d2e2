"""Credits through the ledger service on SQLite and PostgreSQL: purchase, transfer, redeem,
balances, and the idempotency surface of spec §4 (§17 item 6): replays are byte-identical and
marked, 400s are not stored, business rejections are, a key reused with another request or on
another route is 409, an external reference is used once."""

from __future__ import annotations

from eecp.core.clock import FixedClock
from tests.databases import Backend
from tests.ledger.dbkit import T0, body, error, ok, open_ledger, setup_node


async def test_money_moves_in_and_out_and_every_replay_is_the_first_answer(
        backend: Backend) -> None:
    async with open_ledger(backend, FixedClock(T0)) as (ledger, _):
        bought = await ledger.purchase("admin", body(account_id="alice", amount_usd="10"),
                                       ["buy-1"])
        assert ok(bought) == {"account_id": "alice", "balance_cents": 1000,
                              "balance_micros": 10_000_000, "amount_micros": 10_000_000,
                              "transfer_id": bought.json()["transfer_id"]}
        moved = ok(await ledger.transfer("admin", body(
            from_account="alice", to_account="bob", amount="3.25"), ["move-1"]))
        assert (moved["from_balance_micros"], moved["to_balance_micros"]) == (6_750_000,
                                                                             3_250_000)
        out = ok(await ledger.redeem("admin", body(account_id="bob", amount_usd="1"),
                                     ["out-1"]))
        assert out["balance_micros"] == 2_250_000
        # the same key and the same request, spelled differently: the first answer, exactly
        again = await ledger.purchase("admin", b'{"amount_usd": 10.000, "account_id":"alice"}',
                                      ["buy-1"])
        assert (again.status, again.body, again.replayed) == (200, bought.body, True)
        assert ("Idempotent-Replayed", "true") in again.headers
        mint = ok(await ledger.balance("admin", "mint:usd"))
        assert (mint["balance_micros"], mint["posted_micros"]) == (-9_000_000, -9_000_000)
        assert ok(await ledger.balance("admin", "bob"))["balance_usd"] == "2.250000"
        nobody = ok(await ledger.balance("admin", "carol"))
        assert (nobody["exists"], nobody["balance_micros"]) == (False, 0)
        assert ok(await ledger.check())["ok"] is True


async def test_what_is_stored_under_a_key_and_what_is_not(backend: Backend) -> None:
    async with open_ledger(backend, FixedClock(T0)) as (ledger, _):
        # a malformed request is not stored: the fixed request then runs under the same key
        assert error(await ledger.purchase("admin", body(account_id="alice", amount_usd="1e3"),
                                           ["k-1"])) == (400, "invalid_amount")
        ok(await ledger.purchase("admin", body(account_id="alice", amount_usd="1"), ["k-1"]))
        # a business rejection is stored: a later top-up does not turn it into a success
        short = await ledger.transfer("admin", body(from_account="alice", to_account="bob",
                                                    amount_usd="5"), ["k-2"])
        assert error(short) == (409, "insufficient_funds")
        ok(await ledger.purchase("admin", body(account_id="alice", amount_usd="10"), ["k-3"]))
        retried = await ledger.transfer("admin", body(from_account="alice", to_account="bob",
                                                      amount_usd="5"), ["k-2"])
        assert (retried.status, retried.body, retried.replayed) == (409, short.body, True)
        # the same key with another request, or on another route: 409, nothing happens
        assert error(await ledger.purchase("admin", body(account_id="alice", amount_usd="2"),
                                           ["k-1"])) == (409, "idempotency_key_reused")
        assert error(await ledger.redeem("admin", body(account_id="alice", amount_usd="1"),
                                         ["k-1"])) == (409, "idempotency_key_reused")
        # keys are scoped by principal: the launcher's k-1 is another key
        ok(await ledger.purchase("launcher", body(account_id="alice", amount_usd="2"), ["k-1"]))
        assert ok(await ledger.balance("admin", "alice"))["balance_micros"] == 13_000_000
        assert error(await ledger.purchase("admin", body(account_id="alice", amount_usd="1"),
                                           [])) == (400, "missing_idempotency_key")
        assert error(await ledger.purchase("admin", body(account_id="alice", amount_usd="1"),
                                           ["x" * 256])) == (400, "invalid_idempotency_key")
        ok(await ledger.purchase("admin", body(account_id="alice", amount_usd="1"), ["x" * 255]))
        assert error(await ledger.purchase("admin", body(account_id="alice", amount_usd="1"),
                                           ["a", "b"])) == (400, "invalid_idempotency_key")


async def test_an_external_reference_buys_once(backend: Backend) -> None:
    async with open_ledger(backend, FixedClock(T0)) as (ledger, _):
        first = await ledger.purchase("admin", body(account_id="alice", amount_usd="7",
                                                    external_ref="pi_123"), ["k-1"])
        ok(first)
        # the same purchase under another key (a client that lost its key): the first answer
        twin = await ledger.purchase("admin", body(account_id="alice", amount_usd="7",
                                                   external_ref="pi_123"), ["k-2"])
        assert (twin.status, twin.body, twin.replayed) == (200, first.body, True)
        assert error(await ledger.purchase("admin", body(account_id="alice", amount_usd="8",
                                                         external_ref="pi_123"), ["k-3"])) == (
            409, "external_ref_used")
        assert ok(await ledger.balance("admin", "alice"))["balance_micros"] == 7_000_000


async def test_which_accounts_may_be_funded_moved_and_read(backend: Backend) -> None:
    async with open_ledger(backend, FixedClock(T0)) as (ledger, _):
        await setup_node(ledger, stake=None, agent=None)
        assert error(await ledger.purchase("admin", body(account_id="fee:platform",
                                                         amount_usd="1"), ["k-1"])) == (
            409, "account_not_fundable")
        assert error(await ledger.purchase("admin", body(account_id="node:ghost",
                                                         amount_usd="1"), ["k-2"])) == (
            404, "node_not_found")
        assert error(await ledger.transfer("admin", body(from_account="nobody", to_account="bob",
                                                         amount_usd="1"), ["k-3"])) == (
            404, "account_not_found")
        assert error(await ledger.transfer("admin", body(from_account="alice",
                                                         to_account="stake:n1", amount_usd="1"),
                                           ["k-4"])) == (400, "account_not_transferable")
        assert error(await ledger.transfer("admin", body(from_account="bob", to_account="bob",
                                                         amount_usd="1"), ["k-5"])) == (
            400, "accounts_must_be_different")
        assert error(await ledger.transfer("admin", body(to_account="bob", amount_usd="1"),
                                           ["k-6"])) == (400, "missing_account")
        assert error(await ledger.redeem("admin", body(account_id="mint:usd", amount_usd="1"),
                                         ["k-7"])) == (400, "account_not_redeemable")
        assert error(await ledger.balance("admin", "no:such")) == (400, "invalid_account_id")
        # a node reads its own accounts only
        ok(await ledger.balance("node:n1", "node:n1"))
        ok(await ledger.balance("node:n1", "stake:n1"))
        for other in ("alice", "node:n2", "mint:usd"):
            denied = await ledger.balance("node:n1", other)
            assert (denied.status, denied.json()) == (403, {"error": "forbidden",
                                                            "reason": "not_your_node"})
        assert ok(await ledger.check())["ok"] is True
