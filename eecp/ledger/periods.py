"""Settlement periods: a fixed UTC grid, period ids, and the time fields of requests (spec §6,
§21.10, §21.13).

A period is ``[start, end)`` in whole Unix seconds with ``start`` a multiple of the period
length, counted from the epoch (a UTC midnight, and Unix time has no leap seconds, so the
grid of days is the calendar's). ``EE_LEDGER_PERIOD`` is ``hour`` (the default), ``day``, or a
whole number of seconds, at least 60 and dividing 86,400, so that tests and demos can run
several periods in minutes; a seconds-period is its own kind even when it is 3600, and its ids
are RFC 3339 start times.

Ids are strict, one spelling per period, because they appear in paths and fingerprints:
``2026-07-01T13Z`` (hours), ``2026-07-01`` (days), ``2026-07-01T13:05:00Z`` (seconds). Request
bounds (``period_start``/``period_end``) are RFC 3339 with an explicit offset; a naive time is
refused (``timezone``) rather than guessed as UTC, unlike eecp's ``parse_isoformat``, because
money must not guess. Everything is stored and compared as integers, never as strings
(upstream compared ISO strings).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from typing import Final, Literal

from eecp.core.clock import isoformat
from eecp.core.errors import ConfigError, LedgerConflictError, LedgerInputError

PeriodKind = Literal["hour", "day", "seconds"]
PeriodDetail = Literal["format", "timezone", "order", "unaligned", "length", "mismatch"]
#: every ``detail`` of ``invalid_period``
PERIOD_DETAILS: Final[tuple[PeriodDetail, ...]] = (
    "format", "timezone", "order", "unaligned", "length", "mismatch",
)
SECONDS_PER_DAY: Final = 86_400
#: the shortest seconds-period (§21.10)
MIN_PERIOD_SEC: Final = 60

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_DATE = r"([0-9]{4})-([0-9]{2})-([0-9]{2})"
_HOUR_ID = re.compile(_DATE + r"T([0-9]{2})Z")
_DAY_ID = re.compile(_DATE)
_SECONDS_ID = re.compile(_DATE + r"T([0-9]{2}):([0-9]{2}):([0-9]{2})Z")
_RFC3339 = re.compile(
    _DATE + r"[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]{1,9})?([Zz]|[+-][0-9]{2}:[0-9]{2})?"
)
_MAX_TIME_CHARS: Final = 40


@dataclass(frozen=True)
class PeriodLength:
    """The grid: ``seconds`` long, of ``kind`` (which decides the id's spelling)."""

    seconds: int
    kind: PeriodKind

    def __post_init__(self) -> None:
        if self.seconds < MIN_PERIOD_SEC or SECONDS_PER_DAY % self.seconds:
            raise ValueError(f"a period of {self.seconds} s does not divide a day")

    @property
    def setting(self) -> str:
        """The ``EE_LEDGER_PERIOD`` value that means this grid."""
        return self.kind if self.kind != "seconds" else str(self.seconds)


HOUR: Final = PeriodLength(3600, "hour")
DAY: Final = PeriodLength(SECONDS_PER_DAY, "day")


@dataclass(frozen=True, order=True)
class Period:
    """One period of a grid. Build it with :func:`period_of`, :func:`period_at` or a parser."""

    start: int
    length: PeriodLength

    def __post_init__(self) -> None:
        if type(self.start) is not int or self.start % self.length.seconds:
            raise ValueError(f"{self.start!r} is not on the {self.length.setting} grid")

    @property
    def end(self) -> int:
        return self.start + self.length.seconds

    @property
    def id(self) -> str:
        """The period's id, as in ``/v1/settlements/{period}`` and the body's ``period``."""
        return period_id(self.start, self.length)

    @property
    def start_iso(self) -> str:
        return isoformat(self.start)

    @property
    def end_iso(self) -> str:
        return isoformat(self.end)

    def contains(self, t: float) -> bool:
        return self.start <= t < self.end

    def next(self) -> Period:
        return Period(self.end, self.length)

    def previous(self) -> Period:
        return Period(self.start - self.length.seconds, self.length)


# --- settings -------------------------------------------------------------------------------

def period_setting(raw: str) -> PeriodLength:
    """``EE_LEDGER_PERIOD``: ``hour``, ``day`` or N seconds (N ≥ 60, dividing 86400)."""
    text = raw.strip()
    if text == "hour":
        return HOUR
    if text == "day":
        return DAY
    if re.fullmatch(r"[1-9][0-9]{0,5}", text):
        seconds = int(text)
        if seconds >= MIN_PERIOD_SEC and SECONDS_PER_DAY % seconds == 0:
            return PeriodLength(seconds, "seconds")
    raise ConfigError("EE_LEDGER_PERIOD", f"{raw!r} is not hour, day, or a whole number of "
                      f"seconds >= {MIN_PERIOD_SEC} that divides 86400")


def check_period_settings(length: PeriodLength, *, settlement_delay_sec: float,
                          gap_tolerance_sec: float, reconnect_grace_sec: float) -> None:
    """With a seconds-period, the waits measured inside one period must be shorter than it
    (§21.10, §21.13): ConfigError naming the first that is not. Hours and days keep the spec's
    defaults (600 / 60 / 120 s) far below their length and are not constrained."""
    if length.kind != "seconds":
        return
    for name, value in (("EE_SETTLEMENT_DELAY_SEC", settlement_delay_sec),
                        ("EE_OBSERVER_GAP_TOLERANCE_SEC", gap_tolerance_sec),
                        ("EE_SETTLEMENT_RECONNECT_GRACE_SEC", reconnect_grace_sec)):
        if not value < length.seconds:
            raise ConfigError(name, f"{value:g} must be smaller than the period "
                              f"(EE_LEDGER_PERIOD={length.seconds})")


# --- the grid -------------------------------------------------------------------------------

def is_aligned(t: float, length: PeriodLength) -> bool:
    """Whether ``t`` is a boundary of the grid."""
    return t == math.floor(t) and math.floor(t) % length.seconds == 0


def period_of(t: float, length: PeriodLength) -> Period:
    """The period containing the instant ``t``."""
    return Period(math.floor(t) // length.seconds * length.seconds, length)


def period_at(start: int, length: PeriodLength) -> Period:
    """The period starting at ``start`` (ValueError when it is not a boundary)."""
    return Period(start, length)


def boundary_after(t: float, length: PeriodLength) -> int:
    """The first boundary strictly after ``t``: where a price decrease takes effect (§7.2),
    so that a change never alters a period already started."""
    return (math.floor(t) // length.seconds + 1) * length.seconds


def boundary_at_or_after(t: float, length: PeriodLength) -> int:
    """The first boundary ≥ ``t`` (a price increase: the first boundary ≥ now + notice)."""
    return -(-math.ceil(t) // length.seconds) * length.seconds


def periods_overlapping(start: float, end: float, length: PeriodLength) -> list[Period]:
    """Every period that shares an instant with ``[start, end)``, oldest first."""
    periods: list[Period] = []
    period = period_of(start, length)
    while period.start < end:
        periods.append(period)
        period = period.next()
    return periods


# --- ids and request fields ------------------------------------------------------------------

def period_id(start: int, length: PeriodLength) -> str:
    """The id of the period starting at ``start``."""
    at = datetime.fromtimestamp(start, tz=UTC)
    if length.kind == "hour":
        return at.strftime("%Y-%m-%dT%HZ")
    if length.kind == "day":
        return at.strftime("%Y-%m-%d")
    return isoformat(start)


def parse_period_id(text: object, length: PeriodLength, *, field: str = "period") -> Period:
    """A period id of this grid's kind, else 400 ``invalid_period`` (``format``; a
    seconds-period id off the grid is ``unaligned``)."""
    pattern = {"hour": _HOUR_ID, "day": _DAY_ID, "seconds": _SECONDS_ID}[length.kind]
    match = pattern.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise _invalid("format", field)
    try:
        start = _seconds(_datetime(match.groups(), UTC))
    except ValueError:
        raise _invalid("format", field) from None
    if start % length.seconds:
        raise _invalid("unaligned", field)
    return Period(start, length)


def parse_timestamp(text: object, field: str) -> int:
    """An RFC 3339 time with an explicit offset (``Z`` or ``±hh:mm``) to whole Unix seconds.

    400 ``invalid_period``: ``format`` (not RFC 3339, not a date), ``timezone`` (no offset),
    ``unaligned`` (a non-zero fraction of a second: never on any grid)."""
    if not isinstance(text, str) or len(text) > _MAX_TIME_CHARS:
        raise _invalid("format", field)
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise _invalid("format", field)
    *parts, fraction, offset = match.groups()
    if offset is None:
        raise _invalid("timezone", field)
    try:
        tz = UTC
        if offset not in ("Z", "z"):
            hours, minutes = int(offset[1:3]), int(offset[4:6])
            if hours > 23 or minutes > 59:
                raise ValueError(offset)
            sign = -1 if offset[0] == "-" else 1
            tz = timezone(sign * timedelta(hours=hours, minutes=minutes))
        at = _datetime(parts, tz)
    except ValueError:
        raise _invalid("format", field) from None
    if fraction and int(fraction[1:]):
        raise _invalid("unaligned", field)
    return _seconds(at)


def period_from_bounds(start: int, end: int, length: PeriodLength, *,
                       field: str = "period_start") -> Period:
    """The period ``[start, end)``: ``order`` (start ≥ end), ``unaligned``, ``length``."""
    if not start < end:
        raise _invalid("order", field)
    if start % length.seconds:
        raise _invalid("unaligned", field)
    if end - start != length.seconds:
        raise _invalid("length", "period_end")
    return Period(start, length)


def period_from_fields(period: object, period_start: object, period_end: object,
                       length: PeriodLength) -> Period:
    """The one period a usage report or a finalize names, by id, by bounds, or by both.

    Absent fields are None. Each given field is parsed first (``format``, ``timezone``), then
    the bounds are checked (``order``, ``unaligned``, ``length``), then an id and bounds given
    together must agree (``mismatch``). Nothing given, or one bound without the other and
    without an id, is 400 ``missing_fields``."""
    by_id = None if period is None else parse_period_id(period, length)
    start = None if period_start is None else parse_timestamp(period_start, "period_start")
    end = None if period_end is None else parse_timestamp(period_end, "period_end")
    if start is not None and end is not None:
        by_bounds = period_from_bounds(start, end, length)
        if by_id is not None and by_id != by_bounds:
            raise _invalid("mismatch", "period")
        return by_bounds
    if by_id is None:
        missing = "period" if start is None and end is None else (
            "period_start" if start is None else "period_end")
        raise LedgerInputError("missing_fields", field=missing)
    if (start is not None and start != by_id.start) or (end is not None and end != by_id.end):
        raise _invalid("mismatch", "period")
    return by_id


# --- when a period may be used ---------------------------------------------------------------

def check_reportable(period: Period, now: float, max_age_sec: float) -> None:
    """Usage may name the current period or a past one no older than ``EE_USAGE_MAX_AGE_SEC``:
    400 ``period_in_future`` (start > now) or ``period_too_old`` (end < now − max age)."""
    if period.start > now:
        raise LedgerInputError("period_in_future", field="period")
    if period.end < now - max_age_sec:
        raise LedgerInputError("period_too_old", field="period")


def settleable_at(period: Period, delay_sec: float) -> float:
    """When ``period`` may be finalized: its end plus ``EE_SETTLEMENT_DELAY_SEC``, which lets
    late reports, buffered events and heartbeats land."""
    return period.end + delay_sec


def check_settleable(period: Period, now: float, delay_sec: float) -> None:
    """409 ``period_not_ended`` (with ``settleable_at``) before :func:`settleable_at`."""
    due = settleable_at(period, delay_sec)
    if now < due:
        raise LedgerConflictError("period_not_ended", extra={"settleable_at": isoformat(due)})


def _datetime(parts: Sequence[str], tz: tzinfo) -> datetime:
    # year, month, day[, hour[, minute, second]]: the fields a pattern above matched
    y, mo, d, h, mi, sec = (*(int(part) for part in parts), 0, 0, 0)[:6]
    return datetime(y, mo, d, h, mi, sec, tzinfo=tz)


def _seconds(at: datetime) -> int:
    return (at - _EPOCH) // timedelta(seconds=1)


def _invalid(detail: PeriodDetail, field: str) -> LedgerInputError:
    return LedgerInputError("invalid_period", detail, field=field)
