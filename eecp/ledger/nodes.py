"""Nodes: register (terms, stake target, token), the node view, tokens (spec §7.2–7.4, §5).

A node is created by the admin with a price and a capacity; it gets ``node:<id>`` (payout)
and ``stake:<id>`` accounts, a first ``node_terms`` row effective from the current period, and
a token (``eecpn_`` + 43 base64url characters of 32 random bytes) returned once and stored as
its SHA-256. Register is PATCH-like: an absent field stays as it is, and re-sending the same
fields changes nothing (the natural key is the node id).

Terms never change a period already started: a price decrease, a capacity change or a tier
downgrade takes effect at the next period boundary; a price increase or a tier upgrade at the
first boundary at least ``EE_PRICE_INCREASE_NOTICE_SEC`` away, and only when the node's
available stake covers the minimum under the new terms. A new change replaces one not yet in
effect. ``stake_amount_usd`` is a target: the difference above the posted stake moves
``node:N → stake:N``; a lower target is 409 ``stake_decrease_requires_unstake``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Final, cast

from eecp.core.clock import isoformat
from eecp.core.errors import LedgerConflictError, LedgerInputError, LedgerNotFoundError
from eecp.ledger import idempotency
from eecp.ledger.answers import (
    ADMIN,
    Answer,
    LedgerSettings,
    check_node_principal,
    render,
)
from eecp.ledger.journal import Code, Transfer, node_account, parse_node_id, stake_account
from eecp.ledger.money import (
    JsonNumber,
    JsonObject,
    format_usd,
    parse_amount_fields,
    parse_json_body,
    parse_usd,
    reject_unknown_fields,
)
from eecp.ledger.periods import boundary_after, boundary_at_or_after, period_id, period_of
from eecp.ledger.settlement import minimum_stake
from eecp.ledger.stake import Tier, parse_tier, tier_rank
from eecp.ledger.units import Leg, Request, Work, balances, move, new_id
from eecp.store.ledger_records import AccountRow, NodeRow, StakeOpRow, TermsRow
from eecp.store.store import Tx

REGISTER = "/v1/nodes/register"
TOKEN_PREFIX: Final = "eecpn_"
TOKEN_ALG: Final = "sha256"
_TOKEN = re.compile(r"eecpn_[A-Za-z0-9_-]{43}")
MAX_CAPACITY: Final = 4096
_FIELDS = frozenset({"node_id", "price_usd_per_vcpu_hour", "price_usd", "capacity_vcpus",
                     "stake_tier", "stake_amount_usd", "allow_update", "rotate_token"})


def new_token() -> tuple[str, str]:
    """A fresh node token and its stored hash."""
    raw = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii")
    token = TOKEN_PREFIX + raw
    return token, token_hash(token)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def node_of_token(tx: Tx, token: str) -> str | None:
    """The node whose token ``token`` is, compared in constant time; None for anything else
    (a malformed token is never looked up)."""
    if not _TOKEN.fullmatch(token):
        return None
    digest = token_hash(token)
    row = tx.nodes.node_by_token(digest)
    if row is None or not hmac.compare_digest(row.token_sha256, digest):
        return None
    return row.node_id


# --- terms ----------------------------------------------------------------------------------

def terms_at(rows: Sequence[TermsRow], start: float) -> TermsRow | None:
    """The terms of the period starting at ``start``: the row with the largest
    ``effective_from <= start``."""
    found = None
    for row in rows:
        if row.effective_from <= start:
            found = row
    return found


def terms_doc(row: TermsRow | None, settings: LedgerSettings) -> dict[str, object] | None:
    if row is None:
        return None
    return {"price_usd_per_vcpu_hour": format_usd(row.price_micros_per_vcpu_hour),
            "price_micros_per_vcpu_hour": row.price_micros_per_vcpu_hour,
            "capacity_vcpus": row.capacity_vcpus, "tier": row.tier,
            "effective_from": period_id(row.effective_from, settings.period)}


def minimum_for(row: TermsRow | None, settings: LedgerSettings) -> int:
    if row is None:
        return settings.stake_min_micros
    return minimum_stake(row.price_micros_per_vcpu_hour, row.capacity_vcpus,
                         cast(Tier, row.tier), settings.stake_min_micros)


def node_doc(tx: Tx, node: NodeRow, settings: LedgerSettings, now: float) -> dict[str, object]:
    """The register answer's ``node`` (and the start of ``GET /v1/nodes/{id}``)."""
    rows = tx.nodes.terms(node.node_id)
    current = terms_at(rows, period_of(now, settings.period).start)
    upcoming = [r for r in rows if r.effective_from > now]
    stake = balances(tx.ledger.accounts([stake_account(node.node_id)]).get(
        stake_account(node.node_id)))
    minimum = minimum_for(current, settings)
    return {
        "node_id": node.node_id, "status": node.status, "status_reason": node.status_reason,
        "terms": terms_doc(current, settings),
        "terms_next": terms_doc(upcoming[-1] if upcoming else None, settings),
        "stake": {"posted_micros": stake.posted, "available_micros": stake.available,
                  "pending_unstake_micros": stake.debits_pending,
                  "min_required_micros": minimum, "ok": stake.available >= minimum},
        "platforms": [p.ppid for p in tx.nodes.platforms(node.node_id)],
        "created_at": isoformat(node.created_at),
    }


# --- register -------------------------------------------------------------------------------

def _int_field(body: JsonObject, name: str, reason: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, JsonNumber) or not re.fullmatch(r"[1-9][0-9]{0,5}", value) or not (
            low <= int(value) <= high):
        raise LedgerInputError(reason, field=name)
    return int(value)


def _flag(body: JsonObject, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise LedgerInputError(f"invalid_{name}", field=name)
    return value


def register(settings: LedgerSettings, principal: str, raw: bytes, keys: Sequence[str],
             now: float) -> tuple[Request, Work]:
    """``POST /v1/nodes/register`` (admin: create or update; a node: update itself)."""
    body = parse_json_body(raw)
    reject_unknown_fields(body, _FIELDS)
    if body.get("node_id") is None:
        raise LedgerInputError("missing_node_id", field="node_id")
    node_id = parse_node_id(body["node_id"])
    check_node_principal(principal, node_id)
    price = None
    if body.get("price_usd_per_vcpu_hour") is not None or body.get("price_usd") is not None:
        price = parse_amount_fields(body, ("price_usd_per_vcpu_hour", "price_usd"),
                                    cap_micros=settings.max_amount_micros)
    capacity = _int_field(body, "capacity_vcpus", "invalid_capacity", 1, MAX_CAPACITY)
    tier = parse_tier(body["stake_tier"]) if body.get("stake_tier") is not None else None
    stake = None
    if body.get("stake_amount_usd") is not None:
        stake = parse_usd(body["stake_amount_usd"], "stake_amount_usd", allow_zero=True,
                          cap_micros=settings.max_amount_micros)
    allow_update, rotate = _flag(body, "allow_update"), _flag(body, "rotate_token")
    key = idempotency.parse_key(keys, required=False)
    request = Request(idempotency.check_principal(principal), key, REGISTER,
                      idempotency.fingerprint("POST", REGISTER, {}, {
                          "node_id": node_id, "price_micros": price, "capacity_vcpus": capacity,
                          "tier": tier, "stake_micros": stake, "allow_update": allow_update,
                          "rotate_token": rotate}))
    change = _Change(price, capacity, tier, stake, rotate)

    def work(tx: Tx, key_id: int | None) -> Answer:
        node = tx.nodes.node(node_id, lock=True)
        token = None
        if node is None:
            if principal != ADMIN:
                raise LedgerNotFoundError("node_not_found")
            node, token = _create(tx, settings, node_id, change, principal, now)
        elif principal == ADMIN and not allow_update:
            raise LedgerConflictError("node_exists")
        elif node.status == "banned":
            raise LedgerConflictError("node_inactive")
        else:
            _change_terms(tx, settings, node, change, principal, now)
        _stake_target(tx, node, change.stake, principal, now)
        if change.rotate and token is None:
            token, digest = new_token()
            node = replace(node, token_sha256=digest, updated_at=now)
            tx.nodes.write_node(node)
        doc = {"node": node_doc(tx, node, settings, now), "node_token": token,
               "token_returned": token is not None}
        return Answer(200, render(doc),
                      stored=render(idempotency.storable_register_answer(doc)))

    return request, work


@dataclass(frozen=True)
class _Change:
    """What a register asks to change (None: leave as it is)."""

    price: int | None
    capacity: int | None
    tier: Tier | None
    stake: int | None  # the stake target
    rotate: bool


def _create(tx: Tx, settings: LedgerSettings, node_id: str, change: _Change, principal: str,
            now: float) -> tuple[NodeRow, str]:
    if change.price is None or change.capacity is None:
        raise LedgerInputError("missing_fields", field="price_usd_per_vcpu_hour"
                               if change.price is None else "capacity_vcpus")
    token, digest = new_token()
    node = NodeRow(node_id, "active", digest, TOKEN_ALG, now, now)
    if not tx.nodes.insert_node(node):  # created meanwhile by another transaction
        raise LedgerConflictError("node_exists")
    for account_id in (node_account(node_id), stake_account(node_id)):
        kind = account_id.partition(":")[0]
        tx.ledger.insert_account(AccountRow(account_id, kind, True, now, owner_node=node_id))
    tx.nodes.insert_terms(TermsRow(node_id, period_of(now, settings.period).start,
                                   change.price, change.capacity, change.tier or "economy",
                                   now, principal))
    return node, token


def _change_terms(tx: Tx, settings: LedgerSettings, node: NodeRow, change: _Change,
                  principal: str, now: float) -> None:
    rows = tx.nodes.terms(node.node_id)
    current = terms_at(rows, period_of(now, settings.period).start)
    if current is None or not rows:
        raise LedgerConflictError("node_price_missing")
    base = rows[-1]  # the latest change, maybe not yet in effect
    new = replace(base, price_micros_per_vcpu_hour=change.price or base.price_micros_per_vcpu_hour,
                  capacity_vcpus=change.capacity or base.capacity_vcpus,
                  tier=change.tier or base.tier, created_at=now, created_by=principal)
    same = ("price_micros_per_vcpu_hour", "capacity_vcpus", "tier")
    if all(getattr(new, f) == getattr(base, f) for f in same):
        return
    increase = (new.price_micros_per_vcpu_hour > current.price_micros_per_vcpu_hour
                or tier_rank(new.tier) > tier_rank(current.tier))
    if increase and settings.require_stake:
        # "already covered": by the stake as it is, or as this request's target leaves it
        stake = balances(tx.ledger.accounts([stake_account(node.node_id)]).get(
            stake_account(node.node_id)))
        needed = minimum_for(new, settings)
        if _target_available(stake.available, stake.posted, change.stake) < needed:
            raise LedgerConflictError("stake_below_minimum",
                                      extra={"min_required_micros": needed})
    tx.nodes.delete_terms_after(node.node_id, now)
    if all(getattr(new, f) == getattr(current, f) for f in same):
        return  # back to the terms in force: the pending change is withdrawn
    effective = (boundary_at_or_after(now + settings.price_increase_notice_sec, settings.period)
                 if increase else boundary_after(now, settings.period))
    tx.nodes.insert_terms(replace(new, effective_from=effective))
    tx.nodes.write_node(replace(node, updated_at=now))


def _target_available(available: int, posted: int, target: int | None) -> int:
    """The stake available once this request's stake target is met."""
    if target is None or target <= posted:
        return available
    return available + target - posted


def _stake_target(tx: Tx, node: NodeRow, target: int | None, principal: str,
                  now: float) -> None:
    if target is None:
        return
    account = stake_account(node.node_id)
    posted = balances(tx.ledger.accounts([account]).get(account)).posted
    if target < posted:
        raise LedgerConflictError("stake_decrease_requires_unstake",
                                  extra={"posted_micros": posted})
    if target == posted:
        return
    (row,) = move(tx, [Leg(Transfer(0, Code.STAKE_DEPOSIT, node_account(node.node_id),
                                    account, target - posted), "node", node.node_id)], now)
    tx.ledger.insert_stake_op(StakeOpRow(new_id("so"), node.node_id, "deposit",
                                         target - posted, "done", now, principal,
                                         transfer_id=row.transfer_id))
