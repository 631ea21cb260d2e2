"""The proxy's one line per failed request is bounded per client (a client failing its own
uploads in a loop cannot flood eecp's log, nor push out the lines of other clients), and what
was left out is summed up with a later line."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import cast

import pytest
import trio
import trio.testing

from eecp.core.metrics import Metrics, StateGauges
from eecp.dataplane.forwarded import TrustedProxies
from eecp.dataplane.http import Request
from eecp.dataplane.listeners import FAILED_LINES_PER_MIN, ProxyHandler
from eecp.dataplane.proxy import Forwarder


def handler() -> ProxyHandler:
    metrics = Metrics(lambda: StateGauges(0, 0, {}), lambda _: True)
    return ProxyHandler(cast(Forwarder, None), TrustedProxies(()), metrics)


REQUEST = cast(Request, SimpleNamespace(method="POST", path="/upload"))


def lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


async def test_one_client_gets_its_share_of_the_lines_and_the_rest_is_summed_up(
        caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock) -> None:
    caplog.set_level(logging.INFO, "eecp.dataplane")
    proxy = handler()
    for _ in range(1000):
        proxy._failed(REQUEST, "shop", "client_gone", "203.0.113.7")
    share = FAILED_LINES_PER_MIN // 5
    assert len(lines(caplog, "failed: client_gone")) == share
    proxy._failed(REQUEST, "shop", "stream_reset", "198.51.100.1")  # another client: logged
    assert len(lines(caplog, "failed: stream_reset")) == 1
    await trio.sleep(60)
    proxy._failed(REQUEST, "shop", "client_gone", "203.0.113.7")
    (summary,) = lines(caplog, "left out")
    assert summary.startswith(f"proxy: {1000 - share} lines of failed requests left out")
    assert "shop POST /upload: client_gone" in summary
