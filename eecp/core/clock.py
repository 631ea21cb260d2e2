"""The one injectable clock.

eecp needs two kinds of time: *wall* time (Unix seconds: registration TTLs, collateral validity,
the time a quote is verified at, audit timestamps) and trio's *deadline* time (``trio.sleep``,
``fail_after``), which a test drives with ``trio.testing.MockClock``. ``TrioClock`` ties the two
together, so a test that jumps trio time 30 days also moves the wall clock 30 days.
"""

from __future__ import annotations

import functools
import time
from datetime import UTC, datetime
from typing import Protocol

import trio


class Clock(Protocol):
    """Source of wall-clock time in Unix seconds."""

    def now(self) -> float:
        """Current wall time, Unix seconds (UTC)."""
        ...


class SystemClock:
    """The real wall clock."""

    def now(self) -> float:
        return time.time()


class FixedClock:
    """A clock stopped at one instant (operator tools such as ``verify-quote --at``)."""

    def __init__(self, at: float) -> None:
        self._at = at

    def now(self) -> float:
        return self._at

    def advance(self, seconds: float) -> None:
        """Move the fixed instant forward (tests)."""
        self._at += seconds


class TrioClock:
    """Wall time that follows trio's clock: ``start_wall + (trio.current_time() - start_trio)``.

    Must be constructed inside ``trio.run``. Under a ``MockClock`` every jump of trio time moves
    this clock too, which is how tests make 60 minutes or 30 days pass instantly.
    """

    def __init__(self, start_wall: float | None = None) -> None:
        self._start_trio = trio.current_time()
        self._start_wall = time.time() if start_wall is None else start_wall

    def now(self) -> float:
        return self._start_wall + (trio.current_time() - self._start_trio)


@functools.lru_cache(maxsize=4096)
def isoformat(ts: float) -> str:
    """Unix seconds as an RFC 3339 UTC string with a ``Z`` suffix, second precision.

    Remembered: every resolve answer formats its app's few timestamps (expiry, last
    attestation) again, and strftime was a tenth of the auth listener's time."""
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_isoformat(text: str) -> float:
    """RFC 3339 / ISO 8601 (``Z`` or offset; naive means UTC) to Unix seconds."""
    value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()
