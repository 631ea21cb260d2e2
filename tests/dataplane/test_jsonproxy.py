"""eecp.jsonproxy: the JSON proxy's one-buffer answer and its budget (pure; the endpoint itself
is tested through real sockets in tests/dataplane/test_proxy.py)."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eecp.dataplane.jsonproxy import Budget, JsonAnswer
from eecp.dataplane.proxy import ProxyError

HEADERS = [("content-type", "text/plain"), ("x-quote", 'say "hi"\\')]


@given(st.lists(st.binary(max_size=40), max_size=12))
def test_the_answer_is_the_json_of_the_whole_body_however_it_is_chunked(
        chunks: list[bytes]) -> None:
    budget = Budget(1 << 20)
    share = budget.share()
    answer = JsonAnswer(201, HEADERS, share, limit=1 << 20)
    for chunk in chunks:
        answer.feed(chunk)
    data = answer.finish()
    body = b"".join(chunks)
    assert json.loads(data) == {"status": 201, "headers": [list(h) for h in HEADERS],
                                "body_b64": base64.b64encode(body).decode()}
    assert answer.size == len(body)
    assert share.held == budget.used >= len(data)  # every byte it holds was taken first
    share.release()
    assert budget.used == 0 and share.held == 0


def test_a_call_that_cannot_have_its_bytes_is_proxy_busy_and_takes_nothing() -> None:
    budget = Budget(2000)
    other = budget.share("192.0.2.1")
    other.take(1000)
    another = budget.share("192.0.2.2")
    another.take(600)
    share = budget.share("192.0.2.3")
    answer = JsonAnswer(200, [], share, limit=10_000)
    taken = budget.used
    answer.feed(b"x" * 240)  # 320 bytes of base64: it fits
    with pytest.raises(ProxyError) as caught:
        answer.feed(b"y" * 90)  # 120 more do not
    assert (caught.value.http_status, caught.value.reason, caught.value.allowed) == (
        503, "proxy_busy", True)
    assert budget.used == taken + 320
    share.release()
    other.release()
    another.release()
    assert budget.used == 0


def test_one_client_holds_at_most_half_the_budget() -> None:
    budget = Budget(1000)
    first, second = budget.share("192.0.2.1"), budget.share("192.0.2.1")
    first.take(300)
    with pytest.raises(ProxyError) as caught:
        second.take(201)  # 501 in all for that client
    assert caught.value.reason == "proxy_busy" and budget.used == 300
    second.take(200)
    budget.share("192.0.2.2").take(500)  # another client still gets the rest
    first.release()
    second.release()
    assert budget.used == 500


def test_an_answer_over_the_limit_is_response_too_large() -> None:
    answer = JsonAnswer(200, [], Budget(1 << 20).share(), limit=5)
    answer.feed(b"12345")
    with pytest.raises(ProxyError) as caught:
        answer.feed(b"6")
    assert (caught.value.http_status, caught.value.reason) == (502, "response_too_large")
