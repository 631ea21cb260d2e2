"""The ledger's background loops and housekeeping on SQLite and PostgreSQL (spec §8.1, §15):
the observer beats while eecp runs and records its stop; the settler settles a period once it
is due, on trio's clock; old idempotency keys are pruned, and a pruned key is a new request."""

from __future__ import annotations

import trio
import trio.testing

from eecp.core.clock import FixedClock, TrioClock
from eecp.ledger.answers import LedgerSettings
from eecp.ledger.availability import Policy
from eecp.ledger.jobs import serve_observer, serve_settler
from tests.databases import Backend
from tests.ledger.dbkit import HOUR, P0, T0, body, error, ok, open_ledger, setup_node


async def test_the_observer_beats_and_the_settler_settles_on_their_own(
        backend: Backend, autojump_clock: trio.testing.MockClock) -> None:
    # the store works in threads, which trio's clock does not wait for: jump only once the
    # loop has been idle a little while (the database's calls take a millisecond or two)
    autojump_clock.autojump_threshold = 0.02
    clock = TrioClock(start_wall=T0)
    settings = LedgerSettings(policy=Policy(beat_sec=60), settle_interval_sec=300)
    async with open_ledger(backend, clock, settings) as (ledger, store):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_observer, ledger)
            await setup_node(ledger)
            ok(await ledger.purchase("admin", body(account_id="alice", amount_usd="5"), ["k"]))
            ok(await ledger.report_usage("uptime", body(
                account_id="alice", node_id="n1", period=P0, vcpu_hours="1", app_name="app")))
            await nursery.start(serve_settler, ledger)
            await trio.sleep(T0 + HOUR + 300 - clock.now())
            assert ok(await ledger.settlements(P0, "n1"))["status"] == "open"  # not yet due
            await trio.sleep(T0 + HOUR + 900 - clock.now())
            stopped = clock.now()
            nursery.cancel_scope.cancel()
        settled = ok(await ledger.settlements(P0, "n1"))
        assert (settled["status"], settled["eligible"], settled["settled_by"]) == (
            "settled", True, "settler")
        row = await store.snapshot(lambda tx: tx.nodes.observer(ledger.instance_id))
    assert row is not None and row.started_at == T0
    assert row.stopped_at is not None and stopped <= row.stopped_at <= stopped + 5
    assert row.stopped_at - row.last_beat_at < 1  # the stop ended its coverage at once


async def test_old_keys_are_pruned_and_a_pruned_key_is_a_new_request(backend: Backend) -> None:
    clock = FixedClock(T0)
    async with open_ledger(backend, clock) as (ledger, _):
        ok(await ledger.purchase("admin", body(account_id="alice", amount_usd="1"), ["old"]))
        clock.advance(29 * 86_400)
        ok(await ledger.purchase("admin", body(account_id="alice", amount_usd="1"), ["young"]))
        assert error(await ledger.purchase("admin", body(account_id="alice", amount_usd="2"),
                                           ["old"])) == (409, "idempotency_key_reused")
        clock.advance(2 * 86_400)
        assert await ledger.prune_keys() == 1
        again = await ledger.purchase("admin", body(account_id="alice", amount_usd="2"),
                                      ["old"])
        assert ok(again)["balance_micros"] == 4_000_000 and not again.replayed
        assert (await ledger.purchase("admin", body(account_id="alice", amount_usd="1"),
                                      ["young"])).replayed
