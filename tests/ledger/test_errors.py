"""The ledger's error family in eecp.core.errors: one base, the HTTP status each subclass hints, and
the JSON body every ledger refusal is answered with."""

from __future__ import annotations

import pytest

import eecp.core.errors
from eecp.core.errors import (
    BodyTooLargeError,
    EecpError,
    LedgerConflictError,
    LedgerError,
    LedgerInputError,
    LedgerNotFoundError,
)


@pytest.mark.parametrize(("cls", "status"), [
    (LedgerError, 500), (LedgerInputError, 400), (BodyTooLargeError, 413),
    (LedgerNotFoundError, 404), (LedgerConflictError, 409)])
def test_one_family_with_a_status_each(cls: type[LedgerError], status: int) -> None:
    err = cls("some_reason")
    assert isinstance(err, LedgerError) and isinstance(err, EecpError)
    assert err.http_status == status
    assert err.body() == {"error": "some_reason"}
    assert cls.__name__ in (eecp.core.errors.__doc__ or "")


def test_the_body_carries_field_detail_and_extra_members() -> None:
    err = LedgerInputError("invalid_amount", "exponent", field="amount_usd")
    assert err.body() == {"error": "invalid_amount", "field": "amount_usd", "detail": "exponent"}
    assert str(err) == "invalid_amount: exponent"
    conflict = LedgerConflictError("period_not_ended", extra={"settleable_at": "x"})
    assert conflict.body() == {"error": "period_not_ended", "settleable_at": "x"}
    assert conflict.body() is not conflict.body()  # a fresh dict for each answer
    assert isinstance(BodyTooLargeError("body_too_large"), LedgerInputError)
