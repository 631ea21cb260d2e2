"""Price and trust: the history factor, the effective price and the placement list (spec §12).

A node's **effective price** (µ$ per vCPU-hour, an integer) is what the launcher compares:
``price × tier_factor × history_factor``.

- ``tier_factor`` is 0.90 / 1.00 / 1.10 for premium / standard / economy
  (:data:`eecp.ledger.stake.TIERS`): a stronger promise, backed by a larger stake, is preferred.
- ``history_factor = 1 + missed / max(1, measured)`` over the node's last
  :data:`HISTORY_PERIODS` (168) measured periods, where a *missed* period had counted downtime,
  plus 0.5 when an authorized abuse report overlaps the last 30 days. It lies in [1, 2.5]:
  deterministic, explainable, and computed from eecp's own records only.

The history factor is kept in parts per million (:func:`history_ppm`, rounded half up), which is
what the settler caches on the node row (``trust_ppm``) after each settlement; the effective price
is computed from it and the terms in force, in integers, rounded half up
(:func:`effective_price`), so every reader (placement, the node view, the proxy's pick) gets the
same number, and a price change shows at its period boundary without waiting for a settlement.

**Placement** (``GET /v1/nodes``) is where a price actually matters under vCPU-hour billing:
the eligible nodes (``active``, stake covering the minimum, at least one agent up now) sorted by
effective price, then node id (:func:`place`), with the filters of :class:`PlacementQuery`. A
node below its minimum stake leaves this list, though its agents are still routed (its users'
apps must be served).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Final

from eecp.core.errors import LedgerError, LedgerInputError
from eecp.ledger.eligibility import NodeStatus
from eecp.ledger.money import format_usd
from eecp.ledger.stake import TIER_ORDER, MeasuredPeriod, Tier, tier_rule

#: how many measured periods the history factor looks back over
HISTORY_PERIODS: Final = 168
PPM: Final = 1_000_000
#: the history factor of a node with no history (and the ``trust_ppm`` column's default)
NEUTRAL_PPM: Final = PPM
#: the history factor's penalty for an authorized abuse report in the last 30 days
ABUSE_PPM: Final = PPM // 2
MAX_CAPACITY: Final = 4096


def _half_up(numerator: int, denominator: int) -> int:
    return (2 * numerator + denominator) // (2 * denominator)


def history_ppm(missed: int, measured: int, abuse: bool) -> int:
    """The history factor in ppm: ``1 + missed / max(1, measured)`` (+ 0.5 with ``abuse``)."""
    if not 0 <= missed <= measured:
        raise LedgerError("history_invalid", f"{missed}/{measured}")
    return PPM + _half_up(PPM * missed, max(1, measured)) + (ABUSE_PPM if abuse else 0)


def history_of(down_seconds: Sequence[float], abuse: bool) -> int:
    """The history factor (ppm) of the measured periods' downtime, oldest first (only the last
    :data:`HISTORY_PERIODS` count)."""
    recent = down_seconds[-HISTORY_PERIODS:]
    return history_ppm(sum(1 for d in recent if d > 0), len(recent), abuse)


def effective_price(price_micros_per_vcpu_hour: int, tier: str, trust_ppm: int) -> int:
    """``price × tier_factor × history_factor``, in µ$ per vCPU-hour, rounded half up."""
    factor = tier_rule(tier).factor_permille
    return _half_up(price_micros_per_vcpu_hour * factor * trust_ppm, 1000 * PPM)


def availability_of(periods: Iterable[MeasuredPeriod]) -> float | None:
    """The share of measured time without counted downtime (six decimals); None when nothing
    was measured."""
    total = Fraction(0)
    down = Fraction(0)
    for p in periods:
        total += p.end - p.start
        down += Fraction(p.down_seconds)
    if total == 0:
        return None
    return round(float(1 - down / total), 6)


def ppm_text(ppm: int) -> float:
    """A ppm factor as the API shows it (``trust_factor``: 1.25)."""
    return round(ppm / PPM, 6)


# --- placement ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Offer:
    """One node as placement sees it."""

    node_id: str
    status: NodeStatus
    tier: Tier
    price_micros: int
    capacity_vcpus: int
    trust_ppm: int
    stake_ok: bool
    agents_up: int
    reported_micro_hours_last_period: int = 0
    availability_30d: float | None = None

    @property
    def effective_micros(self) -> int:
        return effective_price(self.price_micros, self.tier, self.trust_ppm)

    @property
    def eligible(self) -> bool:
        return self.status == "active" and self.stake_ok and self.agents_up > 0


@dataclass(frozen=True)
class PlacementQuery:
    """``GET /v1/nodes``' filters."""

    tier: Tier | None = None
    min_capacity_vcpus: int | None = None
    include_ineligible: bool = False


_QUERY_NAMES: Final = ("tier", "min_capacity_vcpus", "include_ineligible")


def _invalid(name: str) -> LedgerInputError:
    return LedgerInputError(f"invalid_query:{name}", field=name)


def parse_placement_query(pairs: Iterable[tuple[str, str]]) -> PlacementQuery:
    """The query string's ``(name, value)`` pairs: each known name at most once; else 400
    ``invalid_query:<name>`` (an unknown name, a repeated one, or a bad value)."""
    seen: dict[str, str] = {}
    for name, value in pairs:
        if name not in _QUERY_NAMES or name in seen:
            raise _invalid(name if len(name) <= 64 and name.isprintable() else "name")
        seen[name] = value
    tier: Tier | None = None
    if "tier" in seen:
        tier = next((t for t in TIER_ORDER if t == seen["tier"]), None)
        if tier is None:
            raise _invalid("tier")
    capacity = None
    if "min_capacity_vcpus" in seen:
        text = seen["min_capacity_vcpus"]
        if not (text.isascii() and text.isdigit() and len(text) <= 4 and text[0] != "0"
                and int(text) <= MAX_CAPACITY):
            raise _invalid("min_capacity_vcpus")
        capacity = int(text)
    include = seen.get("include_ineligible", "false")
    if include not in ("true", "false"):
        raise _invalid("include_ineligible")
    return PlacementQuery(tier, capacity, include == "true")


def place(offers: Iterable[Offer], query: PlacementQuery) -> list[Offer]:
    """The placement list: the eligible offers passing the filters by effective price, then
    node id; with ``include_ineligible``, the others after them in the same order."""
    chosen = [o for o in offers
              if (query.tier is None or o.tier == query.tier)
              and (query.min_capacity_vcpus is None
                   or o.capacity_vcpus >= query.min_capacity_vcpus)]
    chosen.sort(key=lambda o: (o.effective_micros, o.node_id))
    eligible = [o for o in chosen if o.eligible]
    if not query.include_ineligible:
        return eligible
    return eligible + [o for o in chosen if not o.eligible]


def offer_doc(offer: Offer) -> dict[str, object]:
    """One entry of the placement list (§12's fields, and whether it is eligible)."""
    return {
        "node_id": offer.node_id, "tier": offer.tier,
        "price_usd_per_vcpu_hour": format_usd(offer.price_micros),
        "effective_price_usd_per_vcpu_hour": format_usd(offer.effective_micros),
        "effective_price_micros_per_vcpu_hour": offer.effective_micros,
        "trust_factor": ppm_text(offer.trust_ppm),
        "capacity_vcpus": offer.capacity_vcpus,
        # vCPU-hours are kept in millionths, like money, and share its exact rendering
        "reported_vcpu_hours_last_period": format_usd(offer.reported_micro_hours_last_period),
        "availability_30d": offer.availability_30d,
        "status": offer.status, "stake_ok": offer.stake_ok, "agents_up": offer.agents_up,
        "eligible": offer.eligible,
    }
