"""The ledger over the real store, driven by hypothesis (spec §17 item 3), on SQLite and on
PostgreSQL: purchases, transfers, redemptions, usage reports, time passing, a node's agent
dropping for a few seconds, abuse reports filed and decided, finalizing and the settler, replays
of earlier requests (same key and body: the identical answer; same key, other body: 409
``idempotency_key_reused``) and crashes injected inside the unit of work after some writes;
and stake (issue 16): stake targets, unstakes and their release, a premium node's outages and
the availability slashes they call for, its status, fraud signals and the fraud ban.

After every step: ``GET /v1/ledger/check`` is ok (the sums, the journal, each hold resolved
once, no held usage in a settled node-period, settlement conservation), and every account's
four counters equal those of the pure reference model (:class:`eecp.ledger.journal.Journal`),
which applies what each answer says happened, after checking it is what the rules predict:
the refusal reasons of the journal, the usage amounts at the posted price, and each hold's
fate (a node with an agent up and no blip is paid, a node never seen up or an app that never
ran is refunded, a blip refunds its period, abuse holds or fails, a ban refunds). The premium
node's slashes are predicted by a plain re-statement of §10.2 over the downtime the machine
caused (the window since 30 days, the node's first period or an interval after the last
slash; the penalty or what is staked, unstakes voided newest first), and compared with the
slashes the store made, period by period, after every step that may measure a period.

``LEDGER_DB_EXAMPLES`` (default 8) sets the number of examples per backend; each runs up to
``LEDGER_DB_STEPS`` (default 30) steps.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from eecp.core.clock import FixedClock
from eecp.core.errors import LedgerError
from eecp.ledger.answers import Answer, LedgerSettings
from eecp.ledger.journal import MINT_ACCOUNT, Balances, Code, Journal, Transfer
from eecp.ledger.money import format_usd, platform_fee, usage_amount
from eecp.ledger.observe import SessionEvent
from eecp.ledger.periods import HOUR as GRID
from eecp.ledger.periods import period_of
from eecp.store import ledger_repo
from eecp.store.records import AuditEntry
from tests.databases import Backend
from tests.ledger.dbkit import T0, LedgerHost, body, fresh_database, setup_node

EXAMPLES = int(os.environ.get("LEDGER_DB_EXAMPLES", "8"))
STEPS = int(os.environ.get("LEDGER_DB_STEPS", "30"))
USERS = ("alice", "bob", "carol")
GOOD, IDLE = "good", "idle"  # an agent up on GOOD; nothing ever on IDLE
PREM = "prem"  # premium, with its own agent and no usage: its outages slash it
NODES = (GOOD, IDLE, PREM)
PAYABLE = (*USERS, f"node:{GOOD}", f"node:{IDLE}", f"node:{PREM}")
PRICE = 500_000  # $0.50 per vCPU-hour
CAPACITY = 8
FEE_BPS = 500
AGENT, APP = "agent-1", "app"
H = 3600
COOLDOWN = 3 * H  # short, so that unstakes mature within an example (or are slashed first)
INTERVAL = H
SETTINGS = LedgerSettings(fee_bps=FEE_BPS, unstake_cooldown_sec=COOLDOWN,
                          slash_min_interval_sec=INTERVAL)
PREM_PPID = f"{3:032x}"
PREM_AGENT = "agent-p"
PREM_PRICE = 2000  # $0.002 x 1 vCPU x 720 h: the penalty, and the minimum stake
PENALTY = PREM_PRICE * 720
ALLOWED_CENTISECONDS = 2592  # premium's 25.92 s
MINIMUM = {GOOD: 4_000_000, IDLE: 4_000_000, PREM: PENALTY}
#: what each node stakes at the start (GOOD exactly its minimum: it is paid; IDLE more, so
#: that its unstakes succeed and a ban finds some pending)
STAKED = {GOOD: 4_000_000, IDLE: 8_000_000, PREM: 4_000_000}
USAGE_ARGS = {"account": st.sampled_from(USERS), "node": st.sampled_from((GOOD, IDLE)),
              "vcpu": st.sampled_from((500_000, 1_000_000, 2_000_000, 3_000_000)),
              "app": st.sampled_from((None, APP, "zzz"))}


class Crash(Exception):
    """Raised from inside a unit of work, after it wrote something."""


@dataclass
class Usage:
    usage_id: str
    account: str
    node: str
    app: str | None
    start: int
    vcpu: int
    hold: int  # the model's transfer id
    answer: bytes


@dataclass
class Keyed:
    method: str
    principal: str
    fields: dict[str, Any]
    key: str
    answer: Answer
    path: tuple[str, ...] = ()  # path parameters, before the body


@dataclass
class Unstake:
    op_id: str
    node: str
    amount: int
    hold: int  # the model's transfer id
    created_at: float
    release_at: float


class LedgerDbMachine(RuleBasedStateMachine):
    backend: Backend
    tmp: Path
    pg_url: str | None

    def __init__(self) -> None:
        super().__init__()
        self.clock = FixedClock(T0)
        self._database = fresh_database(self.backend, self.tmp, self.pg_url)
        self._host_cm = LedgerHost(self._database.__enter__(), self.clock, SETTINGS).running()
        self.host = self._host_cm.__enter__()
        self.model = Journal()
        self.usages: dict[tuple[str, str, str, int], Usage] = {}
        self.open: dict[str, Usage] = {}  # usage_id -> its unresolved hold
        self.history: list[Keyed] = []
        self.blips: set[int] = set()  # periods of GOOD with a blip
        self.reports: dict[str, tuple[str, int, int, str, float]] = {}  # id -> node, span, status
        self.settled: set[tuple[str, int]] = set()
        self.session = 0
        self.last_blip = float(T0)  # the agent came up at T0
        self.keys = 0
        self.status = dict.fromkeys(NODES, "active")
        self.unstakes: dict[str, Unstake] = {}  # op_id -> a pending unstake
        self.prem_down: dict[int, int] = {}  # PREM's period start -> its counted downtime
        self.prem_session = f"s-{PREM_AGENT}"
        self.prem_last = float(T0)
        self.prem_checked = T0 - H  # PREM's periods up to here are compared
        self.prem_last_slash: int | None = None  # the end of its last slash's period
        self.slashes: list[tuple[int, int, list[str]]] = []  # (period start, amount, voided)
        self.bans: dict[str, bytes] = {}  # node -> its ban's answer

    def teardown(self) -> None:
        self._host_cm.__exit__(None, None, None)
        self._database.__exit__(None, None, None)

    # -- helpers --

    @property
    def ledger(self) -> Any:
        return self.host.ledger

    def call(self, method: str, *args: Any) -> Answer:
        answer: Answer = self.host.call(getattr(self.ledger, method), *args)
        assert answer.status != 500, answer.body
        return answer

    def key(self) -> str:
        self.keys += 1
        return f"key-{self.keys}"

    def now(self) -> float:
        return self.clock.now()

    def model_try(self, *transfers: Transfer) -> LedgerError | None:
        try:
            self.model = self.model.apply(*transfers)
        except LedgerError as exc:
            return exc
        return None

    def next_id(self, offset: int = 0) -> int:
        return self.model.next_id + offset

    def keyed(self, method: str, principal: str, fields: dict[str, Any],
              path: tuple[str, ...] = ()) -> Answer:
        key = self.key()
        answer = self.call(method, principal, *path, body(**fields), [key])
        if answer.status in (200, 202, 404, 409):
            self.history.append(Keyed(method, principal, fields, key, answer, path))
        return answer

    def expect(self, answer: Answer, refusal: LedgerError | None, status: int = 200) -> None:
        if refusal is None:
            assert answer.status == status, answer.body
        else:
            assert (answer.status, answer.json()["error"]) == (refusal.http_status,
                                                               refusal.reason), answer.body

    # -- set up --

    @initialize()
    def nodes(self) -> None:
        self.host.call(self.ledger.observer_heartbeat)
        for index, node in enumerate(NODES):
            if node == PREM:
                self.host.call(partial(setup_node, self.ledger, node, price="0.002",
                                       capacity=1, stake="4", ppid=PREM_PPID,
                                       agent=PREM_AGENT, app=APP, at=T0, tier="premium"))
            else:
                self.host.call(partial(setup_node, self.ledger, node, price="0.5",
                                       capacity=CAPACITY, stake=format_usd(STAKED[node]),
                                       ppid=f"{index + 1:032x}",
                                       agent=AGENT if node == GOOD else None, app=APP, at=T0))
            for account in (f"node:{node}", f"stake:{node}"):
                self.model = self.model.with_account(account)
            fund, stake = self.next_id(), self.next_id(1)
            self.model = self.model.apply(
                Transfer(fund, Code.PURCHASE, MINT_ACCOUNT, f"node:{node}", STAKED[node]))
            self.model = self.model.apply(
                Transfer(stake, Code.STAKE_DEPOSIT, f"node:{node}", f"stake:{node}",
                         STAKED[node]))
        for user in USERS[:2]:  # carol starts with nothing
            answer = self.call("purchase", "admin", body(account_id=user, amount_usd="20"),
                               [f"seed-{user}"])
            assert answer.status == 200, answer.body
            self.model = self.model.apply(Transfer(self.next_id(), Code.PURCHASE, MINT_ACCOUNT,
                                                   user, 20_000_000))

    # -- money --

    @rule(op=st.sampled_from(("purchase", "transfer", "redeem")),
          account=st.sampled_from(PAYABLE), other=st.sampled_from(PAYABLE),
          amount=st.integers(1, 6_000_000))
    def money(self, op: str, account: str, other: str, amount: int) -> None:
        if op == "purchase":
            self.purchase(account, amount)
        elif op == "transfer":
            self.transfer(account, other, amount)
        else:
            self.redeem(account, amount)

    def purchase(self, account: str, amount: int) -> None:
        refusal = self.model_try(Transfer(self.next_id(), Code.PURCHASE, MINT_ACCOUNT, account,
                                          amount))
        answer = self.keyed("purchase", "admin", {"account_id": account,
                                                  "amount_usd": format_usd(amount)})
        self.expect(answer, refusal)
        if refusal is None:
            assert answer.json()["balance_micros"] == self.model.accounts[account].available

    def transfer(self, source: str, dest: str, amount: int) -> None:
        if source == dest:
            return
        refusal = self.model_try(Transfer(self.next_id(), Code.TRANSFER, source, dest, amount))
        answer = self.keyed("transfer", "admin", {"from_account": source, "to_account": dest,
                                                  "amount_usd": format_usd(amount)})
        self.expect(answer, refusal)

    def redeem(self, account: str, amount: int) -> None:
        refusal = self.model_try(Transfer(self.next_id(), Code.REDEEM, account, MINT_ACCOUNT,
                                          amount))
        answer = self.keyed("redeem", "admin", {"account_id": account,
                                                "amount_usd": format_usd(amount)})
        self.expect(answer, refusal)

    # -- usage --

    @rule(**USAGE_ARGS)
    def report_usage(self, account: str, node: str, vcpu: int, app: str | None) -> None:
        self.usage(account, node, vcpu, app)

    @rule(**USAGE_ARGS)
    def report_more_usage(self, account: str, node: str, vcpu: int, app: str | None) -> None:
        self.usage(account, node, vcpu, app)  # (a second rule: usage twice as often)

    def usage(self, account: str, node: str, vcpu: int, app: str | None) -> None:
        start = period_of(self.now(), GRID).start
        fields = {"account_id": account, "node_id": node, "period": period_of(
            self.now(), GRID).id, "vcpu_hours": format_usd(vcpu)}
        if app is not None:
            fields["app_name"] = app
        answer = self.call("report_usage", "uptime", body(**fields))
        natural = (account, node, app or "", start)
        if node in self.bans:
            # the ban settled every node-period it saw; a report creates none behind it
            seen = any((u.node, u.start) == (node, start) for u in self.usages.values())
            assert answer.json()["error"] == ("period_finalized" if seen else "node_inactive")
            return
        earlier = self.usages.get(natural)
        if earlier is not None:
            if earlier.vcpu == vcpu:
                assert (answer.status, answer.body, answer.replayed) == (200, earlier.answer,
                                                                         True)
            else:
                assert answer.json() == {"error": "usage_conflict",
                                         "usage_id": earlier.usage_id}
            return
        used = sum(u.vcpu for u in self.usages.values() if (u.node, u.start) == (node, start))
        if used + vcpu > CAPACITY * 1_000_000:
            assert answer.json()["error"] == "usage_exceeds_capacity", answer.body
            return
        hold = self.next_id()
        refusal = self.model_try(Transfer(hold, Code.USAGE_HOLD, account, f"node:{node}",
                                          usage_amount(vcpu, PRICE)))
        self.expect(answer, refusal)
        if refusal is None:
            doc = answer.json()
            assert (doc["amount_micros"], doc["status"]) == (usage_amount(vcpu, PRICE), "held")
            usage = Usage(doc["usage_id"], account, node, app, start, vcpu, hold, answer.body)
            self.usages[natural] = self.open[usage.usage_id] = usage

    # -- time and availability --

    @rule(seconds=st.sampled_from((60, 300, 1200, 3600, 0)), settle=st.booleans())
    def time_passes(self, seconds: int, settle: bool) -> None:
        """Some seconds (0: to where the current period may be settled), then maybe the
        settler's pass. The observer beats: eecp watched all along."""
        if seconds == 0:
            seconds = int(period_of(self.now(), GRID).end + SETTINGS.settlement_delay_sec
                          - self.now())
        self.clock.advance(seconds)
        assert self.host.call(self.ledger.observer_heartbeat)
        if settle:
            self.settle_due()

    @precondition(lambda self: self.now() + 5 < period_of(self.now(), GRID).end
                  and self.now() >= self.last_blip + 10)
    @rule()
    def blip(self) -> None:
        # GOOD's agent drops and comes back 5 s later on a new session: its period fails
        at, old, new = self.now(), f"s-{self.session}", f"s-{self.session + 1}"
        self.last_blip = at
        if self.session == 0:
            old = f"s-{AGENT}"
        self.session += 1
        ppid = f"{1:032x}"
        self.host.call(self.ledger.record_availability, [
            SessionEvent(at, AGENT, APP, old, "down", "disconnected:peer_closed", ppid),
            SessionEvent(at + 5, AGENT, APP, new, "up", "attested", ppid)])
        self.blips.add(period_of(at, GRID).start)

    # -- abuse --

    @rule(node=st.sampled_from((GOOD, IDLE)))
    def file_abuse(self, node: str) -> None:
        answer = self.keyed("file_abuse", "launcher", {"node_id": node})
        doc = answer.json()
        start = period_of(self.now(), GRID).start
        self.reports[doc["report_id"]] = (node, start, start + H, "pending", self.now())

    @precondition(lambda self: any(r[3] == "pending" for r in self.reports.values()))
    @rule(data=st.data(), authorize=st.booleans())
    def decide_abuse(self, data: st.DataObject, authorize: bool) -> None:
        pending = sorted(i for i, r in self.reports.items() if r[3] == "pending")
        report = data.draw(st.sampled_from(pending))
        action = "authorize" if authorize else "deny"
        answer = self.call("decide_abuse", "admin", report, body(action=action))
        assert answer.json()["status"] == ("authorized" if authorize else "denied")
        node, start, end, _, at = self.reports[report]
        self.reports[report] = (node, start, end, answer.json()["status"], at)

    # -- settlement --

    def due(self) -> list[int]:
        starts = {u.start for u in self.open.values()}
        return sorted(s for s in starts if s + H + SETTINGS.settlement_delay_sec <= self.now())

    @precondition(lambda self: bool(self.due()))
    @rule(data=st.data(), one=st.booleans())
    def finalize(self, data: st.DataObject, one: bool) -> None:
        start = data.draw(st.sampled_from(self.due()))
        fields = {"node_id": data.draw(st.sampled_from((GOOD, IDLE)))} if one else {}
        answer = self.call("finalize", "admin", period_of(start, GRID).id, body(**fields))
        assert answer.status == 200, answer.body
        self.after_settling()

    @rule()
    def settle_due(self) -> None:
        done = self.host.call(self.ledger.settle_due)
        assert done.ran and done.errors == 0
        self.after_settling()
        # every due node-period was judged: only holds the rules hold are still open
        due = set(self.due())
        assert all(self.fate(u) == "held" for u in self.open.values() if u.start in due)

    def fate(self, usage: Usage) -> str:
        """What the rules say happens to a hold when its node-period is settled now."""
        if usage.node in self.bans:
            return "voided"
        reports = [r for r in self.reports.values()
                   if r[0] == usage.node and r[1] < usage.start + H and usage.start < r[2]]
        if any(r[3] == "pending" and self.now() < r[4] + SETTINGS.abuse_deadline_sec
               for r in reports):
            return "held"
        failed = (any(r[3] == "authorized" for r in reports) or usage.node == IDLE
                  or usage.app == "zzz" or usage.start in self.blips)
        return "voided" if failed else "posted"

    def sync_settled(self) -> None:
        rows = self.host.call(self.host.store.snapshot, lambda tx: {
            u.usage_id: u.status for n in (GOOD, IDLE) for s in {x.start for x in
                                                                   self.open.values()}
            for u in tx.ledger.usages(n, s)})
        for usage_id, usage in sorted(self.open.items()):
            status = rows[usage_id]
            if status == "held":
                continue
            assert status == self.fate(usage), (usage, status)
            hold = self.model.transfer(usage.hold)
            assert hold is not None
            code = Code.USAGE_POST if status == "posted" else Code.USAGE_VOID
            legs = [Transfer(self.next_id(), code, hold.debit, hold.credit, hold.amount,
                             hold.id)]
            fee = platform_fee(hold.amount, FEE_BPS) if status == "posted" else 0
            if fee:
                legs.append(Transfer(self.next_id(1), Code.FEE, hold.credit, "fee:platform",
                                     fee))
            self.model = self.model.apply(*legs)
            del self.open[usage_id]

    def after_settling(self) -> None:
        self.sync_settled()
        self.sync_stake()

    # -- stake (issue 16) --

    def stake(self, node: str) -> Balances:
        return self.model.accounts[f"stake:{node}"]

    @rule(node=st.sampled_from(NODES), more=st.sampled_from((0, 1, 500_000, 3_000_000)))
    def stake_target(self, node: str, more: int) -> None:
        """Register's ``stake_amount_usd``: a target over the posted stake moves the
        difference from the node's payout account; under it is refused."""
        posted = self.stake(node).posted
        target = posted + more if more else max(0, posted - 1)
        answer = self.call("register_node", "admin", body(
            node_id=node, stake_amount_usd=format_usd(target), allow_update=True))
        if node in self.bans:
            assert answer.json()["error"] == "node_inactive"
            return
        if target < posted:
            assert answer.json()["error"] == "stake_decrease_requires_unstake", answer.body
            return
        refusal = None
        if target > posted:
            refusal = self.model_try(Transfer(self.next_id(), Code.STAKE_DEPOSIT,
                                              f"node:{node}", f"stake:{node}", target - posted))
        self.expect(answer, refusal)

    @rule(node=st.sampled_from(NODES),
          amount=st.sampled_from((1, 250_000, 1_000_000, 2_560_000, 4_000_000)))
    def unstake(self, node: str, amount: int) -> None:
        available = self.stake(node).available
        minimum = 0 if self.status[node] == "retired" else MINIMUM[node]
        answer = self.keyed("unstake", f"node:{node}", {"amount_usd": format_usd(amount)},
                            (node,))
        if node in self.bans:
            assert answer.json()["error"] == "node_inactive"
        elif amount > available:
            assert answer.json()["error"] == "insufficient_funds"
        elif available - amount < minimum:
            assert answer.json()["error"] == "stake_below_minimum", answer.body
        else:
            hold = self.next_id()
            self.model = self.model.apply(Transfer(hold, Code.UNSTAKE_HOLD, f"stake:{node}",
                                                   f"node:{node}", amount))
            doc = answer.json()
            assert (answer.status, doc["amount_micros"]) == (202, amount), answer.body
            self.unstakes[doc["op_id"]] = Unstake(doc["op_id"], node, amount, hold, self.now(),
                                                  self.now() + COOLDOWN)

    @rule()
    def release_unstakes(self) -> None:
        done = self.host.call(self.ledger.release_unstakes)
        expected: dict[str, int] = {}
        for op_id, u in sorted(self.unstakes.items()):
            if u.release_at > self.now():
                continue
            if self.status[u.node] == "suspended":
                expected["waiting"] = expected.get("waiting", 0) + 1
                continue
            expected["released"] = expected.get("released", 0) + 1
            self.model = self.model.apply(Transfer(self.next_id(), Code.UNSTAKE_POST,
                                                   f"stake:{u.node}", f"node:{u.node}",
                                                   u.amount, u.hold))
            del self.unstakes[op_id]
        assert done.ran and done.outcomes == expected, (done, expected)

    @precondition(lambda self: PREM not in self.bans)
    @rule(seconds=st.sampled_from((10, 20, 30, 600)), then_settle=st.booleans())
    def prem_outage_again(self, seconds: int, then_settle: bool) -> None:
        self.prem_outage(seconds, then_settle)  # (a second rule: outages twice as often)

    @precondition(lambda self: PREM not in self.bans)
    @rule(seconds=st.sampled_from((10, 20, 30, 600)), then_settle=st.booleans())
    def prem_outage(self, seconds: int, then_settle: bool) -> None:
        """PREM's tunnel is cut for ``seconds`` inside the current period (then, maybe, time
        passes until the period may be settled, and the settler runs)."""
        at = max(self.now(), self.prem_last + 1)
        start = period_of(at, GRID).start
        if at + seconds + 1 >= start + H:
            return
        new = f"s-p-{at}"
        self.host.call(self.ledger.record_availability, [
            SessionEvent(at, PREM_AGENT, APP, self.prem_session, "down",
                         "disconnected:peer_closed", PREM_PPID),
            SessionEvent(at + seconds, PREM_AGENT, APP, new, "up", "attested", PREM_PPID)])
        self.prem_session, self.prem_last = new, at + seconds
        self.prem_down[start] = self.prem_down.get(start, 0) + seconds
        if then_settle:
            self.time_passes(0, True)

    @rule(status=st.sampled_from(("active", "suspended", "retired")))
    def prem_status(self, status: str) -> None:
        answer = self.call("set_status", "admin", PREM, body(status=status))
        if PREM in self.bans:
            assert answer.json()["error"] == "node_inactive"
            return
        assert (answer.status, answer.replayed) == (200, self.status[PREM] == status), answer
        self.status[PREM] = status

    @rule(reason=st.sampled_from(("debug_td", "pck_revoked", "nonce_mismatch")))
    def fraud_signal(self, reason: str) -> None:
        audit_id = self.host.call(self.host.store.append_audit, AuditEntry(
            self.now(), APP, PREM_AGENT, "acme/app", "v1", "mainnet", "periodic", "refused",
            reason, platform_id=PREM_PPID))
        suspended = self.host.call(self.ledger.fraud_signal, PREM_PPID, audit_id, reason)
        expected = reason != "nonce_mismatch" and self.status[PREM] in ("active", "retired")
        assert suspended == (PREM if expected else None)
        if expected:
            self.status[PREM] = "suspended"

    # late in an example, so that most of it runs with every node
    @precondition(lambda self: self.now() >= T0 + 3 * H)
    @rule(node=st.sampled_from((IDLE, PREM)))
    def fraud(self, node: str) -> None:
        if node == PREM:
            audit_id = self.host.call(self.host.store.append_audit, AuditEntry(
                self.now(), APP, PREM_AGENT, "acme/app", "v1", "mainnet", "periodic",
                "refused", "report_data_mismatch", platform_id=PREM_PPID))
            fields: dict[str, Any] = {"audit_ids": [audit_id], "note": "caught"}
        else:
            fields = {"force": True, "note": "caught in the logs"}
        answer = self.call("fraud", "admin", node, body(**fields))
        if node in self.bans:
            assert (answer.status, answer.body, answer.replayed) == (200, self.bans[node], True)
            return
        if self.status[node] == "retired":
            assert answer.json()["error"] == "node_inactive"
            return
        doc = answer.json()
        assert answer.status == 200, answer.body
        mine = sorted((u for u in self.unstakes.values() if u.node == node),
                      key=lambda u: u.created_at, reverse=True)
        for u in mine:
            self.model = self.model.apply(Transfer(self.next_id(), Code.UNSTAKE_VOID,
                                                   f"stake:{node}", f"node:{node}", u.amount,
                                                   u.hold))
            del self.unstakes[u.op_id]
        everything = self.stake(node).posted
        if everything:
            self.model = self.model.apply(Transfer(self.next_id(), Code.SLASH_FRAUD,
                                                   f"stake:{node}", "slash:platform",
                                                   everything))
        assert (doc["slashed_micros"], doc["voided_unstakes"]) == (everything, len(mine))
        self.bans[node] = answer.body
        self.status[node] = "banned"
        self.sync_settled()  # its open holds were voided

    def sync_stake(self) -> None:
        """PREM's newly measured periods, in order: the downtime the machine caused, and the
        slash §10.2 calls for, compared with what the store did."""
        rows, ops = self.host.call(self.host.store.snapshot, lambda tx: (
            tx.ledger.node_periods(node_id=PREM, measured=True),
            tx.ledger.stake_ops(PREM, kinds=["slash_availability"])))
        for row in rows:
            if row.period_start <= self.prem_checked:
                continue
            assert PREM not in self.bans  # a banned node is measured no more
            assert row.down_seconds == self.prem_down.get(row.period_start, 0), row
            self.prem_checked = row.period_start
            since = max(row.period_end - 30 * 86_400, T0)
            if self.prem_last_slash is not None:
                since = max(since, self.prem_last_slash + INTERVAL)
            down = sum(d for s, d in self.prem_down.items()
                       if since <= s < row.period_end)
            if down * 100 <= ALLOWED_CENTISECONDS:
                continue
            self.prem_last_slash = row.period_end
            self.slash_prem(row.period_start)
        stored = [(json.loads(o.detail)["period_start"], o.amount_micros,
                   json.loads(o.detail)["voided_unstakes"]) for o in ops]
        assert sorted(stored) == self.slashes, (stored, self.slashes)

    def slash_prem(self, period_start: int) -> None:
        stake = self.stake(PREM)
        amount = min(PENALTY, stake.posted)
        voided = []
        pending = sorted((u for u in self.unstakes.values() if u.node == PREM),
                         key=lambda u: u.created_at, reverse=True)
        free = stake.available
        for u in pending:
            if free >= amount:
                break
            self.model = self.model.apply(Transfer(self.next_id(), Code.UNSTAKE_VOID,
                                                   f"stake:{PREM}", f"node:{PREM}", u.amount,
                                                   u.hold))
            free += u.amount
            voided.append(u.op_id)
            del self.unstakes[u.op_id]
        if amount:
            self.model = self.model.apply(Transfer(self.next_id(), Code.SLASH_AVAILABILITY,
                                                   f"stake:{PREM}", "slash:platform", amount))
        self.slashes.append((period_start, amount, voided))

    # -- replays --

    @precondition(lambda self: bool(self.history))
    @rule(data=st.data(), altered=st.booleans())
    def replay(self, data: st.DataObject, altered: bool) -> None:
        if altered:
            self.replay_altered(data)
            return
        earlier = data.draw(st.sampled_from(self.history))
        answer = self.call(earlier.method, earlier.principal, *earlier.path,
                           body(**earlier.fields), [earlier.key])
        assert (answer.status, answer.body, answer.replayed) == (
            earlier.answer.status, earlier.answer.body, True)

    def replay_altered(self, data: st.DataObject) -> None:
        earlier = data.draw(st.sampled_from(self.history))
        altered = {**earlier.fields, "reported_by": "someone else"} \
            if earlier.method == "file_abuse" else {**earlier.fields, "amount_usd": "0.000001"}
        if altered == earlier.fields:
            altered["amount_usd"] = "0.000002"
        answer = self.call(earlier.method, earlier.principal, *earlier.path, body(**altered),
                           [earlier.key])
        assert (answer.status, answer.json()["error"]) == (409, "idempotency_key_reused")

    # -- crashes --

    @rule(data=st.data(), after=st.integers(0, 2))
    def crash(self, data: st.DataObject, after: int) -> None:
        """The process fails inside a unit of work after ``after`` journal rows: nothing of
        it may remain (the model does not change)."""
        written = {"n": 0}
        original = ledger_repo.LedgerTx.insert_transfer

        def failing(tx: ledger_repo.LedgerTx, row: Any) -> int:
            if written["n"] >= after:
                raise Crash("injected")
            written["n"] += 1
            return original(tx, row)

        ledger_repo.LedgerTx.insert_transfer = failing  # type: ignore[method-assign]
        try:
            due = self.due()
            if due and data.draw(st.booleans()):
                attempt = ("finalize", "admin", period_of(due[0], GRID).id, b"")
            else:
                attempt = ("purchase", "admin", body(account_id="alice", amount_usd="1"),
                           [self.key()])
            try:
                answer = self.host.call(getattr(self.ledger, attempt[0]), *attempt[1:])
            except Crash:
                # what the crashed unit wrote is gone; node-periods settled before it stay
                self.after_settling()
                return
            # it wrote fewer rows than the crash needed: it completed, so the model follows
            assert answer.status == 200, answer.body
            if attempt[0] == "purchase":
                self.model = self.model.apply(Transfer(self.next_id(), Code.PURCHASE,
                                                       MINT_ACCOUNT, "alice", 1_000_000))
            else:
                self.after_settling()
        finally:
            ledger_repo.LedgerTx.insert_transfer = original  # type: ignore[method-assign]

    # -- invariants --

    @invariant()
    def the_pending_unstakes_are_the_model_s(self) -> None:
        pending = self.host.call(self.host.store.snapshot, lambda tx: sorted(
            o.op_id for n in NODES for o in tx.ledger.stake_ops(
                n, kinds=["unstake"], statuses=["pending"])))
        assert pending == sorted(self.unstakes)

    @invariant()
    def the_books_balance_and_match_the_model(self) -> None:
        check = self.call("check").json()
        assert check["ok"] is True, check
        ids = sorted(self.model.accounts)
        rows = self.host.call(self.host.store.snapshot, lambda tx: tx.ledger.accounts(ids))
        for account_id in ids:
            row = rows.get(account_id)
            stored = Balances() if row is None else Balances(
                row.debits_pending, row.debits_posted, row.credits_pending, row.credits_posted)
            assert stored == self.model.accounts[account_id], account_id


@pytest.fixture
def machine(backend: Backend, tmp_path: Path, request: pytest.FixtureRequest) -> type:
    LedgerDbMachine.backend = backend
    LedgerDbMachine.tmp = tmp_path
    LedgerDbMachine.pg_url = request.getfixturevalue("pg_url") if backend.name == "postgres" \
        else None
    return LedgerDbMachine


def test_the_ledger_over_the_store_matches_its_model(machine: type) -> None:
    case = machine.TestCase
    case.settings = settings(max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
                             suppress_health_check=list(HealthCheck))
    case().runTest()
