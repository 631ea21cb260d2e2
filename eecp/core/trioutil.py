"""Small trio helpers both ends of the tunnel share: waking waiters cheaply, and reading the
exception groups that nurseries raise.

* :class:`Signal` wakes every task waiting at the moment it fires (a condition variable without
  the lock: waiters re-check their condition), :class:`Wakeup` one task waiting for another;
  both cheaper than a :class:`trio.Event` per wait on hot paths.
* :func:`single_error` re-raises a nursery's lone exception as itself, :func:`leaf_error` finds
  the exception that matters inside nested groups (for a log line or a close reason).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import trio


class Signal:
    """Wakes every task waiting at the moment it fires (waiters re-check their condition)."""

    def __init__(self) -> None:
        self._event: trio.Event | None = None  # made by the first waiter: most never have one

    def fire(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = None

    async def wait(self) -> None:
        if self._event is None:
            self._event = trio.Event()
        await self._event.wait()


class Wakeup:
    """One task waiting for another: a cheaper :class:`trio.Event` for the hot path (nothing
    allocated per wait), for one waiter at a time."""

    __slots__ = ("_task",)

    def __init__(self) -> None:
        self._task: trio.lowlevel.Task | None = None

    async def wait(self) -> None:
        if self._task is not None:
            raise trio.BusyResourceError("another task is already waiting here")
        self._task = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(self._abort)

    def wake(self) -> None:
        if self._task is not None:
            trio.lowlevel.reschedule(self._task)
            self._task = None

    def _abort(self, _: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        self._task = None
        return trio.lowlevel.Abort.SUCCEEDED


@contextmanager
def single_error() -> Iterator[None]:
    """Re-raise a nursery's lone exception as itself, so callers can catch an ``EecpError``
    (or a consumer's own error) plainly; anything else stays grouped."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


def leaf_error(exc: BaseException) -> BaseException:
    """The exception that matters inside (nested) exception groups: the first leaf that is not
    a ``trio.Cancelled`` (one of those only if that is all there is). For a log line or a
    close reason; handlers that must treat every leaf use ``except*``."""
    while isinstance(exc, BaseExceptionGroup):
        members = [e for e in exc.exceptions if not isinstance(e, trio.Cancelled)]
        exc = (members or list(exc.exceptions))[0]
    return exc
