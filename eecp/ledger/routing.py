"""The proxy's pick among an app's routable agents, weighted by price and trust (spec §12).

Today (and with the ledger off) the registry orders an app's routable agents by ``in_flight``,
least loaded first, ties in the registry's order; the proxy tries the first and retries once on
the next. :func:`rank` keeps that order exactly when no candidate is *bound* to a node (has no
:class:`NodeView` for its platform), and otherwise:

1. drops the agents whose node is ``banned`` or ``suspended`` (a fraud signal takes a node's
   agents out of routing at once);
2. ``best`` is the lowest effective price among the bound agents left;
3. *preferred* are the bound agents with ``effective × 100 ≤ best × (100 + band_pct)``
   (``EE_ROUTE_PRICE_BAND_PCT``, 10), compared in integers;
4. the order is: the preferred by ``in_flight``, then the other bound agents by ``in_flight``,
   then the unbound ones by ``in_flight`` (an unbound agent is routable as today, never paid,
   and sorted last).

Why a band and not "cheapest first": under vCPU-hour billing the request routing does not change
anyone's bill, so the pick expresses trust, and a strict order would send every request to one
agent; within the band, load decides. A node below its minimum stake is still routed: its users'
apps must be served (it only leaves the placement list).

Everything here is plain values: the registry builds the candidates (anything with an
``agent_id``, an ``in_flight`` and the ``ppid`` of its latest accepted quote), and the views come
from :meth:`eecp.ledger.service.Ledger.node_views`, keyed by PPID, since an agent is on node N
exactly while its latest accepted quote came from a platform confirmed for N (§7.1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol, TypeVar

from eecp.ledger.eligibility import NodeStatus

#: a node in these statuses takes its agents out of routing
UNROUTABLE: Final = frozenset({"banned", "suspended"})


class Routable(Protocol):
    @property
    def agent_id(self) -> str: ...

    @property
    def in_flight(self) -> int: ...

    @property
    def ppid(self) -> str | None: ...


R = TypeVar("R", bound=Routable)


@dataclass(frozen=True)
class Candidate:
    """A plain candidate (tests, and callers without an object of their own)."""

    agent_id: str
    in_flight: int = 0
    ppid: str | None = None


@dataclass(frozen=True)
class NodeView:
    """What routing knows of the node a platform is confirmed for."""

    node_id: str
    status: NodeStatus
    effective_micros: int


def rank(candidates: Sequence[R], views: Mapping[str, NodeView], band_pct: int) -> list[R]:
    """The order the proxy tries ``candidates`` in (see the module docstring). ``views`` maps a
    PPID to its node's view; a candidate without one is unbound."""
    if band_pct < 0:
        raise ValueError("band_pct must be >= 0")
    bound: list[tuple[R, NodeView]] = []
    unbound: list[R] = []
    for candidate in candidates:
        view = views.get(candidate.ppid) if candidate.ppid is not None else None
        if view is None:
            unbound.append(candidate)
        elif view.status not in UNROUTABLE:
            bound.append((candidate, view))
    if not bound:
        return _by_load(unbound)
    best = min(view.effective_micros for _, view in bound)
    limit = best * (100 + band_pct)
    preferred = [c for c, view in bound if view.effective_micros * 100 <= limit]
    others = [c for c, view in bound if view.effective_micros * 100 > limit]
    return _by_load(preferred) + _by_load(others) + _by_load(unbound)


def _by_load(agents: list[R]) -> list[R]:
    # sorted() is stable: ties keep the registry's order, exactly as today's pick
    return sorted(agents, key=lambda a: a.in_flight)
