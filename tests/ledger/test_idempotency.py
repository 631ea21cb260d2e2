"""eecp.ledger.idempotency (spec §4): keys, fingerprints, the replay decision and what is
stored, including a small in-memory walk through the table of §4.1."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eecp.core.errors import LedgerConflictError, LedgerError, LedgerInputError
from eecp.ledger.idempotency import (
    REPLAYED_HEADER,
    Canonical,
    Execute,
    Replay,
    StoredAnswer,
    canonical_json,
    check_principal,
    decide,
    decide_natural,
    fingerprint,
    parse_key,
    prune_before,
    should_store,
    storable_register_answer,
)
from eecp.ledger.money import parse_amount_fields, parse_json_body

ROUTE = "/v1/credits/purchase"


# --- keys -----------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["a", "!", "~", "x" * 255, "7f1b3c1e-9a4d-4c1e-8f00-1234567890ab",
                                 "pi_3NfT0x2eZvKYlo2C0abc", "a-b_c.d:e/f"])
def test_keys_accepted(key: str) -> None:
    assert parse_key([key], required=True) == key


@pytest.mark.parametrize(("values", "detail"), [
    ([""], "format"), (["x" * 256], "format"), (["a b"], "format"), (["a\tb"], "format"),
    (["\x7f"], "format"), (["clé"], "format"), (["a\n"], "format"), (["a", "a"], "repeated"),
])
def test_keys_refused(values: list[str], detail: str) -> None:
    with pytest.raises(LedgerInputError) as info:
        parse_key(values, required=False)
    assert info.value.body() == {"error": "invalid_idempotency_key",
                                 "field": "Idempotency-Key", "detail": detail}


def test_a_missing_key() -> None:
    assert parse_key([], required=False) is None
    with pytest.raises(LedgerInputError) as info:
        parse_key([], required=True)
    assert (info.value.reason, info.value.http_status) == ("missing_idempotency_key", 400)


def test_principals() -> None:
    for p in ("admin", "launcher", "uptime", "node:acme-1"):
        assert check_principal(p) == p
    for bad in ("root", "node:", "node:UP", "Admin", "user:alice"):
        with pytest.raises(LedgerError):
            check_principal(bad)


# --- fingerprints ---------------------------------------------------------------------------

def test_canonical_json() -> None:
    assert canonical_json({"b": [1, None, True], "a": {"d": "é", "c": 2}}) == (
        '{"a":{"c":2,"d":"\\u00e9"},"b":[1,null,true]}')
    for bad in (1.5, {"a": 0.1}, [float("nan")], {1: "x"}, {"a": {1, 2}}, b"x"):
        with pytest.raises(TypeError):
            canonical_json(bad)  # type: ignore[arg-type]


def test_a_known_fingerprint() -> None:
    body: dict[str, Canonical] = {"account_id": "alice", "amount_micros": 12_500_000}
    text = '["POST","/v1/credits/purchase",{},{"account_id":"alice","amount_micros":12500000}]'
    assert fingerprint("post", ROUTE, {}, body) == hashlib.sha256(text.encode()).hexdigest()


def normalized(raw: bytes) -> dict[str, Canonical]:
    """What the HTTP layer will hash: the parsed request, amounts as micros."""
    body = parse_json_body(raw)
    return {"account_id": body["account_id"],
            "amount_micros": parse_amount_fields(body), "note": body.get("note")}


def test_the_same_request_written_differently_has_one_fingerprint() -> None:
    variants = [b'{"account_id":"alice","amount_usd":"12.5"}',
                b'{"amount_usd": 12.50, "account_id": "alice"}',
                b'{"account_id":"alice","amount":12.500000,"note":null}',
                b'{\n  "account_id" : "alice",\n  "amount_usd" : "12.500000"\n}']
    hashes = {fingerprint("POST", ROUTE, {}, normalized(v)) for v in variants}
    assert len(hashes) == 1


def test_anything_else_changes_it() -> None:
    base = fingerprint("POST", ROUTE, {"period": 0}, {"a": 1})
    assert fingerprint("POST", "/v1/credits/transfer", {"period": 0}, {"a": 1}) != base
    assert fingerprint("PUT", ROUTE, {"period": 0}, {"a": 1}) != base
    assert fingerprint("POST", ROUTE, {"period": 3600}, {"a": 1}) != base
    assert fingerprint("POST", ROUTE, {"period": 0}, {"a": 2}) != base
    assert fingerprint("POST", ROUTE, {"period": 0}, {"a": 1, "b": None}) != base


@given(st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), st.text(max_size=5),
                                                       st.none(), st.booleans()), max_size=6))
def test_key_order_never_matters(body: dict[str, Canonical]) -> None:
    reordered = dict(reversed(list(body.items())))
    assert fingerprint("POST", ROUTE, {}, body) == fingerprint("POST", ROUTE, {}, reordered)


# --- the decision ---------------------------------------------------------------------------

def test_decide() -> None:
    h = fingerprint("POST", ROUTE, {}, {"a": 1})
    assert decide(None, h) == Execute()
    stored = StoredAnswer(h, 200, '{"transfer_id":"tr_1"}')
    assert decide(stored, h) == Replay(200, '{"transfer_id":"tr_1"}', (REPLAYED_HEADER,))
    assert REPLAYED_HEADER == ("Idempotent-Replayed", "true")
    with pytest.raises(LedgerConflictError) as info:
        decide(stored, fingerprint("POST", ROUTE, {}, {"a": 2}))
    assert info.value.body() == {"error": "idempotency_key_reused",
                                 "detail": "the key was used with a different request"}


@pytest.mark.parametrize(("status", "stored"), [
    (200, True), (201, True), (202, True), (204, True), (404, True), (409, True),
    (400, False), (401, False), (403, False), (413, False), (422, False), (429, False),
    (500, False), (503, False), (302, False)])
def test_what_is_stored(status: int, stored: bool) -> None:
    assert should_store(status) is stored


def test_the_table_walked_through() -> None:
    """An in-memory stand-in for the store's claim: a 400 is not stored, so the fixed request
    succeeds under the same key; a 409 is, so a top-up does not change the answer."""
    store: dict[tuple[str, str], StoredAnswer] = {}
    balance = {"alice": 0}

    def call(key: str, body: dict[str, Canonical]) -> tuple[int, str, bool]:
        h = fingerprint("POST", "/v1/credits/transfer", {}, body)
        decision = decide(store.get(("admin", key)), h)
        if isinstance(decision, Replay):
            return decision.status, decision.body, True
        amount = body["amount_micros"]
        if not isinstance(amount, int):
            status, answer = 400, '{"error":"invalid_amount"}'
        elif balance["alice"] < amount:
            status, answer = 409, '{"error":"insufficient_funds"}'
        else:
            balance["alice"] -= amount
            status, answer = 200, '{"ok":true}'
        if should_store(status):
            store[("admin", key)] = StoredAnswer(h, status, answer)
        return status, answer, False

    assert call("k1", {"amount_micros": "bad"})[0] == 400
    balance["alice"] = 10
    assert call("k1", {"amount_micros": 5}) == (200, '{"ok":true}', False)
    assert call("k1", {"amount_micros": 5}) == (200, '{"ok":true}', True)
    assert balance["alice"] == 5  # the replay moved nothing
    assert call("k2", {"amount_micros": 50})[0] == 409
    balance["alice"] = 100
    assert call("k2", {"amount_micros": 50}) == (409, '{"error":"insufficient_funds"}', True)
    with pytest.raises(LedgerConflictError, match="idempotency_key_reused"):
        call("k2", {"amount_micros": 49})


def test_natural_keys() -> None:
    conflict = LedgerConflictError("usage_conflict", extra={"usage_id": "us_1"})
    assert decide_natural(None, "h1", conflict) == "execute"
    assert decide_natural("h1", "h1", conflict) == "replay"
    with pytest.raises(LedgerConflictError) as info:
        decide_natural("h1", "h2", conflict)
    assert info.value.body() == {"error": "usage_conflict", "usage_id": "us_1"}


def test_retention() -> None:
    assert prune_before(1_000_000.0) == 1_000_000.0 - 30 * 86_400
    assert prune_before(1_000_000.0, 1) == 1_000_000.0 - 86_400
    with pytest.raises(ValueError, match="one day"):
        prune_before(1_000_000.0, 0.5)


def test_a_stored_register_answer_never_holds_the_token() -> None:
    answer = {"node": {"node_id": "acme-1"}, "node_token": "eecpn_secret",
              "token_returned": True}
    stored = storable_register_answer(answer)
    assert stored == {"node": {"node_id": "acme-1"}, "node_token": None,
                      "token_returned": False}
    assert answer["node_token"] == "eecpn_secret"  # the caller's copy is not touched
    assert storable_register_answer({"node": {}}) == {"node": {}}
