"""The ledger's background loops (spec §15), run in the serving process's nursery when the
ledger is on: the observer heartbeat, the settler (with the stake releaser and the key
pruner), the metrics' counts with the periodic invariant check, and the proxy's node views.

Each loop is a plain trio function that runs until cancelled. A database failure is logged and
the loop goes on at its next tick (every step is idempotent, so nothing is lost by skipping
one). The wall time the ledger judges by is its injected clock; the loops wait on trio's clock,
so a test's ``MockClock`` (with :class:`eecp.core.clock.TrioClock`) drives both.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import trio

from eecp.core.errors import StoreError
from eecp.core.metrics import LedgerCounts, LedgerMetrics
from eecp.ledger.outbox import EventOutbox
from eecp.ledger.routing import NodeView
from eecp.ledger.service import STALE_EVERY_SEC, Ledger

log = logging.getLogger("eecp.ledger")

#: how often the settler's pass also prunes expired idempotency keys
PRUNE_EVERY_SEC = 3600.0
#: how often the metrics' counts are refreshed, and the invariants checked (§15)
COUNT_EVERY_SEC = 60.0
CHECK_EVERY_SEC = 600.0
#: how often the node views are read again when nothing in this process changed them (§12:
#: a ban or a suspension made by another process routes within this)
NODE_VIEWS_EVERY_SEC = 30.0


async def serve_observer(ledger: Ledger, *, outbox: EventOutbox | None = None,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Beat every ``EE_OBSERVER_BEAT_SEC``; on the way out (a graceful stop) record the stop,
    so that this instance's coverage ends now and not two beats later. The first beat is
    written before ``started`` returns: sessions accepted afterwards are covered.

    With the sessions' ``outbox``: no beat once it has lost an event, and the stop is recorded
    only when everything it held was written (:mod:`eecp.ledger.outbox`), so an instance whose
    records are incomplete never claims to have watched."""
    beat = ledger.settings.policy.beat_sec
    await _beat(ledger)
    task_status.started()
    # beats on a fixed schedule: a slow store delays one beat, never the ones after it
    due = trio.current_time()
    try:
        while outbox is None or not outbox.lost:
            due = max(due + beat, trio.current_time())
            await trio.sleep_until(due)
            if outbox is None or not outbox.lost:
                await _beat(ledger)
        log.error("observer: no more beats (availability events were lost)")
        await trio.sleep_forever()
    finally:
        if outbox is None or outbox.drained:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                try:
                    await ledger.observer_stop()
                except StoreError as exc:
                    log.warning("observer: the stop was not recorded (%s): coverage ends two "
                                "beats after the last one", exc)
        else:
            log.warning("observer: %d availability events were not written: the stop is not "
                        "recorded, coverage ends two beats after the last beat",
                        outbox.pending + outbox.dropped)


async def _beat(ledger: Ledger) -> None:
    try:
        await ledger.observer_heartbeat()
    except StoreError as exc:
        log.warning("observer: heartbeat failed (%s)", exc)


async def serve_settler(ledger: Ledger, *,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """A settler pass every ``settle_interval_sec``, then the stake releaser's pass (matured
    unstakes, §10.3; its own lease ``stake``), the stale-agent releaser every 10 minutes (its
    lease ``stale``), and the key pruner hourly. Stopped, it gives its
    lease up, so that the instance that comes next settles at once."""
    interval = ledger.settings.settle_interval_sec
    pruned_at = -PRUNE_EVERY_SEC
    stale_at = -STALE_EVERY_SEC
    task_status.started()
    due = trio.current_time()  # a fixed schedule: a slow pass does not delay the next ones
    try:
        while True:
            try:
                done = await ledger.settle_due()
                if done.errors:
                    log.error("settler: %d node-periods could not be settled", done.errors)
                await ledger.release_unstakes()
                if trio.current_time() - stale_at >= STALE_EVERY_SEC:
                    released = await ledger.release_stale()
                    if released:
                        log.info("settler: agents released: %s", released)
                    stale_at = trio.current_time()
                if trio.current_time() - pruned_at >= PRUNE_EVERY_SEC:
                    await ledger.prune_keys()
                    pruned_at = trio.current_time()
            except StoreError as exc:
                log.warning("settler: the store failed (%s); next pass in %g s", exc, interval)
            due = max(due + interval, trio.current_time())
            await trio.sleep_until(due)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            try:
                await ledger.release_settler()
            except StoreError as exc:
                log.warning("settler: the lease was not given up (%s): it expires", exc)


async def serve_counts(ledger: Ledger, metrics: LedgerMetrics, *,
                       task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Refresh the metrics' counts every :data:`COUNT_EVERY_SEC` and check the invariants of
    §3.3 every :data:`CHECK_EVERY_SEC` (``eecp_ledger_invariant_ok``; an error log when one
    fails)."""
    checked_at = -CHECK_EVERY_SEC
    ok: bool | None = None
    task_status.started()
    due = trio.current_time()
    while True:
        try:
            if trio.current_time() - checked_at >= CHECK_EVERY_SEC:
                answer = await ledger.check()
                if answer.status == 200:
                    ok = bool(answer.json()["ok"])
                    checked_at = trio.current_time()
                    if not ok:
                        log.error("ledger check failed: %s", answer.body[:2000].decode())
            counts = await ledger.counts()
            stake = await ledger.stake_stats()
            metrics.counts = LedgerCounts(
                counts.transfers_by_code, counts.settled_by_outcome, counts.held_by_reason, ok,
                slashes_by_kind=stake.slashes_total, slashes_skipped=stake.slashes_skipped_total,
                stake_posted_micros=stake.stake_posted_micros,
                unstake_pending_micros=stake.unstake_pending_micros,
                nodes_by_status=stake.nodes_by_status,
                nodes_below_minimum=stake.nodes_below_minimum)
        except StoreError as exc:
            log.warning("ledger metrics: the store failed (%s)", exc)
        due = max(due + COUNT_EVERY_SEC, trio.current_time())
        await trio.sleep_until(due)


async def serve_node_views(ledger: Ledger, apply: Callable[[Mapping[str, NodeView]], None], *,
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                           ) -> None:
    """Keep the proxy's node views (:meth:`Ledger.node_views`) current: read once before
    ``started`` (the first request is routed by them), again at once when this process changed
    a node (:meth:`Ledger.add_node_listener`), and every :data:`NODE_VIEWS_EVERY_SEC` for the
    changes of other processes and the settler's new effective prices. ``apply`` gets each
    reading; a failed read keeps the previous one."""
    changed = trio.Event()

    def wake() -> None:
        changed.set()

    ledger.add_node_listener(wake)
    try:
        await _read_views(ledger, apply)
        task_status.started()
        while True:
            with trio.move_on_after(NODE_VIEWS_EVERY_SEC):
                await changed.wait()
            changed = trio.Event()  # before the read: a change during it wakes the next one
            await _read_views(ledger, apply)
    finally:
        ledger.remove_node_listener(wake)


async def _read_views(ledger: Ledger, apply: Callable[[Mapping[str, NodeView]], None]) -> None:
    try:
        views = await ledger.node_views()
    except StoreError as exc:
        log.warning("node views: the store failed (%s); routing keeps the last ones", exc)
        return
    apply(views)
