"""eecp.ratelimit: pure, with the time passed in."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from eecp.agents.session import serve_audit_summaries
from eecp.core import ratelimit
from eecp.core.clock import TrioClock
from eecp.core.ratelimit import RefusedAuditLimit, SharedLimit, TokenBucket

T0 = 1_790_000_000.0


def test_bucket_bursts_then_refills_at_its_rate() -> None:
    bucket = TokenBucket.full(rate=2.0, burst=3, now=T0)
    assert [bucket.take(T0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(T0 + 0.5) and not bucket.take(T0 + 0.5)  # 1 token per 0.5 s
    assert [bucket.take(T0 + 100) for _ in range(4)] == [True, True, True, False]  # capped


def test_bucket_ignores_a_clock_stepped_back() -> None:
    bucket = TokenBucket.full(rate=1.0, burst=1, now=T0)
    assert bucket.take(T0)
    assert not bucket.take(T0 - 3600)  # no refill, no debt
    assert not bucket.take(T0 + 0.5) and bucket.take(T0 + 1.0)


def test_one_app_gets_a_share_and_the_rest_is_left_for_others() -> None:
    limit = RefusedAuditLimit(per_minute=60)  # 12 a minute per app
    assert sum(limit.allow("shop", T0) for _ in range(100)) == 12
    assert sum(limit.allow(f"app-{i}", T0) for i in range(100)) == 48  # 60 in all
    assert limit.suppressed == 88 + 52
    assert limit.allow("shop", T0 + 5) and not limit.allow("shop", T0 + 5)  # 1 per 5 s


def test_fresh_names_do_not_escape_the_overall_limit() -> None:
    limit = RefusedAuditLimit(per_minute=30)
    for minute in range(3):
        now = T0 + 60 * minute
        allowed = sum(limit.allow(f"n{minute}-{i}", now) for i in range(10_000))
        assert allowed == 30
    assert len(limit._limit._keys) <= ratelimit.MAX_KEYS_TRACKED


def test_a_shared_limit_bounds_each_key_and_the_total_independently() -> None:
    limit = SharedLimit(per_minute=10, per_key=3)
    assert sum(limit.allow("p1", T0) for _ in range(10)) == 3
    assert sum(limit.allow(f"p{i}", T0) for i in range(2, 20)) == 7  # 10 in all
    assert not limit.allow(None, T0)  # no key: the total alone, spent
    assert limit.allow(None, T0 + 6) and not limit.allow("p1", T0 + 6)  # p1: 1 per 20 s
    assert limit.allow("p1", T0 + 26)
    keys_only = SharedLimit(per_minute=0, per_key=2)
    assert [keys_only.allow("p1", T0) for _ in range(3)] == [True, True, False]
    assert all(keys_only.allow(None, T0) for _ in range(100))
    total_only = SharedLimit(per_minute=2, per_key=0)
    assert [total_only.allow(f"p{i}", T0) for i in range(3)] == [True, True, False]
    assert all(SharedLimit(0, 0).allow("p1", T0) for _ in range(1000))


def test_a_refused_event_spends_nothing() -> None:
    # the key's token is only taken when the total had room, and the other way round
    limit = SharedLimit(per_minute=2, per_key=1)
    assert limit.allow("a", T0) and limit.allow("b", T0)
    assert not limit.allow("c", T0)  # the total is spent: c keeps its token
    assert limit.allow("c", T0 + 30) and not limit.allow("a", T0 + 30)


def test_zero_means_no_limit() -> None:
    limit = RefusedAuditLimit(per_minute=0)
    assert all(limit.allow("shop", T0) for _ in range(1000))
    assert limit.due_summary(T0) == 0


def test_a_summary_at_most_once_a_minute() -> None:
    limit = RefusedAuditLimit(per_minute=1)
    assert limit.due_summary(T0) == 0  # nothing left out yet
    assert limit.allow("a", T0) and not limit.allow("a", T0) and not limit.allow("b", T0)
    assert limit.due_summary(T0) == 2
    assert not limit.allow("c", T0 + 1)
    assert limit.due_summary(T0 + 30) == 0  # counted, reported later
    assert not limit.allow("c", T0 + 40)
    assert limit.due_summary(T0 + 61) == 2 and limit.suppressed == 0


async def test_a_floods_last_minute_is_summed_up_by_the_periodic_task(
        autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture) -> None:
    # the rows left out are reported by this task alone: after the flood's last row nothing
    # else would say so
    clock = TrioClock(start_wall=T0)
    limit = RefusedAuditLimit(per_minute=1)
    caplog.set_level(logging.WARNING, logger="eecp.session")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_audit_summaries, limit, clock)
        assert limit.allow("shop", clock.now())
        assert not limit.allow("shop", clock.now(), "quote_invalid for app shop from 10.0.0.9")
        assert not limit.allow("shop", clock.now(), "quote_invalid for app shop from 10.0.0.7")
        await trio.sleep(ratelimit.SUMMARY_EVERY_SEC / 2)
        assert not caplog.records
        await trio.sleep(ratelimit.SUMMARY_EVERY_SEC)
        [record] = caplog.records
        assert "2 refusals" in record.getMessage()
        assert "latest quote_invalid for app shop from 10.0.0.7" in record.getMessage()
        await trio.sleep(10 * ratelimit.SUMMARY_EVERY_SEC)  # nothing new: nothing more said
        assert len(caplog.records) == 1 and limit.suppressed == 0
        nursery.cancel_scope.cancel()
