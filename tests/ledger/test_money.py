"""eecp.ledger.money (spec §2): every row of the parser's table, the JSON body rules, rendering,
rounding, and hypothesis round trips."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eecp.core.errors import (
    BodyTooLargeError,
    ConfigError,
    LedgerConflictError,
    LedgerError,
    LedgerInputError,
)
from eecp.ledger.money import (
    AMOUNT_DETAILS,
    DEFAULT_MAX_AMOUNT_MICROS,
    GRAMMAR_MAX_MICROS,
    JSON_DETAILS,
    MAX_BODY_BYTES,
    MAX_COUNTER,
    JsonNumber,
    balance_cents,
    checked_counter,
    fee_bps_setting,
    format_usd,
    max_amount_setting,
    parse_amount_fields,
    parse_json_body,
    parse_usd,
    platform_fee,
    reject_unknown_fields,
    usage_amount,
)


def amount_of(raw: bytes, **kw: object) -> int:
    """The whole path an endpoint takes: body, then the amount field."""
    return parse_amount_fields(parse_json_body(raw), **kw)  # type: ignore[arg-type]


def refusal(raw: bytes) -> dict[str, object]:
    with pytest.raises(LedgerError) as info:
        amount_of(raw)
    return dict(info.value.body())


# --- the table of §2.2, through the body parser (numbers as JSON numbers and as strings) -----

@pytest.mark.parametrize(("body", "expected"), [
    (b'{"amount_usd": 12.5}', 12_500_000),
    (b'{"amount_usd": "12.50"}', 12_500_000),
    (b'{"amount_usd": 12.50}', 12_500_000),
    (b'{"amount_usd": 7}', 7_000_000),
    (b'{"amount_usd": "0.000001"}', 1),
    (b'{"amount_usd": 0.1}', 100_000),
    (b'{"amount_usd": "0.0084"}', 8_400),
    (b'{"amount_usd": "1000000"}', DEFAULT_MAX_AMOUNT_MICROS),
    (b'{"amount": "3"}', 3_000_000),
    (b'{"amount_usd": null, "amount": "3"}', 3_000_000),
    (b'{"amount_usd": "12.5", "amount": 12.500000}', 12_500_000),
    (b' {\n"amount_usd" :\t"1"} ', 1_000_000),
])
def test_amounts_accepted(body: bytes, expected: int) -> None:
    assert amount_of(body) == expected


@pytest.mark.parametrize(("body", "error", "detail"), [
    (b'{"amount_usd": }', "invalid_json", "syntax"),
    (b"", "invalid_json", "syntax"),
    (b"\xff\xfe{}", "invalid_json", "syntax"),
    (b'\xef\xbb\xbf{"amount_usd": "1"}', "invalid_json", "syntax"),  # a UTF-8 BOM
    (b'{"amount_usd": "1"} x', "invalid_json", "syntax"),
    (b'{"note": "\\ud800", "amount_usd": "1"}', "invalid_json", "syntax"),  # a lone surrogate
    (b'{"\\udfff": 1}', "invalid_json", "syntax"),
    (b'["amount_usd"]', "invalid_json", "not_object"),
    (b'"12"', "invalid_json", "not_object"),
    (b"[NaN]", "invalid_json", "not_object"),  # not an object is checked first
    (b'{"amount_usd": NaN}', "invalid_json", "non_finite_number"),
    (b'{"amount_usd": Infinity}', "invalid_json", "non_finite_number"),
    (b'{"amount_usd": -Infinity}', "invalid_json", "non_finite_number"),
    (b'{"amount_usd": "1", "amount_usd": "1000"}', "invalid_json", "duplicate_key"),
    (b'{"x": {"a": 1, "a": 1}, "amount_usd": "1"}', "invalid_json", "duplicate_key"),
    (b'{"x": {"a": 1, "a": 1}, "y": NaN}', "invalid_json", "non_finite_number"),
    (b"{}", "missing_amount", None),
    (b'{"amount_usd": null}', "missing_amount", None),
    (b'{"amount_usd": true}', "invalid_amount", "type"),
    (b'{"amount_usd": false}', "invalid_amount", "type"),
    (b'{"amount_usd": {}}', "invalid_amount", "type"),
    (b'{"amount_usd": ["1"]}', "invalid_amount", "type"),
    (b'{"amount_usd": "NaN"}', "invalid_amount", "not_finite"),
    (b'{"amount_usd": "inf"}', "invalid_amount", "not_finite"),
    (b'{"amount_usd": "Infinity"}', "invalid_amount", "not_finite"),
    (b'{"amount_usd": "-inf"}', "invalid_amount", "not_finite"),
    (b'{"amount_usd": "+iNfInItY"}', "invalid_amount", "not_finite"),
    (b'{"amount_usd": 1e3}', "invalid_amount", "exponent"),
    (b'{"amount_usd": "1E3"}', "invalid_amount", "exponent"),
    (b'{"amount_usd": 1.0E2}', "invalid_amount", "exponent"),
    (b'{"amount_usd": -1e-3}', "invalid_amount", "exponent"),  # before negative
    (b'{"amount_usd": "1_000"}', "invalid_amount", "underscore"),
    (b'{"amount_usd": "-1_0.5"}', "invalid_amount", "underscore"),  # before negative
    (b'{"amount_usd": -1}', "invalid_amount", "negative"),
    (b'{"amount_usd": "-0"}', "invalid_amount", "negative"),
    (b'{"amount_usd": -0}', "invalid_amount", "negative"),
    (b'{"amount_usd": " 5 "}', "invalid_amount", "format"),
    (b'{"amount_usd": "+5"}', "invalid_amount", "format"),
    (b'{"amount_usd": "05"}', "invalid_amount", "format"),
    (b'{"amount_usd": ".5"}', "invalid_amount", "format"),
    (b'{"amount_usd": "5."}', "invalid_amount", "format"),
    (b'{"amount_usd": ""}', "invalid_amount", "format"),
    (b'{"amount_usd": "hello"}', "invalid_amount", "format"),  # has an e, is no exponent
    (b'{"amount_usd": "\xd9\xa1"}', "invalid_amount", "format"),  # an Arabic-Indic digit
    (b'{"amount_usd": "1' + b"0" * 32 + b'"}', "invalid_amount", "format"),  # > 32 chars
    (b'{"amount_usd": "0.0000001"}', "invalid_amount", "too_precise"),
    (b'{"amount_usd": "0.0000000"}', "invalid_amount", "too_precise"),  # never rounded
    (b'{"amount_usd": "1000000000000"}', "invalid_amount", "too_large"),  # 13 digits
    (b'{"amount_usd": "1000000.000001"}', "invalid_amount", "too_large"),  # over the cap
    (b'{"amount_usd": 0}', "invalid_amount", "zero"),
    (b'{"amount_usd": "0.000000"}', "invalid_amount", "zero"),
    (b'{"amount_usd": 0, "amount": 5}', "invalid_amount", "zero"),  # no fall-through
    (b'{"amount_usd": "1", "amount": "2"}', "invalid_amount", "conflicting_fields"),
])
def test_amounts_refused(body: bytes, error: str, detail: str | None) -> None:
    doc = refusal(body)
    assert doc["error"] == error
    assert doc.get("detail") == detail


def test_the_error_body_names_the_field() -> None:
    assert refusal(b'{"amount_usd": 1e3}') == {
        "error": "invalid_amount", "field": "amount_usd", "detail": "exponent"}
    assert refusal(b'{"amount": "1", "amount_usd": "2"}')["field"] == "amount"
    assert refusal(b"{}") == {"error": "missing_amount", "field": "amount_usd"}


def test_the_detail_lists_are_the_spec_s() -> None:
    assert AMOUNT_DETAILS == ("type", "not_finite", "exponent", "underscore", "negative",
                              "format", "too_precise", "too_large", "zero",
                              "conflicting_fields")
    assert JSON_DETAILS == ("syntax", "not_object", "non_finite_number", "duplicate_key")


def test_the_grammar_s_largest_value_and_the_cap() -> None:
    assert parse_usd("999999999999.999999", "amount_usd", cap_micros=None) == GRAMMAR_MAX_MICROS
    with pytest.raises(LedgerInputError, match="too_large"):
        parse_usd("999999999999.999999", "amount_usd")
    assert parse_usd("5", "amount_usd", cap_micros=5_000_000) == 5_000_000
    with pytest.raises(LedgerInputError, match="too_large"):
        parse_usd("5.000001", "amount_usd", cap_micros=5_000_000)


def test_zero_where_allowed() -> None:
    assert parse_usd("0", "stake_amount_usd", allow_zero=True) == 0
    assert parse_usd(JsonNumber("0.0"), "stake_amount_usd", allow_zero=True) == 0


def test_other_fields_have_their_own_reasons() -> None:
    with pytest.raises(LedgerInputError) as info:
        parse_usd(None, "vcpu_hours")
    assert info.value.body() == {"error": "missing_vcpu_hours", "field": "vcpu_hours"}
    with pytest.raises(LedgerInputError) as info:
        parse_usd("1e2", "vcpu_hours")
    assert (info.value.reason, info.value.detail) == ("invalid_vcpu_hours", "exponent")
    for field in ("price_usd_per_vcpu_hour", "price_usd"):
        with pytest.raises(LedgerInputError) as info:
            parse_usd("0.00000001", field)
        assert (info.value.reason, info.value.detail) == ("invalid_price", "too_precise")


def test_python_values_from_internal_callers() -> None:
    assert parse_usd(3, "amount_usd") == 3_000_000
    for value in (1.5, True, b"1", Decimal("1")):
        with pytest.raises(LedgerInputError, match="type"):
            parse_usd(value, "amount_usd")


def test_numbers_keep_their_text() -> None:
    body = parse_json_body(b'{"a": 12.50, "b": [1, -0, 1E2], "c": {"d": "x"}}')
    assert body == {"a": "12.50", "b": ["1", "-0", "1E2"], "c": {"d": "x"}}
    assert all(isinstance(v, JsonNumber) for v in [body["a"], *body["b"]])  # type: ignore[misc]
    assert not isinstance(body["c"]["d"], JsonNumber)  # type: ignore[call-overload,index]


def test_body_limits() -> None:
    exact = b'{"a":"' + b"x" * (MAX_BODY_BYTES - 8) + b'"}'
    assert len(exact) == MAX_BODY_BYTES
    assert parse_json_body(exact)
    with pytest.raises(BodyTooLargeError) as info:
        parse_json_body(exact + b" ")
    assert (info.value.http_status, info.value.reason) == (413, "body_too_large")
    with pytest.raises(LedgerInputError) as too_deep:
        parse_json_body(b"[" * 8000 + b"]" * 8000)
    assert too_deep.value.detail == "syntax"


def test_unknown_fields() -> None:
    body = parse_json_body(b'{"account_id": "a", "amont_usd": "1", "x": 1}')
    with pytest.raises(LedgerInputError) as info:
        reject_unknown_fields(body, frozenset({"account_id", "amount_usd"}))
    assert info.value.body() == {"error": "unknown_field", "detail": "amont_usd"}
    reject_unknown_fields(body, frozenset({"account_id", "amont_usd", "x"}))


# --- hypothesis -----------------------------------------------------------------------------

@given(st.integers(0, GRAMMAR_MAX_MICROS))
def test_format_then_parse_round_trips(micros: int) -> None:
    text = format_usd(micros)
    assert len(text.split(".")[1]) == 6
    assert parse_usd(text, "amount_usd", allow_zero=True, cap_micros=None) == micros
    assert parse_usd(JsonNumber(text), "amount_usd", allow_zero=True, cap_micros=None) == micros
    # as a JSON number the text is never a float: no digit is lost even past 2**53
    body = b'{"amount_usd": ' + text.encode() + b"}"
    assert amount_of(body, allow_zero=True, cap_micros=None) == micros


@given(st.text(alphabet="0123456789.-+_eEnaifNIty ", max_size=40))
def test_any_text_is_an_int_or_a_stable_refusal(text: str) -> None:
    try:
        micros = parse_usd(text, "amount_usd", cap_micros=None)
    except LedgerInputError as exc:
        assert exc.reason == "invalid_amount" and exc.detail in AMOUNT_DETAILS
    else:
        # only the grammar gets here, and it means what Decimal says it means
        assert micros == int(Decimal(text) * 1_000_000) and micros > 0


@given(st.decimals(min_value=0, max_value=10**12 - 1, places=6, allow_nan=False))
def test_the_value_is_exact(value: Decimal) -> None:
    text = f"{value:f}"
    assert parse_usd(text, "amount_usd", allow_zero=True, cap_micros=None) == int(
        value * 1_000_000)


# --- rendering and arithmetic (§2.3) --------------------------------------------------------

def test_rendering() -> None:
    assert format_usd(12_345_678) == "12.345678"
    assert format_usd(0) == "0.000000"
    assert format_usd(1) == "0.000001"
    assert format_usd(-12_500_000) == "-12.500000"
    with pytest.raises(TypeError):
        format_usd(1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        format_usd(True)


@pytest.mark.parametrize(("micros", "cents"), [
    (0, 0), (9_999, 0), (10_000, 1), (33_600, 3), (1_999_999, 199), (-1, -1), (-10_001, -2)])
def test_balance_cents_floors(micros: int, cents: int) -> None:
    assert balance_cents(micros) == cents


@pytest.mark.parametrize(("micro_hours", "price", "amount"), [
    (4_000_000, 8_400, 33_600),  # the spec's example: 4 vCPU-h at $0.0084
    (1_000_000, 8_400, 8_400),  # one vCPU-hour: 0.84 ¢, which cents would bill as 1 ¢
    (250_000, 8_400, 2_100),  # a quarter hour, exact
    (1, 500_000, 1),  # ½ µ$ rounds up
    (1, 1_499_999, 1),
    (1, 1_500_000, 2),
    (3, 333_333, 1),  # 0.999999 µ$
])
def test_usage_amount_rounds_half_up(micro_hours: int, price: int, amount: int) -> None:
    assert usage_amount(micro_hours, price) == amount


def test_usage_amount_refuses_zero_and_floats() -> None:
    with pytest.raises(LedgerInputError) as info:
        usage_amount(1, 499_999)
    assert info.value.reason == "amount_rounds_to_zero"
    with pytest.raises(TypeError):
        usage_amount(1.0, 8400)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="negative"):
        usage_amount(-1, 8400)


@given(st.integers(0, 10**13), st.integers(1, 10**9))
def test_usage_amount_is_within_half_a_micro(micro_hours: int, price: int) -> None:
    exact = Decimal(micro_hours) * price / 1_000_000
    try:
        amount = usage_amount(micro_hours, price)
    except LedgerInputError:
        assert exact < Decimal("0.5")
    else:
        assert abs(amount - exact) <= Decimal("0.5")


@pytest.mark.parametrize(("amount", "bps", "fee"), [
    (33_600, 0, 0), (999, 100, 9), (10_000, 1, 1), (9_999, 1, 0), (33_600, 10_000, 33_600),
    (33_600, 3_000, 10_080)])
def test_platform_fee_floors(amount: int, bps: int, fee: int) -> None:
    assert platform_fee(amount, bps) == fee


def test_platform_fee_bounds() -> None:
    for bps in (-1, 10_001):
        with pytest.raises(ValueError, match="bps"):
            platform_fee(100, bps)
    with pytest.raises(ValueError, match="non-negative"):
        platform_fee(-100, 1)


@pytest.mark.parametrize("raw", ["-1", "10001", "1.5", "abc", "", "01", " 5x"])
def test_fee_setting_refusals_name_the_variable(raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        fee_bps_setting(raw)
    assert info.value.variable == "EE_PLATFORM_FEE_BPS"


def test_fee_setting() -> None:
    assert [fee_bps_setting(r) for r in ("0", " 250 ", "10000")] == [0, 250, 10_000]


def test_max_amount_setting() -> None:
    assert max_amount_setting("1000000") == DEFAULT_MAX_AMOUNT_MICROS
    assert max_amount_setting("0.5") == 500_000
    for raw in ("0", "-1", "1e6", "lots"):
        with pytest.raises(ConfigError) as info:
            max_amount_setting(raw)
        assert info.value.variable == "EE_LEDGER_MAX_AMOUNT_USD"


def test_checked_counter() -> None:
    assert checked_counter(MAX_COUNTER, "overflows_credits") == MAX_COUNTER
    with pytest.raises(LedgerConflictError) as info:
        checked_counter(MAX_COUNTER + 1, "overflows_debits")
    assert (info.value.reason, info.value.http_status) == ("overflows_debits", 409)
