"""The ledger's operations inside a unit of work: accounts, transfers, idempotency keys, usage,
node-periods, abuse reports, stake operations, job leases and the check's sums.

A :class:`LedgerTx` is obtained from a unit of work's :class:`~eecp.store.store.Tx` as
``tx.ledger``; its methods are sync and run in the unit of work's worker thread and
transaction. They read and write rows and nothing else: which transfer is allowed, what a
counter becomes and when a key replays are the ledger's rules (:mod:`eecp.ledger`), which calls
these with the values its rules computed. Counters are written as absolute values under the
row's lock, never ``SET x = x + ?`` (SQLite would silently turn an overflow into a REAL).

Reads with ``lock=True`` take the row lock on PostgreSQL (SQLite's ``BEGIN IMMEDIATE`` already
holds the whole file); the order they must be taken in is the store's (see
:mod:`eecp.store.store`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import peewee

from eecp.store.ledger_records import (
    AbuseRow,
    AccountRow,
    JournalSums,
    KeyRow,
    LedgerTallies,
    NodePeriodRow,
    StakeOpRow,
    TransferRow,
    UsageRow,
)
from eecp.store.ledger_tables import LedgerBound


class LedgerTx:
    """The ledger's rows in one unit of work (``tx.ledger``)."""

    def __init__(self, db: Any, m: LedgerBound, locks: bool) -> None:
        self._db = db
        self._m = m
        self._locks = locks

    def _read(self, query: Any, lock: bool) -> Any:
        return query.for_update() if lock and self._locks else query

    def _insert_if_absent(self, model: Any, data: dict[str, Any]) -> bool:
        # INSERT OR IGNORE / ON CONFLICT DO NOTHING: on PostgreSQL a concurrent insert of the
        # same key waits for the other transaction and then does nothing
        cursor = self._db.execute(model.insert(**data).on_conflict_ignore())
        return bool(cursor.rowcount == 1)

    # -- accounts --

    def accounts(self, ids: Iterable[str], *, lock: bool = False) -> dict[str, AccountRow]:
        """The existing accounts among ``ids``, locked in id order with ``lock`` (the order
        every transaction takes account locks in)."""
        wanted = sorted(set(ids))
        if not wanted:
            return {}
        A = self._m.Account
        query = A.select().where(A.id.in_(wanted)).order_by(A.id)
        return {row["id"]: AccountRow(**row) for row in self._read(query, lock).dicts()}

    def insert_account(self, row: AccountRow) -> bool:
        """Create ``row`` unless the account exists; False when it does."""
        return self._insert_if_absent(self._m.Account, dataclasses.asdict(row))

    def write_counters(self, account_id: str, debits_pending: int, debits_posted: int,
                       credits_pending: int, credits_posted: int) -> None:
        """Set the account's four counters (read it locked first)."""
        A = self._m.Account
        changed = A.update(debits_pending=debits_pending, debits_posted=debits_posted,
                           credits_pending=credits_pending,
                           credits_posted=credits_posted).where(A.id == account_id).execute()
        if changed != 1:
            raise LookupError(f"no account {account_id!r} to write")

    # -- transfers --

    def insert_transfer(self, row: TransferRow) -> int:
        """Append ``row`` to the journal; the id the database gave it."""
        data = dataclasses.asdict(row)
        del data["id"]
        return int(self._m.Transfer.insert(**data).execute())

    def insert_unique_ref(self, row: TransferRow) -> int | None:
        """Append ``row``, whose ``(ref_type, ref_id)`` is unique (a purchase's
        ``external_ref``); None, writing nothing, when another transfer holds that reference
        (on PostgreSQL possibly one committed meanwhile by a concurrent transaction)."""
        try:
            with self._db.atomic():  # a savepoint: the failed insert leaves the rest intact
                return self.insert_transfer(row)
        except peewee.IntegrityError:
            if row.ref_type is None or row.ref_id is None or self.transfer_by_ref(
                    row.ref_type, row.ref_id) is None:
                raise
            return None

    def transfers(self, ids: Iterable[int]) -> dict[int, TransferRow]:
        wanted = sorted(set(ids))
        if not wanted:
            return {}
        T = self._m.Transfer
        return {row["id"]: TransferRow(**row)
                for row in T.select().where(T.id.in_(wanted)).dicts()}

    def resolutions(self, pending_ids: Iterable[int]) -> dict[int, TransferRow]:
        """The posts and voids of the holds ``pending_ids``, by the hold they resolve."""
        wanted = sorted(set(pending_ids))
        if not wanted:
            return {}
        T = self._m.Transfer
        return {row["pending_id"]: TransferRow(**row)
                for row in T.select().where(T.pending_id.in_(wanted)).dicts()}

    def transfers_by_public_id(self, transfer_ids: Iterable[str]) -> dict[str, TransferRow]:
        """Transfers by their public ``tr_…`` ids."""
        wanted = sorted(set(transfer_ids))
        if not wanted:
            return {}
        T = self._m.Transfer
        return {row["transfer_id"]: TransferRow(**row)
                for row in T.select().where(T.transfer_id.in_(wanted)).dicts()}

    def transfer_by_ref(self, ref_type: str, ref_id: str) -> TransferRow | None:
        """The first transfer with this reference."""
        T = self._m.Transfer
        row = (T.select().where((T.ref_type == ref_type) & (T.ref_id == ref_id))
               .order_by(T.id).dicts().first())
        return TransferRow(**row) if row is not None else None

    def journal(self) -> list[TransferRow]:
        """Every transfer, in journal order (tests, and small ledgers' tools)."""
        T = self._m.Transfer
        return [TransferRow(**row) for row in T.select().order_by(T.id).dicts()]

    # -- idempotency keys --

    def claim_key(self, principal: str, key: str, route: str, request_hash: str,
                  now: float) -> int | None:
        """Claim ``(principal, key)`` for this transaction: the new row's id, or None when the
        key is claimed already (on PostgreSQL after waiting for a concurrent claimer to
        commit). The answer is stored with :meth:`answer_key` before commit, so no other
        transaction ever sees the claim without it."""
        Key = self._m.Idempotency
        cursor = self._db.execute(Key.insert(
            principal=principal, key=key, route=route, request_hash=request_hash,
            created_at=now).on_conflict_ignore())
        if cursor.rowcount != 1:
            return None
        row = self.key(principal, key)
        if row is None:  # pragma: no cover - inserted by this very transaction
            raise LookupError("a claimed key vanished")
        return row.id

    def key(self, principal: str, key: str) -> KeyRow | None:
        Key = self._m.Idempotency
        row = Key.select().where((Key.principal == principal) & (Key.key == key)).dicts().first()
        return KeyRow(**row) if row is not None else None

    def key_by_id(self, key_id: int) -> KeyRow | None:
        Key = self._m.Idempotency
        row = Key.select().where(Key.id == key_id).dicts().first()
        return KeyRow(**row) if row is not None else None

    def answer_key(self, key_id: int, status: int, response: str) -> None:
        Key = self._m.Idempotency
        Key.update(status_code=status, response=response).where(Key.id == key_id).execute()

    def prune_keys(self, before: float) -> int:
        """Delete keys created before ``before``; how many."""
        Key = self._m.Idempotency
        return int(Key.delete().where(Key.created_at < before).execute())

    # -- usage --

    def usage(self, account_id: str, node_id: str, app_key: str,
              period_start: int) -> UsageRow | None:
        """The report with this natural key."""
        U = self._m.Usage
        row = U.select().where(
            (U.account_id == account_id) & (U.node_id == node_id) & (U.app_key == app_key)
            & (U.period_start == period_start)).dicts().first()
        return UsageRow(**row) if row is not None else None

    def usages(self, node_id: str, period_start: int) -> list[UsageRow]:
        """The node-period's reports, oldest hold first."""
        U = self._m.Usage
        query = U.select().where((U.node_id == node_id) & (U.period_start == period_start))
        return [UsageRow(**row) for row in query.order_by(U.hold_id).dicts()]

    def insert_usage(self, row: UsageRow) -> None:
        self._m.Usage.insert(**dataclasses.asdict(row)).execute()

    def set_usage_status(self, usage_id: str, status: str) -> None:
        U = self._m.Usage
        U.update(status=status).where(U.usage_id == usage_id).execute()

    # -- node-periods --

    def ensure_node_period(self, node_id: str, start: int, end: int) -> bool:
        """Create the node-period row (open) unless it exists; True when this call made it."""
        return self._insert_if_absent(self._m.NodePeriod, {
            "node_id": node_id, "period_start": start, "period_end": end})

    def node_period(self, node_id: str, start: int, *, lock: bool = False
                    ) -> NodePeriodRow | None:
        P = self._m.NodePeriod
        query = P.select().where((P.node_id == node_id) & (P.period_start == start))
        row = self._read(query, lock).dicts().first()
        return NodePeriodRow(**row) if row is not None else None

    def lock_node_periods(self, node_id: str, starts: Iterable[int]) -> dict[int, NodePeriodRow]:
        """The node's rows at ``starts`` (created open where missing), locked oldest first."""
        wanted = sorted(set(starts))
        P = self._m.NodePeriod
        if not wanted:
            return {}
        query = (P.select().where((P.node_id == node_id) & P.period_start.in_(wanted))
                 .order_by(P.period_start))
        return {row["period_start"]: NodePeriodRow(**row)
                for row in self._read(query, True).dicts()}

    def write_node_period(self, row: NodePeriodRow) -> None:
        """Replace every field of the node-period ``row`` names (read it locked first)."""
        P = self._m.NodePeriod
        data = dataclasses.asdict(row)
        del data["node_id"], data["period_start"]
        changed = P.update(**data).where(
            (P.node_id == row.node_id) & (P.period_start == row.period_start)).execute()
        if changed != 1:
            raise LookupError(f"no node-period {row.node_id}@{row.period_start} to write")

    def last_measured(self, node_id: str, before: int) -> NodePeriodRow | None:
        """The node's latest measured node-period starting before ``before``."""
        P = self._m.NodePeriod
        row = (P.select().where((P.node_id == node_id) & (P.period_start < before)
                                & P.measured_at.is_null(False))
               .order_by(P.period_start.desc()).dicts().first())
        return NodePeriodRow(**row) if row is not None else None

    def node_periods(self, *, node_id: str | None = None, period_start: int | None = None,
                     statuses: Iterable[str] | None = None, until: int | None = None,
                     newest: int | None = None, since: float | None = None,
                     measured: bool | None = None) -> list[NodePeriodRow]:
        """Node-periods matching every filter given, oldest first (``newest``: only the last
        so many, still oldest first). ``until``: starting at or before it; ``since``: starting
        at or after it; ``measured``: only measured (True) or unmeasured (False) ones."""
        P = self._m.NodePeriod
        query = P.select()
        if node_id is not None:
            query = query.where(P.node_id == node_id)
        if period_start is not None:
            query = query.where(P.period_start == period_start)
        if statuses is not None:
            query = query.where(P.status.in_(sorted(set(statuses))))
        if until is not None:
            query = query.where(P.period_start <= until)
        if since is not None:
            query = query.where(P.period_start >= since)
        if measured is not None:
            query = query.where(P.measured_at.is_null(not measured))
        if newest is not None:
            query = query.order_by(P.period_start.desc(), P.node_id).limit(newest)
            return [NodePeriodRow(**row) for row in reversed(list(query.dicts()))]
        query = query.order_by(P.period_start, P.node_id)
        return [NodePeriodRow(**row) for row in query.dicts()]

    def measured_frontier(self) -> dict[str, int]:
        """Each node's latest measured node-period start (a node's measured periods are a
        chain from its first one)."""
        P = self._m.NodePeriod
        query = (P.select(P.node_id, peewee.fn.MAX(P.period_start))
                 .where(P.measured_at.is_null(False)).group_by(P.node_id))
        return {node_id: int(start) for node_id, start in query.tuples()}

    # -- abuse --

    def insert_report(self, row: AbuseRow) -> None:
        self._m.AbuseReport.insert(**dataclasses.asdict(row)).execute()

    def report(self, report_id: str, *, lock: bool = False) -> AbuseRow | None:
        R = self._m.AbuseReport
        row = self._read(R.select().where(R.report_id == report_id), lock).dicts().first()
        return AbuseRow(**row) if row is not None else None

    def write_report(self, row: AbuseRow) -> None:
        R = self._m.AbuseReport
        data = dataclasses.asdict(row)
        del data["report_id"]
        R.update(**data).where(R.report_id == row.report_id).execute()

    def reports(self, node_id: str, start: int, end: int) -> list[AbuseRow]:
        """The node's reports overlapping ``[start, end)``."""
        R = self._m.AbuseReport
        query = R.select().where((R.node_id == node_id) & (R.period_start < end)
                                 & (R.period_end > start)).order_by(R.created_at)
        return [AbuseRow(**row) for row in query.dicts()]

    # -- stake operations --

    def insert_stake_op(self, row: StakeOpRow) -> None:
        self._m.StakeOp.insert(**dataclasses.asdict(row)).execute()

    def stake_ops(self, node_id: str, *, kinds: Iterable[str] | None = None,
                  statuses: Iterable[str] | None = None) -> list[StakeOpRow]:
        """The node's stake operations (of ``kinds``, in ``statuses``), oldest first."""
        S = self._m.StakeOp
        query = S.select().where(S.node_id == node_id)
        if kinds is not None:
            query = query.where(S.kind.in_(sorted(set(kinds))))
        if statuses is not None:
            query = query.where(S.status.in_(sorted(set(statuses))))
        return [StakeOpRow(**row) for row in query.order_by(S.created_at, S.op_id).dicts()]

    def stake_op(self, op_id: str) -> StakeOpRow | None:
        """One stake operation (read it under its node's row lock to act on it: a stake
        operation has no lock of its own)."""
        S = self._m.StakeOp
        row = S.select().where(S.op_id == op_id).dicts().first()
        return StakeOpRow(**row) if row is not None else None

    def write_stake_op(self, row: StakeOpRow) -> None:
        S = self._m.StakeOp
        data = dataclasses.asdict(row)
        del data["op_id"]
        if S.update(**data).where(S.op_id == row.op_id).execute() != 1:
            raise LookupError(f"no stake operation {row.op_id!r} to write")

    def matured_unstakes(self, now: float, limit: int) -> list[StakeOpRow]:
        """Pending unstakes whose ``release_at`` has come, the oldest release first."""
        S = self._m.StakeOp
        query = (S.select().where((S.kind == "unstake") & (S.status == "pending")
                                  & (S.release_at <= now))
                 .order_by(S.release_at, S.op_id).limit(limit))
        return [StakeOpRow(**row) for row in query.dicts()]

    def stake_op_counts(self) -> dict[tuple[str, str], int]:
        """How many stake operations there are of each ``(kind, status)``."""
        S = self._m.StakeOp
        query = S.select(S.kind, S.status, peewee.fn.COUNT(S.op_id)).group_by(S.kind, S.status)
        return {(str(kind), str(status)): int(n) for kind, status, n in query.tuples()}

    def usage_totals(self, period_start: int) -> dict[str, int]:
        """Each node's reported micro-vCPU-hours in the period starting at ``period_start``."""
        U = self._m.Usage
        query = (U.select(U.node_id, peewee.fn.SUM(U.vcpu_micro_hours))
                 .where(U.period_start == period_start).group_by(U.node_id))
        return {str(node_id): int(total) for node_id, total in query.tuples()}

    # -- job leases --

    def take_lease(self, name: str, holder: str, now: float, ttl_sec: float) -> bool:
        """Hold the lease ``name`` until ``now + ttl_sec`` if it is free, expired or already
        ours; False when another holder has it. Leases only avoid duplicate work: every job
        is correct without one."""
        L = self._m.JobLease
        if self._insert_if_absent(L, {"name": name, "holder": holder,
                                      "expires_at": now + ttl_sec}):
            return True
        changed = L.update(holder=holder, expires_at=now + ttl_sec).where(
            (L.name == name) & ((L.expires_at < now) | (L.holder == holder))).execute()
        return bool(changed)

    def release_lease(self, name: str, holder: str) -> bool:
        """Give the lease ``name`` up if ``holder`` has it (a graceful stop: the next instance
        need not wait for it to expire)."""
        L = self._m.JobLease
        return bool(L.delete().where((L.name == name) & (L.holder == holder)).execute())

    # -- the check --

    def journal_sums(self) -> JournalSums:
        """The four counters of every account next to their sums over the journal, plus the
        other invariants SQL can count (run it in :meth:`Store.snapshot`, so that every
        statement reads one state)."""
        accounts = {str(r[0]): (int(r[1]), int(r[2]), int(r[3]), int(r[4])) for r in self._sql(
            "SELECT id, debits_pending, debits_posted, credits_pending, credits_posted "
            "FROM ledger_account")}
        journal: dict[str, list[int]] = {}
        open_holds = ("FROM ledger_transfer h WHERE h.phase = 'pending' AND NOT EXISTS "
                      "(SELECT 1 FROM ledger_transfer r WHERE r.pending_id = h.id)")
        sums = (
            (0, f"SELECT h.debit_account, SUM(h.amount) {open_holds} GROUP BY h.debit_account"),
            (1, "SELECT debit_account, SUM(amount) FROM ledger_transfer "
                "WHERE phase IN ('single', 'post') GROUP BY debit_account"),
            (2, f"SELECT h.credit_account, SUM(h.amount) {open_holds} GROUP BY h.credit_account"),
            (3, "SELECT credit_account, SUM(amount) FROM ledger_transfer "
                "WHERE phase IN ('single', 'post') GROUP BY credit_account"),
        )
        for index, sql in sums:
            for account_id, total in self._sql(sql):
                journal.setdefault(str(account_id), [0, 0, 0, 0])[index] = int(total)
        bad = [int(r[0]) for r in self._sql(
            "SELECT r.pending_id FROM ledger_transfer r LEFT JOIN ledger_transfer h "
            "ON h.id = r.pending_id WHERE r.pending_id IS NOT NULL AND (h.id IS NULL "
            "OR h.phase <> 'pending' OR h.id > r.id OR h.debit_account <> r.debit_account "
            "OR h.credit_account <> r.credit_account OR h.amount <> r.amount) "
            "ORDER BY r.pending_id")]
        held = self._sql(
            "SELECT COUNT(*) FROM usage u JOIN node_period p ON p.node_id = u.node_id "
            "AND p.period_start = u.period_start WHERE u.status = 'held' "
            "AND p.status = 'settled'")[0][0]
        mismatches = [f"{r[0]}@{r[1]}" for r in self._sql(
            "SELECT p.node_id, p.period_start FROM node_period p LEFT JOIN usage u "
            "ON u.node_id = p.node_id AND u.period_start = p.period_start "
            "WHERE p.status = 'settled' "
            "GROUP BY p.node_id, p.period_start, p.posted_micros, p.voided_micros, "
            "p.fee_micros, p.holds "
            "HAVING p.posted_micros <> COALESCE(SUM(CASE WHEN u.status = 'posted' "
            "THEN u.amount_micros ELSE 0 END), 0) "
            "OR p.voided_micros <> COALESCE(SUM(CASE WHEN u.status = 'voided' "
            "THEN u.amount_micros ELSE 0 END), 0) "
            "OR p.fee_micros > p.posted_micros OR p.holds <> COUNT(u.usage_id) "
            "ORDER BY p.node_id, p.period_start")]
        return JournalSums(accounts, {a: (s[0], s[1], s[2], s[3]) for a, s in journal.items()},
                           bad, int(held), mismatches)

    def counts(self) -> LedgerTallies:
        """The metrics' counts (:class:`LedgerTallies`): three grouped counts, no row read."""
        def grouped(sql: str) -> dict[str, int]:
            return {str(key): int(n) for key, n in self._sql(sql)}

        return LedgerTallies(
            grouped("SELECT code, COUNT(*) FROM ledger_transfer GROUP BY code"),
            grouped("SELECT outcome, COUNT(*) FROM node_period WHERE status = 'settled' "
                    "AND outcome IS NOT NULL GROUP BY outcome"),
            grouped("SELECT held_reason, COUNT(*) FROM node_period WHERE status = 'held' "
                    "AND held_reason IS NOT NULL GROUP BY held_reason"))

    def _sql(self, sql: str) -> list[tuple[Any, ...]]:
        return list(self._db.execute_sql(sql).fetchall())
