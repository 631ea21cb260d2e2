"""eecp.ledger.periods (spec §6, §21.10, §21.13): the grid, ids of each kind, request fields and
every ``invalid_period`` detail, and the settings."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eecp.core.errors import ConfigError, LedgerConflictError, LedgerInputError
from eecp.ledger.periods import (
    DAY,
    HOUR,
    PERIOD_DETAILS,
    Period,
    PeriodLength,
    boundary_after,
    boundary_at_or_after,
    check_period_settings,
    check_reportable,
    check_settleable,
    is_aligned,
    parse_period_id,
    parse_timestamp,
    period_at,
    period_from_bounds,
    period_from_fields,
    period_id,
    period_of,
    period_setting,
    periods_overlapping,
    settleable_at,
)

T13 = int(datetime(2026, 7, 1, 13, tzinfo=UTC).timestamp())  # 2026-07-01T13:00:00Z
MIDNIGHT = int(datetime(2026, 7, 1, tzinfo=UTC).timestamp())
FIVE_MIN = PeriodLength(300, "seconds")


def detail_of(call: object, *args: object) -> tuple[str, str, str | None]:
    with pytest.raises(LedgerInputError) as info:
        call(*args)  # type: ignore[operator]
    return info.value.reason, info.value.detail, info.value.field


# --- ids ------------------------------------------------------------------------------------

def test_ids_of_each_kind() -> None:
    assert period_of(T13 + 1799.5, HOUR) == Period(T13, HOUR)
    assert Period(T13, HOUR).id == "2026-07-01T13Z"
    assert Period(MIDNIGHT, DAY).id == "2026-07-01"
    assert period_of(T13 + 5 * 60 + 7, FIVE_MIN).id == "2026-07-01T13:05:00Z"
    p = Period(T13, HOUR)
    assert (p.end, p.start_iso, p.end_iso) == (T13 + 3600, "2026-07-01T13:00:00Z",
                                               "2026-07-01T14:00:00Z")
    assert (p.next().id, p.previous().id) == ("2026-07-01T14Z", "2026-07-01T12Z")
    assert p.contains(T13) and p.contains(T13 + 3599.9) and not p.contains(T13 + 3600)


@pytest.mark.parametrize(("length", "text", "start"), [
    (HOUR, "2026-07-01T13Z", T13), (HOUR, "2026-07-01T00Z", MIDNIGHT),
    (DAY, "2026-07-01", MIDNIGHT), (FIVE_MIN, "2026-07-01T13:05:00Z", T13 + 300),
    (PeriodLength(3600, "seconds"), "2026-07-01T13:00:00Z", T13),
    (HOUR, "2028-02-29T23Z", int(datetime(2028, 2, 29, 23, tzinfo=UTC).timestamp())),
])
def test_ids_parse(length: PeriodLength, text: str, start: int) -> None:
    assert parse_period_id(text, length) == Period(start, length)


@pytest.mark.parametrize(("length", "text", "detail"), [
    (HOUR, "2026-07-01T13", "format"), (HOUR, "2026-07-01T13:00Z", "format"),
    (HOUR, "2026-07-01", "format"), (HOUR, "2026-07-01t13z", "format"),
    (HOUR, "2026-07-01T24Z", "format"), (HOUR, "2026-02-30T13Z", "format"),
    (HOUR, " 2026-07-01T13Z", "format"), (HOUR, "2026-07-01T13Z\n", "format"),
    (HOUR, 2026, "format"), (HOUR, None, "format"),
    (HOUR, "２０２６-07-01T13Z", "format"),  # fullwidth digits
    (DAY, "2026-07-01T00Z", "format"), (DAY, "2026-7-1", "format"),
    (FIVE_MIN, "2026-07-01T13Z", "format"), (FIVE_MIN, "2026-07-01T13:05:00+00:00", "format"),
    (FIVE_MIN, "2026-07-01T13:05:01Z", "unaligned"),
    (FIVE_MIN, "2026-07-01T13:06:00Z", "unaligned"),
])
def test_ids_refused(length: PeriodLength, text: object, detail: str) -> None:
    assert detail_of(parse_period_id, text, length) == ("invalid_period", detail, "period")


@given(st.integers(0, 250_000_000_000 // 3600).map(lambda n: n * 3600),
       st.sampled_from([HOUR, DAY, FIVE_MIN, PeriodLength(60, "seconds")]))
def test_every_id_parses_back(start: int, length: PeriodLength) -> None:
    period = period_of(start, length)
    assert parse_period_id(period.id, length) == period
    assert period_id(period.start, length) == period.id


# --- timestamps and request fields ----------------------------------------------------------

@pytest.mark.parametrize(("text", "seconds"), [
    ("2026-07-01T13:00:00Z", T13), ("2026-07-01t13:00:00z", T13),
    ("2026-07-01T15:00:00+02:00", T13), ("2026-07-01T08:30:00-04:30", T13),
    ("2026-07-01T13:00:00-00:00", T13), ("2026-07-01T13:00:00.000Z", T13),
])
def test_timestamps(text: str, seconds: int) -> None:
    assert parse_timestamp(text, "period_start") == seconds


@pytest.mark.parametrize(("text", "detail"), [
    ("2026-07-01T13:00:00", "timezone"), ("2026-07-01T13:00:00.5", "timezone"),
    ("2026-07-01 13:00:00Z", "format"), ("2026-07-01T13:00Z", "format"),
    ("2026-07-01T13:00:00+0200", "format"), ("2026-07-01T13:00:00+24:00", "format"),
    ("2026-07-01T13:00:60Z", "format"), ("2026-13-01T13:00:00Z", "format"),
    ("1782910800", "format"), (1782910800, "format"), ("", "format"),
    ("2026-07-01T13:00:00Z" + " " * 30, "format"),
    ("2026-07-01T13:00:00.001Z", "unaligned"),
])
def test_timestamps_refused(text: object, detail: str) -> None:
    assert detail_of(parse_timestamp, text, "period_end") == ("invalid_period", detail,
                                                              "period_end")


def test_bounds() -> None:
    assert period_from_bounds(T13, T13 + 3600, HOUR) == Period(T13, HOUR)
    assert detail_of(period_from_bounds, T13, T13, HOUR)[1] == "order"
    assert detail_of(period_from_bounds, T13 + 3600, T13, HOUR)[1] == "order"
    assert detail_of(period_from_bounds, T13 + 60, T13 + 3660, HOUR)[1] == "unaligned"
    assert detail_of(period_from_bounds, T13, T13 + 7200, HOUR)[1:] == ("length", "period_end")
    assert detail_of(period_from_bounds, MIDNIGHT, MIDNIGHT + 3600, DAY)[1] == "length"


Z13, Z14 = "2026-07-01T13:00:00Z", "2026-07-01T14:00:00Z"


@pytest.mark.parametrize(("period", "start", "end"), [
    ("2026-07-01T13Z", None, None), (None, Z13, Z14), ("2026-07-01T13Z", Z13, Z14),
    ("2026-07-01T13Z", Z13, None), ("2026-07-01T13Z", None, Z14),
    (None, "2026-07-01T15:00:00+02:00", "2026-07-01T16:00:00+02:00"),
])
def test_fields_naming_one_period(period: str | None, start: str | None,
                                  end: str | None) -> None:
    assert period_from_fields(period, start, end, HOUR) == Period(T13, HOUR)


@pytest.mark.parametrize(("period", "start", "end", "expected"), [
    (None, None, None, ("missing_fields", "", "period")),
    (None, Z13, None, ("missing_fields", "", "period_end")),
    (None, None, Z14, ("missing_fields", "", "period_start")),
    ("2026-07-01T12Z", Z13, Z14, ("invalid_period", "mismatch", "period")),
    ("2026-07-01T12Z", Z13, None, ("invalid_period", "mismatch", "period")),
    ("2026-07-01T13Z", None, "2026-07-01T15:00:00Z", ("invalid_period", "mismatch", "period")),
    ("13Z", Z13, Z14, ("invalid_period", "format", "period")),
    (None, "2026-07-01T13:00:00", Z14, ("invalid_period", "timezone", "period_start")),
    (None, Z14, Z13, ("invalid_period", "order", "period_start")),
    (None, "2026-07-01T13:30:00Z", "2026-07-01T14:30:00Z",
     ("invalid_period", "unaligned", "period_start")),
    (None, Z13, "2026-07-01T15:00:00Z", ("invalid_period", "length", "period_end")),
    # parse errors come before the checks on the bounds, and those before mismatch
    ("2026-07-01T12Z", Z14, Z13, ("invalid_period", "order", "period_start")),
    ("2026-07-01T12Z", "x", Z13, ("invalid_period", "format", "period_start")),
])
def test_fields_refused(period: str | None, start: str | None, end: str | None,
                        expected: tuple[str, str, str]) -> None:
    assert detail_of(period_from_fields, period, start, end, HOUR) == expected


def test_every_detail_is_reachable() -> None:
    assert PERIOD_DETAILS == ("format", "timezone", "order", "unaligned", "length", "mismatch")


# --- the grid -------------------------------------------------------------------------------

def test_alignment_and_boundaries() -> None:
    assert is_aligned(T13, HOUR) and not is_aligned(T13 + 0.5, HOUR)
    assert not is_aligned(T13, DAY) and is_aligned(MIDNIGHT, DAY)
    assert is_aligned(T13 + 300, FIVE_MIN) and not is_aligned(T13 + 301, FIVE_MIN)
    assert boundary_after(T13, HOUR) == T13 + 3600  # a started period is never altered
    assert boundary_after(T13 - 0.5, HOUR) == T13
    assert boundary_at_or_after(T13, HOUR) == T13
    assert boundary_at_or_after(T13 + 0.1, HOUR) == T13 + 3600
    assert period_at(T13, HOUR) == Period(T13, HOUR)
    with pytest.raises(ValueError, match="grid"):
        period_at(T13 + 1, HOUR)
    with pytest.raises(ValueError, match="grid"):
        Period(float(T13), HOUR)  # type: ignore[arg-type]


@given(st.floats(-1e10, 1e11, allow_nan=False),
       st.sampled_from([HOUR, DAY, FIVE_MIN, PeriodLength(60, "seconds")]))
def test_the_period_of_an_instant_contains_it(t: float, length: PeriodLength) -> None:
    period = period_of(t, length)
    assert period.contains(t) and is_aligned(period.start, length)
    assert period.start < boundary_after(t, length) <= period.end
    assert boundary_at_or_after(t, length) >= t
    assert boundary_at_or_after(t, length) - length.seconds < t  # ints first: exact


def test_periods_overlapping() -> None:
    assert [p.id for p in periods_overlapping(T13, T13 + 7200, HOUR)] == [
        "2026-07-01T13Z", "2026-07-01T14Z"]
    assert [p.id for p in periods_overlapping(T13 + 10, T13 + 3601, HOUR)] == [
        "2026-07-01T13Z", "2026-07-01T14Z"]
    assert periods_overlapping(T13, T13, HOUR) == []


def test_reportable() -> None:
    p = Period(T13, HOUR)
    check_reportable(p, T13, 604_800)  # the current period, from its first second
    check_reportable(p, T13 + 3600 + 604_800, 604_800)  # exactly the oldest allowed
    assert detail_of(check_reportable, p, T13 - 0.001, 604_800)[0] == "period_in_future"
    assert detail_of(check_reportable, p, T13 + 3600 + 604_800.5, 604_800)[0] == (
        "period_too_old")


def test_settleable() -> None:
    p = Period(T13, HOUR)
    assert settleable_at(p, 600) == T13 + 4200
    check_settleable(p, T13 + 4200, 600)
    with pytest.raises(LedgerConflictError) as info:
        check_settleable(p, T13 + 4199, 600)
    assert info.value.body() == {"error": "period_not_ended",
                                 "settleable_at": "2026-07-01T14:10:00Z"}


# --- settings -------------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "length"), [
    ("hour", HOUR), (" day ", DAY), ("60", PeriodLength(60, "seconds")),
    ("300", FIVE_MIN), ("3600", PeriodLength(3600, "seconds")),
    ("86400", PeriodLength(86400, "seconds")), ("43200", PeriodLength(43200, "seconds")),
])
def test_period_setting(raw: str, length: PeriodLength) -> None:
    assert period_setting(raw) == length
    assert period_setting(length.setting) == length


@pytest.mark.parametrize("raw", ["Hour", "week", "59", "0", "-60", "70", "060", "172800",
                                 "1e3", "3600.0", ""])
def test_period_setting_refusals_name_the_variable(raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        period_setting(raw)
    assert info.value.variable == "EE_LEDGER_PERIOD"


def test_a_period_length_must_divide_a_day() -> None:
    for seconds in (59, 7, 86401, 0):
        with pytest.raises(ValueError, match="divide"):
            PeriodLength(seconds, "seconds")


def test_short_periods_need_shorter_waits() -> None:
    ok = {"settlement_delay_sec": 59, "gap_tolerance_sec": 10, "reconnect_grace_sec": 30}
    check_period_settings(PeriodLength(60, "seconds"), **ok)
    check_period_settings(HOUR, settlement_delay_sec=7200, gap_tolerance_sec=4000,
                          reconnect_grace_sec=3600)  # not constrained for hours
    for name, variable in (("settlement_delay_sec", "EE_SETTLEMENT_DELAY_SEC"),
                           ("gap_tolerance_sec", "EE_OBSERVER_GAP_TOLERANCE_SEC"),
                           ("reconnect_grace_sec", "EE_SETTLEMENT_RECONNECT_GRACE_SEC")):
        with pytest.raises(ConfigError) as info:
            check_period_settings(PeriodLength(60, "seconds"), **{**ok, name: 60})
        assert info.value.variable == variable
