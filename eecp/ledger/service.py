"""The ledger's service: every endpoint of spec §13 as one async call, over the store.

:class:`Ledger` is what the HTTP layer calls. It passes what it read from the request — the
authenticated principal (``admin``, ``launcher``, ``uptime`` or ``node:<id>``), the path
parameters, the raw body and every ``Idempotency-Key`` header value — and writes the
:class:`~eecp.ledger.answers.Answer` it gets back. The HTTP layer decides which *roles* may call
an endpoint (§5's matrix) and turns a node token into its principal (:meth:`node_for_token`);
the service decides what the principal may touch (a node only itself: 403 ``not_your_node``),
parses the body (every 400 before any transaction), and runs the rules.

Every mutating call is **one unit of work** (:meth:`Store.atomic`) that claims its
idempotency key, applies the pure rules of :mod:`eecp.ledger` on locked rows and stores its
answer (:mod:`eecp.ledger.units`). The exceptions are spelled out where they are: finalizing a
period first measures the chain of earlier periods it depends on (each measurement its own
unit, idempotent by nature), and finalizing *every* node of a period settles each node-period in
its own unit, then answers from what they stored.

The writers the rest of eecp calls (the sessions' availability events, the observer
heartbeat, platform claims) and the background jobs (:meth:`settle_due`, :meth:`prune_keys`;
their loops are in :mod:`eecp.ledger.jobs`) are here too. Wall time comes from the injected
clock, read on the trio side before each unit of work.
"""

from __future__ import annotations

import functools
import logging
import secrets
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from eecp.core.clock import Clock, SystemClock
from eecp.core.errors import LedgerError, LedgerNotFoundError, StoreError
from eecp.ledger import abuse, credits, nodes, observe, placement, settle, staking, units, usage
from eecp.ledger.answers import (
    Answer,
    Forbidden,
    LedgerSettings,
    check_node_principal,
    error_answer,
    ok,
    render,
)
from eecp.ledger.idempotency import prune_before
from eecp.ledger.journal import parse_node_id
from eecp.ledger.periods import Period, parse_period_id, settleable_at
from eecp.ledger.routing import NodeView
from eecp.ledger.settlement import Decision
from eecp.ledger.trust import parse_placement_query
from eecp.ledger.units import Request, Work
from eecp.store.ledger_records import LedgerTallies
from eecp.store.store import Store, Tx

log = logging.getLogger("eecp.ledger")

#: how often the settler also releases stale agents (§15: 10 min)
STALE_EVERY_SEC = 600.0
_Parse = Callable[[float], tuple[Request | None, Work]]


@dataclass(frozen=True)
class SettlePass:
    """What one pass of the settler did: ``ran`` is False when another instance holds the
    lease; ``outcomes`` counts the node-periods by their answer's status."""

    ran: bool
    outcomes: dict[str, int] = field(default_factory=dict)
    errors: int = 0


@dataclass(frozen=True)
class ReleasePass:
    """What one pass of the stake releaser did: ``ran`` is False when another instance holds
    the lease; ``outcomes`` counts ``released``, ``waiting``, ``confiscated``, ``none``."""

    ran: bool
    outcomes: dict[str, int] = field(default_factory=dict)


class Ledger:
    """The ledger over ``store`` (see the module docstring). ``instance_id`` names this eecp
    process in ``observer`` rows and the events it writes (random by default)."""

    def __init__(self, store: Store, settings: LedgerSettings | None = None,
                 clock: Clock | None = None, *, instance_id: str | None = None,
                 version: str = "") -> None:
        self._store = store
        self.settings = settings if settings is not None else LedgerSettings()
        self._clock: Clock = clock if clock is not None else SystemClock()
        self.instance_id = instance_id if instance_id is not None else secrets.token_hex(8)
        self._version = version
        self._listeners: list[Callable[[], None]] = []

    # -- plumbing --

    async def _unit(self, parse: _Parse) -> Answer:
        now = self._clock.now()
        try:
            request, work = parse(now)
            return await self._store.atomic(lambda tx: units.run(tx, request, now, work))
        except (LedgerError, Forbidden, StoreError) as exc:
            return error_answer(exc)

    async def _read(self, read: Callable[[Tx], Answer]) -> Answer:
        try:
            return await self._store.snapshot(read)
        except (LedgerError, Forbidden, StoreError) as exc:
            return error_answer(exc)

    # -- credits (§13) --

    async def purchase(self, principal: str, raw: bytes, keys: Sequence[str] = ()) -> Answer:
        """``POST /v1/credits/purchase`` (admin; key required)."""
        return await self._unit(lambda now: credits.purchase(
            self.settings, principal, raw, keys, now))

    async def transfer(self, principal: str, raw: bytes, keys: Sequence[str] = ()) -> Answer:
        """``POST /v1/credits/transfer`` (admin; key required)."""
        return await self._unit(lambda now: credits.transfer(
            self.settings, principal, raw, keys, now))

    async def redeem(self, principal: str, raw: bytes, keys: Sequence[str] = ()) -> Answer:
        """``POST /v1/credits/redeem`` (§21.6; admin; key required)."""
        return await self._unit(lambda now: credits.redeem(
            self.settings, principal, raw, keys, now))

    async def balance(self, principal: str, account_id: str) -> Answer:
        """``GET /v1/balances/{account}`` (admin, launcher, a node for its own accounts)."""
        try:
            account = credits.balance(principal, account_id)
        except (LedgerError, Forbidden) as exc:
            return error_answer(exc)

        def read(tx: Tx) -> Answer:
            row = tx.ledger.accounts([account.id]).get(account.id)
            return credits.balance_answer(account.id, row is not None, units.balances(row))

        return await self._read(read)

    async def check(self) -> Answer:
        """``GET /v1/ledger/check`` (admin): the invariants of §3.3, summed in the database
        in one snapshot."""
        return await self._read(lambda tx: credits.check_answer(tx.ledger.journal_sums()))

    # -- usage and settlement --

    async def report_usage(self, principal: str, raw: bytes,
                           keys: Sequence[str] = ()) -> Answer:
        """``POST /v1/usage/report`` (uptime, admin; natural key, a key honoured on top)."""
        return await self._unit(lambda now: usage.report(
            self.settings, principal, raw, keys, now))

    async def finalize(self, principal: str, period: str, raw: bytes = b"",
                       keys: Sequence[str] = ()) -> Answer:
        """``POST /v1/settlements/{period}/finalize`` (admin): one node-period (``node_id`` in
        the body) or every node with a row in the period."""
        now = self._clock.now()
        try:
            f = settle.parse_finalize(self.settings, principal, period, raw, keys)
            if f.node_id is not None:
                return await self._finalize_node(f.node_id, f.period, f.decision, f.note,
                                                 principal, f.request, now)
            return await self._finalize_all(f, principal, now)
        except (LedgerError, Forbidden, StoreError) as exc:
            return error_answer(exc)

    async def _finalize_node(self, node_id: str, period: Period,
                             decision: Decision | None, note: str | None,
                             settled_by: str, request: Request | None, now: float) -> Answer:
        if settleable_at(period, self.settings.settlement_delay_sec) <= now:
            while not await self._store.atomic(lambda tx: settle.measure_chain(
                    tx, self.settings, node_id, period.previous(), now)):
                pass

        def work(tx: Tx, key_id: int | None) -> Answer:
            settle.check_due(self.settings, period, now)
            return Answer(200, settle.settle_one(
                tx, self.settings, node_id, period, decision=decision, note=note,
                settled_by=settled_by, now=now).encode("ascii"))

        return await self._store.atomic(lambda tx: units.run(tx, request, now, work))

    async def _finalize_all(self, f: settle.Finalize, principal: str, now: float) -> Answer:
        if settleable_at(f.period, self.settings.settlement_delay_sec) <= now:
            earlier = await self._store.atomic(lambda tx: units.peek(tx, f.request))
            if earlier is not None:
                return earlier
            node_ids = await self._store.snapshot(lambda tx: sorted({
                r.node_id for r in tx.ledger.node_periods(period_start=f.period.start)}))
            for node_id in node_ids:
                await self._finalize_node(node_id, f.period, None, f.note, principal, None, now)

        def work(tx: Tx, key_id: int | None) -> Answer:
            settle.check_due(self.settings, f.period, now)
            rows = tx.ledger.node_periods(period_start=f.period.start)
            texts = [r.result for r in rows if r.result is not None]
            return Answer(200, settle.all_nodes_text(f.period, texts).encode("ascii"))

        return await self._store.atomic(lambda tx: units.run(tx, f.request, now, work))

    async def settlements(self, period: str, node_id: str | None = None) -> Answer:
        """``GET /v1/settlements/{period}?node_id=`` (admin): the stored answers, and
        ``status: open`` for node-periods nobody judged yet; settles nothing."""
        try:
            p = parse_period_id(period, self.settings.period)
            wanted = parse_node_id(node_id) if node_id is not None else None
        except LedgerError as exc:
            return error_answer(exc)

        def text(tx: Tx, n: str, row_result: str | None) -> str:
            if row_result is not None:
                return row_result
            holds = len(tx.ledger.usages(n, p.start))
            return render(settle.open_doc(n, p, holds)).decode("ascii")

        def read(tx: Tx) -> Answer:
            if wanted is not None:
                if tx.nodes.node(wanted) is None:
                    raise LedgerNotFoundError("node_not_found")
                row = tx.ledger.node_period(wanted, p.start)
                return Answer(200, text(tx, wanted, row.result if row else None).encode())
            rows = tx.ledger.node_periods(period_start=p.start)
            return Answer(200, settle.all_nodes_text(
                p, [text(tx, r.node_id, r.result) for r in rows]).encode("ascii"))

        return await self._read(read)

    # -- abuse --

    async def file_abuse(self, principal: str, raw: bytes, keys: Sequence[str] = ()) -> Answer:
        """``POST /v1/abuse/reports`` (launcher, admin; key required)."""
        return await self._unit(lambda now: abuse.file(self.settings, principal, raw, keys, now))

    async def decide_abuse(self, principal: str, report_id: str, raw: bytes,
                           keys: Sequence[str] = ()) -> Answer:
        """``POST /v1/abuse/reports/{id}/authorize`` (admin; natural key)."""
        return await self._unit(lambda now: abuse.decide(
            self.settings, principal, report_id, raw, keys, now))

    # -- nodes --

    async def register_node(self, principal: str, raw: bytes,
                            keys: Sequence[str] = ()) -> Answer:
        """``POST /v1/nodes/register`` (admin: create, update; a node: update itself)."""
        answer = await self._unit(lambda now: nodes.register(
            self.settings, principal, raw, keys, now))
        self._changed(answer)
        return answer

    async def get_node(self, principal: str, node_id: str) -> Answer:
        """``GET /v1/nodes/{node_id}`` (admin, launcher, the node itself)."""
        now = self._clock.now()

        def read(tx: Tx) -> Answer:
            node = tx.nodes.node(parse_node_id(node_id))
            if node is None:
                raise LedgerNotFoundError("node_not_found")
            return ok(placement.node_view(tx, node, self.settings, now,
                                          observe.bound_agents(tx, node.node_id)))

        try:
            check_node_principal(principal, node_id)
        except Forbidden as exc:
            return error_answer(exc)
        return await self._read(read)

    async def confirm_platform(self, principal: str, node_id: str, raw: bytes,
                               keys: Sequence[str] = ()) -> Answer:
        """``POST /v1/nodes/{node_id}/platforms`` (the node, admin; natural key)."""
        answer = await self._unit(lambda now: observe.confirm_platform(
            principal, node_id, raw, keys, now))
        self._changed(answer)
        return answer

    async def delete_platform(self, principal: str, node_id: str, ppid: str) -> Answer:
        """``DELETE /v1/nodes/{node_id}/platforms/{ppid}`` (admin)."""
        answer = await self._unit(lambda now: (None, lambda tx, _key: observe.delete_platform(
            tx, self.instance_id, node_id, ppid, now)))
        self._changed(answer)
        return answer

    async def release_agent(self, principal: str, node_id: str, agent_id: str) -> Answer:
        """``POST /v1/nodes/{node_id}/agents/{agent_id}/release`` (launcher, admin)."""
        return await self._unit(lambda now: (None, lambda tx, _key: observe.release_agent(
            tx, self.instance_id, node_id, agent_id, now)))

    async def agent_bindings(self, agent_ids: Sequence[str]
                             ) -> dict[str, tuple[str | None, str | None]]:
        """Each agent's ``(node_id, ppid)`` from its latest availability event (the admin
        view): the node None unless that event binds it (a release leaves it unbound)."""
        def read(tx: Tx) -> dict[str, tuple[str | None, str | None]]:
            found: dict[str, tuple[str | None, str | None]] = {}
            for agent_id in agent_ids:
                last = tx.nodes.last_event(agent_id)
                if last is not None:
                    found[agent_id] = (None if last.kind == "release" else last.node_id,
                                       last.ppid)
            return found

        return await self._store.snapshot(read)

    async def counts(self) -> LedgerTallies:
        """What the ledger's metrics count (journal rows, settled and held node-periods)."""
        return await self._store.snapshot(lambda tx: tx.ledger.counts())
    async def list_nodes(self, query: Iterable[tuple[str, str]] = ()) -> Answer:
        """``GET /v1/nodes`` (admin, launcher; §12): the placement list. ``query`` is the query
        string's ``(name, value)`` pairs, repeats included (``MultiDict.items(multi=True)``)."""
        now = self._clock.now()
        try:
            parsed = parse_placement_query(query)
        except LedgerError as exc:
            return error_answer(exc)
        return await self._read(lambda tx: ok(placement.list_nodes(
            tx, self.settings, parsed, now)))

    # -- stake (§10) --

    async def unstake(self, principal: str, node_id: str, raw: bytes,
                      keys: Sequence[str] = ()) -> Answer:
        """``POST /v1/nodes/{node_id}/unstake`` (the node, admin; key required): 202."""
        return await self._unit(lambda now: staking.unstake(
            self.settings, principal, node_id, raw, keys, now))

    async def set_status(self, principal: str, node_id: str, raw: bytes,
                         keys: Sequence[str] = ()) -> Answer:
        """``POST /v1/nodes/{node_id}/status`` (admin; natural key): clear a suspension,
        suspend, retire."""
        answer = await self._unit(lambda now: staking.set_status(
            principal, node_id, raw, keys, now))
        self._changed(answer)
        return answer

    async def fraud(self, principal: str, node_id: str, raw: bytes,
                    keys: Sequence[str] = ()) -> Answer:
        """``POST /v1/nodes/{node_id}/fraud`` (admin; natural key): slash everything, ban."""
        answer = await self._unit(lambda now: staking.fraud(
            self.settings, principal, node_id, raw, keys, now))
        self._changed(answer)
        return answer

    async def fraud_signal(self, ppid: str, audit_id: int, reason: str) -> str | None:
        """A refusal audited as ``audit_id`` (reason ``reason``, platform ``ppid``): when it is
        a fraud signal (§10.4) the platform's node is suspended. The node's id when this call
        suspended it, else None. The session calls it after writing the audit entry, whose
        ``platform_id`` must be ``ppid``. ``StoreError`` when the database fails."""
        now = self._clock.now()
        suspended = await self._store.atomic(lambda tx: staking.fraud_signal(
            tx, ppid, audit_id, reason, now))
        if suspended is not None:
            self._notify()
        return suspended

    async def node_views(self) -> dict[str, NodeView]:
        """Every confirmed platform's node (status, effective price), by PPID: what the
        proxy's pick ranks with (:func:`eecp.ledger.routing.rank`). ``StoreError`` when the
        database fails (keep the previous views)."""
        now = self._clock.now()
        return await self._store.snapshot(lambda tx: placement.node_views(
            tx, self.settings, now))

    async def stake_stats(self) -> placement.StakeStats:
        """The slash counters and stake gauges of §15 (``StoreError`` when the database
        fails)."""
        now = self._clock.now()
        return await self._store.snapshot(lambda tx: placement.stake_stats(
            tx, self.settings, now))

    def add_node_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (sync, quick) after this process changed what a node view shows
        (a fraud signal, a status change, a ban, a node's terms, a platform confirmed or
        removed), so node views refresh at once; changes made by
        other processes are seen by the periodic refresh (§12: 30 s)."""
        self._listeners.append(listener)

    def remove_node_listener(self, listener: Callable[[], None]) -> None:
        """Stop calling ``listener`` (added by :meth:`add_node_listener`)."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _changed(self, answer: Answer) -> None:
        if answer.status == 200 and not answer.replayed:
            self._notify()

    def _notify(self) -> None:
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:  # a listener's bug must not undo a committed change's answer
                log.exception("ledger: a node listener failed")

    async def node_for_token(self, token: str) -> str | None:
        """The node a bearer token belongs to (the HTTP layer's ``node:<id>`` principal)."""
        return await self._store.snapshot(lambda tx: nodes.node_of_token(tx, token))

    # -- what the rest of eecp writes --

    async def record_availability(self, events: Sequence[observe.SessionEvent]) -> None:
        """Append sessions' events (§8.2), each on the node its PPID is confirmed for.
        ``StoreError`` when the database fails: the caller's outbox keeps them and retries."""
        if events:
            await self._store.atomic(lambda tx: observe.record_events(
                tx, self.instance_id, events))

    async def claim_platform(self, ppid: str, node_id: str, agent_id: str,
                             audit_id: int | None) -> bool:
        """An accepted attestation from ``ppid`` named ``node_id`` (§7.1 step 1)."""
        now = self._clock.now()
        return await self._store.atomic(lambda tx: observe.claim_platform(
            tx, ppid, node_id, agent_id, audit_id, now))

    async def platform_banned(self, ppid: str) -> bool:
        return await self._store.snapshot(lambda tx: observe.platform_banned(tx, ppid))

    async def observer_heartbeat(self) -> bool:
        """This instance is watching now (§8.1); False once it has stopped."""
        now = self._clock.now()
        return await self._store.atomic(lambda tx: observe.heartbeat(
            tx, self.instance_id, self._version, now))

    async def observer_stop(self) -> bool:
        now = self._clock.now()
        return await self._store.atomic(lambda tx: observe.stop_observing(
            tx, self.instance_id, now))

    # -- background jobs (§15) --

    async def settle_due(self, *, use_lease: bool = True) -> SettlePass:
        """One pass of the settler: at most ``settle_batch`` due node-periods, oldest first.
        The ``settler`` lease only avoids duplicate work between instances (two settlers
        without it still settle each node-period once)."""
        now = self._clock.now()
        if use_lease and not await self._store.atomic(lambda tx: tx.ledger.take_lease(
                "settler", self.instance_id, now, 3 * self.settings.settle_interval_sec)):
            return SettlePass(False)
        todo = await self._store.snapshot(lambda tx: settle.due_work(
            tx, self.settings, now, self.settings.settle_batch))
        outcomes: Counter[str] = Counter()
        errors = 0
        for node_id, start in todo:
            try:
                answer = await self._finalize_node(
                    node_id, settle.period_for(self.settings, start), None, None, "settler",
                    None, now)
            except LedgerError as exc:  # a broken rule for this node: the others go on
                answer = error_answer(exc)
            if answer.status == 200:
                outcomes[str(answer.json()["status"])] += 1
            else:
                errors += 1
                log.error("settler: %s@%s answered %s %s", node_id, start, answer.status,
                          answer.body[:200])
        return SettlePass(True, dict(outcomes), errors)

    async def release_settler(self) -> None:
        """Give up the ``settler`` lease, if this instance holds it (a graceful stop)."""
        await self._store.atomic(lambda tx: tx.ledger.release_lease("settler", self.instance_id))
    async def release_unstakes(self, *, use_lease: bool = True) -> ReleasePass:
        """One pass of the stake releaser (§10.3, §15): matured unstakes posted (active or
        retired node), left waiting (suspended), confiscated (banned); at most
        ``release_batch``, each in its own unit of work. The ``stake`` lease only avoids
        duplicate work (the node's row lock makes a release happen once)."""
        now = self._clock.now()
        if use_lease and not await self._store.atomic(lambda tx: tx.ledger.take_lease(
                "stake", self.instance_id, now, 3 * self.settings.settle_interval_sec)):
            return ReleasePass(False)
        matured = await self._store.snapshot(lambda tx: [
            op.op_id for op in tx.ledger.matured_unstakes(now, self.settings.release_batch)])
        outcomes: Counter[str] = Counter()
        for op_id in matured:
            outcomes[await self._store.atomic(functools.partial(
                staking.release_one, op_id=op_id, now=now))] += 1
        return ReleasePass(True, dict(outcomes))

    async def release_stale(self, *, use_lease: bool = True) -> dict[str, int] | None:
        """One pass of the stale-agent releaser (§8.4, §15): agents down for
        ``EE_AGENT_STALE_SEC`` released ``stale``, those of expired or deleted apps
        ``app_gone``; how many by reason, or None when another instance holds the ``stale``
        lease (which only avoids duplicate work)."""
        now = self._clock.now()
        if use_lease and not await self._store.atomic(lambda tx: tx.ledger.take_lease(
                "stale", self.instance_id, now, 3 * STALE_EVERY_SEC)):
            return None
        return await self._store.atomic(lambda tx: observe.release_stale(
            tx, self.instance_id, now, self.settings.agent_stale_sec))

    async def prune_keys(self) -> int:
        """Delete idempotency keys past ``EE_IDEMPOTENCY_RETENTION_DAYS`` (natural keys are
        permanent)."""
        before = prune_before(self._clock.now(), self.settings.idempotency_retention_days)
        return await self._store.atomic(lambda tx: tx.ledger.prune_keys(before))
