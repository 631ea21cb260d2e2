"""Concurrent calls on one database (spec §17 item 4), on PostgreSQL (READ COMMITTED, row
locks in the documented order) and on SQLite (whole transactions serialized): two stores stand
for two eecp processes. Identical purchases racing with one key make one transfer; random
transfers over shared keys take effect once per key; usage reports racing the finalize of their
period either land in it or are refused, never held in a settled period; two settlers on one
backlog resolve each hold once."""

from __future__ import annotations

import random
from collections import Counter

import trio

from eecp.core.clock import FixedClock
from eecp.ledger.answers import Answer
from eecp.ledger.service import Ledger
from tests.databases import Backend
from tests.ledger.dbkit import HOUR, P0, T0, body, ok, open_ledger, period_id, setup_node


async def test_sixteen_identical_purchases_with_one_key_make_one_transfer(
        backend: Backend) -> None:
    async with open_ledger(backend, FixedClock(T0), workers=16) as (one, store), \
            open_ledger(backend, FixedClock(T0), workers=16) as (two, _):
        answers: list[Answer] = []

        async def buy(ledger: Ledger) -> None:
            answers.append(await ledger.purchase("admin", body(
                account_id="alice", amount_usd="5"), ["the-one-key"]))

        async with trio.open_nursery() as nursery:
            for n in range(16):
                nursery.start_soon(buy, one if n % 2 else two)
        assert {(a.status, a.body) for a in answers} == {(200, answers[0].body)}
        assert sorted(a.replayed for a in answers) == [False] + [True] * 15
        assert len(await store.snapshot(lambda tx: tx.ledger.journal())) == 1
        assert ok(await one.balance("admin", "alice"))["balance_micros"] == 5_000_000
        assert ok(await one.check())["ok"] is True


async def test_random_transfers_over_shared_keys_take_effect_once_per_key(
        backend: Backend) -> None:
    accounts = ["a", "b", "c", "d", "e"]
    async with open_ledger(backend, FixedClock(T0), workers=8) as (one, store), \
            open_ledger(backend, FixedClock(T0), workers=8) as (two, _):
        for account in accounts:
            ok(await one.purchase("admin", body(account_id=account, amount_usd="1"),
                                  [f"seed-{account}"]))
        rng = random.Random(15)
        plans = {f"k-{n}": (rng.sample(accounts, 2), rng.randint(1, 400_000)) for n in range(30)}
        results: dict[str, set[tuple[int, bytes]]] = {key: set() for key in plans}

        async def worker(ledger: Ledger, seed: int) -> None:
            pick = random.Random(seed)
            for _ in range(12):
                key = pick.choice(sorted(plans))
                (source, target), amount = plans[key]
                answer = await ledger.transfer("admin", body(
                    from_account=source, to_account=target, amount=f"0.{amount:06d}"), [key])
                results[key].add((answer.status, answer.body))

        async with trio.open_nursery() as nursery:
            for n in range(8):
                nursery.start_soon(worker, one if n % 2 else two, n)
        assert all(len(seen) <= 1 for seen in results.values())  # one answer per key
        journal = await store.snapshot(lambda tx: tx.ledger.journal())
        effects = Counter(t.idempotency_id for t in journal if t.code == "transfer")
        assert set(effects.values()) <= {1}
        assert ok(await one.check())["ok"] is True
        total = sum([ok(await one.balance("admin", a))["balance_micros"] for a in accounts])
        assert total == 5_000_000


async def test_usage_racing_the_finalize_of_its_period_lands_in_it_or_is_refused(
        backend: Backend) -> None:
    clock = FixedClock(T0)
    async with open_ledger(backend, clock, workers=8) as (one, store), \
            open_ledger(backend, clock, workers=8, instance_id="i-2") as (two, _):
        await one.observer_heartbeat()
        await setup_node(one, price="0.001", capacity=4096, stake="5")
        ok(await one.purchase("admin", body(account_id="alice", amount_usd="100"), ["seed"]))
        clock.advance(HOUR + 600)
        await one.observer_heartbeat()
        reports: dict[str, Answer] = {}
        finals: list[Answer] = []
        some_landed = trio.Event()

        async def report(ledger: Ledger, parity: int) -> None:
            # one report after another (each for its own app) until the finalize refuses one
            for n in range(parity, 4000, 2):
                app = f"app-{n}"
                reports[app] = answer = await ledger.report_usage("uptime", body(
                    account_id="alice", node_id="n1", period=P0, vcpu_hours="0.5",
                    app_name=app))
                if len(reports) >= 4:
                    some_landed.set()
                if answer.status != 200:
                    return

        async def finalize() -> None:
            await some_landed.wait()
            finals.append(await two.finalize("admin", P0, body(node_id="n1")))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(report, one, 0)
            nursery.start_soon(report, two, 1)
            nursery.start_soon(finalize)
        (final,) = finals
        settled = ok(final)
        landed = {a for a, answer in reports.items() if answer.status == 200}
        refused = {a for a, answer in reports.items() if answer.status != 200}
        assert len(landed) >= 4 and len(refused) == 2  # each reporter stopped at its refusal
        assert all(reports[a].json()["error"] == "period_finalized" for a in refused)
        # what landed was settled with the rest (the agent served "app" only: voided)
        assert settled["holds"] == settled["failed"] == len(landed)
        statuses = await store.snapshot(lambda tx: {u.app_key: u.status
                                                    for u in tx.ledger.usages("n1", T0)})
        assert statuses == dict.fromkeys(landed, "voided")
        check = ok(await one.check())
        assert check["ok"] is True and check["held_in_settled"] == 0


async def test_two_settlers_on_one_backlog_resolve_each_hold_once(backend: Backend) -> None:
    clock = FixedClock(T0)
    async with open_ledger(backend, clock, workers=4) as (one, store), \
            open_ledger(backend, clock, workers=4, instance_id="i-2") as (two, _):
        await one.observer_heartbeat()
        for n in range(3):
            await setup_node(one, f"n{n}", ppid=f"{n + 1:032x}", agent=f"agent-{n}",
                             capacity=16, stake="8")
        ok(await one.purchase("admin", body(account_id="alice", amount_usd="50"), ["seed"]))
        for hour in range(4):
            for n in range(3):
                ok(await one.report_usage("uptime", body(
                    account_id="alice", node_id=f"n{n}", period=period_id(hour),
                    vcpu_hours="1", app_name="app" if hour % 2 else "ghost")))
            clock.advance(HOUR)
            await one.observer_heartbeat()
        clock.advance(600)
        await one.observer_heartbeat()
        passes = []

        async def settle(ledger: Ledger) -> None:
            passes.append(await ledger.settle_due(use_lease=False))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(settle, one)
            nursery.start_soon(settle, two)
        assert all(p.errors == 0 for p in passes)
        assert sum(p.outcomes.get("settled", 0) for p in passes) >= 12  # each saw them all
        usages = await store.snapshot(lambda tx: [u for n in range(3) for h in range(4)
                                                  for u in tx.ledger.usages(f"n{n}",
                                                                            T0 + h * HOUR)])
        assert len(usages) == 12 and all(u.status != "held" for u in usages)
        assert Counter(u.status for u in usages) == {"posted": 6, "voided": 6}
        journal = await store.snapshot(lambda tx: tx.ledger.journal())
        resolutions = Counter(t.pending_id for t in journal if t.pending_id is not None)
        assert len(resolutions) == 12 and set(resolutions.values()) == {1}
        check = ok(await one.check())
        assert check["ok"] is True, check
