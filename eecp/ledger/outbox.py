"""The sessions' availability events on their way to the store (spec §8.2, §15 "event outbox").

A session must never wait on the database to go on serving its agent, and an event must never
vanish unnoticed: eligibility is computed from these records, so a missing ``down`` would pay a
period that failed. :class:`EventOutbox` reconciles the two. :meth:`EventOutbox.record` is
synchronous and O(1): it appends to a bounded queue (:data:`CAPACITY` events). One task
(:meth:`EventOutbox.serve`) writes the queue in batches, oldest first, each batch one unit of
work, retried with backoff while the store fails; an event leaves the queue only once it
committed.

When the queue is full the event is dropped, counted (``on_drop``, the metric
``eecp_availability_events_dropped_total``) and logged, and the outbox is **lost** for good: the
observer of this process stops beating (:func:`eecp.ledger.jobs.serve_observer` reads
:attr:`EventOutbox.lost`), so coverage ends two beats after its last beat and what followed is
an observer gap, which holds the affected periods for the owner instead of judging them on
incomplete records. Coverage of an instance is one interval, so this instance cannot resume:
a restart (a new instance id) does. At a graceful stop the queue is flushed; only when that
succeeds does the observer record its stop (:attr:`EventOutbox.drained`), else its coverage
ends with its last beat as after a crash.

:class:`SessionWriter` is what the sessions hold (:class:`eecp.agents.ledger_hooks.SessionLedger`).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

import trio

from eecp.core.errors import StoreError
from eecp.ledger.observe import MAX_FIELD, SessionEvent
from eecp.ledger.service import Ledger

log = logging.getLogger("eecp.ledger")

#: events held for the store at most (a few hours of a busy process's events)
CAPACITY = 10_000
#: events written per unit of work
BATCH = 200
#: the first and the longest wait before writing again after the store failed
RETRY_MIN_SEC = 0.5
RETRY_MAX_SEC = 30.0


class EventOutbox:
    """A bounded queue of availability events and its writer (see the module docstring)."""

    def __init__(self, ledger: Ledger, *, capacity: int = CAPACITY,
                 on_drop: Callable[[int], None] | None = None) -> None:
        self._ledger = ledger
        self._capacity = capacity
        self._on_drop = on_drop
        self._events: deque[SessionEvent] = deque()
        self._queued = trio.Event()
        self._writing = trio.Lock()
        self._closed = False
        #: events dropped (the queue was full, or could not be flushed at the stop)
        self.dropped = 0

    @property
    def pending(self) -> int:
        """Events not written yet."""
        return len(self._events)

    @property
    def lost(self) -> bool:
        """Some event was dropped: this instance's records are incomplete from then on."""
        return self.dropped > 0

    @property
    def drained(self) -> bool:
        """Everything this instance recorded is in the store."""
        return not self.lost and not self._events

    def record(self, event: SessionEvent) -> None:
        """Queue ``event``; returns at once (a full queue drops it, see the module docstring)."""
        if not _storable(event):  # a bug of the caller's: one bad event must not jam the rest
            log.error("ledger: an availability event the store cannot take: %r", event)
            self._drop(1)
            return
        if self._closed or len(self._events) >= self._capacity:
            self._drop(1)
            return
        self._events.append(event)
        self._queued.set()

    def _drop(self, count: int) -> None:
        if not self.lost:
            log.error("ledger: availability events lost (%d could not be written or queued): "
                      "this instance stops beating, its later periods are held as observer "
                      "gaps; restart it once the store is healthy", count)
        self.dropped += count
        if self._on_drop is not None:
            self._on_drop(count)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        """Write queued events until cancelled."""
        task_status.started()
        wait = RETRY_MIN_SEC
        while True:
            if not self._events:
                self._queued = trio.Event()
                await self._queued.wait()
            if await self._write_batch():
                wait = RETRY_MIN_SEC
            else:
                await trio.sleep(wait)
                wait = min(2 * wait, RETRY_MAX_SEC)

    async def _write_batch(self) -> bool:
        """Write the oldest events (one unit of work); False when the store failed. One batch
        at a time: a flush waits for the writer's batch in flight (whose thread cannot be
        cancelled), so no event is written twice."""
        async with self._writing:
            batch = [self._events[i] for i in range(min(BATCH, len(self._events)))]
            if not batch:
                return True
            try:
                await self._ledger.record_availability(batch)
            except StoreError as exc:
                log.warning("ledger: %d availability events wait for the store (%s)",
                            len(self._events), exc)
                return False
            # record() only appends, so the batch is still at the front, unless close() gave
            # the queue up while this write was in flight (it counted them dropped)
            for event in batch:
                if self._events and self._events[0] is event:
                    self._events.popleft()
            return True

    async def flush(self) -> bool:
        """Write everything queued now (at a graceful stop; the caller bounds the time, and
        :meth:`close` then counts what is left as dropped): True when all of it committed."""
        while self._events:
            if not await self._write_batch():
                return False
        return True

    def close(self) -> None:
        """The process is stopping: what is still queued is given up, and so is anything
        recorded from now on, each counted as dropped (so :attr:`drained` tells the truth)."""
        self._closed = True
        if self._events:
            self._drop(len(self._events))
            self._events.clear()


def _storable(event: SessionEvent) -> bool:
    """What :func:`eecp.ledger.observe.record_events` accepts."""
    fields = (event.agent_id, event.app_name, event.session_id, event.reason)
    return (event.kind in ("up", "down", "release") and bool(event.agent_id)
            and all(len(f) <= MAX_FIELD for f in fields))


class SessionWriter:
    """What a session holds when the ledger is on: events go to the outbox, claims and fraud
    signals to the ledger (a failure is logged: the next attestation refreshes the claim; a
    lost suspension leaves its audit entry for the owner)."""

    def __init__(self, ledger: Ledger, outbox: EventOutbox) -> None:
        self._ledger = ledger
        self._outbox = outbox

    def record(self, event: SessionEvent) -> None:
        self._outbox.record(event)

    async def claim_platform(self, ppid: str, node_id: str, agent_id: str,
                             audit_id: int | None) -> None:
        try:
            await self._ledger.claim_platform(ppid, node_id, agent_id, audit_id)
        except StoreError as exc:
            log.warning("ledger: the claim of platform %s for node %s was not recorded (%s)",
                        ppid, node_id, exc)

    async def fraud_signal(self, ppid: str, audit_id: int, reason: str) -> None:
        try:
            await self._ledger.fraud_signal(ppid, audit_id, reason)
        except StoreError as exc:
            # the audit entry stays: the owner can still ban with it (POST /v1/nodes/{id}/fraud)
            log.error("ledger: fraud signal %s (audit %s) on platform %s did not suspend its "
                      "node: the store failed (%s)", reason, audit_id, ppid, exc)
