"""Money: integer micro-USD, one amount parser, one JSON body parser, exact rendering (spec §2).

Every amount, price and balance is a Python ``int`` of **micros** (1 USD = 1,000,000 µ; asset
scale 6). Nothing here ever produces a float or a ``Decimal``: floats cannot hold 0.1, SQLite
stores SQL ``DECIMAL`` as REAL, and ``Decimal("1_000")`` accepts underscores (one of upstream's
bugs). Amounts are read from their *text*: the body parser keeps every JSON number as a
:class:`JsonNumber` (a ``str`` subclass holding the literal as written), so ``12.50`` arrives as
``"12.50"`` and ``1e3`` as ``"1e3"``, and :func:`parse_usd` applies one grammar,
``^(0|[1-9][0-9]*)(\\.[0-9]+)?$``, to numbers and strings alike.

The checks run in the order of the spec's table and the first failure is the answer; the
``detail`` values (:data:`AMOUNT_DETAILS`) are a stable interface. Two readings of that table
are deliberate (see the ledger report): ``exponent`` and ``underscore`` are answered for values
*shaped like numbers* with an exponent or an underscore (``"hello"`` contains an ``e`` but is a
``format`` error, not an ``exponent`` one), and a Python ``int`` (an internal caller) is read
as its decimal text while a Python ``float`` is refused as ``type``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Final, Literal, TypeAlias

from eecp.core.errors import (
    BodyTooLargeError,
    ConfigError,
    LedgerConflictError,
    LedgerInputError,
)

MICROS_PER_USD: Final = 1_000_000
#: decimals a USD amount may carry (asset scale 6)
SCALE: Final = 6
#: the largest value a BIGINT counter holds; counters are checked against it before a write
MAX_COUNTER: Final = 2**63 - 1
#: ``EE_LEDGER_MAX_AMOUNT_USD``'s default, in micros: the largest single amount
DEFAULT_MAX_AMOUNT_MICROS: Final = 1_000_000 * MICROS_PER_USD
#: the largest value the grammar admits at all (12 integer digits, 6 decimals)
GRAMMAR_MAX_MICROS: Final = 999_999_999_999_999_999
#: ledger request bodies above this are 413 ``body_too_large``
MAX_BODY_BYTES: Final = 16 * 1024
#: longer amount texts are ``format`` errors before any other work
MAX_AMOUNT_CHARS: Final = 32
#: usage and fee rates are expressed per 1e6 (micro-vCPU-hours) and per 1e4 (basis points)
MICRO: Final = 1_000_000
BPS_DENOMINATOR: Final = 10_000

AmountDetail = Literal[
    "type", "not_finite", "exponent", "underscore", "negative", "format", "too_precise",
    "too_large", "zero", "conflicting_fields",
]
#: every ``detail`` :func:`parse_usd` can answer, in the order they are checked
AMOUNT_DETAILS: Final[tuple[AmountDetail, ...]] = (
    "type", "not_finite", "exponent", "underscore", "negative", "format", "too_precise",
    "too_large", "zero", "conflicting_fields",
)
JsonDetail = Literal["syntax", "not_object", "non_finite_number", "duplicate_key"]
#: every ``detail`` of ``invalid_json``, in the order they are checked
JSON_DETAILS: Final[tuple[JsonDetail, ...]] = (
    "syntax", "not_object", "non_finite_number", "duplicate_key",
)

# ASCII classes on purpose: \d would also match other scripts' digits
_GRAMMAR = re.compile(r"(0|[1-9][0-9]*)(?:\.([0-9]+))?")
_NOT_FINITE = re.compile(r"[+-]?(?:nan|inf|infinity)", re.IGNORECASE)
_EXPONENT = re.compile(r"[+-]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][+-]?[0-9_]+")
#: what Python's int()/Decimal() would read past an underscore (checked without a regex, so
#: that a 16 KiB hostile string costs linear time)
_NUMBERISH: Final = frozenset("+-0123456789_.")

# (reason when absent, reason when invalid) per request field; other fields are amounts
_FIELD_REASONS: Final[Mapping[str, tuple[str, str]]] = {
    "vcpu_hours": ("missing_vcpu_hours", "invalid_vcpu_hours"),
    "price_usd_per_vcpu_hour": ("missing_fields", "invalid_price"),
    "price_usd": ("missing_fields", "invalid_price"),
}
_AMOUNT_REASONS: Final = ("missing_amount", "invalid_amount")


class JsonNumber(str):
    """A JSON number kept as the text it was written with (``12.50``, ``1e3``, ``-0``).

    The spec calls it ``Literal``; it is a ``str`` so that a number and a string holding the
    same digits go through the same grammar, and a float is never made."""

    __slots__ = ()


JsonValue: TypeAlias = "bool | str | list[JsonValue] | dict[str, JsonValue] | None"
JsonObject: TypeAlias = "dict[str, JsonValue]"


def field_reasons(field: str) -> tuple[str, str]:
    """The (missing, invalid) reasons for a field parsed with the money grammar."""
    return _FIELD_REASONS.get(field, _AMOUNT_REASONS)


# --- the body -------------------------------------------------------------------------------

def parse_json_body(raw: bytes, *, max_bytes: int = MAX_BODY_BYTES) -> JsonObject:
    """Parse a ledger request body: a JSON object of at most ``max_bytes``, strict UTF-8.

    Numbers come back as :class:`JsonNumber`; ``NaN``/``Infinity`` literals and repeated keys
    (at any depth) are refused, so ``{"amount_usd":"1","amount_usd":"1000"}`` cannot mean
    either, and so are escaped lone surrogates (``"\\ud800"``: not text, ``syntax``). One pass
    over the text; its findings are reported in the spec's order (``syntax``, ``not_object``,
    ``non_finite_number``, ``duplicate_key``).
    """
    if len(raw) > max_bytes:
        raise BodyTooLargeError("body_too_large", extra={"limit_bytes": max_bytes})
    found: set[str] = set()

    def constant(_name: str) -> JsonValue:
        found.add("non_finite_number")
        return None

    def pairs(items: list[tuple[str, JsonValue]]) -> JsonObject:
        obj: JsonObject = {}
        for key, value in items:
            if key in obj:
                found.add("duplicate_key")
            obj[key] = value
        return obj

    try:
        doc = json.loads(
            raw.decode("utf-8"), parse_float=JsonNumber, parse_int=JsonNumber,
            parse_constant=constant, object_pairs_hook=pairs,
        )
    # RecursionError: 16 KiB of "[" nests deeper than the C scanner allows
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise LedgerInputError("invalid_json", "syntax") from None
    if not _encodable(doc):
        raise LedgerInputError("invalid_json", "syntax")
    if not isinstance(doc, dict):
        raise LedgerInputError("invalid_json", "not_object")
    for detail in ("non_finite_number", "duplicate_key"):
        if detail in found:
            raise LedgerInputError("invalid_json", detail)
    return doc


def _encodable(value: JsonValue) -> bool:
    # "\ud800" is valid JSON syntax but no Unicode text: it could not be stored or echoed
    # as UTF-8 later, so it is refused here with the body
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, list):
        return all(_encodable(item) for item in value)
    if isinstance(value, dict):
        return all(_encodable(key) and _encodable(item) for key, item in value.items())
    return True


def reject_unknown_fields(body: Mapping[str, object], known: frozenset[str]) -> None:
    """400 ``unknown_field`` (``detail``: the first unknown name, in body order)."""
    for name in body:
        if name not in known:
            raise LedgerInputError("unknown_field", name)


# --- amounts --------------------------------------------------------------------------------

def parse_usd(value: object, field: str, *, allow_zero: bool = False,
              cap_micros: int | None = DEFAULT_MAX_AMOUNT_MICROS) -> int:
    """A USD amount (or vCPU-hours, or a price: the same grammar) to integer micros.

    ``value`` is what the body parser produced for ``field``: a ``str``, a :class:`JsonNumber`,
    or anything else (refused). ``cap_micros`` is the configured largest amount
    (``EE_LEDGER_MAX_AMOUNT_USD``); None leaves only the grammar's own bound. Raises
    ``LedgerInputError`` with the field's reasons (:func:`field_reasons`) and a ``detail`` of
    :data:`AMOUNT_DETAILS`.
    """
    missing, invalid = field_reasons(field)
    if value is None:
        raise LedgerInputError(missing, field=field)

    def refuse(detail: AmountDetail) -> LedgerInputError:
        return LedgerInputError(invalid, detail, field=field)

    if isinstance(value, bool) or not isinstance(value, str | int):
        raise refuse("type")
    text = value if isinstance(value, str) else str(value)
    if _NOT_FINITE.fullmatch(text):
        raise refuse("not_finite")
    if _EXPONENT.fullmatch(text):
        raise refuse("exponent")
    if "_" in text and _NUMBERISH.issuperset(text):
        raise refuse("underscore")
    if text.startswith("-"):
        raise refuse("negative")
    match = _GRAMMAR.fullmatch(text) if len(text) <= MAX_AMOUNT_CHARS else None
    if match is None:
        raise refuse("format")
    whole, fraction = match.group(1), match.group(2) or ""
    if len(fraction) > SCALE:
        raise refuse("too_precise")
    if len(whole) > 12:
        raise refuse("too_large")
    micros = int(whole) * MICROS_PER_USD + int(fraction.ljust(SCALE, "0"))
    if cap_micros is not None and micros > cap_micros:
        raise refuse("too_large")
    if micros == 0 and not allow_zero:
        raise refuse("zero")
    return micros


def parse_amount_fields(body: Mapping[str, object], fields: tuple[str, str] = ("amount_usd",
                        "amount"), *, allow_zero: bool = False,
                        cap_micros: int | None = DEFAULT_MAX_AMOUNT_MICROS) -> int:
    """An amount given under a name and its upstream alias (``amount_usd`` | ``amount``).

    Absent and ``null`` are the same; either field alone is the amount (``amount_usd: 0`` is
    a ``zero`` error, never a reason to look at ``amount``); both present must agree after
    parsing (``"12.5"`` and ``12.50`` do), else ``conflicting_fields`` on the alias.
    """
    primary, alias = fields
    given = [name for name in fields if body.get(name) is not None]
    if not given:
        raise LedgerInputError(field_reasons(primary)[0], field=primary)
    values = [parse_usd(body[name], name, allow_zero=allow_zero, cap_micros=cap_micros)
              for name in given]
    if len(values) == 2 and values[0] != values[1]:
        raise LedgerInputError(field_reasons(alias)[1], "conflicting_fields", field=alias)
    return values[0]


def max_amount_setting(raw: str) -> int:
    """``EE_LEDGER_MAX_AMOUNT_USD`` (a positive USD amount) to micros, or ConfigError."""
    try:
        return parse_usd(raw.strip(), "EE_LEDGER_MAX_AMOUNT_USD", cap_micros=None)
    except LedgerInputError as exc:
        raise ConfigError("EE_LEDGER_MAX_AMOUNT_USD",
                          f"{raw!r} is not a positive USD amount ({exc.detail})") from None


# --- rendering ------------------------------------------------------------------------------

def format_usd(micros: int) -> str:
    """Micros as an exact USD string with always six decimals: ``12345678`` → ``"12.345678"``.

    Negative values (``mint:usd``'s balance) keep their sign. ``parse_usd`` reads the
    non-negative ones back to the same integer."""
    _require_int(micros)
    sign = "-" if micros < 0 else ""
    whole, fraction = divmod(abs(micros), MICROS_PER_USD)
    return f"{sign}{whole}.{fraction:06d}"


def balance_cents(available_micros: int) -> int:
    """Upstream's ``balance_cents``: floored, so a client never believes it has more."""
    _require_int(available_micros)
    return available_micros // 10_000


# --- arithmetic -----------------------------------------------------------------------------

def usage_amount(vcpu_micro_hours: int, price_micros_per_vcpu_hour: int) -> int:
    """The amount a usage report holds: half-up rounding to the micro (at most ½ µ$ of error).

    400 ``amount_rounds_to_zero`` when that is 0 (a report that would move nothing)."""
    _require_int(vcpu_micro_hours, price_micros_per_vcpu_hour)
    if vcpu_micro_hours < 0 or price_micros_per_vcpu_hour < 0:
        raise ValueError("usage and price are never negative")
    amount = (vcpu_micro_hours * price_micros_per_vcpu_hour + MICRO // 2) // MICRO
    if amount == 0:
        raise LedgerInputError("amount_rounds_to_zero", field="vcpu_hours")
    return amount


def platform_fee(amount_micros: int, fee_bps: int) -> int:
    """The platform's fee on a posted hold: floored, in the provider's favour."""
    _require_int(amount_micros, fee_bps)
    if not 0 <= fee_bps <= BPS_DENOMINATOR:
        raise ValueError(f"fee of {fee_bps} bps is outside 0..{BPS_DENOMINATOR}")
    if amount_micros < 0:
        raise ValueError("a fee is taken on a non-negative amount")
    return amount_micros * fee_bps // BPS_DENOMINATOR


def fee_bps_setting(raw: str) -> int:
    """``EE_PLATFORM_FEE_BPS``: a whole number of basis points 0..10000, or ConfigError."""
    text = raw.strip()
    if not re.fullmatch(r"0|[1-9][0-9]{0,4}", text) or int(text) > BPS_DENOMINATOR:
        raise ConfigError("EE_PLATFORM_FEE_BPS",
                          f"{raw!r} must be a whole number of basis points 0..10000")
    return int(text)


def checked_counter(value: int, reason: Literal["overflows_debits", "overflows_credits"]) -> int:
    """``value`` if it fits a BIGINT, else 409 ``reason`` (TigerBeetle's names).

    Checked in Python before a write because SQLite silently turns an overflowing integer
    into a REAL."""
    _require_int(value)
    if value > MAX_COUNTER:
        raise LedgerConflictError(reason)
    return value


def _require_int(*values: int) -> None:
    # the whole money path is int; a float or bool reaching it is a bug, never rounded
    for value in values:
        if type(value) is not int:
            raise TypeError(f"money is int micros, not {type(value).__name__}")
