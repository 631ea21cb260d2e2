"""The ledger's schema on SQLite and PostgreSQL (spec §14, §17 item 9): migration 4 from a
version-3 database, the system accounts, and the database's own backstops — CHECKs refuse an
overdraft or a malformed transfer written by hand, ``UNIQUE(pending_id)`` a second resolution,
triggers any UPDATE or DELETE of a transfer or an availability event; ``GET /v1/ledger/check``
notices a counter changed behind the ledger's back."""

from __future__ import annotations

import pytest

from eecp.core.blocking import Workers
from eecp.core.clock import FixedClock
from eecp.store import migrations as migrations_module
from eecp.store.migrations import MIGRATIONS
from eecp.store.store import open_store
from tests.databases import Backend
from tests.ledger.dbkit import T0, body, ok, open_ledger, setup_node


async def test_a_version_3_database_gains_the_ledger(backend: Backend,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(migrations_module, "MIGRATIONS", MIGRATIONS[:3])
    monkeypatch.setattr(migrations_module, "LATEST_SCHEMA_VERSION", 3)
    async with open_store(backend.config, Workers()) as store:
        assert await store.schema_version() == 3
    backend.raw("INSERT INTO app (name, repo, release_tag, network, registered_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?, ?)", "hello", "acme/hello", "v1", "forge-1", T0, T0 + 1)
    monkeypatch.undo()
    async with open_store(backend.config, Workers()) as store:
        assert await store.schema_version() == 4
        assert [a.name for a in await store.list_apps()] == ["hello"]
    assert backend.raw("SELECT id, kind, credits_posted FROM ledger_account ORDER BY id") == [
        ("fee:platform", "fee", 0), ("mint:usd", "mint", 0), ("slash:platform", "slash", 0)]


async def test_the_database_refuses_what_the_ledger_never_writes(backend: Backend) -> None:
    clock = FixedClock(T0 + 10)
    async with open_ledger(backend, clock) as (ledger, _):
        await setup_node(ledger, stake=None)
        ok(await ledger.purchase("admin", body(account_id="alice", amount_usd="5"), ["k"]))
        ok(await ledger.report_usage("uptime", body(
            account_id="alice", node_id="n1", period="2026-01-01T00Z", vcpu_hours="1")))
    (hold_id,) = backend.raw("SELECT id FROM ledger_transfer WHERE phase = 'pending'")[0]

    def refused(sql: str, *params: object) -> str:
        with pytest.raises(Exception) as info:
            backend.raw(sql, *params)
        return str(info.value)

    # no overdraft, no negative counter (CHECKs)
    assert refused("UPDATE ledger_account SET debits_posted = 6000000 WHERE id = 'alice'")
    assert refused("UPDATE ledger_account SET credits_posted = 0 WHERE id = 'alice'")
    assert refused("UPDATE ledger_account SET debits_pending = -1 WHERE id = 'mint:usd'")
    insert = ("INSERT INTO ledger_transfer (transfer_id, debit_account, credit_account, amount, "
              "code, phase, pending_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
    assert refused(insert, "tr_a", "alice", "alice", 1, "transfer", "single", None, T0)
    assert refused(insert, "tr_b", "mint:usd", "alice", 0, "purchase", "single", None, T0)
    assert refused(insert, "tr_c", "mint:usd", "alice", 1, "purchase", "sideways", None, T0)
    assert refused(insert, "tr_d", "alice", "node:n1", 1, "usage_post", "post", None, T0)
    # a hold resolves at most once
    backend.raw(insert, "tr_f", "alice", "node:n1", 500000, "usage_void", "void", hold_id, T0)
    assert refused(insert, "tr_g", "alice", "node:n1", 500000, "usage_post", "post", hold_id, T0)
    # transfers and availability events are append-only
    for table in ("ledger_transfer", "availability_event"):
        assert "append_only" in refused(f"UPDATE {table} SET id = id")
        assert "append_only" in refused(f"DELETE FROM {table}")


async def test_the_check_sees_a_counter_changed_behind_the_ledgers_back(
        backend: Backend) -> None:
    clock = FixedClock(T0 + 10)
    async with open_ledger(backend, clock) as (ledger, _):
        ok(await ledger.purchase("admin", body(account_id="alice", amount_usd="5"), ["k"]))
        assert ok(await ledger.check())["ok"] is True
        # a hand-made credit: allowed by the CHECKs, but neither in the journal nor balanced
        backend.raw("UPDATE ledger_account SET credits_posted = 9000000 WHERE id = 'alice'")
        report = ok(await ledger.check())
    assert report["ok"] is False
    assert report["journal_mismatches"] == ["alice"]
    assert report["invariant_failures"] == ["debits_posted_ne_credits_posted"]
    assert (report["debits_posted"], report["credits_posted"]) == (5_000_000, 9_000_000)
