"""An agent written against the seed's protocol works unchanged (issue 17, part 1).

:class:`SeedAgent` is what a new user's old agent is: JSON text messages over a real WebSocket,
a ``register`` without ``data_protocol``, ``proxy_request`` in and ``proxy_response`` out. It
never reads a binary frame (it fails the test if one arrives) and has no Mux; only its quotes
come from the harness (:meth:`tests.harness.FakeAgent.answer`, genuine ones under the test PKI).
Everything runs through a real eecp: its tunnel endpoint, its proxy listener, its metrics.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from eecp.dev import pki as devpki
from eecp.wire.httpmsg import ResponseHead
from eecp.wire.streams import Mux
from tests.harness import (
    ControlPlane,
    FakeAgent,
    control_plane_env,
    eventually,
    open_control_plane,
    open_upstreams,
    resolve_until,
    running_agent,
)

HOST = "shop.example.com"
MAX_MESSAGE = 64 * 1024  # EE_TUNNEL_MAX_MESSAGE_BYTES here: the bodies' bound
BOGUS_ID = "f" * 32


@pytest.fixture(scope="session")
def pki() -> devpki.DevPki:
    return devpki.make_pki(seed=171)


@asynccontextmanager
async def open_cp(tmp_path: Path, pki: devpki.DevPki) -> AsyncIterator[ControlPlane]:
    async with open_upstreams(pki) as (pccs, github):
        env = control_plane_env(tmp_path, pki, pccs.url, github.url,
                                EE_TUNNEL_MAX_MESSAGE_BYTES=str(MAX_MESSAGE))
        async with open_control_plane(env, pki, pccs, github) as cp:
            yield cp


@dataclass
class SeedAgent:
    """An agent speaking only the seed's JSON protocol. Its app: ``/echo`` answers what it
    got, ``/slow`` waits for :attr:`release`, ``/big`` answers a body over the bound,
    ``/unknown`` first answers a request nobody sent, ``/cookies`` sets two cookies,
    ``/bad-head`` answers a header name that is no token, ``/malformed`` a status that is no
    number, ``/die`` drops the tunnel instead of answering; anything else answers ``body``."""

    url: str
    pki: devpki.DevPki
    body: bytes = b"seed"
    release: trio.Event = field(default_factory=trio.Event)
    statuses: list[tuple[str, str]] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    attested: trio.Event = field(default_factory=trio.Event)
    binary_seen: int = 0
    closed: bool = False

    def __post_init__(self) -> None:
        # only for its quotes (never run): genuine ones over sha256(measurements) || nonce
        self._minter = FakeAgent(self.url, self.pki)

    def register(self) -> str:
        m = self._minter
        return json.dumps({"type": "register", "repo": m.repo, "release_tag": m.tag,
                           "app_name": m.app, "network": m.network, "agent_id": m.agent_id})

    async def run(self, task_status: trio.TaskStatus[SeedAgent] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        async with open_websocket_url(self.url) as ws, trio.open_nursery() as nursery:
            await ws.send_message(self.register())
            task_status.started(self)
            try:
                while True:
                    data = await ws.get_message()
                    if isinstance(data, bytes):
                        self.binary_seen += 1
                        continue
                    message = json.loads(data)
                    kind = message.get("type")
                    if kind == "attest_request":
                        await ws.send_message(self._minter.answer(
                            bytes.fromhex(message["nonce"])))
                    elif kind == "status":
                        self.statuses.append((message["state"], message["reason"]))
                        if message["reason"] == "attested":
                            await self.health("pass", ws)
                            self.attested.set()
                    elif kind == "proxy_request":
                        self.requests.append(message)
                        nursery.start_soon(self._answer, ws, message)
            except ConnectionClosed:
                self.closed = True
                nursery.cancel_scope.cancel()

    async def health(self, status: str, ws: WebSocketConnection) -> None:
        await ws.send_message(json.dumps({"type": "health", "status": status}))

    async def _answer(self, ws: WebSocketConnection, request: dict[str, Any]) -> None:
        path = request["path"]
        body = self.body
        status, headers = 200, {"content-type": "text/plain", "x-app": "seed"}
        if path == "/echo":
            body = json.dumps({"method": request["method"], "path": path,
                               "headers": request["headers"],
                               "body": base64.b64decode(request["body_b64"]).decode()}).encode()
            headers["content-type"] = "application/json"
        elif path == "/slow":
            await self.release.wait()
            body = b"slow done"
        elif path == "/big":
            body = b"x" * (MAX_MESSAGE + 1)
        elif path == "/unknown":
            await ws.send_message(json.dumps({
                "type": "proxy_response", "request_id": BOGUS_ID, "status": 200,
                "headers": {}, "body_b64": base64.b64encode(b"forged").decode()}))
        elif path == "/cookies":
            headers["set-cookie"] = ["a=1", "b=2"]  # type: ignore[assignment]
            headers["content-length"] = "999"  # eecp states the length itself
        elif path == "/bad-head":
            headers["bad name"] = "x"
        elif path == "/malformed":
            await ws.send_message(json.dumps({
                "type": "proxy_response", "request_id": request["request_id"],
                "status": "200", "body_b64": ""}))
            return
        elif path == "/die":
            await ws.aclose()
            return
        await ws.send_message(json.dumps({
            "type": "proxy_response", "request_id": request["request_id"], "status": status,
            "headers": headers, "body_b64": base64.b64encode(body).decode()}))


@asynccontextmanager
async def running_seed(cp: ControlPlane, **kwargs: Any) -> AsyncIterator[SeedAgent]:
    agent = SeedAgent(cp.ws_url, cp.pki, **kwargs)
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        await eventually(lambda: agent.attested.is_set() or agent.closed, 30)
        assert agent.attested.is_set(), f"not attested: {agent.statuses}"
        try:
            yield agent
        finally:
            nursery.cancel_scope.cancel()
    assert agent.binary_seen == 0, "eecp sent a seed-protocol agent binary frames"


def proxy(cp: ControlPlane) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=cp.proxy_url, headers={"host": HOST}, timeout=30)


async def test_a_seed_agent_is_attested_resolved_and_proxied(tmp_path: Path,
                                                           pki: devpki.DevPki) -> None:
    async with open_cp(tmp_path, pki) as cp, running_seed(cp) as agent, proxy(cp) as client:
        assert ("ok", "attested") in agent.statuses
        assert (await cp.resolve("shop")).status_code == 200
        got = await client.get("/hello?x=1")
        assert (got.status_code, got.content) == (200, b"seed")
        assert got.headers["x-app"] == "seed"
        assert got.headers["content-length"] == "4"
        sent = await client.post("/echo", content=b"a body", headers={"x-test": "1"})
        assert sent.status_code == 200
        echoed = sent.json()
        assert (echoed["method"], echoed["body"]) == ("POST", "a body")
        assert echoed["headers"]["x-test"] == "1"
        assert echoed["headers"]["content-length"] == "6"
        assert agent.requests[0]["path"] == "/hello?x=1"
        assert len(agent.requests[0]["request_id"]) == 32
        # POST /v1/proxy reaches it too
        async with httpx.AsyncClient() as control:
            called = await control.post(f"{cp.url}/v1/proxy/shop", json={
                "method": "POST", "path": "/echo", "body_b64": base64.b64encode(b"hi").decode()})
        assert called.status_code == 200, called.text
        assert json.loads(base64.b64decode(called.json()["body_b64"]))["body"] == "hi"


async def test_a_seed_agent_is_health_watched(tmp_path: Path, pki: devpki.DevPki) -> None:
    async with open_cp(tmp_path, pki) as cp:
        agent = SeedAgent(cp.ws_url, cp.pki)
        async with open_websocket_url(cp.ws_url) as ws:
            await ws.send_message(agent.register())
            while True:
                message = json.loads(await ws.get_message())
                if message["type"] == "attest_request":
                    await ws.send_message(agent._minter.answer(bytes.fromhex(message["nonce"])))
                elif message.get("reason") == "attested":
                    break
            await resolve_until(cp, "shop", lambda b: b["allowed"])
            await agent.health("fail", ws)
            assert (await resolve_until(cp, "shop", lambda b: not b["allowed"]))["reason"] \
                == "health_fail"
            await agent.health("pass", ws)
            await resolve_until(cp, "shop", lambda b: b["allowed"])


async def test_concurrent_requests_a_slow_one_blocks_none(tmp_path: Path,
                                                         pki: devpki.DevPki) -> None:
    async with open_cp(tmp_path, pki) as cp, running_seed(cp) as agent, proxy(cp) as client:
        slow: list[httpx.Response] = []
        async with trio.open_nursery() as nursery:
            async def slow_one() -> None:
                slow.append(await client.get("/slow"))
            nursery.start_soon(slow_one)
            await eventually(lambda: bool(agent.requests))
            quick = [await client.get(f"/quick/{i}") for i in range(5)]
            assert [r.status_code for r in quick] == [200] * 5
            assert not slow  # still waiting for its answer
            agent.release.set()
        assert (slow[0].status_code, slow[0].content) == (200, b"slow done")


async def test_limits_unknown_answers_and_tunnel_loss(tmp_path: Path,
                                                      pki: devpki.DevPki) -> None:
    async with open_cp(tmp_path, pki) as cp, running_seed(cp) as agent, proxy(cp) as client:
        too_big = await client.post("/echo", content=b"y" * (MAX_MESSAGE + 1))
        assert too_big.status_code == 413
        assert too_big.json() == {"allowed": False, "reason": "body_too_large"}
        big = await client.get("/big")
        assert big.status_code == 502
        assert big.json()["reason"] == "response_too_large"
        forged = await client.get("/unknown")
        assert (forged.status_code, forged.content) == (200, b"seed")
        metrics = (await cp.get("/metrics")).text
        assert "eecp_tunnel_unknown_responses_total 1.0" in metrics
        cookies = await client.get("/cookies")
        assert cookies.headers.get_list("set-cookie") == ["a=1", "b=2"]
        assert cookies.headers["content-length"] == "4"
        bad = await client.get("/bad-head")  # fails this request only
        assert (bad.status_code, bad.json()["reason"]) == (502, "agent_error")
        assert (await client.get("/")).status_code == 200  # the tunnel lives on
        with trio.fail_after(30):  # (the proxy timeout is 60 s: this is the tunnel's end)
            lost = await client.get("/die")
        assert lost.status_code == 502
        assert lost.json() == {"allowed": True, "reason": "tunnel_closed"}
        assert agent.closed


async def binary_streams(mux: Mux) -> None:
    """A binary-protocol agent's app: ``binary`` for every request."""
    async with trio.open_nursery() as nursery:
        while True:
            stream, _ = await mux.accept_stream()

            async def respond(stream=stream) -> None:  # type: ignore[no-untyped-def]
                async with stream:
                    await stream.send_head(ResponseHead(200, [("content-length", "6")]))
                    await stream.send(b"binary", end=True)
            nursery.start_soon(respond)


async def test_a_binary_agent_is_preferred_over_a_seed_agent(tmp_path: Path,
                                                            pki: devpki.DevPki) -> None:
    async with open_cp(tmp_path, pki) as cp, running_seed(cp) as seed, proxy(cp) as client:
        assert (await client.get("/")).content == b"seed"
        binary = FakeAgent(cp.ws_url, pki, serve_streams=binary_streams)
        async with running_agent(binary):
            await binary.wait_status("attested")
            await resolve_until(cp, "shop", lambda b: b["agents"] == 2)
            answers = [(await client.get(f"/{i}")).content for i in range(6)]
            assert answers == [b"binary"] * 6
            served = len(seed.requests)
        assert served == 1  # only the request before the binary agent came


async def test_a_malformed_proxy_response_ends_the_session(tmp_path: Path,
                                                           pki: devpki.DevPki) -> None:
    async with open_cp(tmp_path, pki) as cp, running_seed(cp) as agent, proxy(cp) as client:
        with trio.fail_after(30):
            answer = await client.get("/malformed")
        assert (answer.status_code, answer.json()["reason"]) == (502, "tunnel_closed")
        await eventually(lambda: agent.closed)
        assert ("invalid", "invalid_field:status") in agent.statuses
