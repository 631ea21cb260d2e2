"""Crashes in the middle of a settlement, on SQLite and PostgreSQL (spec §17 item 5): an
exception raised inside the unit of work after some of its writes, and a process killed with
SIGKILL inside the transaction. Either way nothing is half-applied: the invariants hold, every
hold is still held, and a re-run settles the node-period with exactly the totals (and the very
answer) of a run that never crashed."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from eecp.core.clock import FixedClock
from eecp.core.config import Config
from eecp.ledger.answers import LedgerSettings
from eecp.ledger.service import Ledger
from eecp.store import ledger_repo
from eecp.store.ledger_records import TransferRow
from eecp.store.store import Store
from tests.databases import Backend
from tests.ledger.dbkit import HOUR, P0, T0, body, ok, open_ledger, setup_node

SETTINGS = LedgerSettings(fee_bps=1000)
FINALIZE_AT = T0 + HOUR + 600
USERS = ("alice", "bob", "carol", "dave")
ROOT = Path(__file__).resolve().parents[2]


class Crash(Exception):
    pass


async def prepare(ledger: Ledger, clock: FixedClock) -> None:
    """A node with its agent up all hour, four users each holding usage in P0 (one of them for
    an app that never ran, so the settlement posts, fees and voids)."""
    await ledger.observer_heartbeat()
    await setup_node(ledger, ppid=f"{5:032x}")
    for n, user in enumerate(USERS):
        ok(await ledger.purchase("admin", body(account_id=user, amount_usd="10"), [user]))
        ok(await ledger.report_usage("uptime", body(
            account_id=user, node_id="n1", period=P0, vcpu_hours=str((n + 1) / 2),
            app_name="app" if user != "dave" else "ghost")))
    clock.advance(FINALIZE_AT - clock.now())
    await ledger.observer_heartbeat()


@dataclass
class State:
    balances: dict[str, int]
    held: int
    journal_rows: int


async def state(ledger: Ledger, store: Store) -> State:
    check = ok(await ledger.check())
    assert check["ok"] is True, check
    accounts = [*USERS, "node:n1", "fee:platform", "mint:usd"]
    balances = {a: ok(await ledger.balance("admin", a))["balance_micros"] for a in accounts}
    held = await store.snapshot(lambda tx: sum(1 for u in tx.ledger.usages("n1", T0)
                                               if u.status == "held"))
    rows = await store.snapshot(lambda tx: len(tx.ledger.journal()))
    return State(balances, held, rows)


async def control_answer(tmp_path: Path) -> bytes:
    """The answer of the same settlement without any crash (a fresh SQLite database; the
    answer names no ids, and the clock is the same)."""
    clock = FixedClock(T0)
    control = Backend("sqlite", Config(db_path=tmp_path / "control.db"))
    async with open_ledger(control, clock, SETTINGS) as (ledger, _):
        await prepare(ledger, clock)
        answer = await ledger.finalize("admin", P0, body(node_id="n1"))
    assert ok(answer)["status"] == "settled"
    return answer.body


async def test_an_exception_inside_the_settlement_leaves_nothing_behind(
        backend: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FixedClock(T0)
    async with open_ledger(backend, clock, SETTINGS) as (ledger, store):
        await prepare(ledger, clock)
        before = await state(ledger, store)
        assert before.held == 4
        for after in (0, 1, 2, 5):  # journal rows written before the failure
            written = {"n": 0}
            original = ledger_repo.LedgerTx.insert_transfer

            def failing(tx: ledger_repo.LedgerTx, row: TransferRow, after: int = after,
                        written: dict[str, int] = written,
                        original: Callable[..., int] = original) -> int:
                if written["n"] == after:
                    raise Crash(after)
                written["n"] += 1
                return original(tx, row)

            monkeypatch.setattr(ledger_repo.LedgerTx, "insert_transfer", failing)
            with pytest.raises(Crash):
                await ledger.finalize("admin", P0, body(node_id="n1"))
            monkeypatch.undo()
            assert await state(ledger, store) == before
            assert ok(await ledger.settlements(P0, "n1"))["status"] == "open"
        answer = await ledger.finalize("admin", P0, body(node_id="n1"))
    assert answer.body == await control_answer(tmp_path)
    doc = answer.json()
    assert (doc["settled"], doc["failed"], doc["fee_micros"]) == (3, 1, 150_000)


async def test_a_process_killed_inside_the_settlement_leaves_nothing_behind(
        backend: Backend, tmp_path: Path) -> None:
    clock = FixedClock(T0)
    async with open_ledger(backend, clock, SETTINGS) as (ledger, store):
        await prepare(ledger, clock)
        before = await state(ledger, store)
    spec = {"now": FINALIZE_AT, "fee_bps": SETTINGS.fee_bps, "period": P0, "node_id": "n1",
            "db_path": str(backend.config.db_path) if backend.name == "sqlite" else None,
            "db_url": backend.config.db_url}
    child = await trio.run_process(
        [sys.executable, "-m", "tests.ledger.crash_child", json.dumps(spec)], cwd=ROOT,
        check=False, capture_stderr=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
    async with open_ledger(backend, clock, SETTINGS) as (ledger, store):
        assert await state(ledger, store) == before  # nothing of the dead transaction
        assert ok(await ledger.settlements(P0, "n1"))["status"] == "open"
        answer = await ledger.finalize("admin", P0, body(node_id="n1"))
        assert ok(await ledger.check())["ok"] is True
    assert answer.body == await control_answer(tmp_path)
