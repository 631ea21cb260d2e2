"""Idempotency: the key, the request fingerprint and the replay decision (spec §4).

Every mutating ledger call is idempotent, by an ``Idempotency-Key`` header or by its natural
key. This module holds the parts that are rules rather than storage:

- :func:`parse_key`: 1–255 printable ASCII characters (Stripe's length). An absent header is
  *missing* (400 ``missing_idempotency_key`` where the endpoint requires one); a present but
  empty, repeated or malformed one is 400 ``invalid_idempotency_key``.
- :func:`fingerprint`: SHA-256 of the canonical JSON (sorted keys, no spaces, ASCII) of
  ``[method, route template, path params, normalized body]``. Normalized means parsed:
  amounts as integer micros, periods as integer starts, absent optional fields as ``null``, so
  ``"12.5"`` and ``12.50`` are one request and key order or whitespace never matter. Floats are
  refused outright: a fingerprint must not depend on how a float prints.
- :func:`decide`: no stored answer → execute; same fingerprint → replay the stored status and
  body byte for byte with ``Idempotent-Replayed: true``; another fingerprint (another body, or
  another route: keys are scoped by principal, not by route) → 409 ``idempotency_key_reused``.
- :func:`should_store`: 2xx and business rejections (404, 409) are stored, so a refused
  transfer never turns into a surprise success on a retry (TigerBeetle's ``id_already_failed``);
  400/401/403/413 and 5xx are not (nothing happened; the client may fix and retry).

The claim itself is the store's: ``store/ledger_repo.py`` inserts ``(principal, key, route,
request_hash)`` in the same transaction as the effect (§4.2), so other transactions only ever
see a claim together with its answer.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

from eecp.core.errors import LedgerConflictError, LedgerError, LedgerInputError
from eecp.ledger.journal import parse_node_id

KEY_HEADER: Final = "Idempotency-Key"
REPLAYED_HEADER: Final = ("Idempotent-Replayed", "true")
MAX_KEY_CHARS: Final = 255
#: the roles a key is scoped by, besides ``node:<id>``
ROLE_PRINCIPALS: Final = frozenset({"admin", "launcher", "uptime"})
SECONDS_PER_DAY: Final = 86_400
#: ``EE_IDEMPOTENCY_RETENTION_DAYS``' default (Stripe keeps keys at least 24 h)
DEFAULT_RETENTION_DAYS: Final = 30.0

_KEY = re.compile(r"[\x21-\x7e]{1,255}")  # MAX_KEY_CHARS
_REUSED_DETAIL: Final = "the key was used with a different request"

Canonical: TypeAlias = (
    "bool | int | str | Sequence[Canonical] | Mapping[str, Canonical] | None"
)


def parse_key(values: Sequence[str], *, required: bool) -> str | None:
    """The ``Idempotency-Key`` from every value the request carried for that header.

    None when absent and not required. 400 ``missing_idempotency_key`` when absent and
    required; 400 ``invalid_idempotency_key`` when repeated (``detail: repeated``), empty or
    not 1–255 characters of ``[\\x21-\\x7e]`` (``detail: format``)."""
    if not values:
        if required:
            raise LedgerInputError("missing_idempotency_key", field=KEY_HEADER)
        return None
    if len(values) > 1:
        raise LedgerInputError("invalid_idempotency_key", "repeated", field=KEY_HEADER)
    if not _KEY.fullmatch(values[0]):
        raise LedgerInputError("invalid_idempotency_key", "format", field=KEY_HEADER)
    return values[0]


def check_principal(principal: str) -> str:
    """A key's scope: ``admin``, ``launcher``, ``uptime`` or ``node:<id>`` (so two roles never
    collide). Anything else is a bug in the caller."""
    if principal not in ROLE_PRINCIPALS:
        prefix, _, node_id = principal.partition(":")
        if prefix != "node":
            raise LedgerError("principal_invalid", principal)
        parse_node_id(node_id)
    return principal


def canonical_json(value: Canonical) -> str:
    """Sorted keys, no whitespace, ASCII only; floats and non-string keys refused."""
    _check_canonical(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)


def fingerprint(method: str, route: str, path_params: Mapping[str, Canonical],
                body: Mapping[str, Canonical]) -> str:
    """The request hash stored with a key: SHA-256 hex of the canonical
    ``[METHOD, route template, path params, normalized body]``."""
    doc = canonical_json([method.upper(), route, path_params, body])
    return hashlib.sha256(doc.encode("ascii")).hexdigest()


def _check_canonical(value: object) -> None:
    if value is None or isinstance(value, bool | int | str):
        return
    if isinstance(value, float):
        raise TypeError("a fingerprint never holds a float: normalize amounts to int micros")
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"fingerprint keys are strings, not {type(key).__name__}")
            _check_canonical(item)
        return
    if isinstance(value, list | tuple):
        for item in value:
            _check_canonical(item)
        return
    raise TypeError(f"{type(value).__name__} has no canonical JSON form")


# --- the decision ---------------------------------------------------------------------------

@dataclass(frozen=True)
class StoredAnswer:
    """A claimed key with its answer, as the store returns it. The body is the exact text
    sent the first time, so a replay is byte-identical."""

    request_hash: str
    status: int
    body: str


@dataclass(frozen=True)
class Execute:
    """No answer stored under the key: do the work (the store claims the key in the same
    transaction) and keep the answer if :func:`should_store` says so."""


@dataclass(frozen=True)
class Replay:
    """Answer with the stored status and body, adding :data:`REPLAYED_HEADER`."""

    status: int
    body: str
    headers: tuple[tuple[str, str], ...] = (REPLAYED_HEADER,)


def decide(stored: StoredAnswer | None, request_hash: str) -> Execute | Replay:
    """What a request with a key does, given what is stored under ``(principal, key)``.

    Raises 409 ``idempotency_key_reused`` when the stored fingerprint is another request's
    (another body, or another route)."""
    if stored is None:
        return Execute()
    if not hmac.compare_digest(stored.request_hash, request_hash):
        raise LedgerConflictError("idempotency_key_reused", _REUSED_DETAIL)
    return Replay(stored.status, stored.body)


def should_store(status: int) -> bool:
    """Whether an answer is kept under its key: 2xx and business rejections (404, 409) are;
    malformed requests (400, 413), 401/403 and server failures (5xx: the transaction rolled
    back, nothing happened) are re-evaluated on a retry."""
    return 200 <= status < 300 or status in (404, 409)


def decide_natural(existing: str | None, request_hash: str,
                   conflict: LedgerConflictError) -> Literal["execute", "replay"]:
    """The same table for a natural key (usage ``(account, node, app, period)``, an abuse
    decision, ...): nothing there → execute; the same normalized request → replay; another
    one → ``conflict`` (``usage_conflict`` with its ``usage_id``, ``report_already_decided``)."""
    if existing is None:
        return "execute"
    if not hmac.compare_digest(existing, request_hash):
        raise conflict
    return "replay"


def prune_before(now: float, retention_days: float = DEFAULT_RETENTION_DAYS) -> float:
    """Keys created before this instant may be deleted; a key reused after that is new.
    Natural keys are permanent and never pruned."""
    if not retention_days >= 1:
        raise ValueError("keys are kept at least one day")
    return now - retention_days * SECONDS_PER_DAY


def storable_register_answer(body: Mapping[str, object]) -> dict[str, object]:
    """The ``POST /v1/nodes/register`` answer as stored for replays: the token is returned
    once and only its SHA-256 is kept, so a replay says ``node_token: null,
    token_returned: false`` (a client that lost it asks the admin to rotate)."""
    stored = dict(body)
    if "node_token" in stored:
        stored["node_token"] = None
        stored["token_returned"] = False
    return stored
