"""The graceful drain: what a stopping eecp tells the parts that serve requests and tunnels.

A stop (SIGTERM, or ``serve``'s ``shutdown`` event) does not drop every tunnel at once: it
first *drains* (:func:`eecp.service.serve`). From :meth:`Drain.start` on, new proxied requests
are refused (503 ``draining``, :class:`eecp.dataplane.proxy.Forwarder`), new tunnels too
(:class:`eecp.agents.tunnels.TunnelRouter`), ``GET /health`` answers 503 ``draining`` so that a
load balancer stops sending, and each agent is told to move (status ``warning draining``).
The requests already in flight are counted here (:meth:`Drain.track`), and the drain ends once
none is left (:meth:`Drain.wait_idle`), or when ``EE_SHUTDOWN_GRACE_SEC`` is up.

One object per process, shared by the entry points: trio's single thread keeps the count
exact without a lock.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from eecp.core.trioutil import Signal


class Drain:
    """Whether this process is draining, and how many proxied requests are in flight."""

    def __init__(self) -> None:
        #: the drain began: refuse what is new, let what runs finish
        self.started = False
        self._in_flight = 0
        self._idle = Signal()  # fired when the last request in flight ends

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def start(self) -> None:
        self.started = True

    @contextmanager
    def track(self) -> Iterator[None]:
        """Count one request in flight for the block (its response relayed whole included)."""
        self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.fire()

    async def wait_idle(self) -> None:
        """Return once no request is in flight (the caller bounds the wait)."""
        while self._in_flight:
            await self._idle.wait()
