"""Helpers for the ledger's tests over the real store (SQLite and PostgreSQL, through the
``backend`` fixture of :mod:`tests.databases`): a ledger on a fixed clock, request bodies, a
node set up the way an operator would (registered, funded, staked, its platform claimed and
confirmed, an agent up on it), and a trio loop in a thread for hypothesis' state machines."""

from __future__ import annotations

import json
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import trio

from eecp.core.blocking import Workers
from eecp.core.clock import Clock, FixedClock
from eecp.core.config import Config
from eecp.ledger.answers import Answer, LedgerSettings
from eecp.ledger.observe import SessionEvent
from eecp.ledger.service import Ledger
from eecp.store.store import Store, open_store
from tests.databases import Backend, fresh_schema

T = TypeVar("T")

#: 2026-01-01T00:00:00Z, a period boundary of every grid
T0 = 1_767_225_600
HOUR = 3600
P0 = "2026-01-01T00Z"


def body(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def period_id(index: int) -> str:
    """The id of the hour ``index`` hours after T0 (within the first day)."""
    return f"2026-01-01T{index:02d}Z"


def ppid_of(n: int) -> str:
    return f"{n:032x}"


@asynccontextmanager
async def open_ledger(backend: Backend, clock: Clock,
                      settings: LedgerSettings | None = None, *, instance_id: str = "i-1",
                      workers: int = 4) -> AsyncIterator[tuple[Ledger, Store]]:
    async with open_store(backend.config, Workers(store=workers)) as store:
        yield Ledger(store, settings, clock, instance_id=instance_id), store


async def setup_node(ledger: Ledger, node_id: str = "n1", *, price: str = "0.5",
                     capacity: int = 8, stake: str | None = "4", ppid: str | None = None,
                     agent: str | None = "agent-1", app: str = "app",
                     at: float | None = None, tier: str | None = None) -> str:
    """Register ``node_id`` (in ``tier``, default economy); fund and stake it (``stake``);
    claim and confirm ``ppid`` and bring ``agent`` up on it at ``at``. Returns the node's
    token."""
    fields: dict[str, object] = {"stake_tier": tier} if tier is not None else {}
    created = await ledger.register_node("admin", body(
        node_id=node_id, price_usd_per_vcpu_hour=price, capacity_vcpus=capacity, **fields))
    assert created.status == 200, created.body
    token = created.json()["node_token"]
    if stake is not None:
        funded = await ledger.purchase("admin", body(account_id=f"node:{node_id}",
                                                     amount_usd=stake), [f"fund-{node_id}"])
        assert funded.status == 200, funded.body
        staked = await ledger.register_node("admin", body(
            node_id=node_id, stake_amount_usd=stake, allow_update=True))
        assert staked.status == 200, staked.body
    if agent is not None:
        platform = ppid or ppid_of(abs(hash(node_id)) % 10**12)
        assert await ledger.claim_platform(platform, node_id, agent, None)
        confirmed = await ledger.confirm_platform("admin", node_id, body(ppid=platform))
        assert confirmed.status == 200, confirmed.body
        when = at if at is not None else ledger._clock.now()
        await ledger.record_availability([SessionEvent(when, agent, app, f"s-{agent}", "up",
                                                       "attested", platform)])
    return str(token)


def ok(answer: Answer, status: int = 200) -> Any:
    assert answer.status == status, (answer.status, answer.body)
    return answer.json()


def error(answer: Answer) -> tuple[int, str]:
    return answer.status, str(answer.json()["error"])


class LedgerHost:
    """One trio loop in a thread, holding an open store and a ledger, for synchronous callers
    (hypothesis' rule-based machines): :meth:`call` runs an async function on it."""

    def __init__(self, backend: Backend, clock: FixedClock,
                 settings: LedgerSettings | None = None) -> None:
        self._backend, self._clock, self._settings = backend, clock, settings
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self.ledger: Ledger | None = None
        self.store: Store | None = None

    @contextmanager
    def running(self) -> Iterator[LedgerHost]:
        ready: queue.Queue[BaseException | None] = queue.Queue()

        async def main() -> None:
            try:
                async with open_ledger(self._backend, self._clock, self._settings) as (
                        ledger, store):
                    self.ledger, self.store = ledger, store
                    self._stop = trio.Event()
                    self._token = trio.lowlevel.current_trio_token()
                    ready.put(None)
                    await self._stop.wait()
            except BaseException as exc:
                ready.put(exc)
                raise

        thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
        thread.start()
        failure = ready.get(timeout=60)
        if failure is not None:
            raise failure
        try:
            yield self
        finally:
            assert self._stop is not None
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            thread.join(timeout=60)

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        assert self._token is not None
        return trio.from_thread.run(fn, *args, trio_token=self._token)


@contextmanager
def fresh_database(base: Backend, tmp: Path, pg_url: str | None) -> Iterator[Backend]:
    """A new empty database of ``base``'s kind (hypothesis runs one per example): a new
    SQLite file, or a new schema on the PostgreSQL server ``pg_url``, dropped afterwards."""
    name = uuid.uuid4().hex[:12]
    if base.name == "sqlite":
        yield Backend("sqlite", Config(db_path=tmp / f"{name}.db"))
        return
    assert pg_url is not None
    with fresh_schema(pg_url, "eecp_hyp") as scoped:
        yield Backend("postgres", Config(db_url=scoped), raw_url=scoped)
