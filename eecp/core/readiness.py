"""Readiness: may a load balancer or a service manager send work to this process now?

``GET /ready`` answers from :class:`Readiness`, which :func:`eecp.service.serve` sets at one
point: :func:`run_readiness`, started in the root nursery once the store is open (migrated) and
every listener is bound, marks it ready and tells systemd ``READY=1``. It is not ready again
from the instant the shutdown event fires (checked at every request, so no task has to run
first: a load balancer polling /ready during the drain sees 503 at once), and systemd is told
``STOPPING=1``. Before serve() gets there, /ready cannot be reached at all, or says
``starting``.

The watchdog pings (:meth:`eecp.core.sdnotify.Notifier.serve_watchdog`) run in the same task,
until shutdown: systemd stops watching a unit once it has said ``STOPPING=1``, and
``TimeoutStopSec`` bounds the drain instead.
"""

from __future__ import annotations

from typing import Literal

import trio

from eecp.core.sdnotify import Notifier

State = Literal["starting", "ready", "stopping"]


class Readiness:
    """The process's readiness (one per serve())."""

    def __init__(self) -> None:
        self._until: trio.Event | None = None

    def serving(self, until: trio.Event) -> None:
        """Ready from now until ``until`` is set."""
        self._until = until

    @property
    def state(self) -> State:
        if self._until is None:
            return "starting"
        return "stopping" if self._until.is_set() else "ready"

    @property
    def ready(self) -> bool:
        return self.state == "ready"


async def run_readiness(readiness: Readiness, notifier: Notifier | None, status: str,
                        shutdown: trio.Event,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Mark ``readiness`` ready and tell systemd (when ``notifier``); ping its watchdog until
    ``shutdown``, then tell it ``STOPPING=1``. Ends by itself at shutdown."""
    readiness.serving(until=shutdown)
    try:
        if notifier is not None:
            notifier.ready(status)
        task_status.started()
        if notifier is None:
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(notifier.serve_watchdog, name="sd-watchdog")
            await shutdown.wait()
            nursery.cancel_scope.cancel()
        notifier.stopping()
    finally:
        if notifier is not None:
            notifier.close()
