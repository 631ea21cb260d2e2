"""A control plane with the ledger on, for the ledger's HTTP tests (real sockets).

:func:`open_ledger_plane` runs ``serve()`` through the harness with ``EE_LEDGER_ENABLED=true``,
three distinct strong role tokens and a 60-second period (the shortest, §21.10), so that a test
can run several periods with trio's ``MockClock``. When the block ends without an error it
asserts ``GET /v1/ledger/check`` is ``ok`` (every ledger test ends with its invariants whole).

:meth:`LedgerPlane.advance` moves the mock clock in steps of the observer's beat and waits,
in real time, for the beat of each step to be written: a single long jump would leave a gap
in the observer's coverage, which the ledger rightly holds as ``observer_gap``.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio
from trio.testing import MockClock

from eecp.dev import pki as devpki
from tests.databases import Backend
from tests.harness import (
    START,
    ControlPlane,
    FakeAgent,
    control_plane_env,
    open_control_plane,
    open_upstreams,
)

ADMIN = "admin-" + "a" * 40
LAUNCHER = "launcher-" + "l" * 40
UPTIME = "uptime-" + "u" * 40
PERIOD = 60
BEAT = 5.0
#: real seconds of idle before a shutting-down plane's deadlines pass (the harness's is 0.05)
SHUTDOWN_AUTOJUMP_SEC = 0.5
LEDGER_ENV = {
    "EE_LEDGER_ENABLED": "true", "EE_ADMIN_TOKEN": ADMIN, "EE_LAUNCHER_TOKEN": LAUNCHER,
    "EE_UPTIME_TOKEN": UPTIME, "EE_LEDGER_PERIOD": str(PERIOD),
    "EE_SETTLEMENT_DELAY_SEC": "10", "EE_OBSERVER_BEAT_SEC": str(BEAT),
    "EE_OBSERVER_GAP_TOLERANCE_SEC": "30", "EE_SETTLEMENT_RECONNECT_GRACE_SEC": "20",
    # the fake agents send no health reports: silence must not be what fails a period
    "EE_HEALTH_TIMEOUT_SEC": "86400",
}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def key() -> dict[str, str]:
    """A fresh ``Idempotency-Key``."""
    return {"Idempotency-Key": str(uuid.uuid4())}


def period_id(start: float) -> str:
    """The id of the 60-second period starting at ``start`` (RFC 3339, §21.10)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start))


@dataclass
class LedgerPlane:
    """A running eecp with the ledger on."""

    cp: ControlPlane
    clock: MockClock | None
    backend: Backend | None = None
    node_tokens: dict[str, str] = field(default_factory=dict)

    @property
    def now(self) -> float:
        """eecp's wall clock (the harness's TrioClock)."""
        return START + trio.current_time()

    def period(self, offset: int = 0) -> tuple[int, str]:
        """The start and id of the current period (``offset`` periods later)."""
        start = int(self.now) // PERIOD * PERIOD + offset * PERIOD
        return start, period_id(start)

    async def call(self, method: str, path: str, token: str | None = ADMIN, *,
                   json: Any = None, content: bytes | None = None,
                   headers: dict[str, str] | None = None) -> httpx.Response:
        sent = {**(bearer(token) if token is not None else {}), **(headers or {})}
        async with httpx.AsyncClient() as client:  # fresh per call: the clock jumps
            return await client.request(method, self.cp.url + path, json=json,
                                        content=content, headers=sent)

    async def ok(self, method: str, path: str, token: str | None = ADMIN, **kwargs: Any
                 ) -> dict[str, Any]:
        response = await self.call(method, path, token, **kwargs)
        assert response.status_code == 200, (method, path, response.status_code, response.text)
        return dict(response.json())

    async def check(self) -> dict[str, Any]:
        return await self.ok("GET", "/v1/ledger/check")

    # -- set-ups the tests share --

    async def fund(self, account: str, usd: str) -> dict[str, Any]:
        return await self.ok("POST", "/v1/credits/purchase", headers=key(),
                             json={"account_id": account, "amount_usd": usd})

    async def create_node(self, node_id: str, *, price: str = "0.5", capacity: int = 2,
                          stake: str | None = "1") -> str:
        """A node, its token, and (``stake``) its stake deposited from a purchase."""
        doc = await self.ok("POST", "/v1/nodes/register", json={
            "node_id": node_id, "price_usd_per_vcpu_hour": price, "capacity_vcpus": capacity})
        token = str(doc["node_token"])
        self.node_tokens[node_id] = token
        if stake is not None:
            await self.fund(f"node:{node_id}", stake)
            await self.ok("POST", "/v1/nodes/register", json={
                "node_id": node_id, "stake_amount_usd": stake, "allow_update": True})
        return token

    def agent(self, node_id: str | None, ppid: bytes | None = None, **kwargs: Any
              ) -> FakeAgent:
        """A fake agent on platform ``ppid`` (a fresh one by default) naming ``node_id``."""
        extra = {"node_id": node_id} if node_id is not None else {}
        return FakeAgent(self.cp.ws_url, self.cp.pki, register_extra=extra,
                         mint_kwargs={"ppid": ppid or uuid.uuid4().bytes}, **kwargs)

    # -- the store, read directly --

    def rows(self, sql: str, *params: object) -> list[tuple[Any, ...]]:
        if self.backend is not None and self.backend.name == "postgres":
            return self.backend.raw(sql, *params)
        conn = sqlite3.connect(Path(self.cp.config.db_path))
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def events(self, agent_id: str | None = None) -> list[tuple[str, str, str | None]]:
        """The availability events (of ``agent_id``) as ``(kind, reason, node_id)``."""
        sql = "SELECT kind, reason, node_id, agent_id FROM availability_event ORDER BY at, id"
        return [(r[0], r[1], r[2]) for r in self.rows(sql)
                if agent_id is None or r[3] == agent_id]

    async def wait_events(self, agent_id: str, count: int) -> list[tuple[str, str, str | None]]:
        """The agent's events once there are ``count`` of them (real time)."""
        end = time.monotonic() + 10
        while len(found := await trio.to_thread.run_sync(self.events, agent_id)) < count:
            assert time.monotonic() < end, found
            await trio.to_thread.run_sync(time.sleep, 0.01)
        return found

    # -- time --

    def beat_at(self) -> float:
        """The latest heartbeat of a running observer (0 when none)."""
        rows = self.rows("SELECT MAX(last_beat_at) FROM observer WHERE stopped_at IS NULL")
        return float(rows[0][0] or 0.0)

    async def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` forward in beats, each beat written before the next."""
        assert self.clock is not None
        left = seconds
        while left > 0:
            step = min(BEAT, left)
            self.clock.jump(step)
            left -= step
            target = self.now
            end = time.monotonic() + 10
            while await trio.to_thread.run_sync(self.beat_at) < target - 1e-6:
                assert time.monotonic() < end, ("the observer did not beat", target,
                                                self.beat_at(), self.rows("SELECT * FROM observer"))
                await trio.to_thread.run_sync(time.sleep, 0.01)

    async def advance_until(self, done: Callable[[], bool], seconds: float) -> None:
        """:meth:`advance` a beat at a time until ``done()`` (within ``seconds`` of the clock),
        giving the control plane a little real time after each beat."""
        passed = 0.0
        while not done():
            assert passed < seconds, "not done in time"
            await self.advance(BEAT)
            passed += BEAT
            await trio.to_thread.run_sync(time.sleep, 0.02)


@asynccontextmanager
async def open_ledger_plane(tmp_path: Path, pki: devpki.DevPki, clock: MockClock | None,
                            backend: Backend | None = None, **extra: str
                            ) -> AsyncIterator[LedgerPlane]:
    """A control plane with the ledger on (see the module docstring); ``backend`` picks the
    database (its PostgreSQL URL), else SQLite in ``tmp_path``."""
    # pytest-trio runs a test under the clock the *test* requests (not its fixtures')
    assert clock is None or trio.lowlevel.current_clock() is clock, "request mock_clock"
    env = dict(LEDGER_ENV)
    if backend is not None and backend.config.db_url:
        env["EE_DB_URL"] = backend.config.db_url
    env.update(extra)
    threshold = clock.autojump_threshold if clock is not None else None
    async with open_upstreams(pki) as (pccs, github):
        env = control_plane_env(tmp_path, pki, pccs.url, github.url, **env)
        # one wall clock for every plane of a test: START at trio time 0 (a restart goes on)
        # its shutdown writes to the store (the outbox's flush, the observer's stop, the
        # settler's lease), on PostgreSQL too: give them time before its deadlines pass
        async with open_control_plane(env, pki, pccs, github,
                                      wall_start=START + trio.current_time(),
                                      shutdown_autojump_sec=SHUTDOWN_AUTOJUMP_SEC) as cp:
            plane = LedgerPlane(cp, clock, backend)
            yield plane
            doc = await plane.check()
            assert doc["ok"] is True, doc
    if clock is not None and threshold is not None:
        clock.autojump_threshold = threshold  # (the harness's shutdown let it jump)
