"""The backend health probe: one GET, judged by its status code within a deadline."""

from __future__ import annotations

import logging
from typing import Literal

import httpx
import trio

log = logging.getLogger("agent.health")

HealthStatus = Literal["pass", "fail"]


async def probe_backend(client: httpx.AsyncClient, url: str, timeout_sec: float) -> HealthStatus:
    """GET ``url``: ``pass`` on a 2xx or 3xx answer within ``timeout_sec``, else ``fail``.

    Redirects are not followed (a 3xx already proves the backend answers), and every failure
    is logged at debug level only: the caller logs transitions, not every failed probe.
    """
    with trio.move_on_after(timeout_sec):
        try:
            # streamed and never read: only the status line matters, whatever the body's size
            async with client.stream("GET", url, follow_redirects=False) as response:
                status = response.status_code
        except httpx.HTTPError as exc:
            log.debug("health probe %s failed: %s", url, exc or type(exc).__name__)
            return "fail"
        if 200 <= status < 400:
            return "pass"
        log.debug("health probe %s answered %d", url, status)
        return "fail"
    log.debug("health probe %s timed out after %.1fs", url, timeout_sec)
    return "fail"
