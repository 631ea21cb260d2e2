"""A whole control plane on loopback for tests, and a scriptable fake agent.

``open_control_plane`` starts ``serve()`` (hypercorn, the real store on SQLite in ``tmp_path``)
with a stand-in PCCS and a stand-in GitHub on real sockets, under a test PKI. Time is trio's:
tests run under ``trio.testing.MockClock`` (the ``mock_clock`` fixture) and move it with
``mock_clock.jump(seconds)``; the control plane's wall clock follows (``TrioClock``).

Real-time safety: with a mock clock ``fail_after`` never fires, so waits here are bounded in
*real* seconds by :func:`real_deadline`.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio
import trio.testing
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from agent.forward import open_backend_pool, serve_forwarding
from eecp.core.clock import TrioClock
from eecp.core.config import Config, from_env
from eecp.dev import mint as devmint
from eecp.dev import pki as devpki
from eecp.service import Bound, serve
from eecp.wire.measurements import Measurements, report_data_for
from eecp.wire.protocol import AttestResponse, Register, encode_attest_response, encode_register
from eecp.wire.streams import Mux
from tests.fake_github import FakeGitHub, open_fake_github
from tests.fake_pccs import FakePccs, open_fake_pccs

MINTED_AT = 1_790_000_000.0  # when the test PKI's collateral was issued
START = MINTED_AT + 3600.0  # the control plane's wall clock at trio time 0
REPO, TAG = "acme/shop", "v1.2.0"
MEAS = Measurements("a" * 64, "b" * 64, "tag=v1.2.0\nsha256=" + "c" * 64, True)
ASSET = "agent-attestation-allowlist.json"
#: real seconds every task must have been blocked before a shutting-down plane's clock jumps
#: (a task waiting on a worker thread counts as blocked: a plane whose shutdown writes to the
#: store, the ledger's, asks for more)
SHUTDOWN_AUTOJUMP_SEC = 0.0


def allowlist_doc(measurements: Measurements = MEAS, **overrides: Any) -> bytes:
    """An upstream-format allowlist matching the factory's default MRTD/RTMRs."""
    doc: dict[str, Any] = {
        "version": "1.0",
        "measurements": measurements.as_dict(),
        "quote_measurements": {
            "mrtd": devmint.DEFAULT_MRTD.hex(),
            **{f"rtmr{i}": r.hex() for i, r in enumerate(devmint.DEFAULT_RTMRS)}},
    }
    doc.update(overrides)
    return json.dumps(doc).encode()


async def _sleep_real(seconds: float) -> None:
    await trio.to_thread.run_sync(time.sleep, seconds)


@asynccontextmanager
async def real_deadline(seconds: float) -> AsyncIterator[trio.CancelScope]:
    """Cancel the body after ``seconds`` of real time (mock clocks never fire fail_after)."""
    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as scope:
            async def watchdog() -> None:
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    await _sleep_real(0.02)
                scope.cancel()
            nursery.start_soon(watchdog)
            yield scope
        nursery.cancel_scope.cancel()
    if scope.cancelled_caught:
        raise AssertionError(f"not done within {seconds}s of real time")


@asynccontextmanager
async def safety_net(seconds: float) -> AsyncIterator[None]:
    """Fail the block after ``seconds`` of real time (a MockClock never fires fail_after).

    A thread waits the whole time instead of polling like harness.real_deadline, so trio is
    not woken before then and ``wait_all_tasks_blocked`` can see the run idle."""
    done = threading.Event()
    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as scope:
            async def watchdog() -> None:
                if not await trio.to_thread.run_sync(done.wait, seconds):
                    scope.cancel()
            nursery.start_soon(watchdog)
            try:
                yield
            finally:
                done.set()
    if scope.cancelled_caught:
        raise AssertionError(f"not done within {seconds}s of real time")


async def eventually(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    """Wait (in real time, never moving the mock clock) until ``condition()`` holds."""
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        await _sleep_real(0.005)


async def resolve_until(cp: ControlPlane, app: str,
                        predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Resolve ``app`` until ``predicate(body)`` holds (the server notices closes async)."""
    body: dict[str, Any] = {}

    async def check() -> bool:
        nonlocal body
        body = (await cp.resolve(app)).json()
        return predicate(body)

    async with real_deadline(10):
        while not await check():
            await _sleep_real(0.01)
    if not predicate(body):
        raise AssertionError(f"resolve {app} never matched: {body}")
    return body


@dataclass
class ControlPlane:
    """A running eecp and its stand-in upstreams."""

    bound: Bound
    config: Config
    pki: devpki.DevPki
    pccs: FakePccs
    github: FakeGitHub
    env: dict[str, str]
    #: set it to stop eecp before the block ends (what SIGTERM does); ``stopped``: serve returned
    shutdown: trio.Event = field(default_factory=trio.Event)
    stopped: trio.Event = field(default_factory=trio.Event)

    @property
    def url(self) -> str:
        return self.bound.control_url

    @property
    def proxy_url(self) -> str:
        return f"http://{self.bound.control_host}:{self.bound.proxy_port}"

    @property
    def auth_url(self) -> str:
        return f"http://127.0.0.1:{self.bound.auth_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.bound.control_host}:{self.bound.control_port}/v1/tunnel"

    async def get(self, path: str, **kwargs: Any) -> httpx.Response:
        # a fresh client per call: mock-clock jumps may outlive pooled connections
        async with httpx.AsyncClient() as client:
            return await client.get(self.url + path, **kwargs)

    async def resolve(self, app: str) -> httpx.Response:
        return await self.get(f"/v1/resolve/{app}")

    async def app(self, name: str) -> dict[str, Any]:
        response = await self.get(f"/v1/apps/{name}", headers=self.admin_headers)
        assert response.status_code == 200, response.text
        return dict(response.json())

    @property
    def admin_headers(self) -> dict[str, str]:
        token = self.config.admin_token
        return {"Authorization": f"Bearer {token}"} if token else {}


def control_plane_env(tmp_path: Path, pki: devpki.DevPki, pccs_url: str, github_url: str,
                      **extra: str) -> dict[str, str]:
    root = tmp_path / "root.pem"
    if not root.exists():
        pki.write_root(root)
    return {
        "EE_CONTROL_BIND": "127.0.0.1", "EE_CONTROL_PORT": "0",
        "EE_PROXY_BIND": "127.0.0.1", "EE_PROXY_PORT": "0", "EE_AUTH_PORT": "0",
        "EE_DB_PATH": str(tmp_path / "eecp.db"), "EE_DCAP_ROOT_CA": str(root),
        "EE_PCCS_URL": pccs_url, "EE_GITHUB_API_URL": github_url,
        "EE_ADMIN_TOKEN": "admin-secret", "EE_TUNNEL_PING_INTERVAL_SEC": "0",
        **extra,
    }


@asynccontextmanager
async def open_upstreams(pki: devpki.DevPki) -> AsyncIterator[tuple[FakePccs, FakeGitHub]]:
    """The stand-in PCCS (collateral valid 400 days) and GitHub (REPO@TAG released)."""
    baseline = devmint.mint_tdx_quote(pki, now=MINTED_AT, collateral_days=400)
    async with open_fake_pccs(baseline.collateral_json) as pccs, open_fake_github() as github:
        github.add_release(REPO, TAG, {ASSET: allowlist_doc()})
        yield pccs, github


@asynccontextmanager
async def open_control_plane(env: dict[str, str], pki: devpki.DevPki, pccs: FakePccs,
                             github: FakeGitHub, *, wall_start: float = START,
                             shutdown_autojump_sec: float = SHUTDOWN_AUTOJUMP_SEC
                             ) -> AsyncIterator[ControlPlane]:
    """Run ``serve()`` with ``env`` until the block ends (then shut it down gracefully); its
    wall clock reads ``wall_start`` now and follows trio's clock. Under a MockClock the
    shutdown's deadlines pass once every task has been blocked ``shutdown_autojump_sec`` of
    real time (see :data:`SHUTDOWN_AUTOJUMP_SEC`)."""
    config = from_env(env)
    shutdown, stopped = trio.Event(), trio.Event()

    async def run(task_status: trio.TaskStatus[Bound] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await serve(config, clock=TrioClock(wall_start), shutdown=shutdown,
                        handle_signals=False, task_status=task_status)
        finally:
            stopped.set()

    async with trio.open_nursery() as nursery:
        bound: Bound = await nursery.start(run)
        try:
            yield ControlPlane(bound, config, pki, pccs, github, env, shutdown, stopped)
        finally:
            shutdown.set()
            clock = trio.lowlevel.current_clock()
            if isinstance(clock, trio.testing.MockClock):
                # let the shutdown grace deadlines pass instead of waiting for real time
                clock.autojump_threshold = shutdown_autojump_sec


@dataclass
class FakeAgent:
    """A scriptable agent speaking the tunnel protocol through a real WebSocket.

    With ``auto=True`` it answers every challenge with a genuine quote over
    ``sha256(measurements) || nonce`` (``mint_kwargs`` tweak the quote; ``claimed`` replaces the
    measurements it reports; ``answer_nonce`` replaces the nonce it binds, e.g. an old one).
    """

    url: str
    pki: devpki.DevPki
    app: str = "shop"
    repo: str = REPO
    tag: str = TAG
    network: str = "forge-1"
    agent_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    measurements: Measurements = MEAS
    claimed: Measurements | None = None
    mint_kwargs: dict[str, Any] = field(default_factory=dict)
    auto: bool = True
    answer_nonce: bytes | None = None
    backend_url: str | None = None  # forward proxied requests here (agent.forward)
    #: or serve the tunnel's streams with this (a hostile or scripted agent's data plane)
    serve_streams: Callable[[Mux], Awaitable[None]] | None = None
    register_extra: dict[str, Any] = field(default_factory=dict)  # fields to add or override
    received: list[dict[str, Any]] = field(default_factory=list)
    closed: tuple[int, str | None] | None = None
    ws: WebSocketConnection | None = None
    _changed: trio.Event = field(default_factory=trio.Event)

    def register_message(self, **extra: Any) -> str:
        return encode_register(Register(self.repo, self.tag, self.app, self.network,
                                        self.agent_id), **{**self.register_extra, **extra})

    def answer(self, nonce: bytes) -> str:
        bound = self.answer_nonce if self.answer_nonce is not None else nonce
        report_data = report_data_for(self.measurements, bound)
        minted = devmint.mint_tdx_quote(self.pki, now=MINTED_AT, report_data=report_data,
                                   **self.mint_kwargs)
        return encode_attest_response(AttestResponse(
            nonce, minted.quote, report_data, (self.claimed or self.measurements).as_dict()))

    async def run(self, *, register: bool = True,
                  task_status: trio.TaskStatus[FakeAgent] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, register, then receive until the socket closes."""
        async with open_websocket_url(self.url) as ws, trio.open_nursery() as nursery:
            self.ws = ws
            mux = Mux(ws.send_message, opener=False)
            if self.backend_url is not None:
                nursery.start_soon(self._forward, mux)
            elif self.serve_streams is not None:
                nursery.start_soon(self.serve_streams, mux)
            if register:
                await ws.send_message(self.register_message(tunnel_version="test"))
            task_status.started(self)
            try:
                while True:
                    data = await ws.get_message()
                    if isinstance(data, bytes):
                        await mux.feed(data)
                        continue
                    message = json.loads(data)
                    self.received.append(message)
                    self._notify()
                    if self.auto and message.get("type") == "attest_request":
                        await ws.send_message(self.answer(bytes.fromhex(message["nonce"])))
            except ConnectionClosed as exc:
                reason = exc.reason
                self.closed = (reason.code, reason.reason) if reason else (1006, None)
                self._notify()
            finally:
                mux.close("tunnel_closed")

    async def _forward(self, mux: Mux) -> None:
        assert self.backend_url is not None
        async with open_backend_pool(self.backend_url) as pool:
            await serve_forwarding(mux, pool, timeout_sec=30)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def send(self, text: str | bytes) -> None:
        assert self.ws is not None
        await self.ws.send_message(text)

    async def health(self, status: str = "pass") -> None:
        await self.send(json.dumps({"type": "health", "status": status}))

    def statuses(self) -> list[tuple[str, str]]:
        return [(m["state"], m["reason"]) for m in self.received if m.get("type") == "status"]

    def challenges(self) -> list[dict[str, Any]]:
        return [m for m in self.received if m.get("type") == "attest_request"]

    async def wait_for(self, predicate: Callable[[FakeAgent], bool], seconds: float = 10.0
                       ) -> None:
        """Wait (real time) until ``predicate(self)`` holds."""
        async with real_deadline(seconds):
            while not predicate(self):
                await self._changed.wait()

    async def wait_status(self, reason: str, seconds: float = 10.0) -> None:
        await self.wait_for(lambda a: any(r == reason for _, r in a.statuses()), seconds)

    async def wait_closed(self, seconds: float = 10.0) -> tuple[int, str | None]:
        await self.wait_for(lambda a: a.closed is not None, seconds)
        assert self.closed is not None
        return self.closed


@asynccontextmanager
async def running_agent(agent: FakeAgent, **kwargs: Any) -> AsyncIterator[FakeAgent]:
    """Run ``agent`` in the background for the block; disconnect it at the end."""
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(agent.run, **kwargs))
        try:
            yield agent
        finally:
            nursery.cancel_scope.cancel()
