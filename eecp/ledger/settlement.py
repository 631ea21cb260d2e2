"""Settlement arithmetic and the abuse rule (spec §9.1 capacity, §9.3, §10.1 minimum stake, §11).

:func:`plan_settlement` turns one node-period's holds and their verdicts into what must happen:
each hold posted (plus the platform's fee, ``EE_PLATFORM_FEE_BPS``, floored in the provider's
favour) or voided, or nothing at all while the node-period is held; an admin ``decision``
(``pay`` / ``refund``) settles a held one. The plan carries its totals, and
:meth:`SettlementPlan.transfers` spells it as journal transfers, so ``store/ledger_repo.py``
writes exactly what was planned, in one transaction, checking each with
:func:`eecp.ledger.journal.apply`. Money is conserved by construction and checked by the tests:
``posted + voided = held`` and ``fee <= posted``, so ``held = (posted − fee) + fee + voided``.

Abuse (§11): a report spans whole periods. An *authorized* report fails every node-period it
overlaps; a *pending* one holds them until it is decided or until
``EE_ABUSE_DECISION_DEADLINE_SEC`` after it was filed, after which it is ignored (only authorized
reports fail a period); a denied one does nothing. A decision is taken once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from eecp.core.errors import LedgerConflictError, LedgerError, LedgerInputError
from eecp.ledger.eligibility import REASONS, Verdict
from eecp.ledger.journal import FEE_ACCOUNT, Code, Transfer, node_account
from eecp.ledger.money import MICRO, platform_fee
from eecp.ledger.periods import (
    Period,
    PeriodLength,
    parse_timestamp,
    period_of,
    periods_overlapping,
)
from eecp.ledger.stake import Tier, penalty

Decision = Literal["pay", "refund"]
NodePeriodStatus = Literal["open", "held", "settled"]
Action = Literal["post", "void", "hold"]
ReportStatus = Literal["pending", "authorized", "denied"]
SECONDS_PER_HOUR: Final = 3600
_ORDER: Final = {reason: i for i, reason in enumerate(REASONS)}


# --- usage (§9.1) ---------------------------------------------------------------------------

def check_capacity(reported_micro_hours: int, new_micro_hours: int, capacity_vcpus: int,
                   period: Period) -> None:
    """409 ``usage_exceeds_capacity`` when the node-period's reports would exceed
    ``capacity_vcpus × period hours`` (compared in integers: a 60-s period is 1/60 h)."""
    used = reported_micro_hours + new_micro_hours
    if used * SECONDS_PER_HOUR > capacity_vcpus * period.length.seconds * MICRO:
        raise LedgerConflictError("usage_exceeds_capacity")


def minimum_stake(price_micros_per_vcpu_hour: int, capacity_vcpus: int, tier: Tier,
                  floor_micros: int) -> int:
    """``max(penalty, EE_STAKE_MIN_USD)`` where the penalty is the tier's hours of list revenue
    (price × capacity, :func:`eecp.ledger.stake.penalty`): the stake can always pay one
    penalty."""
    return max(penalty(price_micros_per_vcpu_hour, capacity_vcpus, tier), floor_micros)


# --- the plan (§9.3) ------------------------------------------------------------------------

@dataclass(frozen=True)
class Hold:
    """One usage hold of the node-period: the pending transfer ``hold_id`` of ``amount``
    micros from ``account_id`` to ``node:<node_id>``, for ``app`` (None: the report named no
    app)."""

    hold_id: int
    usage_id: str
    account_id: str
    node_id: str
    app: str | None
    amount: int


@dataclass(frozen=True)
class Leg:
    hold: Hold
    action: Action
    fee: int = 0


@dataclass(frozen=True)
class SettlementPlan:
    status: Literal["settled", "held"]
    outcome: Literal["pass", "fail", "mixed"] | None  # None while held
    reasons: tuple[str, ...]
    legs: tuple[Leg, ...]
    settled_by: str | None  # "admin" for a decision, else the caller's name once settled

    @property
    def eligible(self) -> bool:
        return self.outcome == "pass"

    @property
    def held_micros(self) -> int:
        return sum(leg.hold.amount for leg in self.legs)

    @property
    def posted_micros(self) -> int:
        return sum(leg.hold.amount for leg in self.legs if leg.action == "post")

    @property
    def voided_micros(self) -> int:
        return sum(leg.hold.amount for leg in self.legs if leg.action == "void")

    @property
    def fee_micros(self) -> int:
        return sum(leg.fee for leg in self.legs)

    @property
    def net_micros(self) -> int:
        """What the node's payout account gains: posted minus the platform's fee."""
        return self.posted_micros - self.fee_micros

    @property
    def settled(self) -> int:
        """Upstream's ``settled``: holds posted."""
        return sum(1 for leg in self.legs if leg.action == "post")

    @property
    def failed(self) -> int:
        """Upstream's ``failed``: holds voided."""
        return sum(1 for leg in self.legs if leg.action == "void")

    def transfers(self, ids: Iterator[int]) -> list[Transfer]:
        """The plan as journal transfers, ids drawn from ``ids`` in order: for each posted hold
        ``usage_post`` then ``fee`` (when > 0), for each voided one ``usage_void``."""
        out: list[Transfer] = []
        for leg in self.legs:
            hold, node = leg.hold, node_account(leg.hold.node_id)
            if leg.action == "hold":
                continue
            code = Code.USAGE_POST if leg.action == "post" else Code.USAGE_VOID
            out.append(Transfer(next(ids), code, hold.account_id, node, hold.amount,
                                hold.hold_id))
            if leg.fee:
                out.append(Transfer(next(ids), Code.FEE, node, FEE_ACCOUNT, leg.fee))
        return out


def parse_decision(value: object) -> Decision | None:
    """The finalize body's optional ``decision``: 400 ``invalid_decision`` unless absent,
    ``pay`` or ``refund``."""
    if value is None:
        return None
    if value == "pay":
        return "pay"
    if value == "refund":
        return "refund"
    raise LedgerInputError("invalid_decision", field="decision")


def plan_settlement(holds: Sequence[Hold], verdicts: Mapping[str | None, Verdict],
                    fee_bps: int, *, decision: Decision | None = None,
                    status: NodePeriodStatus = "open",
                    settled_by: str = "settler") -> SettlementPlan:
    """What settling one node-period does.

    ``verdicts`` has the :func:`~eecp.ledger.eligibility.judge` verdict for each app the holds
    name, and for ``None`` (holds naming no app; and the node-period's own verdict when it
    has no holds). ``status`` is the node-period's stored status: a settled one is never
    planned again (the store replays its stored result; a ``decision`` on it is 409
    ``period_finalized``), and a ``decision`` on one that is not held is 409
    ``period_not_held``."""
    if status == "settled":
        raise LedgerConflictError("period_finalized")
    keys: list[str | None] = list(dict.fromkeys(h.app for h in holds)) or [None]
    missing = [k for k in keys if k not in verdicts]
    if missing:
        raise LedgerError("verdict_missing", repr(missing))
    judged = [verdicts[k] for k in keys]
    if len({v.outcome == "held" for v in judged}) > 1:
        # held reasons are node-level facts, so one hold cannot be held and another judged
        raise LedgerError("verdicts_inconsistent", repr(judged))
    held = judged[0].outcome == "held"
    if decision is not None and not held:
        raise LedgerConflictError("period_not_held")
    if held and decision is None:
        return SettlementPlan("held", None, _reasons(judged),
                              tuple(Leg(h, "hold") for h in holds), None)

    def leg(hold: Hold) -> Leg:
        pay = decision == "pay" if held else verdicts[hold.app].eligible
        if pay:
            return Leg(hold, "post", platform_fee(hold.amount, fee_bps))
        return Leg(hold, "void")

    legs = tuple(leg(h) for h in holds)
    if held:
        outcome: Literal["pass", "fail", "mixed"] = "pass" if decision == "pay" else "fail"
    elif not legs:
        outcome = "pass" if judged[0].eligible else "fail"
    else:
        actions = {lg.action for lg in legs}
        outcome = "mixed" if len(actions) > 1 else ("pass" if actions == {"post"} else "fail")
    return SettlementPlan("settled", outcome, _reasons(judged), legs,
                          "admin" if held else settled_by)


def _reasons(verdicts: Iterable[Verdict]) -> tuple[str, ...]:
    return tuple(sorted({r for v in verdicts for r in v.reasons}, key=_ORDER.__getitem__))


# --- abuse (§11) ----------------------------------------------------------------------------

@dataclass(frozen=True)
class AbuseReport:
    report_id: str
    start: int  # a period boundary
    end: int  # a period boundary, > start
    status: ReportStatus
    created_at: float


@dataclass(frozen=True)
class AbuseEffect:
    """The reports that fail (``authorized``) or hold (``pending``) one node-period."""

    authorized: tuple[str, ...] = ()
    pending: tuple[str, ...] = ()


def overlaps(report: AbuseReport, period: Period) -> bool:
    return report.start < period.end and period.start < report.end


def report_periods(report: AbuseReport, length: PeriodLength) -> list[Period]:
    """The periods a report covers (its span is aligned, so exactly those inside it)."""
    return periods_overlapping(report.start, report.end, length)


def abuse_effect(reports: Iterable[AbuseReport], period: Period, now: float,
                 deadline_sec: float) -> AbuseEffect:
    """Which reports fail or hold ``period`` at ``now``: authorized ones overlapping it fail
    it; pending ones overlapping it hold it while ``now < created_at + deadline``."""
    authorized, pending = [], []
    for report in reports:
        if not overlaps(report, period):
            continue
        if report.status == "authorized":
            authorized.append(report.report_id)
        elif report.status == "pending" and now < report.created_at + deadline_sec:
            pending.append(report.report_id)
    return AbuseEffect(tuple(sorted(authorized)), tuple(sorted(pending)))


def abuse_span(period_start: object, period_end: object, now: float, length: PeriodLength,
               max_span_sec: float) -> tuple[int, int]:
    """The span a filed report covers. An absent start is the current period's start, an
    absent end the current period's end. 400 ``invalid_period`` (``format``, ``timezone``,
    ``unaligned``, ``order``) or ``abuse_span_too_long`` (over ``EE_ABUSE_MAX_SPAN_SEC``)."""
    current = period_of(now, length)
    start = current.start if period_start is None else parse_timestamp(period_start,
                                                                       "period_start")
    end = current.end if period_end is None else parse_timestamp(period_end, "period_end")
    for name, t in (("period_start", start), ("period_end", end)):
        if t % length.seconds:
            raise LedgerInputError("invalid_period", "unaligned", field=name)
    if not start < end:
        raise LedgerInputError("invalid_period", "order", field="period_start")
    if end - start > max_span_sec:
        raise LedgerInputError("abuse_span_too_long", field="period_end")
    return start, end


def parse_action(value: object) -> ReportStatus:
    """``authorize`` → ``authorized``, ``deny`` → ``denied``; else 400 ``invalid_action``
    (required: upstream defaulted to authorize)."""
    if value == "authorize":
        return "authorized"
    if value == "deny":
        return "denied"
    raise LedgerInputError("invalid_action", field="action")


def decide_report(status: ReportStatus, decided: ReportStatus) -> Literal["apply", "replay"]:
    """A decision is taken once: a pending report takes it (``apply``), the same decision
    again replays, the opposite one is 409 ``report_already_decided``."""
    if decided == "pending":
        raise ValueError("a decision is authorized or denied")
    if status == "pending":
        return "apply"
    if status == decided:
        return "replay"
    raise LedgerConflictError("report_already_decided", extra={"status": status})
