"""The ledger's background loops (spec §15), run in the serving process's nursery when the
ledger is on: the observer heartbeat, and the settler (with the stake releaser and the key
pruner).

Each loop is a plain trio function that runs until cancelled. A database failure is logged and
the loop goes on at its next tick (every step is idempotent, so nothing is lost by skipping
one). The wall time the ledger judges by is its injected clock; the loops wait on trio's clock,
so a test's ``MockClock`` (with :class:`eecp.core.clock.TrioClock`) drives both.
"""

from __future__ import annotations

import logging

import trio

from eecp.core.errors import StoreError
from eecp.ledger.service import Ledger

log = logging.getLogger("eecp.ledger")

#: how often the settler's pass also prunes expired idempotency keys
PRUNE_EVERY_SEC = 3600.0


async def serve_observer(ledger: Ledger, *,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Beat every ``EE_OBSERVER_BEAT_SEC``; on the way out (a graceful stop) record the stop,
    so that this instance's coverage ends now and not two beats later. The first beat is
    written before ``started`` returns: sessions accepted afterwards are covered."""
    beat = ledger.settings.policy.beat_sec
    await _beat(ledger)
    task_status.started()
    try:
        while True:
            await trio.sleep(beat)
            await _beat(ledger)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            try:
                await ledger.observer_stop()
            except StoreError as exc:
                log.warning("observer: the stop was not recorded (%s): coverage ends two "
                            "beats after the last one", exc)


async def _beat(ledger: Ledger) -> None:
    try:
        await ledger.observer_heartbeat()
    except StoreError as exc:
        log.warning("observer: heartbeat failed (%s)", exc)


async def serve_settler(ledger: Ledger, *,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """A settler pass every ``settle_interval_sec``, then the stake releaser's pass (matured
    unstakes, §10.3; its own lease ``stake``), and the key pruner hourly."""
    interval = ledger.settings.settle_interval_sec
    pruned_at = -PRUNE_EVERY_SEC
    task_status.started()
    while True:
        try:
            done = await ledger.settle_due()
            if done.errors:
                log.error("settler: %d node-periods could not be settled", done.errors)
            await ledger.release_unstakes()
            if trio.current_time() - pruned_at >= PRUNE_EVERY_SEC:
                await ledger.prune_keys()
                pruned_at = trio.current_time()
        except StoreError as exc:
            log.warning("settler: the store failed (%s); next pass in %g s", exc, interval)
        await trio.sleep(interval)
