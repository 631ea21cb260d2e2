"""The sessions' event outbox (spec §8.2): a session never waits on the store, an event is
never lost unnoticed. A full outbox drops (and counts) and the observer stops beating for good;
a failing store is waited out; a stop flushes what is queued and records the observer's stop
only when nothing was lost."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, cast

import pytest
import trio
import trio.testing

from eecp.core.clock import TrioClock
from eecp.core.errors import StoreError
from eecp.core.metrics import Metrics, StateGauges
from eecp.ledger.answers import LedgerSettings
from eecp.ledger.availability import Policy
from eecp.ledger.jobs import serve_observer
from eecp.ledger.observe import SessionEvent
from eecp.ledger.outbox import EventOutbox, SessionWriter
from eecp.ledger.service import Ledger
from tests.databases import Backend
from tests.ledger.dbkit import T0, open_ledger


def event(n: int, kind: str = "up", reason: str = "attested") -> SessionEvent:
    return SessionEvent(T0 + n, f"agent-{n}", "app", "s-1", kind, reason)  # type: ignore[arg-type]


class FlakyLedger:
    """Stands in for the ledger's writer: fails ``failures`` times, takes ``delay`` seconds."""

    def __init__(self, failures: int = 0, delay: float = 0.0) -> None:
        self.failures = failures
        self.delay = delay
        self.written: list[SessionEvent] = []
        self.calls = 0

    async def record_availability(self, events: Sequence[SessionEvent]) -> None:
        self.calls += 1
        await trio.sleep(self.delay)
        if self.failures:
            self.failures -= 1
            raise StoreError("store_unavailable", "down")
        self.written.extend(events)


def outbox_over(fake: FlakyLedger, **kwargs: Any) -> EventOutbox:
    return EventOutbox(cast(Ledger, fake), **kwargs)


async def test_events_are_written_in_order_and_a_failing_store_is_waited_out(
        autojump_clock: trio.testing.MockClock) -> None:
    fake = FlakyLedger(failures=3)
    outbox = outbox_over(fake)
    async with trio.open_nursery() as nursery:
        await nursery.start(outbox.serve)
        for n in range(450):  # three batches
            outbox.record(event(n))
        assert outbox.pending == 450  # record() returned at once, nothing written yet
        await trio.sleep(60)
        nursery.cancel_scope.cancel()
    assert fake.written == [event(n) for n in range(450)]
    assert fake.calls == 3 + 3 and outbox.drained and outbox.dropped == 0


async def test_a_full_outbox_drops_counts_and_stops_the_observer_for_good(
        sqlite_backend: Backend, autojump_clock: trio.testing.MockClock) -> None:
    autojump_clock.autojump_threshold = 0.02  # (the store's calls run in threads)
    metrics = Metrics(lambda: StateGauges(0, 0, {}), lambda _: True).enable_ledger()
    clock = TrioClock(start_wall=T0)
    settings = LedgerSettings(policy=Policy(beat_sec=10))
    async with open_ledger(sqlite_backend, clock, settings) as (ledger, store):
        outbox = EventOutbox(ledger, capacity=3, on_drop=metrics.events_dropped.inc)
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve_observer, ledger, outbox=outbox))
            await trio.sleep(25)
            for n in range(5):  # the writer is not running: the queue fills
                outbox.record(event(n))
            assert (outbox.pending, outbox.dropped, outbox.lost) == (3, 2, True)
            lost_at = clock.now()
            await trio.sleep(100)
            nursery.cancel_scope.cancel()
        row = await store.snapshot(lambda tx: tx.nodes.observer(ledger.instance_id))
    assert metrics.events_dropped._value.get() == 2  # eecp_availability_events_dropped_total
    assert row is not None and row.stopped_at is None  # no stop: coverage ends with the beats
    assert lost_at - 10 <= row.last_beat_at <= lost_at + 10  # no beat after the loss


@pytest.mark.parametrize("flushed", [True, False])
async def test_the_stop_is_recorded_only_when_every_event_reached_the_store(
        sqlite_backend: Backend, autojump_clock: trio.testing.MockClock, flushed: bool) -> None:
    autojump_clock.autojump_threshold = 0.02
    clock = TrioClock(start_wall=T0)
    async with open_ledger(sqlite_backend, clock) as (ledger, store):
        outbox = EventOutbox(ledger)
        writer = SessionWriter(ledger, outbox)
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve_observer, ledger, outbox=outbox))
            writer.record(event(1))
            writer.record(event(2, "down", "disconnected:peer_closed"))
            if flushed:
                assert await outbox.flush()
            outbox.close()  # (the stop: what is left is counted lost)
            writer.record(event(3, "down", "observer_shutdown"))  # too late: counted too
            nursery.cancel_scope.cancel()
        row = await store.snapshot(lambda tx: tx.nodes.observer(ledger.instance_id))
        written = await store.snapshot(lambda tx: tx.nodes.last_event("agent-2"))
    assert outbox.dropped == (1 if flushed else 3)
    assert row is not None and row.stopped_at is None  # something was lost: no stop
    assert (written is not None) is flushed


async def test_a_clean_stop_records_the_observers_stop(
        sqlite_backend: Backend, autojump_clock: trio.testing.MockClock) -> None:
    autojump_clock.autojump_threshold = 0.02
    clock = TrioClock(start_wall=T0)
    async with open_ledger(sqlite_backend, clock) as (ledger, store):
        outbox = EventOutbox(ledger)
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve_observer, ledger, outbox=outbox))
            outbox.record(event(1))
            assert await outbox.flush()
            outbox.close()
            nursery.cancel_scope.cancel()
        row = await store.snapshot(lambda tx: tx.nodes.observer(ledger.instance_id))
    assert outbox.drained and row is not None and row.stopped_at is not None


async def test_a_flush_during_a_write_in_flight_writes_nothing_twice(
        autojump_clock: trio.testing.MockClock) -> None:
    fake = FlakyLedger(delay=1.0)
    outbox = outbox_over(fake)
    async with trio.open_nursery() as nursery:
        await nursery.start(outbox.serve)
        outbox.record(event(1))
        await trio.sleep(0.5)  # the writer's batch is in flight
        outbox.record(event(2))
        assert await outbox.flush()
        nursery.cancel_scope.cancel()
    assert fake.written == [event(1), event(2)]


async def test_an_event_the_store_cannot_take_is_dropped_alone(
        autojump_clock: trio.testing.MockClock) -> None:
    fake = FlakyLedger()
    outbox = outbox_over(fake)
    outbox.record(event(1))
    outbox.record(event(2, reason="x" * 256))  # a bug's: one bad event must not jam the rest
    outbox.record(event(3))
    assert await outbox.flush()
    assert fake.written == [event(1), event(3)] and outbox.dropped == 1


async def test_a_close_while_a_write_is_in_flight_leaves_the_writer_whole(
        autojump_clock: trio.testing.MockClock) -> None:
    # a stop's flush ran out of time with the writer's batch in flight: close() gives the
    # queue up (counted), and the batch's late success must not take other events' places
    fake = FlakyLedger(delay=5)
    outbox = outbox_over(fake)
    async with trio.open_nursery() as nursery:
        await nursery.start(outbox.serve)
        for n in range(3):
            outbox.record(event(n))
        await trio.sleep(1)  # the write is in flight
        outbox.close()
        assert outbox.dropped == 3 and outbox.pending == 0
        await trio.sleep(10)  # the write returns: no IndexError, nothing counted twice
        nursery.cancel_scope.cancel()
    assert fake.written == [event(n) for n in range(3)]
    assert outbox.dropped == 3 and outbox.pending == 0
