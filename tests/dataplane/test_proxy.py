"""Requests over the tunnel: the proxy listener, the auth listener and ``POST /v1/proxy/{app}``,
against fake agents that forward to real local backends (real sockets, MockClock)."""

from __future__ import annotations

import base64
import hashlib
import json
import random
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing
from trio.testing import MockClock

from eecp.dataplane import proxy as proxy_module
from eecp.dev import mint as devmint
from eecp.dev import pki as devpki
from tests.fakehttp import FakeServer, Request, Response, open_fake_http
from tests.harness import (
    ControlPlane,
    FakeAgent,
    control_plane_env,
    eventually,
    open_control_plane,
    open_upstreams,
    real_deadline,
    resolve_until,
    running_agent,
)

ORIGIN_DATE = "Tue, 01 Jan 2030 00:00:00 GMT"  # not eecp's clock: whose Date went out shows


@dataclass
class Backend:
    """A scriptable app: its name is in every answer so tests can tell agents apart."""

    name: str
    server: FakeServer | None = None
    release: trio.Event = field(default_factory=trio.Event)
    entered: trio.Event = field(default_factory=trio.Event)
    events: list[trio.Event] = field(default_factory=lambda: [trio.Event() for _ in range(3)])
    big: bytes = b""  #: /big's body (64 KiB chunks); /half sends half of it, then waits

    async def handle(self, request: Request) -> Response:
        if request.path == "/hello":
            return Response(200, f"hello from {self.name}".encode(),
                            [("x-backend", self.name), ("connection", "keep-alive")])
        if request.path == "/echo":
            return Response(201, request.body, [("x-method", request.method)])
        if request.path == "/headers":
            return Response.json(json.dumps(request.headers))
        if request.path == "/cookies":
            return Response(200, b"", [("set-cookie", "a=1"), ("set-cookie", "b=2"),
                                       ("set-cookie", "c=3")])
        if request.path == "/hang":
            self.entered.set()
            await self.release.wait()
            return Response(200, b"late")
        if request.path == "/cut":  # a head, part of the body, then the connection drops
            return Response(200, headers=[("content-type", "text/plain")], chunks=self._cut())
        if request.path == "/sse":
            return Response(200, headers=[("content-type", "text/event-stream")],
                            chunks=self._events())
        if request.path == "/dated":
            return Response(200, b"dated", [("date", ORIGIN_DATE)])
        if request.path in ("/big", "/half"):
            return Response(200, headers=[("content-type", "application/octet-stream")],
                            chunks=self._big(self.release if request.path == "/half" else None))
        return Response(404, b"nope")

    async def _big(self, gate: trio.Event | None) -> AsyncIterator[bytes]:
        for at in range(0, len(self.big), 65536):
            if gate is not None and at >= len(self.big) // 2:
                self.entered.set()
                await gate.wait()
            yield self.big[at:at + 65536]

    async def _cut(self) -> AsyncIterator[bytes]:
        yield b"partial"
        raise trio.BrokenResourceError

    async def _events(self) -> AsyncIterator[bytes]:
        for index, gate in enumerate(self.events):
            await gate.wait()
            yield f"data: event {index}\n\n".encode()


@dataclass
class World:
    cp: ControlPlane
    pki: devpki.DevPki
    clock: MockClock

    def agent(self, backend: FakeServer, **kwargs: object) -> FakeAgent:
        return FakeAgent(self.cp.ws_url, self.pki, backend_url=backend.url,  # type: ignore[arg-type]
                         **kwargs)


@asynccontextmanager
async def open_backend(name: str) -> AsyncIterator[tuple[Backend, FakeServer]]:
    backend = Backend(name)
    async with open_fake_http(backend.handle) as server:
        backend.server = server
        yield backend, server


@pytest.fixture(scope="session")
def pki() -> devpki.DevPki:
    return devpki.make_pki(seed=31)


@asynccontextmanager
async def open_world(tmp_path: Path, pki: devpki.DevPki, mock_clock: MockClock,
                     **extra: str) -> AsyncIterator[World]:
    assert trio.lowlevel.current_clock() is mock_clock, "request mock_clock in the test"
    async with open_upstreams(pki) as (pccs, github):
        env = control_plane_env(tmp_path, pki, pccs.url, github.url, **extra)
        async with open_control_plane(env, pki, pccs, github) as cp:
            yield World(cp, pki, mock_clock)


@pytest.fixture
async def world(tmp_path: Path, pki: devpki.DevPki, mock_clock: MockClock) -> AsyncIterator[World]:
    async with open_world(tmp_path, pki, mock_clock) as world:
        yield world


async def proxy_get(cp: ControlPlane, path: str, host: str = "shop.app.example.com",
                    headers: dict[str, str] | None = None) -> httpx.Response:
    # no client timeout: the mock clock jumps, and the server's timeouts are under test
    async with httpx.AsyncClient(timeout=None) as client:
        return await client.get(cp.proxy_url + path, headers=headers or {"Host": host})


async def test_requests_reach_the_app(mock_clock: MockClock, world: World) -> None:
    async with open_backend("one") as (_, server), running_agent(world.agent(server)) as agent:
        await agent.wait_status("attested")
        response = await proxy_get(world.cp, "/hello?x=1")
        assert (response.status_code, response.text) == (200, "hello from one")
        assert response.headers["x-backend"] == "one"
        assert "keep-alive" not in response.headers.get("connection", "")
        async with httpx.AsyncClient() as client:
            echoed = await client.post(world.cp.proxy_url + "/echo", content=b"x" * 300_000,
                                       headers={"X-EE-App": "shop", "Host": "elsewhere"})
        assert (echoed.status_code, len(echoed.content)) == (201, 300_000)
        assert echoed.headers["x-method"] == "POST"
        seen = (await proxy_get(world.cp, "/headers",
                                headers={"Host": "shop.app.example.com",
                                         "X-Forwarded-For": "6.6.6.6",
                                         "Connection": "keep-alive, x-secret",
                                         "X-Secret": "hop", "Proxy-Authorization": "p"})).json()
        assert seen["x-forwarded-for"] == "6.6.6.6, 127.0.0.1"
        assert seen["x-forwarded-proto"] == "http"
        assert seen["x-forwarded-host"] == "shop.app.example.com"
        assert "x-secret" not in seen and "proxy-authorization" not in seen
        cookies = await proxy_get(world.cp, "/cookies")
        assert cookies.headers.get_list("set-cookie") == ["a=1", "b=2", "c=3"]



SPOOFED = {"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https",
           "X-Forwarded-Host": "bank.example"}
#: what apps also read as a proxy's word (the client's address, the URL it asked for), and
#: eecp's own decision headers
ALSO_SPOOFED = {"X-Real-IP": "6.6.6.6", "X_Forwarded_For": "6.6.6.6", "Forwarded": "for=6.6.6.6",
                "X-EE-Release-Tag": "forged", "CF-Connecting-IP": "6.6.6.6",
                "X-Cluster-Client-IP": "6.6.6.6", "Fastly-Client-IP": "6.6.6.6",
                "True-Client-IP": "6.6.6.6", "X-ProxyUser-IP": "6.6.6.6",
                "X-Original-Forwarded-For": "6.6.6.6", "X-Original-URL": "/admin",
                "X-Rewrite-URL": "/admin", "X-Original-Host": "bank.example",
                "X-Forwarded-Prefix": "/admin"}


@pytest.mark.parametrize("trusted", ["10.0.0.0/8", "none"])
async def test_forwarded_headers_from_an_untrusted_client_are_replaced(
        tmp_path: Path, pki: devpki.DevPki, mock_clock: MockClock, trusted: str) -> None:
    # this client (127.0.0.1) is not a trusted proxy here: what it claims must not reach the app
    async with open_world(tmp_path, pki, mock_clock, EE_TRUSTED_PROXIES=trusted) as world, \
            open_backend("one") as (_, server), running_agent(world.agent(server)) as agent:
        await agent.wait_status("attested")
        seen = (await proxy_get(world.cp, "/headers", headers={
            "Host": "shop.app.example.com", "X-EE-App": "shop", **SPOOFED, **ALSO_SPOOFED})).json()
        assert (seen["x-forwarded-for"], seen["x-forwarded-proto"]) == ("127.0.0.1", "http")
        assert seen["x-forwarded-host"] == "shop.app.example.com"
        assert not {name.lower() for name in ALSO_SPOOFED} & set(seen), seen
        # nor does its X-Forwarded-Host (bank.example) name the app: Host does
        named = await proxy_get(world.cp, "/hello", headers={"Host": "shop.app.example.com",
                                                             **SPOOFED})
        assert (named.status_code, named.text) == (200, "hello from one")
        async with httpx.AsyncClient() as client:
            answer = await client.post(world.cp.url + "/v1/proxy/shop", headers=SPOOFED, json={
                "path": "/headers",
                "headers": {**SPOOFED, **ALSO_SPOOFED, "Host": "shop.internal"}})
        assert answer.status_code == 200, answer.text
        seen = json.loads(base64.b64decode(answer.json()["body_b64"]))
        assert not {name.lower() for name in ALSO_SPOOFED} & set(seen), seen
        assert (seen["x-forwarded-for"], seen["x-forwarded-proto"]) == ("127.0.0.1", "http")
        assert seen["x-forwarded-host"] == "shop.internal"


async def test_the_json_proxy_believes_a_trusted_front_proxy_only(
        mock_clock: MockClock, world: World) -> None:
    # loopback is trusted by default: the HTTP request's X-Forwarded-* (what Caddy set) count,
    # the JSON's own never do
    async with open_backend("one") as (_, server), running_agent(world.agent(server)) as agent:
        await agent.wait_status("attested")
        async with httpx.AsyncClient() as client:
            answer = await client.post(world.cp.url + "/v1/proxy/shop", headers={
                "X-Forwarded-For": "198.51.100.7", "X-Forwarded-Proto": "https",
                "X-Forwarded-Host": "eecp.example.com"}, json={
                "path": "/headers", "headers": {**SPOOFED, "Host": "shop.internal"}})
        assert answer.status_code == 200, answer.text
        seen = json.loads(base64.b64decode(answer.json()["body_b64"]))
        assert seen["x-forwarded-for"] == "198.51.100.7, 127.0.0.1"
        assert seen["x-forwarded-proto"] == "https"
        assert seen["x-forwarded-host"] == "shop.internal"
        # on the proxy listener, the host a trusted proxy was asked for names the app
        named = await proxy_get(world.cp, "/hello", headers={
            "Host": "eecp-proxy.internal", "X-Forwarded-Host": "shop.app.example.com"})
        assert (named.status_code, named.text) == (200, "hello from one")

async def test_refusals_mirror_resolve(mock_clock: MockClock, world: World) -> None:
    response = await proxy_get(world.cp, "/hello", host="nosuch.app.example.com")
    assert response.status_code == 403
    assert response.json() == {"allowed": False, "reason": "unknown_app"}
    async with httpx.AsyncClient() as client:
        missing = await client.get(world.cp.proxy_url + "/hello", headers={"Host": ""})
        assert (missing.status_code, missing.json()["reason"]) == (400, "missing_app")
        # a host that is an address names no app (it was 403 unknown_app for an "app" 127)
        for literal in ("127.0.0.1:9090", "127.0.0.1", "[::1]:9090", "[::1]", "::1"):
            by_ip = await client.get(world.cp.proxy_url + "/hello", headers={"Host": literal})
            assert (by_ip.status_code, by_ip.json()["reason"]) == (400, "missing_app"), literal
        named = await client.get(world.cp.proxy_url + "/hello",
                                 headers={"Host": "127-0-0-1.example.com"})
        assert (named.status_code, named.json()["reason"]) == (403, "unknown_app")
    async with open_backend("one") as (_, server), running_agent(world.agent(server)) as agent:
        await agent.wait_status("attested")
        await agent.health("fail")
        await agent.wait_status("health_fail")
        sick = await proxy_get(world.cp, "/hello")
        assert (sick.status_code, sick.json()["reason"]) == (403, "health_fail")


async def test_backend_down_is_agent_error(mock_clock: MockClock, world: World) -> None:
    async with open_backend("one") as (_, server):
        down = FakeServer(url=server.url)
    agent = FakeAgent(world.cp.ws_url, world.pki, backend_url=down.url)  # nothing listens
    async with running_agent(agent):
        await agent.wait_status("attested")
        response = await proxy_get(world.cp, "/hello")
        assert response.status_code == 502
        # the app may be served: it is this request that failed (alike on both entry points)
        assert response.json() == {"allowed": True, "reason": "agent_error"}
        async with httpx.AsyncClient() as client:
            api = await client.post(world.cp.url + "/v1/proxy/shop", json={"path": "/hello"})
        assert (api.status_code, api.json()) == (502, {"allowed": True, "reason": "agent_error"})


async def test_an_app_whose_agents_left_is_not_connected_on_both_entry_points(
        mock_clock: MockClock, world: World) -> None:
    async with open_backend("one") as (_, server):
        async with running_agent(world.agent(server)) as agent:
            await agent.wait_status("attested")
            assert (await proxy_get(world.cp, "/hello")).status_code == 200
        body = await resolve_until(world.cp, "shop", lambda b: b["agents"] == 0)
        assert (body["allowed"], body["reason"]) == (False, "not_connected")
        response = await proxy_get(world.cp, "/hello")
        assert (response.status_code, response.json()) == (
            403, {"allowed": False, "reason": "not_connected"})
        async with httpx.AsyncClient() as client:
            api = await client.post(world.cp.url + "/v1/proxy/shop", json={"path": "/hello"})
        assert (api.status_code, api.json()) == (
            403, {"allowed": False, "reason": "not_connected"})
        assert [r.path for r in server.requests] == ["/hello"]


async def test_upstream_timeout_on_both_entry_points(tmp_path: Path, pki: devpki.DevPki,
                                                    mock_clock: MockClock) -> None:
    # shorter than the agent's own backend timeout (30 s here): eecp's is what answers
    patience = 5
    extra = {"EE_PROXY_TIMEOUT_SEC": str(patience)}
    async with open_world(tmp_path, pki, mock_clock, **extra) as world, \
            open_backend("one") as (backend, server), \
            running_agent(world.agent(server)) as agent, trio.open_nursery() as nursery:
        await agent.wait_status("attested")
        result: list[httpx.Response] = []

        async def call() -> None:
            result.append(await proxy_get(world.cp, "/hang"))

        async def call_api() -> None:
            async with httpx.AsyncClient(timeout=None) as client:
                result.append(await client.post(world.cp.url + "/v1/proxy/shop",
                                                json={"path": "/hang"}))
        for start in (call, call_api):  # the proxy listener, then the control port's JSON proxy
            result.clear()
            backend.entered = trio.Event()
            nursery.start_soon(start)
            await backend.entered.wait()
            world.clock.jump(patience - 0.5)
            await trio.to_thread.run_sync(__import__("time").sleep, 0.2)
            assert result == []  # half a second short: still waiting for the app
            world.clock.jump(1)
            await eventually(lambda: bool(result))
            assert (result[0].status_code, result[0].json()) == (
                504, {"allowed": True, "reason": "upstream_timeout"})
        backend.release.set()


async def test_a_slow_upload_that_keeps_moving_is_no_upstream_timeout(
        tmp_path: Path, pki: devpki.DevPki, mock_clock: MockClock) -> None:
    # (20 s between its chunks: far below EE_PROXY_MIN_RATE_BYTES_SEC, off here)
    async with open_world(tmp_path, pki, mock_clock, EE_PROXY_MIN_RATE_BYTES_SEC="0"
                          ) as world, open_backend("one") as (_, server), running_agent(
                              world.agent(server)) as agent:
        await agent.wait_status("attested")

        async def upload() -> AsyncIterator[bytes]:
            for _ in range(4):  # 80 s in all, more than EE_PROXY_TIMEOUT_SEC (60)
                yield b"u" * 1000
                await trio.to_thread.run_sync(__import__("time").sleep, 0.05)  # it leaves
                world.clock.jump(20)

        async with httpx.AsyncClient(timeout=None) as client:
            response = await client.post(world.cp.proxy_url + "/echo", content=upload(),
                                         headers={"Host": "shop.app.example.com"})
        assert (response.status_code, response.content) == (201, b"u" * 4000)


@pytest.mark.parametrize("entry", ["proxy listener", "POST /v1/proxy"])
async def test_tunnel_loss_fails_requests_in_flight(mock_clock: MockClock, world: World,
                                                   entry: str) -> None:
    async with open_backend("one") as (backend, server), trio.open_nursery() as nursery:
        result: list[httpx.Response] = []
        async with running_agent(world.agent(server)) as agent:
            await agent.wait_status("attested")

            async def call() -> None:
                if entry == "proxy listener":
                    result.append(await proxy_get(world.cp, "/hang"))
                    return
                async with httpx.AsyncClient(timeout=None) as client:
                    result.append(await client.post(world.cp.url + "/v1/proxy/shop",
                                                    json={"path": "/hang"}))
            nursery.start_soon(call)
            await backend.entered.wait()
        # the agent's tunnel is gone while the request waits for its answer
        await eventually(lambda: bool(result))
        assert (result[0].status_code, result[0].json()) == (
            502, {"allowed": True, "reason": "tunnel_closed"})
        backend.release.set()


async def test_server_sent_events_stream_through(mock_clock: MockClock, world: World) -> None:
    async with open_backend("one") as (backend, server), \
            running_agent(world.agent(server)) as agent:
        await agent.wait_status("attested")
        async with httpx.AsyncClient() as client, client.stream(
                "GET", world.cp.proxy_url + "/sse",
                headers={"Host": "shop.app.example.com"}) as response:
            assert response.headers["content-type"] == "text/event-stream"
            chunks = response.aiter_raw()
            for index, gate in enumerate(backend.events):
                gate.set()  # the backend sends event N only now
                assert await chunks.__anext__() == f"data: event {index}\n\n".encode()


async def test_least_loaded_agent_and_retry(mock_clock: MockClock, world: World) -> None:
    async with open_backend("one") as (b_one, one), open_backend("two") as (b_two, two), \
            trio.open_nursery() as nursery, running_agent(world.agent(one)) as first, \
                running_agent(world.agent(two)) as second:
        await first.wait_status("attested")
        await second.wait_status("attested")
        held: list[httpx.Response] = []

        async def hold() -> None:
            held.append(await proxy_get(world.cp, "/hang"))
        nursery.start_soon(hold)
        # with both idle either agent may take the first request; the other is then less loaded
        await eventually(lambda: b_one.entered.is_set() or b_two.entered.is_set())
        busy, idle = (b_one, b_two) if b_one.entered.is_set() else (b_two, b_one)
        for _ in range(3):
            assert (await proxy_get(world.cp, "/hello")).text == f"hello from {idle.name}"
        busy.release.set()


async def test_idempotent_request_retried_on_another_agent(mock_clock: MockClock,
                                                           world: World) -> None:
    async def drop(request: Request) -> Response:
        raise trio.BrokenResourceError  # the connection closes without an answer

    async with open_backend("two") as (good, two), open_fake_http(drop) as broken, \
            trio.open_nursery() as nursery:
        dead = FakeAgent(world.cp.ws_url, world.pki, backend_url=broken.url)
        async with running_agent(dead), running_agent(world.agent(two)) as alive:
            await dead.wait_status("attested")
            await alive.wait_status("attested")

            async def hold() -> None:
                await proxy_get(world.cp, "/hang")
            nursery.start_soon(hold)
            # whichever agent it tried first, the held request ends up on the good one (a GET
            # is retried): the dead agent is now the least loaded and is picked first
            await good.entered.wait()
            tried = len(broken.requests)
            for _ in range(3):
                response = await proxy_get(world.cp, "/hello")
                assert (response.status_code, response.text) == (200, "hello from two")
            assert len(broken.requests) == tried + 3  # each GET failed there, then was retried
            async with httpx.AsyncClient() as client:
                post = await client.post(world.cp.proxy_url + "/echo", content=b"x",
                                         headers={"Host": "shop.app.example.com"})
            # a request with a body is never replayed
            assert (post.status_code, post.json()["reason"]) == (502, "agent_error")
            assert len(broken.requests) == tried + 4
            good.release.set()


async def _drop(request: Request) -> Response:
    raise trio.BrokenResourceError  # the connection closes without an answer


async def test_a_request_is_tried_on_two_agents_at_most(mock_clock: MockClock,
                                                        world: World) -> None:
    async with open_backend("good") as (good, server), open_fake_http(_drop) as broken_1, \
            open_fake_http(_drop) as broken_2, trio.open_nursery() as nursery:
        dead = [FakeAgent(world.cp.ws_url, world.pki, backend_url=b.url)
                for b in (broken_1, broken_2)]
        async with running_agent(world.agent(server)) as alive:
            await alive.wait_status("attested")
            nursery.start_soon(proxy_get, world.cp, "/hang")
            await good.entered.wait()  # the good agent is now the most loaded: picked last
            async with running_agent(dead[0]), running_agent(dead[1]):
                for agent in dead:
                    await agent.wait_status("attested")

                def tries() -> int:
                    return len(broken_1.requests) + len(broken_2.requests)
                response = await proxy_get(world.cp, "/hello")
                assert (response.status_code, response.json()["reason"]) == (502, "agent_error")
                # tried on both dead agents (a retry), never on the third: once, not on every agent
                # (an agent may itself send a GET twice to its backend: counts are not compared)
                assert broken_1.requests and broken_2.requests
                before = tries()
                async with httpx.AsyncClient() as client:
                    post = await client.post(world.cp.proxy_url + "/hello",
                                             headers={"Host": "shop.app.example.com"})
                # no body, but POST is not idempotent: never replayed
                assert (post.status_code, post.json()["reason"]) == (502, "agent_error")
                assert tries() == before + 1
                assert [r.path for r in server.requests] == ["/hang"]
                good.release.set()


async def test_a_request_whose_answer_has_begun_is_not_retried(mock_clock: MockClock,
                                                               world: World) -> None:
    async with open_backend("one") as (b_one, one), open_backend("two") as (b_two, two), \
            trio.open_nursery() as nursery, running_agent(world.agent(one)) as first, \
            running_agent(world.agent(two)) as second:
        await first.wait_status("attested")
        await second.wait_status("attested")
        nursery.start_soon(proxy_get, world.cp, "/hang")
        await eventually(lambda: b_one.entered.is_set() or b_two.entered.is_set())
        busy, idle = (one, two) if b_one.entered.is_set() else (two, one)
        # the idle agent's backend sends a head and part of the body, then drops: the client
        # already has the head, so the request cannot be replayed elsewhere
        async with httpx.AsyncClient() as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get(world.cp.proxy_url + "/cut",
                                 headers={"Host": "shop.app.example.com"})
        assert [r.path for r in idle.requests] == ["/cut"]
        assert [r.path for r in busy.requests] == ["/hang"]
        b_one.release.set()
        b_two.release.set()


async def test_an_agent_failing_reattestation_is_drained_from_the_pick(
        mock_clock: MockClock, world: World) -> None:
    async with open_backend("one") as (_, one), open_backend("two") as (_, two), \
            running_agent(world.agent(one)) as first, running_agent(world.agent(two)) as second:
        await first.wait_status("attested")
        await second.wait_status("attested")
        # idle agents tie: the pick is the same one each time; that one's node changes
        preferred = (await proxy_get(world.cp, "/hello")).text
        failing, staying = (first, second) if preferred == "hello from one" else (second, first)
        failing.mint_kwargs = {"rtmrs": (*devmint.DEFAULT_RTMRS[:3], b"\x09" * 48)}
        world.clock.jump(3600)
        assert await failing.wait_closed() == (4003, "quote_measurement_mismatch:rtmr3")
        await staying.wait_for(lambda a: a.statuses().count(("ok", "attested")) == 2)
        await staying.health()
        await resolve_until(world.cp, "shop", lambda b: b["allowed"] and b["agents"] == 1)
        answers = {(await proxy_get(world.cp, "/hello")).text for _ in range(4)}
        assert answers == {"hello from one", "hello from two"} - {preferred}


async def test_an_agent_failing_health_is_drained_from_the_pick(mock_clock: MockClock,
                                                                world: World) -> None:
    async with open_backend("one") as (_, one), open_backend("two") as (_, two), \
            running_agent(world.agent(one)) as first, running_agent(world.agent(two)) as second:
        await first.wait_status("attested")
        await second.wait_status("attested")
        for sick, well in ((first, "two"), (second, "one")):
            await sick.health("fail")
            await sick.wait_status("health_fail")
            answers = {(await proxy_get(world.cp, "/hello")).text for _ in range(4)}
            assert answers == {f"hello from {well}"}
            await sick.health("pass")
            await eventually(lambda agent=sick: agent.statuses()[-1][0] == "ok")


async def test_control_messages_flow_while_a_stream_is_open(mock_clock: MockClock,
                                                            world: World) -> None:
    async with open_backend("one") as (backend, server), \
            running_agent(world.agent(server)) as agent:
        await agent.wait_status("attested")
        async with httpx.AsyncClient() as client, client.stream(
                "GET", world.cp.proxy_url + "/sse",
                headers={"Host": "shop.app.example.com"}) as response:
            chunks = response.aiter_raw()
            backend.events[0].set()
            assert await chunks.__anext__() == b"data: event 0\n\n"
            # the tunnel carries the stream's frames and the agent's JSON messages side by side
            await agent.health("fail")
            await agent.wait_status("health_fail")
            assert (await world.cp.resolve("shop")).status_code == 403
            await agent.health("pass")
            await eventually(lambda: agent.statuses()[-1][0] == "ok")
            assert (await world.cp.resolve("shop")).status_code == 200
            for index in (1, 2):
                backend.events[index].set()
                assert await chunks.__anext__() == f"data: event {index}\n\n".encode()


async def test_a_request_waits_briefly_for_a_stream_slot_then_is_agent_busy(
        tmp_path: Path, pki: devpki.DevPki, mock_clock: MockClock) -> None:
    async with open_world(tmp_path, pki, mock_clock, EE_TUNNEL_MAX_STREAMS="1") as world, \
            open_backend("one") as (backend, server), \
            running_agent(world.agent(server)) as agent, trio.open_nursery() as nursery:
        await agent.wait_status("attested")
        results: dict[str, httpx.Response] = {}

        async def call(path: str) -> None:
            results[path] = await proxy_get(world.cp, path)

        async def wait_behind_hang(seconds: float) -> None:
            backend.entered, backend.release = trio.Event(), trio.Event()
            nursery.start_soon(call, "/hang")
            await backend.entered.wait()  # the one slot is taken
            nursery.start_soon(call, "/hello")
            await trio.to_thread.run_sync(__import__("time").sleep, 0.2)
            world.clock.jump(seconds)
            await trio.to_thread.run_sync(__import__("time").sleep, 0.1)

        await wait_behind_hang(1)  # within the 2 s a request may wait for a slot
        assert results == {}
        backend.release.set()  # the slot frees: the waiting request takes it
        await eventually(lambda: len(results) == 2)
        assert (results["/hang"].status_code, results["/hang"].text) == (200, "late")
        assert (results["/hello"].status_code, results["/hello"].text) == (200, "hello from one")
        results.clear()
        await wait_behind_hang(2.5)  # longer: it gives up
        await eventually(lambda: "/hello" in results)
        assert (results["/hello"].status_code, results["/hello"].json()) == (
            503, {"allowed": True, "reason": "agent_busy"})
        backend.release.set()


async def test_a_body_over_the_configured_limit_is_refused(
        tmp_path: Path, pki: devpki.DevPki, mock_clock: MockClock) -> None:
    async with open_world(tmp_path, pki, mock_clock, EE_PROXY_MAX_BODY_BYTES="1000") as world, \
            open_backend("one") as (_, server), running_agent(world.agent(server)) as agent, \
            httpx.AsyncClient() as client:
        await agent.wait_status("attested")
        headers = {"Host": "shop.app.example.com"}
        small = await client.post(world.cp.proxy_url + "/echo", content=b"s" * 1000,
                                  headers=headers)
        assert (small.status_code, small.content) == (201, b"s" * 1000)
        large = await client.post(world.cp.proxy_url + "/echo", content=b"l" * 1001,
                                  headers=headers)
        assert large.status_code == 413


async def test_json_proxy_on_the_control_port(mock_clock: MockClock, world: World) -> None:
    async with open_backend("one") as (_, server), running_agent(world.agent(server)) as agent:
        await agent.wait_status("attested")
        async with httpx.AsyncClient() as client:
            answer = await client.post(world.cp.url + "/v1/proxy/shop", json={
                "method": "POST", "path": "/echo", "headers": {"x-a": "1"},
                "body_b64": base64.b64encode(b"ping").decode()})
            assert answer.status_code == 200
            doc = answer.json()
            assert doc["status"] == 201 and base64.b64decode(doc["body_b64"]) == b"ping"
            assert ["x-method", "POST"] in doc["headers"]
            bad = await client.post(world.cp.url + "/v1/proxy/shop",
                                    json={"path": "http://evil/"})
            assert (bad.status_code, bad.json()["reason"]) == (400, "invalid_field:path")
            unknown = await client.post(world.cp.url + "/v1/proxy/nosuch", json={"path": "/"})
            assert (unknown.status_code, unknown.json()["reason"]) == (403, "unknown_app")
            for doc, reason in (({"path": "/\\\\evil.example/"}, "invalid_field:path"),
                                ({"path": "/", "headers": {"bad name": "x"}},
                                 "invalid_field:headers"),
                                ({"path": "/", "headers": [["x-a", "v\u0001"]]},
                                 "invalid_field:headers")):
                refused = await client.post(world.cp.url + "/v1/proxy/shop", json=doc)
                assert (refused.status_code, refused.json()["reason"]) == (400, reason), doc
            # the agent resets the stream after the head: a JSON 502, not a 500
            broken = await client.post(world.cp.url + "/v1/proxy/shop", json={"path": "/cut"})
            assert (broken.status_code, broken.json()["reason"]) == (502, "agent_error")
            large = await client.post(world.cp.url + "/v1/proxy/shop",
                                      content=b" " * (1024 * 1024 + 1))
            assert (large.status_code, large.json()) == (
                413, {"allowed": False, "reason": "body_too_large"})


async def test_the_proxy_listener_forwards_only_origin_form_targets(mock_clock: MockClock,
                                                                   world: World) -> None:
    async with open_backend("one") as (_, server), running_agent(world.agent(server)) as agent:
        await agent.wait_status("attested")
        for target in (b"http://169.254.169.254/latest", b"//evil.example/x", b"*"):
            stream = await trio.open_tcp_stream("127.0.0.1", world.cp.bound.proxy_port)
            async with stream:
                await stream.send_all(b"GET " + target + b" HTTP/1.1\r\n"
                                      b"Host: shop.app.example.com\r\n\r\n")
                reply = b""
                while b"invalid_target" not in reply and (data := await stream.receive_some()):
                    reply += data
            assert reply.startswith(b"HTTP/1.1 400 "), (target, reply)
            assert b'"reason":"invalid_target"' in reply
        assert server.requests == []  # nothing reached the backend


async def test_auth_listener_answers_like_resolve(mock_clock: MockClock, world: World) -> None:
    async with open_backend("one") as (_, server), running_agent(world.agent(server)) as agent:
        await agent.wait_status("attested")
        async with httpx.AsyncClient() as client:
            fast = await client.get(world.cp.auth_url + "/v1/resolve/shop")
            slow = await client.get(world.cp.url + "/v1/resolve/shop")
            assert (fast.status_code, fast.json()) == (slow.status_code, slow.json())
            assert fast.headers["x-ee-allowed"] == "true"
            by_host = await client.get(world.cp.auth_url + "/v1/resolve",
                                       headers={"X-Original-Host": "shop.app.example.com"})
            assert by_host.status_code == 200
            other = await client.get(world.cp.auth_url + "/v1/apps")
            assert other.status_code == 404
            denied = await client.get(world.cp.auth_url + "/v1/resolve/nosuch")
            assert (denied.status_code, denied.json()["reason"]) == (403, "unknown_app")


async def test_metrics(mock_clock: MockClock, world: World) -> None:
    async with open_backend("one") as (_, server), running_agent(world.agent(server)) as agent:
        await agent.wait_status("attested")
        assert (await proxy_get(world.cp, "/hello")).status_code == 200
        # names nobody registered share one series: a client picking random Host names
        # cannot grow the metrics (and eecp's memory) without bound
        for n in range(5):
            assert (await proxy_get(world.cp, "/x", host=f"nosuch{n}.app")).status_code == 403
        # the control port's POST /v1/proxy counts the same way
        async with httpx.AsyncClient() as client:
            api = world.cp.url + "/v1/proxy/"
            assert (await client.post(api + "shop", json={"path": "/hello"})).status_code == 200
            assert (await client.post(api + "other", json={"path": "/"})).status_code == 403
            # bodies both ways, and the time to the head, on both entry points
            echoed = await client.post(world.cp.proxy_url + "/echo", content=b"u" * 300,
                                       headers={"Host": "shop.app.example.com"})
            assert (echoed.status_code, echoed.content) == (201, b"u" * 300)
            ping = await client.post(api + "shop", json={
                "method": "POST", "path": "/echo", "body_b64": base64.b64encode(b"ping").decode()})
            assert ping.json()["status"] == 201
        text = (await world.cp.get("/metrics")).text
    assert 'eecp_attestations_total{reason="attested",result="accepted"} 1.0' in text
    assert 'eecp_proxy_requests_total{app="shop",status="200"} 2.0' in text
    assert 'eecp_proxy_requests_total{app="_unknown",status="403"} 6.0' in text
    assert "nosuch" not in text
    assert "eecp_agents_connected 1.0" in text
    assert 'eecp_apps{state="ok"} 1.0' in text
    assert "eecp_attestation_seconds_count 1.0" in text
    assert 'eecp_proxy_requests_total{app="shop",status="201"} 2.0' in text
    assert "eecp_proxy_seconds_count 4.0" in text
    assert 'eecp_proxy_bytes_total{direction="in"} 304.0' in text
    assert 'eecp_proxy_bytes_total{direction="out"} 332.0' in text  # 2 x 14 + 300 + 4


async def test_streams_in_flight_are_counted(mock_clock: MockClock, world: World) -> None:
    async with open_backend("one") as (backend, server), \
            running_agent(world.agent(server)) as agent, trio.open_nursery() as nursery:
        await agent.wait_status("attested")
        assert "eecp_streams_in_flight 0.0" in (await world.cp.get("/metrics")).text
        done = trio.Event()

        async def hold() -> None:
            assert (await proxy_get(world.cp, "/hang")).text == "late"
            done.set()
        nursery.start_soon(hold)
        await backend.entered.wait()
        assert "eecp_streams_in_flight 1.0" in (await world.cp.get("/metrics")).text
        backend.release.set()
        await done.wait()
        assert "eecp_streams_in_flight 0.0" in (await world.cp.get("/metrics")).text


async def test_a_proxied_answer_carries_one_date_the_origin_s(mock_clock: MockClock,
                                                              world: World) -> None:
    async with open_backend("one") as (_, server), running_agent(world.agent(server)) as agent:
        await agent.wait_status("attested")
        dated = await proxy_get(world.cp, "/dated")
        assert (dated.status_code, dated.headers.get_list("date")) == (200, [ORIGIN_DATE])
        undated = await proxy_get(world.cp, "/hello")  # the backend gave none: eecp's own
        assert len(undated.headers.get_list("date")) == 1
        assert undated.headers["date"] != ORIGIN_DATE


#: two hosts in the header that names the app: two lines, or one list
TWO_HOSTS = ([("X-Forwarded-Host", "shop.app.example.com"),
              ("X-Forwarded-Host", "nosuch.app.example.com")],
             [("X-Forwarded-Host", "shop.app.example.com, nosuch.app.example.com")])


async def test_a_header_naming_two_hosts_is_refused_alike_by_resolve_and_the_proxy(
        mock_clock: MockClock, world: World) -> None:
    # (the seed's resolve answered for the last line, its proxy routed by the first)
    async with open_backend("one") as (_, server), running_agent(world.agent(server)) as agent, \
            httpx.AsyncClient() as client:
        await agent.wait_status("attested")
        refused = {"allowed": False, "reason": "ambiguous_host"}
        for two in TWO_HOSTS:
            # loopback is a trusted proxy here: its X-Forwarded-Host names the app
            proxied = await client.get(world.cp.proxy_url + "/hello",
                                       headers=[("Host", "eecp-proxy.internal"), *two])
            assert (proxied.status_code, proxied.json()) == (400, refused), two
            for base in (world.cp.auth_url, world.cp.url):
                resolved = await client.get(base + "/v1/resolve", headers=two)
                # resolve's refusal is a 403 (auth_request makes any other status a 500)
                assert (resolved.status_code, resolved.json()) == (403, refused), (base, two)
                assert resolved.headers["x-ee-reason"] == "ambiguous_host"
                resolved = await client.get(base + "/v1/resolve", headers=[
                    (n.replace("Forwarded", "Original"), v) for n, v in two])
                assert (resolved.status_code, resolved.json()) == (403, refused), (base, two)
        twice = await client.get(world.cp.proxy_url + "/hello", headers=[
            ("Host", "shop.app.example.com"), ("X-EE-App", "shop"), ("X-EE-App", "nosuch")])
        assert (twice.status_code, twice.json()) == (400, refused)
        # only the header that counts must name one host
        first = await client.get(world.cp.auth_url + "/v1/resolve", headers=[
            ("X-Original-Host", "shop.app.example.com"), *TWO_HOSTS[0]])
        assert (first.status_code, first.json()["reason"]) == (200, "ok")
    assert [r.path for r in server.requests] == []


async def test_only_a_trusted_proxy_names_the_app(tmp_path: Path, pki: devpki.DevPki,
                                                  mock_clock: MockClock) -> None:
    async with open_world(tmp_path, pki, mock_clock, EE_TRUSTED_PROXIES="none") as world, \
            open_backend("one") as (_, server), running_agent(world.agent(server)) as agent:
        await agent.wait_status("attested")
        # from anybody else, the Host the app is asked for names it
        ignored = await proxy_get(world.cp, "/hello", headers={
            "Host": "shop.app.example.com", "X-EE-App": "nosuch"})
        assert (ignored.status_code, ignored.text) == (200, "hello from one")
        spoofed = await proxy_get(world.cp, "/hello", headers={
            "Host": "nosuch.app.example.com", "X-EE-App": "shop"})
        assert (spoofed.status_code, spoofed.json()) == (
            403, {"allowed": False, "reason": "unknown_app"})
    assert [r.path for r in server.requests] == ["/hello"]


async def test_the_json_proxy_takes_a_bearer_token_once_one_is_set(
        tmp_path: Path, pki: devpki.DevPki, mock_clock: MockClock) -> None:
    async with open_world(tmp_path, pki, mock_clock, EE_PROXY_API_TOKEN="proxy-secret") as world, \
            open_backend("one") as (_, server), running_agent(world.agent(server)) as agent, \
            httpx.AsyncClient() as client:
        await agent.wait_status("attested")
        api = world.cp.url + "/v1/proxy/shop"
        for headers in ({}, {"Authorization": "Bearer wrong"},
                        {"Authorization": "Basic proxy-secret"},
                        {"Authorization": "Bearer admin-secret"},  # the admin's is not it
                        [("Authorization", "Bearer proxy-secret")] * 2):  # one header, once
            refused = await client.post(api, json={"path": "/hello"}, headers=headers)
            assert (refused.status_code, refused.json()) == (
                401, {"allowed": False, "reason": "proxy_token_required"}), headers
            assert refused.headers["www-authenticate"].startswith("Bearer")
        answer = await client.post(api, json={"path": "/hello"},
                                   headers={"Authorization": "Bearer proxy-secret"})
        assert answer.status_code == 200
        assert base64.b64decode(answer.json()["body_b64"]) == b"hello from one"
    assert [r.path for r in server.requests] == ["/hello"]  # refused calls reached nothing


async def json_buffered(cp: ControlPlane) -> float:
    """What ``POST /v1/proxy`` calls hold now (the gauge)."""
    text = (await cp.get("/metrics")).text
    return float(next(line.split()[1] for line in text.splitlines()
                      if line.startswith("eecp_proxy_json_buffered_bytes ")))


async def test_json_proxy_calls_share_a_bounded_buffer(tmp_path: Path, pki: devpki.DevPki,
                                                       mock_clock: MockClock) -> None:
    # 2 MiB for every JSON call at once, one client's calls at most half of it: one 600 KiB
    # answer (800 KiB of base64) fits, a second one of the same client does not
    extra = {"EE_PROXY_JSON_BUFFER_BYTES": str(2 * 1024 * 1024)}
    async with open_world(tmp_path, pki, mock_clock, **extra) as world, \
            open_backend("one") as (backend, server), \
            running_agent(world.agent(server)) as agent, \
            httpx.AsyncClient(timeout=None) as client, trio.open_nursery() as nursery:
        backend.big = random.Random(3).randbytes(600 * 1024)
        await agent.wait_status("attested")
        api = world.cp.url + "/v1/proxy/shop"
        first: list[httpx.Response] = []

        async def hold() -> None:
            first.append(await client.post(api, json={"path": "/half"}))
        nursery.start_soon(hold)
        await backend.entered.wait()  # half the body has left the backend
        async with real_deadline(10):
            while await json_buffered(world.cp) < 400 * 1024:  # and is held by eecp
                pass
        busy = await client.post(api, json={"path": "/big"})
        assert (busy.status_code, busy.json()) == (503, {"allowed": True,
                                                         "reason": "proxy_busy"})
        # another client (as the trusted front proxy on loopback names it) still has its part
        other = await client.post(api, json={"path": "/big"},
                                  headers={"X-Forwarded-For": "203.0.113.9"})
        assert other.status_code == 200, other.text
        async with real_deadline(10):  # its stream was let go: only the first is in flight
            while "eecp_streams_in_flight 1.0" not in (await world.cp.get("/metrics")).text:
                pass
        backend.release.set()
        await eventually(lambda: bool(first))
        assert first[0].status_code == 200
        assert base64.b64decode(first[0].json()["body_b64"]) == backend.big
        async with real_deadline(10):  # its share is back once it has been sent
            while await json_buffered(world.cp) != 0:
                pass
        again = await client.post(api, json={"path": "/big"})
        assert again.status_code == 200, again.text
        # a client that leaves in the middle of an answer gives its share back too
        async with client.stream("POST", api, json={"path": "/big"}) as response:
            assert response.status_code == 200
            await response.aiter_raw().__anext__()
        async with real_deadline(10):
            while await json_buffered(world.cp) != 0:
                pass
        metrics = (await world.cp.get("/metrics")).text
    assert 'eecp_proxy_requests_total{app="shop",status="503"} 1.0' in metrics


async def streamed_answer(client: httpx.AsyncClient, url: str, doc: dict[str, object]
                          ) -> tuple[int, str]:
    """POST ``doc`` to the JSON proxy; the answer's status and the sha256 of its body, read
    piece by piece (so that this client holds no copy of the answer)."""
    digest = hashlib.sha256()
    head, tail, pending = b"", b"", b""
    marker = b'"body_b64":"'
    in_body = False
    async with client.stream("POST", url, json=doc) as response:
        assert response.status_code == 200
        async for piece in response.aiter_raw():
            if tail:
                tail += piece
                continue
            if not in_body:
                head += piece
                if marker not in head:
                    continue
                head, _, piece = head.partition(marker)
                in_body = True
            end = piece.find(b'"')  # never inside base64: the string's end
            if end >= 0:
                piece, tail = piece[:end], piece[end:]
            pending += piece
            whole = len(pending) - len(pending) % 4
            digest.update(base64.b64decode(pending[:whole], validate=True))
            pending = pending[whole:]
    assert pending == b""
    return json.loads(head + b'"body_b64":"' + tail)["status"], digest.hexdigest()


async def test_a_json_answer_is_held_once_not_copied(mock_clock: MockClock,
                                                     world: World) -> None:
    # tracemalloc counts every allocation of the process: eecp, the agent, the backend (whose
    # body is allocated before), this client (which reads the answer piece by piece)
    size = 8 * 1024 * 1024
    async with open_backend("one") as (backend, server), \
            running_agent(world.agent(server)) as agent, \
            httpx.AsyncClient(timeout=None) as client:
        backend.big = random.Random(5).randbytes(size)
        expected = hashlib.sha256(backend.big).hexdigest()
        await agent.wait_status("attested")
        tracemalloc.start()
        try:
            got = await streamed_answer(client, world.cp.url + "/v1/proxy/shop", {"path": "/big"})
            _, peak = tracemalloc.get_traced_memory()
            async with real_deadline(10):
                while await json_buffered(world.cp) != 0:
                    pass
            kept, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert got == (200, expected)
    # the answer is 4/3 of the body (its base64), in one buffer; the seed held 5 bodies' worth
    assert peak < 2.0 * size, f"peak {peak / size:.2f} x the body"
    assert kept < 0.1 * size, f"{kept / size:.2f} x the body stayed"  # and nothing stays


async def test_both_entry_points_share_the_per_client_stream_limit(
        tmp_path: Path, pki: devpki.DevPki, mock_clock: MockClock) -> None:
    # one client's JSON calls count against the same per-(app, client) limit as its requests
    # on the proxy listener (they held every slot through POST /v1/proxy before)
    async with open_world(tmp_path, pki, mock_clock, EE_PROXY_MAX_STREAMS_PER_CLIENT="2"
                          ) as world, open_backend("one") as (backend, server), \
            running_agent(world.agent(server)) as agent, \
            httpx.AsyncClient(timeout=None) as client, trio.open_nursery() as nursery:
        await agent.wait_status("attested")
        api = world.cp.url + "/v1/proxy/shop"
        held: list[httpx.Response] = []

        client_a = {"X-Forwarded-For": "198.51.100.7"}  # as the trusted front proxy names it

        async def hang() -> None:
            held.append(await client.post(api, json={"path": "/hang"}, headers=client_a))
        for _ in range(2):
            nursery.start_soon(hang)
        async with real_deadline(10):
            while "eecp_streams_in_flight 2.0" not in (await world.cp.get("/metrics")).text:
                pass
        third = await client.post(api, json={"path": "/hello"}, headers=client_a)
        assert (third.status_code, third.json()["reason"]) == (429, "client_stream_limit")
        listener = await proxy_get(world.cp, "/hello",
                                   headers={"Host": "shop.app.example.com", **client_a})
        assert (listener.status_code, listener.json()["reason"]) == (429, "client_stream_limit")
        other = await client.post(api, json={"path": "/hello"},
                                  headers={"X-Forwarded-For": "203.0.113.9"})
        assert other.status_code == 200, other.text
        backend.release.set()
        await eventually(lambda: len(held) == 2)
        assert [r.status_code for r in held] == [200, 200]


async def test_a_json_call_whose_body_never_comes_holds_no_budget_and_times_out(
        mock_clock: MockClock, world: World) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", world.cp.bound.control_port)
    async with stream:
        await stream.send_all(b"POST /v1/proxy/shop HTTP/1.1\r\nHost: x\r\nContent-Type: "
                              b"application/json\r\nContent-Length: 1000000\r\n\r\n{\"pa")
        await trio.testing.wait_all_tasks_blocked(0.05)
        assert await json_buffered(world.cp) <= 16  # what arrived, not what was declared
        world.clock.jump(16)  # BODY_TIMEOUT_SEC
        data = b""
        async with real_deadline(10):
            while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
                chunk = await stream.receive_some(65536)
                assert chunk, data
                data += chunk
    assert data.startswith(b"HTTP/1.1 408"), data
    assert b'"body_timeout"' in data
    assert await json_buffered(world.cp) == 0


async def test_a_json_call_naming_two_hosts_is_refused_as_the_listener_refuses_it(
        mock_clock: MockClock, world: World) -> None:
    async with httpx.AsyncClient() as client:
        for headers in ([["Host", "a.example"], ["Host", "b.example"]],
                        [["Host", "a.example, b.example"]]):
            response = await client.post(world.cp.url + "/v1/proxy/shop",
                                         json={"path": "/", "headers": headers})
            assert (response.status_code, response.json()["reason"]) == (400, "ambiguous_host")


@pytest.mark.parametrize(("address", "key"), [
    ("198.51.100.7", "198.51.100.7"),
    ("::ffff:198.51.100.7", "198.51.100.7"),
    ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),  # one /64: one client
    ("fe80::1%eth0", "fe80::/64"),
    ("", ""),
])
def test_a_client_is_its_address_or_its_ipv6_slash_64(address: str, key: str) -> None:
    assert proxy_module.client_key(address) == key


async def test_a_request_whose_client_is_unknown_is_not_counted_per_client(
        tmp_path: Path, pki: devpki.DevPki, mock_clock: MockClock) -> None:
    # from a trusted proxy that names no client (no X-Forwarded-For: loopback here), there is
    # no client to count: the front proxy's own limits are what applies
    async with open_world(tmp_path, pki, mock_clock, EE_PROXY_MAX_STREAMS_PER_CLIENT="2"
                          ) as world, open_backend("one") as (backend, server), \
            running_agent(world.agent(server)) as agent, trio.open_nursery() as nursery:
        await agent.wait_status("attested")
        held: list[httpx.Response] = []

        async def hang() -> None:
            held.append(await proxy_get(world.cp, "/hang"))
        for _ in range(3):
            nursery.start_soon(hang)
        async with real_deadline(10):
            while "eecp_streams_in_flight 3.0" not in (await world.cp.get("/metrics")).text:
                pass
        backend.release.set()
        await eventually(lambda: len(held) == 3)
        assert [r.status_code for r in held] == [200, 200, 200]
