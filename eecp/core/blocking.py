"""The one way eecp runs blocking work: a worker thread behind a capacity limiter.

Database calls (peewee) and quote verification (dcap-qvl, CPU-bound, holds the GIL for about
0.7 ms) must never run on the trio loop. Each kind of work has its own limiter so a burst of
verifications after a restart cannot starve the store, and vice versa.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import trio

T = TypeVar("T")


class Workers:
    """Named capacity limiters for blocking work; one instance per process (``serve()``).

    ``store`` is small because SQLite serialises writers anyway; ``verify`` is bounded so that
    1,000 agents re-attesting after a restart are admitted at a steady pace.
    """

    def __init__(self, store: int = 4, verify: int = 2) -> None:
        self.store = trio.CapacityLimiter(store)
        self.verify = trio.CapacityLimiter(verify)


async def run_blocking(limiter: trio.CapacityLimiter, fn: Callable[..., T], *args: object) -> T:
    """Run ``fn(*args)`` in a worker thread under ``limiter``.

    Cancellation is *not* abandoned: the caller waits for the thread to finish, so nothing the
    call touches outlives the scope that started it.
    """
    return await trio.to_thread.run_sync(fn, *args, limiter=limiter)
