"""Graceful drain (issue 17 §3), through real sockets: a real eecp (``serve()``, stopped by its
``shutdown`` event as SIGTERM would), agents on real tunnels forwarding to a real local
backend, clients on the proxy listener and the control port.

While eecp drains, the request in flight finishes, a new one is refused (503 ``draining``,
``Connection: close``), a new tunnel is refused (503 before the upgrade), ``/health`` says
``draining`` (503), every agent is told ``warning draining``; then the tunnels close with
1001 and ``serve`` returns, within the grace (on the mock clock) even when a request never
ends. A session an agent leaves during the drain writes ``down observer_shutdown``, and the
observer still records its stop. The real agent (agent.tunnel) leaves its tunnel once its own
request has finished and dials again — through a stand-in load balancer, onto a second eecp —
without counting a failure.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio.testing import MockClock
from trio_websocket import ConnectionRejected, open_websocket_url

from agent.agent import build_provider
from agent.config import from_env as agent_from_env
from agent.tunnel import AgentState, run_agent
from eecp.dev import pki as devpki
from eecp.service import CLOSE_SEC
from tests.fakehttp import FakeServer, Request, Response, open_fake_http
from tests.harness import (
    MEAS,
    REPO,
    TAG,
    ControlPlane,
    FakeAgent,
    control_plane_env,
    open_control_plane,
    open_upstreams,
    real_deadline,
    resolve_until,
    running_agent,
    safety_net,
)
from tests.ledgerkit import LEDGER_ENV, LedgerPlane
from tests.ledgerkit import SHUTDOWN_AUTOJUMP_SEC as LEDGER_AUTOJUMP_SEC

HOST = "shop.example.com"
GRACE = 30.0
WAIT = 10.0  # real seconds a step may take before the test fails instead of hanging


@pytest.fixture(scope="module")
def pki() -> devpki.DevPki:
    return devpki.make_pki(seed=317)


@dataclass
class App:
    """The backend: ``/slow`` answers once :attr:`release` is set, anything else at once."""

    release: trio.Event = field(default_factory=trio.Event)
    slow_started: trio.Event = field(default_factory=trio.Event)
    server: FakeServer | None = None

    async def handle(self, request: Request) -> Response:
        if request.path == "/slow":
            self.slow_started.set()
            await self.release.wait()
            return Response(200, b"slow done")
        return Response(200, b"quick")

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url


@asynccontextmanager
async def open_app() -> AsyncIterator[App]:
    app = App()
    async with open_fake_http(app.handle) as server:
        app.server = server
        yield app


@asynccontextmanager
async def open_cp(tmp_path: Path, pki: devpki.DevPki, grace: float = GRACE
                  ) -> AsyncIterator[ControlPlane]:
    async with open_upstreams(pki) as (pccs, github):
        env = control_plane_env(tmp_path, pki, pccs.url, github.url,
                                EE_SHUTDOWN_GRACE_SEC=str(grace))
        async with open_control_plane(env, pki, pccs, github) as cp:
            yield cp


async def proxied(cp: ControlPlane, path: str) -> httpx.Response:
    # no client timeout: the mock clock's jumps must not end a request eecp is waiting for
    async with httpx.AsyncClient(timeout=None) as client:
        return await client.get(cp.proxy_url + path, headers={"Host": HOST})


@dataclass
class Call:
    """A request running in the background: its response, or what it raised."""

    response: httpx.Response | None = None
    error: Exception | None = None
    done: trio.Event = field(default_factory=trio.Event)

    async def run(self, request: Callable[[], Any]) -> None:
        try:
            self.response = await request()
        except httpx.HTTPError as exc:
            self.error = exc
        finally:
            self.done.set()


async def start_slow(nursery: trio.Nursery, cp: ControlPlane, app: App) -> Call:
    call = Call()
    nursery.start_soon(call.run, partial(proxied, cp, "/slow"))
    async with real_deadline(WAIT):
        await app.slow_started.wait()
    return call


async def test_a_drain_finishes_the_request_in_flight_and_refuses_what_is_new(
        tmp_path: Path, pki: devpki.DevPki, mock_clock: MockClock) -> None:
    async with open_app() as app, open_cp(tmp_path, pki) as cp, trio.open_nursery() as bg:
        agent = FakeAgent(cp.ws_url, pki, backend_url=app.url)
        async with running_agent(agent):
            await agent.wait_status("attested")
            assert (await proxied(cp, "/")).text == "quick"
            slow = await start_slow(bg, cp, app)

            cp.shutdown.set()  # SIGTERM
            await agent.wait_status("draining")
            assert ("warning", "draining") in agent.statuses()
            health = await cp.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "draining"
            # new requests, on both entry points, are refused; the proxy listener's says close
            refused = await proxied(cp, "/")
            assert refused.status_code == 503
            assert refused.json() == {"allowed": True, "reason": "draining"}
            assert refused.headers["connection"] == "close"
            async with httpx.AsyncClient() as client:
                call = await client.post(cp.url + "/v1/proxy/shop",
                                         json={"method": "GET", "path": "/"})
            assert call.status_code == 503 and call.json()["reason"] == "draining"
            # a new tunnel is refused before its handshake completes
            with pytest.raises(ConnectionRejected) as rejected:
                async with open_websocket_url(cp.ws_url):
                    pass
            assert rejected.value.status_code == 503
            assert b'"draining"' in (rejected.value.body or b"")
            # the tunnel with the request in flight stays up, the request unhurt
            assert agent.closed is None and not slow.done.is_set()
            assert not cp.stopped.is_set()

            app.release.set()
            async with real_deadline(WAIT):
                await slow.done.wait()
            assert slow.response is not None and slow.response.status_code == 200
            assert slow.response.text == "slow done"
            # the last request done: the tunnels close with 1001 and eecp exits
            assert await agent.wait_closed() == (1001, "server_shutdown")
            async with real_deadline(WAIT):
                await cp.stopped.wait()


async def test_a_request_that_never_ends_holds_the_stop_no_longer_than_the_grace(
        tmp_path: Path, pki: devpki.DevPki, mock_clock: MockClock) -> None:
    grace = 10.0  # below every other deadline of the request (proxy and backend timeouts)
    async with open_app() as app, open_cp(tmp_path, pki, grace) as cp, \
            trio.open_nursery() as bg:
        agent = FakeAgent(cp.ws_url, pki, backend_url=app.url)
        async with running_agent(agent):
            await agent.wait_status("attested")
            slow = await start_slow(bg, cp, app)
            started = trio.current_time()
            cp.shutdown.set()
            await agent.wait_status("draining")
            mock_clock.jump(grace - 1)
            await trio.testing.wait_all_tasks_blocked(0.05)
            health = await cp.get("/health")  # still draining, still waiting for it
            assert health.status_code == 503 and health.json()["status"] == "draining"
            assert agent.closed is None and not slow.done.is_set()
            # from here on every deadline may pass, once all has been idle a while (a task
            # waiting on a store thread, as a session's cleanup does, counts as idle)
            mock_clock.autojump_threshold = LEDGER_AUTOJUMP_SEC
            async with safety_net(WAIT):  # (one thread waiting: no polling keeps trio awake)
                await cp.stopped.wait()
            elapsed = trio.current_time() - started
            assert await agent.wait_closed() == (1001, "server_shutdown")
            async with real_deadline(WAIT):
                await slow.done.wait()
    assert slow.response is None or slow.response.status_code == 502  # never a 200
    assert grace <= elapsed <= grace + min(grace, CLOSE_SEC) + 1


async def test_a_session_left_during_the_drain_is_eecps_own_down(
        tmp_path: Path, pki: devpki.DevPki, mock_clock: MockClock) -> None:
    node = "acme-1"
    async with open_app() as app, open_upstreams(pki) as (pccs, github), \
            trio.open_nursery() as bg:
        env = control_plane_env(tmp_path, pki, pccs.url, github.url, **LEDGER_ENV,
                                EE_SHUTDOWN_GRACE_SEC=str(GRACE))
        # (not ledgerkit's open_ledger_plane: its end asks the stopped eecp for a check)
        async with open_control_plane(env, pki, pccs, github,
                                      shutdown_autojump_sec=LEDGER_AUTOJUMP_SEC) as cp:
            plane = LedgerPlane(cp, mock_clock)
            await plane.create_node(node)
            busy = plane.agent(node, backend_url=app.url)
            # another app's: the slow request can only be the first one's
            leaving = plane.agent(node, uuid.uuid4().bytes, app="cart")
            async with running_agent(busy), running_agent(leaving):
                await busy.wait_status("attested")
                await leaving.wait_status("attested")
                await plane.wait_events(leaving.agent_id, 1)
                slow = await start_slow(bg, cp, app)
                cp.shutdown.set()
                await leaving.wait_status("draining")
                assert leaving.ws is not None
                await leaving.ws.aclose(1001, "draining")  # it moves, as asked
                events = await plane.wait_events(leaving.agent_id, 2)
                assert events[-1] == ("down", "observer_shutdown", None)
                assert not cp.stopped.is_set()  # the drain still waits for the other
                app.release.set()
                async with real_deadline(WAIT):
                    await slow.done.wait()
                assert slow.response is not None and slow.response.status_code == 200
                assert await busy.wait_closed() == (1001, "server_shutdown")
                async with real_deadline(WAIT):
                    await cp.stopped.wait()
    with sqlite3.connect(tmp_path / "eecp.db") as conn:
        last = conn.execute("SELECT kind, reason FROM availability_event WHERE agent_id = ? "
                            "ORDER BY at DESC, id DESC LIMIT 1", (busy.agent_id,)).fetchone()
        assert last == ("down", "observer_shutdown")
        (stopped,) = conn.execute("SELECT stopped_at FROM observer").fetchone()
        assert stopped is not None  # every event reached the store before the observer stopped


# ---- the real agent ---------------------------------------------------------------------------


@dataclass
class Balancer:
    """A stand-in TCP load balancer: each new connection goes to ``target`` (a port)."""

    target: int
    port: int = 0

    async def serve(self, client: trio.SocketStream) -> None:
        async with client, await trio.open_tcp_stream("127.0.0.1", self.target) as upstream, \
                trio.open_nursery() as nursery:
            nursery.start_soon(self._pipe, client, upstream, nursery.cancel_scope)
            await self._pipe(upstream, client, nursery.cancel_scope)

    @staticmethod
    async def _pipe(source: trio.SocketStream, sink: trio.SocketStream,
                    scope: trio.CancelScope) -> None:
        try:
            while data := await source.receive_some(65536):
                await sink.send_all(data)
        except trio.BrokenResourceError:
            pass
        scope.cancel()


@asynccontextmanager
async def open_balancer(target: int) -> AsyncIterator[Balancer]:
    balancer = Balancer(target)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, balancer.serve, 0,
                                                host="127.0.0.1"))
        balancer.port = listeners[0].socket.getsockname()[1]
        yield balancer
        nursery.cancel_scope.cancel()


async def test_the_real_agent_moves_to_another_eecp_once_its_request_is_done(
        tmp_path: Path, pki: devpki.DevPki) -> None:
    """Two eecps (A, B) behind one URL; A drains with a request of the agent in flight. The
    agent finishes it on A, then dials again (the balancer, told by A's /health, now sends new
    connections to B), is attested there, and its backoff has not grown."""
    pki_dir = tmp_path / "pki"
    root = devpki.save_pki(pki, pki_dir)
    async with open_app() as app, open_upstreams(pki) as (pccs, github), \
            trio.open_nursery() as bg:
        planes = []
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            env = control_plane_env(tmp_path / name, pki, pccs.url, github.url,
                                    EE_SHUTDOWN_GRACE_SEC=str(GRACE), EE_DCAP_ROOT_CA=str(root))
            planes.append(open_control_plane(env, pki, pccs, github))
        async with planes[0] as a, planes[1] as b, open_balancer(a.bound.control_port) as lb:
            config = agent_from_env({
                "EE_CONTROL_WS": f"ws://127.0.0.1:{lb.port}/v1/tunnel",
                "EE_BACKEND_URL": app.url, "EE_REPO": REPO, "EE_RELEASE_TAG": TAG,
                "EE_APP_NAME": "shop", "EE_NETWORK": "forge-1", "EE_AGENT_ID": str(uuid.uuid4()),
                "EE_QUOTE_PROVIDER": "dev", "EE_DEV_PKI_DIR": str(pki_dir),
                "EE_TUNNEL_PING_INTERVAL_SEC": "0", "EE_HEALTH_INTERVAL_SEC": "1",
                "EE_RECONNECT_MIN_SEC": "0.05", "EE_RECONNECT_MAX_SEC": "30",
                "VM_IMAGE_ID": MEAS.vm_image_id, "SEAL_VM": "true"})
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                state: AgentState = await nursery.start(partial(
                    run_agent, config, build_provider(config), MEAS, stop=stop))
                await wait_state(state, attested_on(1))
                await resolve_until(a, "shop", lambda body: body.get("connected") is True)
                slow = await start_slow(bg, a, app)

                a.shutdown.set()  # SIGTERM to A
                await wait_state(state, lambda s: s.last_status is not None
                                 and s.last_status.reason == "draining")
                assert (await a.get("/health")).status_code == 503
                lb.target = b.bound.control_port  # the balancer saw A's /health
                # its request in flight on A keeps the agent there
                await trio.testing.wait_all_tasks_blocked(0.05)
                assert state.connections == 1 and state.drains == 0

                app.release.set()
                async with real_deadline(WAIT):
                    await slow.done.wait()
                assert slow.response is not None and slow.response.text == "slow done"
                await wait_state(state, attested_on(2))
                body = await resolve_until(b, "shop", lambda d: d.get("connected") is True)
                assert body["allowed"] is True
                # no failure counted, the first step's delay, and A exited
                assert state.drains == 1 and state.failures == 0
                assert state.delays[-1] <= config.reconnect_min_sec
                assert state.last_error is not None and state.last_error.startswith(
                    ("draining", "closed:1001"))
                async with real_deadline(WAIT):
                    await a.stopped.wait()
                stop.set()


def attested_on(connections: int) -> Callable[[AgentState], bool]:
    return lambda s: (s.connections == connections and s.connected
                      and s.last_status is not None and s.last_status.reason == "attested")


async def wait_state(state: AgentState, predicate: Callable[[AgentState], bool]) -> None:
    async with real_deadline(WAIT):
        await state.wait_for(predicate)
