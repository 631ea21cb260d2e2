"""Stake: the tiers, the penalty, the availability window and its slash, unstake, and the
fraud and status rules (spec §10), as pure values and functions.

**Tiers** (§10.1). Each tier promises an availability over 30 days and backs it with a penalty
of so many hours of the node's *list revenue* (price × capacity under the terms in force, so it
needs no utilisation history and cannot be gamed by idling). The minimum stake is
``max(penalty, EE_STAKE_MIN_USD)`` (:func:`eecp.ledger.settlement.minimum_stake`, built on
:func:`penalty`). The allowed counted downtime is exact: ``30 days × (1 − target)`` as a
:class:`~fractions.Fraction` (25.92 s, 259.2 s, 2,592 s), and a window's downtime (float seconds
as the measurement stores them) is summed exactly too, so "equal to the allowance" means equal,
not "within a float's rounding of it".

**Availability slashing** (§10.2, Cosmos' liveness check). Each measured node-period P is
checked once, in the order the periods are measured (chronological for each node): the window
is the node's measured periods ending at P that start no earlier than :func:`window_start`;
when their downtime exceeds the tier's allowance, the node is slashed ``min(penalty, stake)``
to ``slash:platform``, pending unstakes being voided newest first where the available stake
alone does not cover it (an unstake stays slashable). A slash of 0 (nothing staked) is recorded
as skipped, and counts as a slash for what follows.

After a slash at P the window restarts, and ``EE_SLASH_MIN_INTERVAL_SEC`` later at the
earliest: the window's start is ``max(P'.end − 30 days, the last slash's period end + the
interval, the node's first period)``. So one outage is slashed once (Cosmos' "tombstone cap":
the downtime of the periods that follow within the interval belongs to the outage already
slashed, even when it ran across a period boundary), and an outage that goes on is slashed at
most once per interval. The interval is counted in *period* time, not in the settler's wall
time, so the slashes do not depend on when (or how late) the settler ran. Observer gaps and
excused time are not downtime (§8.3): eecp's own outages never slash anyone.

**Unstake** (§10.3): a pending ``unstake_hold`` released after ``EE_UNSTAKE_COOLDOWN_SEC``; the
available stake after it must still cover the minimum unless the node is retired. The releaser
posts a matured hold unless the node is suspended (it waits) or banned (it is voided and
confiscated).

**Fraud** (§10.4): the refusal reasons that honest agent code on honest hardware cannot produce
for a quote that verified (:data:`FRAUD_SIGNALS`) suspend the node automatically; only the
owner's ``/fraud`` slashes everything and bans it, given audit entries of such refusals from
the node's own platforms (:func:`check_evidence`), or ``force`` with a note.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from types import MappingProxyType
from typing import Final, Literal

from eecp.core.errors import LedgerConflictError, LedgerError, LedgerInputError
from eecp.ledger.eligibility import NodeStatus

Tier = Literal["premium", "standard", "economy"]
ReleaseAction = Literal["post", "wait", "void"]

#: the tiers from low to high (an upgrade needs notice and stake, §7.2)
TIER_ORDER: Final[tuple[Tier, ...]] = ("economy", "standard", "premium")
DAY_SEC: Final = 86_400
#: the span availability is promised over, and the longest slash window (§10.1, §10.2)
WINDOW_SEC: Final = 30 * DAY_SEC
SECONDS_PER_HOUR: Final = 3600


@dataclass(frozen=True)
class TierRule:
    """One row of §10.1's table."""

    tier: Tier
    #: the availability target, exactly (99.999 % is 99999/100000)
    target: Fraction
    #: the penalty (= the minimum stake, above its floor) in hours of list revenue
    penalty_hours: int
    #: the routing and placement price factor, in thousandths (0.90 is 900)
    factor_permille: int

    @property
    def allowed_down_sec(self) -> Fraction:
        """Counted downtime allowed per 30 days: ``30 days × (1 − target)``, exactly."""
        return WINDOW_SEC * (1 - self.target)


TIERS: Final[Mapping[Tier, TierRule]] = MappingProxyType({
    "premium": TierRule("premium", Fraction(99_999, 100_000), 720, 900),
    "standard": TierRule("standard", Fraction(9_999, 10_000), 24, 1000),
    "economy": TierRule("economy", Fraction(999, 1000), 1, 1100),
})


def tier_rule(tier: str) -> TierRule:
    """The rule of a stored tier (a CHECK keeps the column to the three names)."""
    for rule in TIERS.values():
        if rule.tier == tier:
            return rule
    raise LedgerError("tier_unknown", tier)


def parse_tier(value: object, field: str = "stake_tier") -> Tier:
    """``premium`` / ``standard`` / ``economy``; else 400 ``invalid_stake_tier``."""
    for tier in TIER_ORDER:
        if value == tier:
            return tier
    raise LedgerInputError("invalid_stake_tier", field=field)


def tier_rank(tier: str) -> int:
    """0 for economy up to 2 for premium."""
    return TIER_ORDER.index(tier_rule(tier).tier)


def penalty(price_micros_per_vcpu_hour: int, capacity_vcpus: int, tier: str) -> int:
    """The tier's penalty in micros: its hours of list revenue (price × capacity)."""
    return price_micros_per_vcpu_hour * capacity_vcpus * tier_rule(tier).penalty_hours


# --- the availability window (§10.2) ---------------------------------------------------------

def window_start(period_end: int, *, first_period_start: int, last_slash_end: int | None,
                 interval_sec: float) -> float:
    """Where the slash window of the period ending at ``period_end`` starts: the periods that
    start at or after it count. ``last_slash_end`` is the end of the period of the node's latest
    availability slash (skipped ones included), None when there was none."""
    start = float(max(period_end - WINDOW_SEC, first_period_start))
    if last_slash_end is not None:
        start = max(start, last_slash_end + interval_sec)
    return start


@dataclass(frozen=True)
class MeasuredPeriod:
    """One measured node-period, as the window reads it."""

    start: int
    end: int
    down_seconds: float


def window_down(periods: Iterable[MeasuredPeriod], start: float, period_end: int) -> Fraction:
    """The counted downtime, summed exactly, of the periods in ``[start, period_end)``."""
    return sum((Fraction(p.down_seconds) for p in periods
                if p.start >= start and p.end <= period_end), Fraction(0))


def over_allowance(down_seconds: Fraction | float, tier: str) -> bool:
    """Whether a window's downtime breaks the tier's promise (strictly more than allowed)."""
    return Fraction(down_seconds) > tier_rule(tier).allowed_down_sec


@dataclass(frozen=True)
class PendingUnstake:
    """An unstake hold not yet released: its ``stake_op`` id, its pending transfer's id and
    amount, and when it was asked for (the newest is voided first)."""

    op_id: str
    hold_id: int
    amount: int
    created_at: float


@dataclass(frozen=True)
class SlashPlan:
    """What a slash moves: ``amount`` from ``stake:N`` to ``slash:platform``, after voiding the
    unstakes in ``void`` (newest first). ``amount == 0``: nothing staked, recorded as skipped."""

    amount: int
    void: tuple[PendingUnstake, ...] = ()

    @property
    def skipped(self) -> bool:
        return self.amount == 0


def _newest_first(pending: Iterable[PendingUnstake]) -> list[PendingUnstake]:
    return sorted(pending, key=lambda u: (u.created_at, u.op_id), reverse=True)


def plan_slash(wanted: int, available: int, pending: Sequence[PendingUnstake]) -> SlashPlan:
    """Slash ``min(wanted, stake)``, where the stake counts the pending unstakes (they stay
    slashable): the available stake first, then unstakes voided newest first until it covers
    the amount (an unstake is voided whole; what it frees beyond the slash stays staked)."""
    if wanted < 0 or available < 0 or any(u.amount <= 0 for u in pending):
        raise LedgerError("slash_inputs_invalid", f"{wanted} {available}")
    amount = min(wanted, available + sum(u.amount for u in pending))
    void: list[PendingUnstake] = []
    free = available
    for unstake in _newest_first(pending):
        if free >= amount:
            break
        void.append(unstake)
        free += unstake.amount
    return SlashPlan(amount, tuple(void))


def plan_availability_slash(tier: str, down: Fraction, penalty_micros: int, available: int,
                            pending: Sequence[PendingUnstake]) -> SlashPlan | None:
    """The slash of a window with ``down`` seconds of counted downtime, or None when it is
    within the tier's allowance."""
    if not over_allowance(down, tier):
        return None
    return plan_slash(penalty_micros, available, pending)


def plan_fraud_slash(available: int, pending: Sequence[PendingUnstake]) -> SlashPlan:
    """Everything: every pending unstake voided, the whole stake slashed."""
    total = available + sum(u.amount for u in pending)
    plan = plan_slash(total, available, pending)
    return SlashPlan(plan.amount, tuple(_newest_first(pending)))


# --- unstake (§10.3) -----------------------------------------------------------------------

def check_unstake(amount: int, available: int, minimum: int, status: str) -> None:
    """May ``amount`` leave the stake now? 409 ``node_inactive`` (banned),
    ``insufficient_funds`` (more than is available), ``stake_below_minimum`` (what stays would
    not cover the minimum; a retired node needs none)."""
    if status == "banned":
        raise LedgerConflictError("node_inactive")
    if amount > available:
        raise LedgerConflictError("insufficient_funds", extra={"available_micros": available})
    if status != "retired" and available - amount < minimum:
        raise LedgerConflictError("stake_below_minimum", extra={
            "min_required_micros": minimum, "available_micros": available})


def release_action(status: str) -> ReleaseAction:
    """What the releaser does with a matured unstake of a node in ``status``."""
    if status == "suspended":
        return "wait"
    if status == "banned":
        return "void"
    return "post"


# --- fraud and status (§10.4) ----------------------------------------------------------------

#: refusals of quotes that verified which honest code on honest hardware cannot produce
#: (``nonce_mismatch`` is not one: a slow honest agent answering an old challenge makes it)
FRAUD_SIGNALS: Final = frozenset({"report_data_mismatch", "measurements_binding_mismatch",
                                  "pck_revoked", "debug_td"})
#: the statuses ``POST /v1/nodes/{id}/status`` may set (``banned`` only comes from ``/fraud``)
SETTABLE_STATUSES: Final[tuple[NodeStatus, ...]] = ("active", "suspended", "retired")
FRAUD_SUSPECTED: Final = "fraud_suspected"


def is_fraud_signal(verdict: str, reason: str) -> bool:
    return verdict == "refused" and reason in FRAUD_SIGNALS


def suspension_reason(audit_id: int | None) -> str:
    """The ``status_reason`` of an automatic suspension."""
    return f"{FRAUD_SUSPECTED}:{audit_id if audit_id is not None else 'unknown'}"


def suspends(status: str) -> bool:
    """Whether a fraud signal suspends a node in ``status``: an active or retired one (a
    suspended node keeps its first signal's reason; a banned one is done)."""
    return status in ("active", "retired")


def parse_status(value: object) -> NodeStatus:
    """A status the admin may set; else 400 ``invalid_status``."""
    for status in SETTABLE_STATUSES:
        if value == status:
            return status
    raise LedgerInputError("invalid_status", field="status")


@dataclass(frozen=True)
class AuditFact:
    """What an audit entry says, as the fraud evidence rule reads it."""

    audit_id: int
    verdict: str
    reason: str
    platform_id: str | None


def check_evidence(audit_ids: Sequence[int], facts: Mapping[int, AuditFact],
                   platforms: Iterable[str]) -> None:
    """Every entry named must be a fraud signal from one of the node's platforms; else 409
    ``not_fraud_evidence`` naming the first that is not (``facts`` holds the entries found)."""
    owned = frozenset(platforms)
    if not audit_ids:
        raise LedgerConflictError("not_fraud_evidence", "no audit entries")
    for audit_id in audit_ids:
        fact = facts.get(audit_id)
        if (fact is None or not is_fraud_signal(fact.verdict, fact.reason)
                or fact.platform_id is None or fact.platform_id.lower() not in owned):
            raise LedgerConflictError("not_fraud_evidence", extra={"audit_id": audit_id})
