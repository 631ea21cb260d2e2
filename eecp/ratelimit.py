"""Rate limits, sans-IO: the caller passes the time, so tests jump it synchronously.

:class:`RefusedAuditLimit` bounds the audit-log rows that peers eecp has never admitted can
cause. Reaching the audit log takes no more than a ``register`` and a parseable quote (or
silence until the attest deadline), so without it any peer could grow the database without bound
and push an app's real history out of the admin view. Accepted attestations, refusals of quotes
that verified, and every decision about an admitted agent are always recorded; only the other
refusals are limited, and what is left out is counted (``eecp_audit_suppressed``) and summarised
in the log.
"""

from __future__ import annotations

from dataclasses import dataclass

#: a single app name gets at most this share of the limit, so a flood under one name leaves
#: room for the others
PER_APP_SHARE = 0.2
#: app names whose bucket is remembered; beyond it the least recently used is forgotten (the
#: overall bucket still bounds what a flood of fresh names can write)
MAX_APPS_TRACKED = 4096
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


class RefusedAuditLimit:
    """At most ``per_minute`` audit rows a minute for refusals of attempts not yet admitted,
    and at most :data:`PER_APP_SHARE` of them (at least one) under any one app name.
    ``per_minute`` 0 lets everything through."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._all: TokenBucket | None = None
        self._apps: dict[str, TokenBucket] = {}
        #: rows left out since the last summary (:meth:`due_summary`)
        self.suppressed = 0
        #: what the caller said of the latest row left out (for the summary line)
        self.latest = ""
        self._reported_at: float | None = None

    def allow(self, app_name: str, now: float, what: str = "") -> bool:
        """True when a refusal of ``app_name`` at ``now`` may be written to the audit log;
        ``what`` describes it, remembered as :attr:`latest` when it is left out."""
        if self.per_minute <= 0:
            return True
        if self._all is None:
            self._all = TokenBucket.full(self.per_minute / 60.0, self.per_minute, now)
        app = self._app_bucket(app_name, now)
        app.refill(now)
        if app.tokens < 1.0 or not self._all.take(now):
            self.suppressed += 1
            self.latest = what
            return False
        app.tokens -= 1.0
        return True

    def due_summary(self, now: float) -> int:
        """How many rows were left out since the last summary, when one is due (at most one a
        minute, so the log line about a flood is not a flood itself); else 0."""
        if not self.suppressed or (self._reported_at is not None
                                   and now - self._reported_at < SUMMARY_EVERY_SEC):
            return 0
        count, self.suppressed, self._reported_at = self.suppressed, 0, now
        return count

    def _app_bucket(self, app_name: str, now: float) -> TokenBucket:
        bucket = self._apps.pop(app_name, None)
        if bucket is None:
            share = max(1.0, self.per_minute * PER_APP_SHARE)
            bucket = TokenBucket.full(share / 60.0, share, now)
            if len(self._apps) >= MAX_APPS_TRACKED:
                del self._apps[next(iter(self._apps))]  # the least recently used
        self._apps[app_name] = bucket  # most recently used last
        return bucket
