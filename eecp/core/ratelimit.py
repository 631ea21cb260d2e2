"""Rate limits, sans-IO: the caller passes the time, so tests jump it synchronously.

:class:`SharedLimit` is the one shape every limit here takes: a total a minute, and a share of
it a minute under any one key, so that one source of a flood leaves room for the others.

:class:`LogBudget` bounds the log lines of failed proxied streams per client.

:class:`RefusedAuditLimit` bounds the audit-log rows that peers eecp has never admitted can
cause. Reaching the audit log takes no more than a ``register`` and a parseable quote (or
silence until the attest deadline), so without it any peer could grow the database without bound
and push an app's real history out of the admin view. A verified quote takes a genuine TD, but
one TD can still name any number of made-up releases, so the refusals of verified quotes that
named no usable allowlist are limited too, keyed by the TD's platform. Accepted attestations,
the other refusals of quotes that verified, and every decision about an admitted (or already
known) agent are always recorded; what is left out is counted (``eecp_audit_suppressed``) and
summarised in the log.

The allowlist source uses a :class:`SharedLimit` keyed by platform for its GitHub fetches
(``EE_ALLOWLIST_FETCHES_PER_MIN``): the operator's API quota is spent by verified quotes only,
and no one platform can spend all of it.
"""

from __future__ import annotations

from dataclasses import dataclass

#: a single app name gets at most this share of the limit, so a flood under one name leaves
#: room for the others
PER_APP_SHARE = 0.2
#: keys (app names, platforms) whose bucket is remembered; beyond it the least recently used
#: is forgotten (the overall bucket still bounds what a flood of fresh keys can get)
MAX_KEYS_TRACKED = 4096
#: the least time between two log lines summing up rows left out
SUMMARY_EVERY_SEC = 60.0


@dataclass
class TokenBucket:
    """``burst`` events at once, refilled at ``rate`` per second."""

    rate: float
    burst: float
    tokens: float
    at: float

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> TokenBucket:
        return cls(rate, burst, burst, now)

    def refill(self, now: float) -> None:
        # a clock stepped backwards refills nothing rather than draining
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.at) * self.rate)
        self.at = max(self.at, now)

    def take(self, now: float) -> bool:
        """Spend one token if there is one."""
        self.refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class SharedLimit:
    """At most ``per_minute`` events a minute in all, and at most ``per_key`` a minute under
    any one key (bursts of that size, refilled evenly). A key's bucket is remembered for the
    :data:`MAX_KEYS_TRACKED` most recently used keys: beyond that a fresh key starts full,
    but the overall bucket still bounds what a flood of fresh keys gets. ``0`` for either
    means no such limit."""

    def __init__(self, per_minute: float, per_key: float,
                 max_keys: int = MAX_KEYS_TRACKED) -> None:
        self.per_minute = per_minute
        self.per_key = per_key
        self._max_keys = max_keys
        self._all: TokenBucket | None = None
        self._keys: dict[str, TokenBucket] = {}

    def allow(self, key: str | None, now: float) -> bool:
        """Spend one event under ``key`` (None: the overall limit only) if both the key's
        bucket and the overall one have room; spend nothing otherwise."""
        bucket = self._key_bucket(key, now) if key is not None and self.per_key > 0 else None
        if bucket is not None:
            bucket.refill(now)
            if bucket.tokens < 1.0:
                return False
        if self.per_minute > 0:
            if self._all is None:
                self._all = TokenBucket.full(self.per_minute / 60.0, self.per_minute, now)
            if not self._all.take(now):
                return False
        if bucket is not None:
            bucket.tokens -= 1.0
        return True

    def _key_bucket(self, key: str, now: float) -> TokenBucket:
        bucket = self._keys.pop(key, None)
        if bucket is None:
            bucket = TokenBucket.full(self.per_key / 60.0, self.per_key, now)
            if len(self._keys) >= self._max_keys:
                del self._keys[next(iter(self._keys))]  # the least recently used
        self._keys[key] = bucket  # most recently used last
        return bucket


class KeyedBudget:
    """At most ``per_minute`` events a minute, and at most :data:`PER_APP_SHARE` of them (at
    least one) under any one key; what is left out is counted for a summary line at most once
    a minute (:meth:`due_summary`). ``per_minute`` 0 lets everything through."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._limit = SharedLimit(per_minute, max(1.0, per_minute * PER_APP_SHARE)
                                  if per_minute > 0 else 0)
        #: rows left out since the last summary (:meth:`due_summary`)
        self.suppressed = 0
        #: what the caller said of the latest row left out (for the summary line)
        self.latest = ""
        self._reported_at: float | None = None

    def allow(self, key: str, now: float, what: str = "") -> bool:
        """True when a refusal under ``key`` at ``now`` may be written to the audit log;
        ``what`` describes it, remembered as :attr:`latest` when it is left out."""
        if self._limit.allow(key, now):
            return True
        self.suppressed += 1
        self.latest = what
        return False

    def due_summary(self, now: float) -> int:
        """How many rows were left out since the last summary, when one is due (at most one a
        minute, so the log line about a flood is not a flood itself); else 0."""
        if not self.suppressed or (self._reported_at is not None
                                   and now - self._reported_at < SUMMARY_EVERY_SEC):
            return 0
        count, self.suppressed, self._reported_at = self.suppressed, 0, now
        return count


class RefusedAuditLimit(KeyedBudget):
    """The audit rows of refusals of attempts not yet admitted (``EE_AUDIT_REFUSALS_PER_MIN``),
    keyed by the app name the attempt named, or the platform (PPID) of a quote that verified
    but named a release without a usable allowlist (see the module docstring)."""


class LogBudget(KeyedBudget):
    """Log lines that peers cause one by one (a failed proxied stream), keyed by the client:
    one client failing its own streams in a loop cannot flood the log, nor push out the lines
    of others; what was left out is summed up with the next line logged."""
